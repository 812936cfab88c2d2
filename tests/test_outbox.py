"""The outbox's claim/lease/complete/retry/dead life cycle, against real Postgres."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from switcher import FailureKind, Switcher
from switcher.drainer import Backoff
from switcher.outbox import NOTIFY_SWITCH, RESTART_AGENT, Message, Outbox
from tests.conftest import outbox, outbox_rows
from tests.procs import run_together

LEASE = timedelta(seconds=30)
KINDS = (RESTART_AGENT, NOTIFY_SWITCH, "hot_reload")
NOW = timedelta(0)


def claim(box: Outbox, worker: str, limit: int = 10, placement: str | None = None) -> list[Any]:
    return box.claim(worker=worker, limit=limit, lease=LEASE, placement=placement, kinds=KINDS)


def fail(box: Outbox, message: Message, error: str, max_attempts: int, delay: timedelta = NOW) -> str | None:
    return box.fail(worker="w", message=message, error=error, delay=delay, max_attempts=max_attempts)


def _agents(sw: Switcher, n: int) -> None:
    sw.add_subscription("A", credential_ref="env:A")
    sw.add_subscription("B", credential_ref="env:B")
    for i in range(n):
        sw.add_agent(f"agent{i}", subscription="A")


def _switch_all(sw: Switcher, n: int) -> None:
    for i in range(n):
        sw.handle_failure(f"agent{i}", "A", FailureKind.RATE_LIMIT)


def _expire_leases(sw: Switcher) -> None:
    """Stand-in for time passing: every running lease ends now."""
    with sw.engine.begin() as conn:
        conn.execute(
            text("UPDATE switcher.outbox SET leased_until = now() - interval '1 s' WHERE status = 'running'")
        )


def test_claim_leases_and_complete_finishes(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with outbox(sw) as box:
        [message] = claim(box, "w1")
        assert (message.agent, message.generation, message.attempts) == ("agent0", 1, 1)
        assert claim(box, "w2") == [], "a leased message is not claimed again"
        assert box.complete(worker="w1", results=[(message, "recreated")]) == {message.id}
    [row] = outbox_rows(sw)
    assert (row.status, row.result, row.leased_by) == ("done", "recreated", "w1")


def _claim_until_empty(barrier: Any, url: str, worker: str) -> list[int]:
    with Switcher.from_url(url) as sw, outbox(sw) as box:
        barrier.wait()
        seen: list[int] = []
        while batch := claim(box, worker, limit=3):
            for message in batch:
                seen.append(message.id)
                box.complete(worker=worker, results=[(message, "ok")])
        return seen


def test_concurrent_drainer_processes_claim_each_message_exactly_once(sw: Switcher, url: str) -> None:
    _agents(sw, 60)
    _switch_all(sw, 60)
    seen = run_together(_claim_until_empty, [(url, f"w{i}") for i in range(4)])
    assert sorted(seen) == [row.id for row in outbox_rows(sw)], "every message claimed exactly once"
    assert {row.status for row in outbox_rows(sw)} == {"done"}


def test_no_claim_while_another_message_of_the_agent_runs(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with sw.engine.begin() as conn:
        Outbox(conn).enqueue("hot_reload", "agent0", {}, generation=1)
    with outbox(sw) as box:
        [first] = claim(box, "w1")  # one per agent per claim
        assert claim(box, "w2") == [], "the agent has a running message"
        box.complete(worker="w1", results=[(first, "ok")])
        [second] = claim(box, "w2")
    assert second.id != first.id


def test_two_running_messages_of_one_agent_are_refused_by_the_database(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with sw.engine.begin() as conn:
        Outbox(conn).enqueue("hot_reload", "agent0", {}, generation=1)
    with pytest.raises(IntegrityError, match="outbox_one_running_idx"), sw.engine.begin() as conn:
        conn.execute(text("UPDATE switcher.outbox SET status = 'running'"))


def test_events_never_coalesce_and_run_beside_the_agents_messages(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with sw.engine.begin() as conn:
        first = Outbox(conn).enqueue(NOTIFY_SWITCH, None, {"switch_id": 1})
        second = Outbox(conn).enqueue(NOTIFY_SWITCH, None, {"switch_id": 2})
    assert first != second, "one event per enqueue"
    with outbox(sw) as box:
        claimed = claim(box, "w1")
    assert sorted(m.kind for m in claimed) == [NOTIFY_SWITCH, NOTIFY_SWITCH, RESTART_AGENT]


def test_a_drainer_claims_only_the_kinds_it_handles(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with outbox(sw) as box:
        assert box.claim(worker="w", limit=5, lease=LEASE, placement=None, kinds=["hot_reload"]) == []
        assert len(box.claim(worker="w", limit=5, lease=LEASE, placement=None, kinds=[RESTART_AGENT])) == 1


def test_placement_decides_which_drainer_claims_an_agents_messages(sw: Switcher) -> None:
    sw.add_subscription("A", credential_ref="env:A")
    sw.add_subscription("B", credential_ref="env:B")
    sw.add_agent("here", subscription="A", placement="host-1")
    sw.add_agent("there", subscription="A", placement="host-2")
    sw.add_agent("nowhere", subscription="A")
    for agent in ("here", "there", "nowhere"):
        sw.handle_failure(agent, "A", FailureKind.AUTH)
    with outbox(sw) as box:
        assert [m.agent for m in claim(box, "w1", placement="host-1")] == ["here"]
        assert [m.agent for m in claim(box, "w2")] == ["nowhere"], "no placement: agents placed nowhere"
        assert [m.agent for m in claim(box, "w3", placement="host-2")] == ["there"]


def test_an_expired_lease_is_reclaimed_and_the_old_holder_cannot_complete(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with outbox(sw) as box:
        [lost] = claim(box, "dead-drainer", limit=1)
        _expire_leases(sw)
        assert box.reclaim_expired(max_attempts=10) == {lost.id: "pending"}
        [again] = claim(box, "w2", limit=1)
        assert again.id == lost.id and again.attempts == 2
        assert box.complete(worker="dead-drainer", results=[(lost, "late")]) == set(), "lease lost"
        assert box.complete(worker="w2", results=[(again, "ok")]) == {again.id}


def test_an_expired_older_message_is_superseded_by_the_newer_pending_one(sw: Switcher) -> None:
    for name in "ABC":
        sw.add_subscription(name, credential_ref=f"env:{name}")
    sw.add_agent("agent0", subscription="A")
    sw.handle_failure("agent0", "A", FailureKind.RATE_LIMIT)
    with outbox(sw) as box:
        [old] = claim(box, "dead-drainer", limit=1)
        sw.handle_failure("agent0", "B", FailureKind.RATE_LIMIT)  # generation 2, a new pending message
        _expire_leases(sw)
        assert box.reclaim_expired(max_attempts=10) == {old.id: "superseded"}
        claimed = claim(box, "w2", limit=5)
    assert [(m.generation, m.attempts) for m in claimed] == [(2, 1)]


def test_a_message_whose_drainer_died_on_its_last_attempt_goes_dead(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with outbox(sw) as box:
        [message] = claim(box, "dead-drainer", limit=1)
        _expire_leases(sw)
        assert box.reclaim_expired(max_attempts=1) == {message.id: "dead"}


def test_a_lease_number_fences_a_holder_that_claimed_the_same_message_again(sw: Switcher) -> None:
    """Its lease ran out, the message was reclaimed, and the same drainer claimed it again: the writes of
    the old claim (its handler may still run) match nothing; the new claim's do."""
    _agents(sw, 1)
    _switch_all(sw, 1)
    with outbox(sw) as box:
        [old] = claim(box, "w", limit=1)
        _expire_leases(sw)
        box.reclaim_expired(max_attempts=10)
        [new] = claim(box, "w", limit=1)
        assert new.id == old.id and new.lease_no == old.lease_no + 1
        assert box.heartbeat(worker="w", leases={old.id: old.lease_no}, lease=LEASE) == set()
        assert box.complete(worker="w", results=[(old, "late")]) == set()
        assert fail(box, old, "late", max_attempts=10) is None
        assert box.release(worker="w", message=old) is None
        assert box.heartbeat(worker="w", leases={new.id: new.lease_no}, lease=LEASE) == {new.id}
        assert box.complete(worker="w", results=[(new, "ok")]) == {new.id}


def test_failures_back_off_then_go_dead_and_can_be_retried(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with outbox(sw) as box:
        [m] = claim(box, "w", limit=1)
        assert fail(box, m, "boom", max_attempts=2, delay=timedelta(hours=1)) == "pending"
        assert claim(box, "w", limit=1) == [], "not due before its backoff"
        box.conn.execute(text("UPDATE switcher.outbox SET available_at = now()"))
        [m] = claim(box, "w", limit=1)
        assert m.attempts == 2
        assert fail(box, m, "boom again", max_attempts=2) == "dead"
        assert box.stats().dead == 1
        [row] = outbox_rows(sw)
        assert (row.status, row.last_error) == ("dead", "boom again")
        assert box.retry([m.id]) == {m.id: "pending"}
        [m] = claim(box, "w", limit=1)
        assert m.attempts == 1, "a retried message gets a full set of attempts"
        assert box.retry([m.id]) == {}, "a running message is not retried"


def test_a_final_failure_goes_dead_at_once(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with outbox(sw) as box:
        [m] = claim(box, "w", limit=1)
        status = box.fail(worker="w", message=m, error="refused", delay=NOW, max_attempts=10, final=True)
    assert status == "dead"


def test_retry_of_several_messages_of_one_agent_brings_back_only_the_newest(sw: Switcher) -> None:
    for name in "ABC":
        sw.add_subscription(name, credential_ref=f"env:{name}")
    sw.add_agent("agent0", subscription="A")
    sw.handle_failure("agent0", "A", FailureKind.RATE_LIMIT)
    with outbox(sw) as box:
        [first] = claim(box, "w")
        assert fail(box, first, "x", max_attempts=1) == "dead"
        sw.handle_failure("agent0", "B", FailureKind.RATE_LIMIT)
        [second] = claim(box, "w")
        assert fail(box, second, "x", max_attempts=1) == "dead"
        statuses = box.retry(all_dead=True)
    assert statuses == {first.id: "superseded", second.id: "pending"}


def test_cancel_withdraws_pending_messages_only(sw: Switcher) -> None:
    _agents(sw, 2)
    _switch_all(sw, 2)
    with outbox(sw) as box:
        [running] = claim(box, "w", limit=1)
        pending = next(r.id for r in outbox_rows(sw) if r.id != running.id)
        assert box.cancel([pending, running.id]) == [pending]
    assert {r.id: r.status for r in outbox_rows(sw)}[pending] == "cancelled"


def test_a_failure_while_a_newer_message_waits_supersedes(sw: Switcher) -> None:
    for name in "ABC":
        sw.add_subscription(name, credential_ref=f"env:{name}")
    sw.add_agent("agent0", subscription="A")
    sw.handle_failure("agent0", "A", FailureKind.RATE_LIMIT)
    with outbox(sw) as box:
        [m] = claim(box, "w", limit=1)
        sw.handle_failure("agent0", "B", FailureKind.RATE_LIMIT)
        assert fail(box, m, "x", max_attempts=5) == "superseded"
        assert box.stats().pending == 1


def test_release_gives_back_a_claim_uncounted(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with outbox(sw) as box:
        [m] = claim(box, "w", limit=1)
        assert box.release(worker="w", message=m) == "pending"
        [again] = claim(box, "w", limit=1)
    assert again.attempts == 1


def test_backoff_grows_exponentially_with_equal_jitter_and_is_capped() -> None:
    backoff = Backoff(timedelta(seconds=1), timedelta(seconds=10))
    for attempts, ceiling in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (30, 10), (10_000, 10)):
        delays = [backoff.delay(attempts).total_seconds() for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), "between half and all of the ceiling"
    assert len({backoff.delay(4) for _ in range(20)}) > 1, "jitter"


def test_the_outbox_payload_names_no_credential(sw: Switcher) -> None:
    _agents(sw, 1)
    sw.update_settings(webhook="env:SWITCHER_CRED_HOOK")
    _switch_all(sw, 1)
    with sw.engine.connect() as conn:
        payloads = conn.execute(text("SELECT payload::text FROM switcher.outbox")).scalars().all()
    assert len(payloads) == 2, "a restart and a notification"
    assert all("env:" not in p and "credential" not in p for p in payloads)


def test_stats_report_backlog(sw: Switcher) -> None:
    _agents(sw, 3)
    _switch_all(sw, 3)
    with outbox(sw) as box:
        s = box.stats()
    assert (s.pending, s.running, s.dead) == (3, 0, 0) and s.oldest_pending_seconds is not None
