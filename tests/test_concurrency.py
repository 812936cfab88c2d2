"""The guarantees that only matter across processes, tested across real OS processes and real Postgres."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import text

from switcher import FailureKind, Outcome, SwitchBusy, Switcher
from tests.conftest import count
from tests.procs import report_async, report_sync, run_together

RL = FailureKind.RATE_LIMIT.value


def _setup(sw: Switcher, subs: dict[str, int | None], agents: dict[str, str]) -> None:
    for i, (name, max_agents) in enumerate(subs.items()):
        sw.add_subscription(name, credential_ref=f"env:TOKEN_{i}", priority=i, max_agents=max_agents)
    for agent, sub in agents.items():
        sw.add_agent(agent, subscription=sub, container=f"agent-{agent}")


def _outcomes(results: list[tuple[str, str | None]]) -> Counter[str]:
    return Counter(outcome for outcome, _ in results)


@pytest.mark.parametrize("reporter", [report_sync, report_async], ids=["sync", "async"])
def test_same_failure_from_many_processes_switches_once(sw: Switcher, url: str, reporter: object) -> None:
    _setup(sw, {"A": None, "B": None}, {"alice": "A"})
    per_process = 1 if reporter is report_sync else 3
    results = run_together(reporter, [(url, [("alice", "A", RL)] * per_process)] * 8)  # type: ignore[arg-type]

    outcomes = _outcomes(results)
    assert outcomes[Outcome.SWITCHED] == 1, f"G1: exactly one of the concurrent reports switches: {outcomes}"
    assert outcomes[Outcome.STALE] == len(results) - 1, f"G1: all the others are stale: {outcomes}"
    assert sw.current_subscription("alice") == "B"
    assert count(sw, "switches") == 1, "G1: exactly one switches row"
    assert count(sw, "outbox", "status = 'pending'") == 1, "G1: exactly one pending restart"
    assert sw.agent("alice").generation == 1


@pytest.mark.parametrize("reporter", [report_sync, report_async], ids=["sync", "async"])
def test_stale_reports_never_cascade(sw: Switcher, url: str, reporter: object) -> None:
    _setup(sw, {"A": None, "B": None, "C": None}, {"alice": "A"})
    per_process = 2 if reporter is report_sync else 4
    results = run_together(reporter, [(url, [("alice", "A", RL)] * per_process)] * 6)  # type: ignore[arg-type]
    late = sw.handle_failure("alice", "A", FailureKind.AUTH, "a late report about A")

    assert _outcomes(results)[Outcome.SWITCHED] == 1
    assert late.outcome is Outcome.STALE and late.new_subscription == "B"
    assert sw.current_subscription("alice") == "B", "G2: reports about A never move the agent past B"
    with sw.engine.connect() as conn:
        moves = conn.execute(
            text(
                "SELECT f.name, t.name FROM switcher.switches s "
                "JOIN switcher.subscriptions f ON f.id = s.from_subscription_id "
                "JOIN switcher.subscriptions t ON t.id = s.to_subscription_id ORDER BY s.id"
            )
        ).all()
    assert [tuple(m) for m in moves] == [("A", "B")], "G2: no A->B->C cascade"


def test_one_agents_held_lock_does_not_block_another_agents_switch(sw: Switcher, url: str) -> None:
    _setup(sw, {"A": None, "B": None}, {"alice": "A", "bob": "A"})
    with sw.engine.connect() as holder:
        holder.begin()
        held = sw.handle_failure("alice", "A", RL, "429", connection=holder)
        assert held.outcome is Outcome.SWITCHED  # alice's row (and her whole switch) stays locked

        # If bob's switch waited on anything alice's open transaction holds, it would end in SwitchBusy.
        [bob] = run_together(report_sync, [(url, [("bob", "A", RL)], 30.0)])
        assert bob == (Outcome.SWITCHED, "B"), "G8: different agents do not serialize on each other"
        holder.commit()
    assert sw.current_subscription("alice") == "B" and sw.current_subscription("bob") == "B"


@pytest.mark.parametrize("reporter", [report_sync, report_async], ids=["sync", "async"])
def test_capacity_holds_under_concurrent_switches_of_different_agents(
    sw: Switcher, url: str, reporter: object
) -> None:
    agents = {f"agent{i:02d}": "A" for i in range(20)}
    _setup(sw, {"A": None, "B": 6, "C": 4}, agents)
    names = list(agents)
    chunks = [[(name, "A", RL) for name in names[i::8]] for i in range(8)]
    results = run_together(reporter, [(url, chunk) for chunk in chunks])  # type: ignore[arg-type]

    loads = {s.name: s.assigned for s in sw.subscriptions()}
    assert loads["B"] <= 6 and loads["C"] <= 4, f"G8: max_agents is never exceeded: {loads}"
    assert loads == {"A": 10, "B": 6, "C": 4}, f"every free slot is used, no more: {loads}"
    outcomes = _outcomes(results)
    assert outcomes == {Outcome.SWITCHED: 10, Outcome.NO_ALTERNATIVE: 10}, outcomes
    assert count(sw, "switches") == 10


def test_no_ping_pong_when_both_subscriptions_fail_within_the_window(sw: Switcher, url: str) -> None:
    _setup(sw, {"A": None, "B": None}, {"alice": "A"})
    first = run_together(report_sync, [(url, [("alice", "A", RL)])] * 4)
    assert _outcomes(first)[Outcome.SWITCHED] == 1
    second = run_together(report_sync, [(url, [("alice", "B", RL)])] * 4)

    assert _outcomes(second)[Outcome.NO_ALTERNATIVE] >= 1
    assert _outcomes(second)[Outcome.SWITCHED] == 0, "G7: A is cooling down, so no switch back"
    assert sw.current_subscription("alice") == "B"
    assert count(sw, "switches") == 1
    assert (
        count(sw, "failures", "subscription_id = (SELECT id FROM switcher.subscriptions WHERE name='B')") >= 1
    )


def test_disabled_auto_switch_records_the_failure_and_does_not_switch(sw: Switcher, url: str) -> None:
    _setup(sw, {"A": None, "B": None}, {"alice": "A"})
    other = Switcher.from_url(url)  # another process's view: settings live in the database
    try:
        other.disable_auto_switch()
        [result] = run_together(report_sync, [(url, [("alice", "A", RL)])])
    finally:
        other.close()

    assert result == (Outcome.DISABLED, "A")
    assert count(sw, "failures") == 1, "G7: failures are recorded even when auto-switch is off"
    assert count(sw, "switches") == 0 and count(sw, "outbox") == 0
    assert sw.current_subscription("alice") == "A"

    sw.enable_auto_switch()
    assert sw.handle_failure("alice", "A", RL).outcome is Outcome.SWITCHED


def test_lock_timeout_raises_switch_busy_and_writes_nothing(sw: Switcher, url: str) -> None:
    _setup(sw, {"A": None, "B": None}, {"alice": "A"})
    with sw.engine.connect() as holder:
        holder.begin()
        sw.handle_failure("alice", "A", RL, "429", connection=holder)
        before = count(sw, "failures")
        [busy] = run_together(report_sync, [(url, [("alice", "A", RL)], 0.2)])
        assert busy[0] == "error:SwitchBusy", f"G6: a bounded wait ends in SwitchBusy, got {busy}"
        assert count(sw, "failures") == before, "the busy call wrote nothing"
        holder.rollback()
    assert sw.current_subscription("alice") == "A"
    assert count(sw, "switches") == 0


def test_switch_busy_in_process(sw: Switcher, url: str) -> None:
    _setup(sw, {"A": None, "B": None}, {"alice": "A"})
    impatient = Switcher.from_url(url, lock_timeout=timedelta(milliseconds=100))
    try:
        with sw.engine.connect() as holder:
            holder.begin()
            holder.execute(text("SELECT 1 FROM switcher.agents WHERE name = 'alice' FOR UPDATE"))
            with pytest.raises(SwitchBusy, match="lock_timeout"):
                impatient.handle_failure("alice", "A", RL)
            holder.rollback()
    finally:
        impatient.close()


def test_a_busy_capacity_limited_alternative_is_skipped_not_waited_for(sw: Switcher, url: str) -> None:
    _setup(sw, {"A": None, "B": 5, "C": 5}, {"alice": "A", "bob": "A"})
    with sw.engine.connect() as holder:
        holder.begin()
        held = sw.handle_failure("alice", "A", RL, "429", connection=holder)
        assert held.new_subscription == "B"  # B's row stays locked until this transaction ends

        [bob] = run_together(report_sync, [(url, [("bob", "A", RL)], 30.0)])
        assert bob == (Outcome.SWITCHED, "C"), "a herd spreads over free alternatives instead of queueing"
        holder.commit()


def test_the_only_alternative_with_capacity_is_waited_for_boundedly(sw: Switcher, url: str) -> None:
    _setup(sw, {"A": None, "B": 5}, {"alice": "A", "bob": "A"})
    with sw.engine.connect() as holder:
        holder.begin()
        sw.handle_failure("alice", "A", RL, "429", connection=holder)
        [busy] = run_together(report_sync, [(url, [("bob", "A", RL)], 0.3)])
        assert busy[0] == "error:SwitchBusy", "capacity requires waiting on B; the wait is bounded"
        holder.commit()
    assert sw.handle_failure("bob", "A", RL).new_subscription == "B"
    assert sw.subscription("B").assigned == 2
