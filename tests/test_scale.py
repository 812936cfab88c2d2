"""A switch's work does not grow with the fleet or its history: the buffers it touches, counted by
PostgreSQL itself (EXPLAIN ANALYZE BUFFERS counts every nested statement of the function), are the same
at 1,000 and at 20,000 agents, and with 20,000 failures on record as with none. Not a timing test."""

from __future__ import annotations

import pytest
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


def _buffers(sw: Switcher, agent: str, plan_cache_mode: str = "auto") -> int:
    """Shared buffers one switch of ``agent`` touches (hit or read), its statements planned as
    ``plan_cache_mode`` says."""
    with sw.engine.begin() as conn:
        conn.execute(text("SELECT set_config('plan_cache_mode', :mode, true)"), {"mode": plan_cache_mode})
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


def _history(sw: Switcher, size: int) -> None:
    """``size`` failures of the alternatives, three days old (past the cooldown window, not yet past
    retention), then a VACUUM ANALYZE."""
    with sw.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO switcher.failures (agent_id, subscription_id, kind, message, occurred_at, "
                "report_id, outcome) "
                "SELECT (SELECT min(id) FROM switcher.agents), s.id, 'rate_limit', '429', "
                "now() - interval '3 days', 'old-' || s.id || '-' || g, 'no_alternative' "
                "FROM switcher.subscriptions s, generate_series(1, :per) g WHERE s.name <> 'S0'"
            ),
            {"per": size // ALTERNATIVES},
        )
    with sw.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_a_switch_reads_no_more_with_20000_failures_on_record_than_with_none(
    sw: Switcher, plan_cache_mode: str
) -> None:
    # History is kept for weeks (retention): the cooldown test must stay a probe of each candidate's
    # recent failures, in a plan made for the arguments and in one made without them (generic).
    for i in range(ALTERNATIVES + 1):
        sw.add_subscription(f"S{i}", credential_ref=f"env:SWITCHER_CRED_S{i}")
    _fleet(sw, 1_000)
    _buffers(sw, "agent1", plan_cache_mode)
    none = min(_buffers(sw, "agent2", plan_cache_mode), _buffers(sw, "agent3", plan_cache_mode))
    _history(sw, 20_000)
    _buffers(sw, "agent4", plan_cache_mode)
    many = min(_buffers(sw, "agent5", plan_cache_mode), _buffers(sw, "agent6", plan_cache_mode))
    assert many <= none * 1.2 + 10, (
        f"a switch touched {none} buffers with no failures on record and {many} with 20,000: "
        "its work must not grow with the history"
    )
    assert {s.name for s in sw.subscriptions() if s.cooling_until is not None} == {"S0"}, (
        "old failures do not keep the alternatives cooling"
    )
