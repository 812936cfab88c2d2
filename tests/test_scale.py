"""A switch's work does not grow with the fleet or its history: the buffers it touches, counted by
PostgreSQL itself (EXPLAIN ANALYZE BUFFERS counts every nested statement of the function), are the same
at 1,000 and at 20,000 agents, and with 20,000 failures on record as with none; and none of it is
compiled by JIT. Not a timing test."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Connection

from switcher import Candidate, FailureKind, Outcome, SelectionPolicy, Switcher
from switcher.demo.runtime import SimulatedRuntime
from switcher.drainer import Drainer
from switcher.outbox import RESTART_AGENT, Message, Outbox
from switcher.testing import PostgresServer

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


SWITCH = (
    "SELECT * FROM switcher.handle_failure_v2(:report, :agent, 'S0', NULL, 'rate_limit', '429', '3s', false, "
    "NULL, 'switcher_outbox', 'restart_agent', 'notify_switch')"
)
ENTER = (
    "SELECT * FROM switcher.enter_execution_v2(:agent, 'test', '1 minute', '1 second', 1, 'restart_agent')"
)


def _buffers(conn: Connection, agent: str, plan_cache_mode: str = "auto", call: str = SWITCH) -> int:
    """Shared buffers one ``call`` (a switch) of ``agent`` touches (hit or read), in ``conn``'s session,
    its statements planned as ``plan_cache_mode`` says."""
    with conn.begin():
        conn.execute(text("SELECT set_config('plan_cache_mode', :mode, true)"), {"mode": plan_cache_mode})
        plan = conn.execute(
            text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {call}"),
            {"report": f"report-{agent}", "agent": agent},
        ).scalar_one()
    top = plan[0]["Plan"]
    return int(top["Shared Hit Blocks"] + top["Shared Read Blocks"])


def test_a_switch_reads_no_more_at_20000_agents_than_at_1000(sw: Switcher) -> None:
    for i in range(ALTERNATIVES + 1):
        sw.add_subscription(f"S{i}", credential_ref=f"env:SWITCHER_CRED_S{i}")
    _fleet(sw, 1_000)
    with sw.engine.connect() as conn:
        _buffers(conn, "agent1")  # a first call plans the function's statements; not counted
        small = min(_buffers(conn, "agent2"), _buffers(conn, "agent3"))
        _fleet(sw, 20_000)
        _buffers(conn, "agent4")
        large = min(_buffers(conn, "agent5"), _buffers(conn, "agent6"))
    assert large <= small * 1.2 + 10, (
        f"a switch touched {small} buffers with 1,000 agents and {large} with 20,000: "
        "its work must not grow with the fleet"
    )
    loads = {s.name: s.assigned for s in sw.subscriptions()}
    assert loads["S0"] == 20_000 - 6 and sum(loads.values()) == 20_000, "the sharded counters stay exact"


def _history(sw: Switcher, size: int, *, analyze: bool = True) -> None:
    """``size`` failures of the alternatives, three days old (past the cooldown window, not yet past
    retention), and as many delivered messages; then, with ``analyze``, a VACUUM ANALYZE."""
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
        conn.execute(
            text(
                "INSERT INTO switcher.outbox (kind, agent_id, generation, status, enqueued_at) "
                "SELECT 'restart_agent', (SELECT min(id) FROM switcher.agents), g, 'done', "
                "now() - interval '3 days' FROM generate_series(1, :size) g"
            ),
            {"size": size},
        )
    if analyze:
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
    with sw.engine.connect() as conn:
        _buffers(conn, "agent1", plan_cache_mode)
        none = min(_buffers(conn, "agent2", plan_cache_mode), _buffers(conn, "agent3", plan_cache_mode))
        _history(sw, 20_000)
        _buffers(conn, "agent4", plan_cache_mode)
        many = min(_buffers(conn, "agent5", plan_cache_mode), _buffers(conn, "agent6", plan_cache_mode))
    assert many <= none * 1.2 + 10, (
        f"a switch touched {none} buffers with no failures on record and {many} with 20,000: "
        "its work must not grow with the history"
    )
    assert {s.name for s in sw.subscriptions() if s.cooling_until is not None} == {"S0"}, (
        "old failures do not keep the alternatives cooling"
    )


def _no_autoanalyze(sw: Switcher) -> None:
    """Autovacuum leaves failures and the outbox alone: an ANALYZE of its own between filling the history
    and measuring would replan the session's statements and hide the trap the test is about. (Before the
    session plans anything: changing a table's options replans the statements that read it.)"""
    with sw.engine.begin() as conn:
        for table in ("failures", "outbox"):
            conn.execute(text(f"ALTER TABLE switcher.{table} SET (autovacuum_enabled = off)"))


def test_a_session_that_planned_on_an_empty_history_reads_no_more_once_it_fills(sw: Switcher) -> None:
    # A pooled session keeps the generic plans it made while failures and the outbox were nearly empty
    # (ANALYZEd so, as autovacuum does after the first 50 rows) until the next ANALYZE. A plan that scans
    # the table would then read the whole history on every switch, and history grows by a row or two
    # per switch, faster than autovacuum looks.
    for i in range(ALTERNATIVES + 1):
        sw.add_subscription(f"S{i}", credential_ref=f"env:SWITCHER_CRED_S{i}")
    _no_autoanalyze(sw)
    _fleet(sw, 1_000)
    with sw.engine.connect() as conn:
        _buffers(conn, "agent1", "force_generic_plan")
        none = min(_buffers(conn, f"agent{i}", "force_generic_plan") for i in (2, 3))
        _history(sw, 20_000, analyze=False)
        many = min(_buffers(conn, f"agent{i}", "force_generic_plan") for i in (4, 5))
    assert many <= none * 1.2 + 10, (
        f"a switch touched {none} buffers with no history and {many} with 20,000 failures and delivered "
        "messages on record, in plans made before they were: its work must not grow with the history"
    )


def test_an_execution_registers_without_reading_the_outbox_history(sw: Switcher) -> None:
    # Every chat and scheduled task registers an execution: it asks whether the agent has a restart
    # pending or running, which must be a probe, not a read of every message kept until retention.
    sw.add_subscription("S0", credential_ref="env:SWITCHER_CRED_S0")
    _fleet(sw, 1_000)
    with sw.engine.connect() as conn:
        _buffers(conn, "agent1", call=ENTER)
        none = min(_buffers(conn, f"agent{i}", call=ENTER) for i in (2, 3))
        _history(sw, 20_000)
        _buffers(conn, "agent4", call=ENTER)
        many = min(_buffers(conn, f"agent{i}", call=ENTER) for i in (5, 6))
    assert many <= none * 1.2 + 10, (
        f"a registration touched {none} buffers with no messages on record and {many} with 20,000"
    )


def test_a_drainer_completes_without_scanning_the_outbox_its_plans_predate(url: str, sw: Switcher) -> None:
    # The same trap on the drainer's side: its completions run as prepared statements, first planned
    # while the outbox was nearly empty, and finished messages are kept until retention purges them.
    sw.add_subscription("A", credential_ref="env:SWITCHER_CRED_A")
    sw.add_agent("agent1", subscription="A")
    _no_autoanalyze(sw)
    with sw.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    drainer = Drainer.from_url(url, runtime=SimulatedRuntime())
    nothing = Message(0, "restart_agent", None, None, 0, {}, 0, 0, datetime.now(UTC))
    try:
        with drainer.engine.connect() as conn:
            for _ in range(20):  # past psycopg's prepare threshold (5), then the server's five custom plans
                Outbox(conn).complete(worker="w", results=[(nothing, "ok")])
            _history(sw, 20_000, analyze=False)
            before = _scanned(conn, "outbox")
            Outbox(conn).complete(worker="w", results=[(nothing, "ok")])
            assert _scanned(conn, "outbox") == before, "a completion scanned the outbox"
    finally:
        drainer.close()


def _scanned(conn: Connection, table: str) -> int:
    """Rows of ``table`` that sequential scans have read so far, ``conn``'s own included: its statistics
    reach the shared view when it goes idle after a forced flush."""
    conn.execute(text("SELECT pg_stat_force_next_flush()"))
    conn.execute(text("SELECT pg_stat_clear_snapshot()"))
    return int(
        conn.execute(
            text("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relid = CAST(:t AS regclass)"),
            {"t": f"switcher.{table}"},
        ).scalar_one()
    )


ENTERED = ("handle_failure_v2", "assign_v2", "eligible_v2", "enqueue_v2", "claim_v2", "enter_execution_v2")
"""The functions a caller enters: enable_seqscan = off (0003) and jit = off (0004)."""


def test_no_statement_inside_the_functions_a_caller_enters_is_compiled_by_jit(
    url: str, switcher_postgres: PostgresServer
) -> None:
    """They set jit = off. With enable_seqscan = off, PostgreSQL 15-17 cost a plan that still scans
    (subscriptions, a few rows) at 1e10, past every JIT threshold: each switch compiled its candidates
    query, 90-105 ms instead of 1 ms (measured on PostgreSQL 15). Here JIT is forced for every plan
    (jit_above_cost = 0) and auto_explain reports each statement as a notice; those that run inside one of
    these functions, nested calls, triggers and foreign key checks included, must not be compiled."""
    explain = (
        "-c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=0 "
        "-c auto_explain.log_nested_statements=on -c auto_explain.log_level=notice -c jit_above_cost=0"
    )
    inside = tuple(f"function switcher.{name}(" for name in ENTERED)
    nested: list[str] = []

    def door(policy: SelectionPolicy | None = None) -> Switcher:
        sw = Switcher.from_url(url, policy=policy, connect_args={"options": explain})
        for engine in (sw.engine, sw._autocommit):
            event.listen(engine, "connect", on_connect)
        return sw

    def on_connect(dbapi_connection: Any, _: Any) -> None:
        def on_notice(notice: Any) -> None:
            if any(frame in (notice.context or "") for frame in inside):
                nested.append(notice.message_primary or "")

        dbapi_connection.add_notice_handler(on_notice)

    class Reversed:  # a policy in Python: the candidates come from the host query `candidates`
        def rank(self, candidates: Sequence[Candidate]) -> list[Candidate]:
            return list(reversed(candidates))

    with door() as sw, door(Reversed()) as python_policy:
        with sw.engine.connect() as conn:
            jit = conn.execute(text("SELECT pg_jit_available()")).scalar()
        if not jit:
            ours = os.environ.get("SWITCHER_TEST_PG_IMAGE", "").startswith("switcher-test/postgres")
            assert not (switcher_postgres.source == "testcontainers" and ours), "the test image has JIT"
            pytest.skip("this server has no JIT (the container tests' PostgreSQL 15 has it)")
        sw.add_subscription("A", credential_ref="env:SWITCHER_CRED_A")
        for name in ("B", "C"):  # capacity-limited: a switch onto them reserves their row
            sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}", max_agents=5)
        sw.add_agent("a1", subscription="A")
        sw.add_agent("a2", subscription="B")
        sw.add_agent("a3", subscription="A")
        nested.clear()  # only what the calls below run
        sw.add_agent("a4", subscription="C")  # reserves C's row, as a switch onto it does
        assert sw.handle_failure("a1", "A", FailureKind.RATE_LIMIT).outcome is Outcome.SWITCHED
        assert sw.assign("a1", "A").outcome is Outcome.SWITCHED
        assert python_policy.handle_failure("a1", "A", FailureKind.AUTH).outcome is Outcome.SWITCHED
        with sw.engine.begin() as conn:
            claimed = Outbox(conn).claim(
                worker="w", limit=10, lease=timedelta(minutes=1), placement=None, kinds=[RESTART_AGENT]
            )
            Outbox(conn).enqueue(RESTART_AGENT, "a2", {"agent": "a2"})
        assert claimed, "the claim found the restart"
        with sw.execution("a3"):  # no restart of its own to wait for
            pass
    assert len(nested) > 20, "auto_explain reported the statements inside the functions"
    compiled = [plan for plan in nested if "JIT:" in plan]
    assert compiled == [], compiled[0]
