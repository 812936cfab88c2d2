"""A switch's work does not grow with the fleet: the buffers it touches, counted by PostgreSQL itself
(EXPLAIN ANALYZE BUFFERS counts every nested statement of the function), are the same at 1,000 and at
20,000 agents. Not a timing test."""

from __future__ import annotations

from sqlalchemy import text

from switcher import Switcher

ALTERNATIVES = 16


def _fleet(sw: Switcher, size: int) -> None:
    """``size`` agents on the failing subscription S0 (set-based; the load triggers count them), then a
    VACUUM, as autovacuum would have done in a running system."""
    with sw.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO switcher.agents (name, subscription_id) "
                "SELECT 'agent' || g, (SELECT id FROM switcher.subscriptions WHERE name = 'S0') "
                "FROM generate_series(1, :size) g ON CONFLICT (name) DO NOTHING"
            ),
            {"size": size},
        )
    with sw.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


def _buffers(sw: Switcher, agent: str) -> int:
    """Shared buffers one switch of ``agent`` touches (hit or read)."""
    with sw.engine.begin() as conn:
        plan = conn.execute(
            text(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM switcher.handle_failure_v2("
                ":report, :agent, 'S0', NULL, 'rate_limit', '429', '3s', false, NULL, "
                "'switcher_outbox', 'restart_agent', 'notify_switch')"
            ),
            {"report": f"report-{agent}", "agent": agent},
        ).scalar_one()
    top = plan[0]["Plan"]
    return int(top["Shared Hit Blocks"] + top["Shared Read Blocks"])


def test_a_switch_reads_no_more_at_20000_agents_than_at_1000(sw: Switcher) -> None:
    for i in range(ALTERNATIVES + 1):
        sw.add_subscription(f"S{i}", credential_ref=f"env:SWITCHER_CRED_S{i}")
    _fleet(sw, 1_000)
    _buffers(sw, "agent1")  # a first call plans the function's statements; not counted
    small = min(_buffers(sw, "agent2"), _buffers(sw, "agent3"))
    _fleet(sw, 20_000)
    _buffers(sw, "agent4")
    large = min(_buffers(sw, "agent5"), _buffers(sw, "agent6"))
    assert large <= small * 1.2 + 10, (
        f"a switch touched {small} buffers with 1,000 agents and {large} with 20,000: "
        "its work must not grow with the fleet"
    )
    loads = {s.name: s.assigned for s in sw.subscriptions()}
    assert loads["S0"] == 20_000 - 6 and sum(loads.values()) == 20_000, "the sharded counters stay exact"
