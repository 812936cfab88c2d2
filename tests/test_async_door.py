"""The asyncio door's reports, against real PostgreSQL: the same answers and retries as the synchronous
door, SQLAlchemy's errors, and a pool that never keeps a connection a report left broken, half-used or in
the wrong mode."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from sqlalchemy import exc, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from switcher import (
    AsyncSwitcher,
    Candidate,
    FailureKind,
    InvalidInput,
    Outcome,
    SwitchBusy,
    Switcher,
    UnknownAgent,
    UnknownSubscription,
)
from tests.conftest import count, row_counts

RL = FailureKind.RATE_LIMIT
T = TypeVar("T")


def _three(sw: Switcher) -> None:
    for name in ("A", "B", "C"):
        sw.add_subscription(name, credential_ref=f"env:TOKEN_{name}")
    sw.add_agent("alice", subscription="A", container="agent-alice")
    sw.add_agent("bob", subscription="A")


def _run(url: str, body: Callable[[AsyncSwitcher], Awaitable[T]], **options: Any) -> T:
    async def main() -> T:
        async with AsyncSwitcher.from_url(url, **options) as asw:
            return await body(asw)

    return asyncio.run(main())


class LastFirst:
    """A policy written in Python: the candidates in reverse name order."""

    def rank(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        return sorted(candidates, key=lambda c: c.name, reverse=True)


def test_a_report_switches_replays_goes_stale_and_refuses_bad_input(sw: Switcher, url: str) -> None:
    _three(sw)

    async def body(asw: AsyncSwitcher) -> list[Any]:
        first = await asw.handle_failure("alice", "A", RL, "429", report_id="r-1")
        again = await asw.handle_failure("alice", "A", RL, "429", report_id="r-1")
        stale = await asw.handle_failure("alice", "A", RL, "429")
        with pytest.raises(InvalidInput, match="already used by a report of another agent"):
            await asw.handle_failure("bob", "A", RL, report_id="r-1")
        with pytest.raises(UnknownAgent):
            await asw.handle_failure("nobody", "A", RL)
        with pytest.raises(UnknownSubscription):
            await asw.handle_failure("bob", "Z", RL)
        with pytest.raises(InvalidInput, match="kind"):
            await asw.handle_failure("bob", "A", "no-such-kind")
        return [first, again, stale]

    first, again, stale = _run(url, body)
    assert (first.outcome, first.old_subscription, first.new_subscription, first.generation) == (
        Outcome.SWITCHED,
        "A",
        "B",
        1,
    )
    assert again.replayed and (again.outcome, again.new_subscription, again.restart_id) == (
        Outcome.SWITCHED,
        "B",
        first.restart_id,
    )
    assert stale.outcome is Outcome.STALE and stale.new_subscription == "B"
    assert count(sw, "switches") == 1 and count(sw, "failures") == 1, "a visibly stale report writes nothing"
    assert sw.current_subscription("bob") == "A", "the refused and invalid reports wrote nothing"


def test_a_python_policy_ranks_the_candidates_of_a_report(sw: Switcher, url: str) -> None:
    _three(sw)
    result = _run(url, lambda asw: asw.handle_failure("alice", "A", RL), policy=LastFirst())
    assert result.new_subscription == "C", "the policy's first choice, not the least loaded B"


def test_a_report_wakes_the_drainers(sw: Switcher, url: str) -> None:
    _three(sw)
    with psycopg.connect(url.replace("+psycopg", "", 1), autocommit=True) as listener:
        listener.execute("LISTEN switcher_outbox")
        result = _run(url, lambda asw: asw.handle_failure("alice", "A", RL))
        [notice] = list(listener.notifies(timeout=10, stop_after=1))
    assert notice.payload == str(result.restart_id)


def test_a_report_that_waits_too_long_for_the_agents_lock_is_busy_and_writes_nothing(
    sw: Switcher, url: str
) -> None:
    _three(sw)
    before = row_counts(sw)
    with sw.engine.connect() as holder:
        holder.begin()
        holder.execute(text("SELECT FROM switcher.agents WHERE name = 'alice' FOR UPDATE"))
        with pytest.raises(SwitchBusy, match="lock_timeout"):
            _run(
                url,
                lambda asw: asw.handle_failure("alice", "A", RL),
                lock_timeout=timedelta(milliseconds=200),
            )
        holder.rollback()
    assert row_counts(sw) == before


def test_a_report_on_a_connection_the_server_dropped_is_retried_on_a_new_one(sw: Switcher, url: str) -> None:
    """The pooled connection's backend is terminated between two reports: the next report's first attempt
    fails on it, which must invalidate it (or every retry would fail on it again), and the retry switches."""
    _three(sw)

    async def body(asw: AsyncSwitcher) -> tuple[Any, Any, Any]:
        first = await asw.handle_failure("alice", "A", RL)
        async with asw._autocommit.connect() as conn:
            pid = (await conn.get_raw_connection()).driver_connection.info.backend_pid
        with sw.engine.connect() as admin:
            terminated = text("SELECT pg_terminate_backend(:pid, 10000)")  # returns once it has exited
            assert admin.execute(terminated, {"pid": pid}).scalar_one()
        second = await asw.handle_failure("bob", "A", RL)
        async with asw._autocommit.connect() as conn:
            new_pid = (await conn.get_raw_connection()).driver_connection.info.backend_pid
        return first, second, new_pid != pid

    first, second, replaced = _run(url, body, pool_size=1, max_overflow=0)
    assert first.outcome is second.outcome is Outcome.SWITCHED
    assert replaced, "the pool holds a new connection in place of the dropped one"
    assert count(sw, "failures") == 2


def test_a_cancelled_report_leaves_the_pool_usable(sw: Switcher, url: str) -> None:
    """A report cancelled while it waits for a lock (a request timeout): its connection is not returned
    to the pool mid-statement, and the next report on the door's only connection works."""
    _three(sw)

    async def body(asw: AsyncSwitcher) -> Any:
        with sw.engine.connect() as holder:
            holder.begin()
            holder.execute(text("SELECT FROM switcher.agents WHERE name = 'alice' FOR UPDATE"))
            report = asyncio.ensure_future(asw.handle_failure("alice", "A", RL))
            while not _lock_waiters(sw) and not report.done():
                await asyncio.sleep(0.01)  # polling the server for the wait, not timing it
            report.cancel()
            with pytest.raises(asyncio.CancelledError):
                await report
            holder.rollback()
        return await asw.handle_failure("bob", "A", RL)

    assert _run(url, body, pool_size=1, max_overflow=0).outcome is Outcome.SWITCHED
    assert sw.current_subscription("alice") == "A", "the cancelled report did not switch"
    assert count(sw, "failures", "agent_id = (SELECT id FROM switcher.agents WHERE name = 'alice')") == 0


def test_a_report_cancelled_twice_leaves_the_pool_usable(sw: Switcher, url: str) -> None:
    """A second cancellation interrupts psycopg's cancel-and-drain of the first, and psycopg closes the
    connection: SQLAlchemy must invalidate it rather than pool it (from_url's autocommit pool has no
    reset on return that would notice), or every later report on it fails."""
    _three(sw)

    async def body(asw: AsyncSwitcher) -> Any:
        await asw.handle_failure("bob", "A", RL)  # the door's only connection is in the pool
        with sw.engine.connect() as holder:
            holder.begin()
            holder.execute(text("SELECT FROM switcher.agents WHERE name = 'alice' FOR UPDATE"))
            report = asyncio.ensure_future(asw.handle_failure("alice", "A", RL))
            while not _lock_waiters(sw) and not report.done():
                await asyncio.sleep(0.01)
            report.cancel()
            await asyncio.sleep(0)  # psycopg is now cancelling the query on the server
            report.cancel()
            with pytest.raises(asyncio.CancelledError):
                await report
            holder.rollback()
        return [await asw.assign("bob", "C"), await asw.handle_failure("bob", "C", RL)]

    assert [r.outcome for r in _run(url, body, pool_size=1, max_overflow=0)] == [Outcome.SWITCHED] * 2


def test_a_report_on_a_hosts_engine_commits_and_hands_its_connection_back_unchanged(
    sw: Switcher, url: str
) -> None:
    _three(sw)

    async def main() -> tuple[Outcome, str, bool]:
        engine = create_async_engine(make_url(url), pool_size=1, max_overflow=0)
        try:
            result = await AsyncSwitcher(engine).handle_failure("alice", "A", RL)
            async with engine.connect() as conn:
                level = await conn.get_isolation_level()
                autocommit = (await conn.get_raw_connection()).driver_connection.autocommit
            return result.outcome, level, autocommit
        finally:
            await engine.dispose()

    outcome, level, autocommit = asyncio.run(main())
    assert outcome is Outcome.SWITCHED and sw.current_subscription("alice") == "B", "committed"
    assert (level, autocommit) == ("READ COMMITTED", False), "the host's pooled connection is as it was"


def test_errors_of_a_report_are_sqlalchemys(url: str) -> None:
    """As the synchronous door raises them: a database without switcher's schema."""
    bare = make_url(url).set(database="postgres")

    async def main() -> None:
        async with AsyncSwitcher.from_url(bare, hide_parameters=True) as asw:
            await asw.handle_failure("alice", "A", RL, "secret-looking message")

    with pytest.raises(exc.ProgrammingError) as raised:
        asyncio.run(main())
    assert isinstance(raised.value.orig, psycopg.errors.InvalidSchemaName)
    assert "secret-looking" not in str(raised.value), "the engine's hide_parameters is honoured"


def _lock_waiters(sw: Switcher) -> int:
    with sw.engine.connect() as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return int(conn.execute(text(query)).scalar_one())
