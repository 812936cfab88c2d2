"""The outbox's claim/lease/complete/retry/dead life cycle, against real Postgres."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from switcher import FailureKind, InvalidInput, Switcher
from switcher.outbox import Backoff, claim, complete, enqueue, fail, release, requeue, stats, supersede
from tests.conftest import outbox_rows
from tests.procs import run_together

LEASE = timedelta(seconds=30)
NO_WAIT = Backoff(timedelta(0), timedelta(0))


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
    with sw.engine.connect() as conn:
        [message] = claim(conn, worker="w1", limit=10, lease=LEASE)
        assert (message.agent, message.generation, message.attempts) == ("agent0", 1, 1)
        assert claim(conn, worker="w2", limit=10, lease=LEASE) == [], "a leased message is not claimed again"
        assert complete(conn, worker="w1", message_id=message.id, result="recreated")
    [row] = outbox_rows(sw)
    assert (row.status, row.result, row.leased_by) == ("done", "recreated", "w1")


def _claim_until_empty(barrier: Any, url: str, worker: str) -> list[int]:
    with Switcher.from_url(url) as sw, sw.engine.connect() as conn:
        barrier.wait()
        seen: list[int] = []
        while batch := claim(conn, worker=worker, limit=3, lease=LEASE):
            for message in batch:
                seen.append(message.id)
                complete(conn, worker=worker, message_id=message.id, result="ok")
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
        agent_id = conn.execute(text("SELECT id FROM switcher.agents")).scalar_one()
        enqueue(conn, kind="hot_reload", agent_id=agent_id, generation=1, payload={})
    with sw.engine.connect() as conn:
        [first] = claim(conn, worker="w1", limit=10, lease=LEASE)  # one per agent per claim
        assert claim(conn, worker="w2", limit=10, lease=LEASE) == [], "the agent has a running message"
        complete(conn, worker="w1", message_id=first.id, result="ok")
        [second] = claim(conn, worker="w2", limit=10, lease=LEASE)
    assert second.id != first.id


def test_two_running_messages_of_one_agent_are_refused_by_the_database(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with sw.engine.begin() as conn:
        agent_id = conn.execute(text("SELECT id FROM switcher.agents")).scalar_one()
        enqueue(conn, kind="hot_reload", agent_id=agent_id, generation=1, payload={})
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), sw.engine.begin() as conn:
        conn.execute(text("UPDATE switcher.outbox SET status = 'running'"))


def test_an_expired_lease_is_claimed_again_and_the_old_holder_cannot_complete(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with sw.engine.connect() as conn:
        [lost] = claim(conn, worker="dead-drainer", limit=1, lease=LEASE)
        _expire_leases(sw)
        [again] = claim(conn, worker="w2", limit=1, lease=LEASE)
        assert again.id == lost.id and again.attempts == 2
        assert not complete(conn, worker="dead-drainer", message_id=lost.id, result="late"), "lease lost"
        assert complete(conn, worker="w2", message_id=again.id, result="ok")


def test_an_expired_older_message_is_superseded_by_the_newer_pending_one(sw: Switcher) -> None:
    sw.add_subscription("A", credential_ref="env:A")
    sw.add_subscription("B", credential_ref="env:B")
    sw.add_subscription("C", credential_ref="env:C")
    sw.add_agent("agent0", subscription="A")
    sw.handle_failure("agent0", "A", FailureKind.RATE_LIMIT)
    with sw.engine.connect() as conn:
        [old] = claim(conn, worker="dead-drainer", limit=1, lease=LEASE)
        sw.handle_failure("agent0", "B", FailureKind.RATE_LIMIT)  # generation 2, a new pending message
        _expire_leases(sw)
        assert supersede(conn) == 1
        claimed = claim(conn, worker="w2", limit=5, lease=LEASE)
    assert [(m.generation, m.attempts) for m in claimed] == [(2, 1)]
    assert {row.id: row.status for row in outbox_rows(sw)}[old.id] == "superseded"


def test_failures_back_off_then_go_dead_and_can_be_requeued(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    backoff = Backoff(timedelta(hours=1), timedelta(hours=1))
    with sw.engine.connect() as conn:
        [m] = claim(conn, worker="w", limit=1, lease=LEASE)
        assert (
            fail(conn, worker="w", message_id=m.id, error="boom", attempts=1, max_attempts=2, backoff=backoff)
            == "pending"
        )
        assert claim(conn, worker="w", limit=1, lease=LEASE) == [], "not due before its backoff"
        conn.execute(text("UPDATE switcher.outbox SET available_at = now()"))
        conn.commit()
        [m] = claim(conn, worker="w", limit=1, lease=LEASE)
        assert m.attempts == 2
        assert (
            fail(
                conn,
                worker="w",
                message_id=m.id,
                error="boom again",
                attempts=2,
                max_attempts=2,
                backoff=backoff,
            )
            == "dead"
        )
        assert stats(conn).dead == 1
        [row] = outbox_rows(sw)
        assert (row.status, row.last_error) == ("dead", "boom again")
        assert requeue(conn, m.id) == "pending"
        [m] = claim(conn, worker="w", limit=1, lease=LEASE)
        assert m.attempts == 1, "a requeued message gets a full set of attempts"
        with pytest.raises(InvalidInput):
            requeue(conn, m.id)  # running: not requeueable


def test_a_failure_while_a_newer_message_waits_supersedes(sw: Switcher) -> None:
    for name in "ABC":
        sw.add_subscription(name, credential_ref=f"env:{name}")
    sw.add_agent("agent0", subscription="A")
    sw.handle_failure("agent0", "A", FailureKind.RATE_LIMIT)
    with sw.engine.connect() as conn:
        [m] = claim(conn, worker="w", limit=1, lease=LEASE)
        sw.handle_failure("agent0", "B", FailureKind.RATE_LIMIT)
        assert (
            fail(conn, worker="w", message_id=m.id, error="x", attempts=1, max_attempts=5, backoff=NO_WAIT)
            == "superseded"
        )
        assert stats(conn).pending == 1


def test_release_gives_back_a_claim_uncounted(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with sw.engine.connect() as conn:
        [m] = claim(conn, worker="w", limit=1, lease=LEASE)
        assert release(conn, worker="w", message_id=m.id) == "pending"
        [again] = claim(conn, worker="w", limit=1, lease=LEASE)
    assert again.attempts == 1


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    backoff = Backoff(timedelta(seconds=1), timedelta(seconds=10))
    for attempts, ceiling in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (30, 10)):
        delays = [backoff.delay(attempts).total_seconds() for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len({backoff.delay(4) for _ in range(20)}) > 1, "jitter"


def test_the_outbox_payload_names_no_credential(sw: Switcher) -> None:
    _agents(sw, 1)
    _switch_all(sw, 1)
    with sw.engine.connect() as conn:
        payload = conn.execute(text("SELECT payload::text FROM switcher.outbox")).scalar_one()
    assert "env:" not in payload and "credential" not in payload


def test_stats_report_backlog(sw: Switcher) -> None:
    _agents(sw, 3)
    _switch_all(sw, 3)
    with sw.engine.connect() as conn:
        s = stats(conn)
    assert (s.pending, s.running, s.dead) == (3, 0, 0) and s.oldest_pending_seconds is not None
