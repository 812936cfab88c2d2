"""The switch in one process, against real Postgres: transactions, selection, settings, registry."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import URL, create_engine, event, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from switcher import (
    AlreadyExists,
    AsyncSwitcher,
    ByPriority,
    Candidate,
    CapacityExceeded,
    FailureKind,
    LeastLoaded,
    Outcome,
    SwitchBusy,
    Switcher,
)
from switcher.selection import BuiltinPolicy
from switcher.switch import Options, run
from tests.conftest import count, row_counts

RL = FailureKind.RATE_LIMIT


def _two(sw: Switcher) -> None:
    sw.add_subscription("A", credential_ref="env:TOKEN_A")
    sw.add_subscription("B", credential_ref="env:TOKEN_B")
    sw.add_agent("alice", subscription="A", container="agent-alice")


def test_switch_writes_everything_together(sw: Switcher) -> None:
    _two(sw)
    result = sw.handle_failure("alice", "A", RL, "429 Too Many Requests")
    assert result.outcome is Outcome.SWITCHED
    assert (result.old_subscription, result.new_subscription, result.generation) == ("A", "B", 1)
    with sw.engine.connect() as conn:
        failure = conn.execute(text("SELECT kind, message FROM switcher.failures")).one()
        switch_row = conn.execute(text("SELECT kind, generation, reason FROM switcher.switches")).one()
        message = conn.execute(
            text("SELECT id, kind, generation, payload, status FROM switcher.outbox")
        ).one()
    assert tuple(failure) == ("rate_limit", "429 Too Many Requests")
    assert tuple(switch_row) == ("rate_limit", 1, "429 Too Many Requests")
    assert message.id == result.restart_id and message.generation == 1 and message.status == "pending"
    assert message.payload == {"agent": "alice", "container": "agent-alice", "subscription": "B"}
    assert "TOKEN" not in str(message.payload), "G9: no credential (or reference) in the outbox"


def test_caller_transaction_rolled_back_leaves_nothing(sw: Switcher) -> None:
    _two(sw)
    before = row_counts(sw)
    with sw.engine.connect() as conn:
        conn.begin()
        result = sw.handle_failure("alice", "A", RL, "429", connection=conn)
        assert result.outcome is Outcome.SWITCHED
        conn.rollback()
    assert row_counts(sw) == before, "G3: nothing of a rolled-back switch remains"
    assert sw.current_subscription("alice") == "A"


def test_caller_transaction_commits_with_its_own_writes(sw: Switcher) -> None:
    _two(sw)
    with sw.engine.connect() as conn:
        conn.begin()
        conn.execute(text("SET LOCAL lock_timeout = '7s'"))
        conn.execute(text("CREATE TEMP TABLE host_write (x int)"))
        sw.handle_failure("alice", "A", RL, "429", connection=conn)
        assert conn.execute(text("SHOW lock_timeout")).scalar() == "7s", "the caller's setting is restored"
        conn.commit()
    assert sw.current_subscription("alice") == "B"
    assert count(sw, "outbox", "status = 'pending'") == 1


def test_async_caller_transaction_rolled_back_leaves_nothing(sw: Switcher, url: str) -> None:
    _two(sw)
    before = row_counts(sw)

    async def main() -> Outcome:
        asw = AsyncSwitcher.from_url(url)
        try:
            async with asw.engine.connect() as conn:
                await conn.begin()
                result = await asw.handle_failure("alice", "A", RL, "429", connection=conn)
                await conn.rollback()
                return result.outcome
        finally:
            await asw.close()

    assert asyncio.run(main()) is Outcome.SWITCHED
    assert row_counts(sw) == before
    assert sw.current_subscription("alice") == "A"


def test_a_committed_switch_notifies_the_drainers_and_a_rolled_back_one_does_not(
    sw: Switcher, url: str
) -> None:
    _two(sw)
    sw.add_agent("bob", subscription="A")
    with psycopg.connect(url.replace("+psycopg", "", 1), autocommit=True) as listener:
        listener.execute("LISTEN switcher_outbox")
        with sw.engine.connect() as conn:
            conn.begin()
            sw.handle_failure("bob", "A", RL, connection=conn)
            conn.rollback()
        committed = sw.handle_failure("alice", "A", RL)
        notes = list(listener.notifies(timeout=5, stop_after=1))
        # Notifications are delivered in commit order, so the rolled-back one would have come first.
        assert [n.payload for n in notes] == [str(committed.restart_id)]


def test_burst_of_switches_coalesces_into_one_pending_restart(sw: Switcher) -> None:
    for name in "ABCD":
        sw.add_subscription(name, credential_ref=f"env:TOKEN_{name}")
    sw.add_agent("alice", subscription="A")
    first = sw.handle_failure("alice", "A", RL)
    sw.handle_failure("alice", "B", RL)
    last = sw.handle_failure("alice", "C", RL)
    assert last.outcome is Outcome.SWITCHED and last.new_subscription == "D"
    assert last.restart_id == first.restart_id
    with sw.engine.connect() as conn:
        [(generation, payload)] = conn.execute(text("SELECT generation, payload FROM switcher.outbox")).all()
    assert generation == 3 and payload["subscription"] == "D"


def test_policy_least_loaded_then_priority_then_id(sw: Switcher) -> None:
    sw.add_subscription("A", credential_ref="env:A")
    sw.add_subscription("low", credential_ref="env:L", priority=5)
    sw.add_subscription("high", credential_ref="env:H", priority=1)
    sw.add_subscription("busy", credential_ref="env:B", priority=0)
    sw.add_agent("already-there", subscription="busy")
    sw.add_agent("alice", subscription="A")
    sw.add_agent("bob", subscription="A")
    assert sw.handle_failure("alice", "A", RL).new_subscription == "high"
    # high now has one agent, like busy; low has none.
    assert sw.handle_failure("bob", "A", RL).new_subscription == "low"


def test_policy_is_replaceable(sw: Switcher, url: str) -> None:
    sw.add_subscription("A", credential_ref="env:A")
    sw.add_subscription("preferred", credential_ref="env:P", priority=0)
    sw.add_subscription("spare", credential_ref="env:S", priority=9)
    sw.add_agent("x", subscription="preferred")
    sw.add_agent("alice", subscription="A")
    with Switcher.from_url(url, policy=ByPriority()) as by_priority:
        assert by_priority.handle_failure("alice", "A", RL).new_subscription == "preferred"


class Prefer:
    """A policy written in Python: only the named subscriptions, in that order."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def rank(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        by_name = {c.name: c for c in candidates}
        return [by_name[n] for n in self.names if n in by_name]


def test_a_python_policy_ranks_and_can_exclude(sw: Switcher, url: str) -> None:
    for name, priority in (("A", 0), ("best", 0), ("odd", 9)):
        sw.add_subscription(name, credential_ref=f"env:{name.upper()}", priority=priority)
    sw.add_agent("alice", subscription="A")
    sw.add_agent("bob", subscription="A")
    with Switcher.from_url(url, policy=Prefer("odd", "best")) as custom:
        assert custom.handle_failure("alice", "A", RL).new_subscription == "odd"
    with Switcher.from_url(url, policy=Prefer("nonexistent")) as custom:
        assert custom.handle_failure("bob", "A", RL).outcome is Outcome.NO_ALTERNATIVE


@pytest.mark.parametrize("policy", [LeastLoaded(), ByPriority()], ids=lambda p: type(p).__name__)
def test_builtin_policies_rank_in_sql_as_their_python_rank_says(
    sw: Switcher, url: str, policy: BuiltinPolicy
) -> None:
    loads = {"s1": (3, 0), "s2": (1, 5), "s3": (1, 2), "s4": (0, 7), "s5": (2, 1)}  # name: (agents, priority)
    sw.add_subscription("A", credential_ref="env:A")
    for name, (agents, priority) in loads.items():
        sw.add_subscription(name, credential_ref="env:S", priority=priority)
        for i in range(agents):
            sw.add_agent(f"{name}-{i}", subscription=name)
    for i in range(len(loads)):
        sw.add_agent(f"x{i}", subscription="A")
    with Switcher.from_url(url, policy=policy) as chosen_in_sql:
        for i in range(len(loads)):
            subs = {s.name: s for s in sw.subscriptions()}
            candidates = [
                Candidate(i + 1, s.name, s.priority, s.max_agents, s.assigned)
                for i, s in enumerate(subs.values())
                if s.name != "A"
            ]
            expected = policy.rank(candidates)[0].name
            assert chosen_in_sql.handle_failure(f"x{i}", "A", RL).new_subscription == expected


def test_cooldown_window_and_disabled_subscriptions_are_skipped(sw: Switcher) -> None:
    for name in "ABC":
        sw.add_subscription(name, credential_ref=f"env:{name}")
    sw.add_agent("alice", subscription="A")
    sw.add_agent("bob", subscription="B")
    sw.add_agent("carol", subscription="A")
    assert sw.handle_failure("bob", "B", RL).new_subscription in {"A", "C"}
    sw.disable_subscription("C")
    result = sw.handle_failure("alice", "A", RL)
    assert result.outcome is Outcome.NO_ALTERNATIVE, "B is cooling down and C is disabled"

    sw.set_cooldown_window(timedelta(0))
    sw.enable_subscription("C")
    assert sw.settings().cooldown_window == timedelta(0)
    assert sw.handle_failure("carol", "A", RL).outcome is Outcome.SWITCHED


def test_a_switch_never_clears_the_old_subscriptions_failures(sw: Switcher) -> None:
    _two(sw)
    sw.handle_failure("alice", "A", RL)
    assert (
        count(sw, "failures", "subscription_id = (SELECT id FROM switcher.subscriptions WHERE name = 'A')")
        == 1
    )


def test_agent_without_subscription_is_not_subscription_backed(sw: Switcher) -> None:
    sw.add_subscription("A", credential_ref="env:A")
    sw.add_agent("local-model")
    result = sw.handle_failure("local-model", None, RL)
    assert result.outcome is Outcome.NOT_SUBSCRIPTION_BACKED
    assert count(sw, "failures") == 0


def test_snapshot_none_reads_the_current_subscription(sw: Switcher) -> None:
    _two(sw)
    assert sw.handle_failure("alice", None, RL).new_subscription == "B"


def test_assign_respects_capacity_and_enqueues_a_restart(sw: Switcher) -> None:
    sw.add_subscription("A", credential_ref="env:A")
    sw.add_subscription("small", credential_ref="env:S", max_agents=1)
    sw.add_agent("alice", subscription="A")
    sw.add_agent("bob", subscription="small")
    before = row_counts(sw)
    with pytest.raises(CapacityExceeded, match="small"):
        sw.assign("alice", "small")
    with pytest.raises(CapacityExceeded):
        sw.add_agent("carol", subscription="small")
    assert row_counts(sw) == before

    moved = sw.assign("bob", "A")
    assert moved.outcome is Outcome.SWITCHED and moved.restart_id is not None
    assert sw.assign("bob", "A").outcome is Outcome.UNCHANGED
    assert sw.assign("alice", "small").generation == 1


def test_duplicate_names_are_refused(sw: Switcher) -> None:
    _two(sw)
    with pytest.raises(AlreadyExists):
        sw.add_subscription("A", credential_ref="env:OTHER")
    with pytest.raises(AlreadyExists):
        sw.add_agent("alice")
    assert count(sw, "subscriptions") == 2 and count(sw, "agents") == 1


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
def test_deadlocks_and_serialization_failures_are_retried_boundedly(sw: Switcher, sqlstate: str) -> None:
    raise_it = text(f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$")
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            conn.execute(raise_it)
        return "done"

    def always() -> str:
        attempts.append(1)
        conn.execute(raise_it)
        return "never"

    options = Options(max_retries=3)
    with sw.engine.connect() as conn:
        assert run(conn, False, options, flaky) == "done"
        assert len(attempts) == 3
        attempts.clear()
        with pytest.raises(Exception, match="injected"):
            run(conn, False, options, always)
        assert len(attempts) == 4, "one try plus max_retries, then the error surfaces"


def test_migrate_is_idempotent(sw: Switcher) -> None:
    sw.migrate()
    sw.migrate()
    assert sw.settings().auto_switch is True


@pytest.mark.parametrize(
    ("timeout", "spelled"),
    [
        (timedelta(seconds=3), "3s"),
        (timedelta(milliseconds=1500), "1500ms"),
        (timedelta(minutes=2), "2min"),
        (timedelta(hours=1), "1h"),
        (timedelta(microseconds=10), "1ms"),
    ],
)
def test_lock_timeout_is_spelled_as_postgresql_shows_it(
    sw: Switcher, timeout: timedelta, spelled: str
) -> None:
    setting = Options(lock_timeout=timeout).lock_timeout_setting
    assert setting == spelled
    with sw.engine.connect() as conn:
        conn.execute(text("SELECT set_config('lock_timeout', :v, false)"), {"v": setting})
        assert conn.execute(text("SHOW lock_timeout")).scalar() == setting, (
            "so sessions that have it skip SET"
        )


@pytest.mark.parametrize("door", [Switcher, AsyncSwitcher])
@pytest.mark.parametrize("given_in", ["connect_args", "url", "service", "PGOPTIONS"])
def test_from_url_adds_its_lock_timeout_to_the_session_settings_it_was_given(
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    door: type[Switcher] | type[AsyncSwitcher],
    given_in: str,
) -> None:
    """Settings given in connect_args, else in the URL's ``options``, else in ``PGOPTIONS`` still apply
    to both of the door's pools; only lock_timeout is the door's. A service file's apply untouched (the
    switch sets its lock_timeout per transaction: next test)."""
    given = "-c statement_timeout=4321 -c lock_timeout=9s -c idle_in_transaction_session_timeout=8765"
    target, connect_args = make_url(url), {}
    monkeypatch.delenv("PGOPTIONS", raising=False)
    monkeypatch.delenv("PGSERVICE", raising=False)
    if given_in == "connect_args":
        connect_args = {"options": given}
        monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=1")  # replaced, as by libpq
    elif given_in == "url":
        target = target.update_query_dict({"options": given})
        monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=1")
    elif given_in == "service":
        target = _service(target, given, tmp_path, monkeypatch)
        monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=1")  # a service's come first, in libpq
    else:
        monkeypatch.setenv("PGOPTIONS", given)
    query = text(
        "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "
        "current_setting('idle_in_transaction_session_timeout')"
    )
    two_seconds = timedelta(seconds=2)

    async def read_async() -> list[tuple[str, ...]]:
        asw = AsyncSwitcher.from_url(target, lock_timeout=two_seconds, connect_args=connect_args)
        rows = []
        for engine in (asw.engine, asw._autocommit):  # its two pools
            async with engine.connect() as conn:
                rows.append(tuple((await conn.execute(query)).one()))
        await asw.close()
        return rows

    if door is AsyncSwitcher:
        rows = asyncio.run(read_async())
    else:
        rows = []
        with Switcher.from_url(target, lock_timeout=two_seconds, connect_args=connect_args) as sw:
            for engine in (sw.engine, sw._autocommit):
                with engine.connect() as conn:
                    rows.append(tuple(conn.execute(query).one()))
    assert rows == [("9s" if given_in == "service" else "2s", "4321ms", "8765ms")] * 2


def _service(target: URL, options: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> URL:
    """A URL naming a libpq service, in a service file of its own, that connects where ``target`` does
    with ``options``."""
    where = target.set(drivername="postgresql").render_as_string(hide_password=False)
    lines = ["[switcher-test]", *(f"{k}={v}" for k, v in conninfo_to_dict(where).items())]
    (tmp_path / "pg_service.conf").write_text("\n".join([*lines, f"options={options}"]) + "\n")
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "pg_service.conf"))
    return make_url("postgresql:///?service=switcher-test")


UNBOUNDED = "-c lock_timeout=0 -c statement_timeout=10s"
"""Sessions that wait for locks without end (statement_timeout only bounds a failure of the test)."""


@pytest.mark.parametrize("door", [Switcher, AsyncSwitcher])
@pytest.mark.parametrize("sessions", ["service file", "host's engine"])
def test_lock_waits_end_after_the_doors_lock_timeout_whatever_the_sessions_say(
    sw: Switcher, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, door: type, sessions: str
) -> None:
    """A switch ends its wait in SwitchBusy, an operation in a transaction of its own in
    lock_not_available, though their sessions would wait without end."""
    sw.add_subscription("A", credential_ref="env:TOKEN_A")
    sw.add_subscription("B", credential_ref="env:TOKEN_B")
    sw.add_agent("alice", subscription="A")
    monkeypatch.delenv("PGOPTIONS", raising=False)
    monkeypatch.delenv("PGSERVICE", raising=False)
    short = timedelta(milliseconds=200)
    if sessions == "service file":
        target = _service(make_url(url), UNBOUNDED, tmp_path, monkeypatch)
        make: Any = functools.partial(door.from_url, target, lock_timeout=short)
    else:
        engines = {Switcher: create_engine, AsyncSwitcher: create_async_engine}
        engine = engines[door](url, connect_args={"options": UNBOUNDED})
        make = functools.partial(door, engine, lock_timeout=short)

    async def call_async(operation: str, *args: Any) -> None:
        asw = make()
        try:
            await getattr(asw, operation)(*args)
        finally:
            await asw.close()

    def call(operation: str, *args: Any) -> None:
        if door is AsyncSwitcher:
            return asyncio.run(call_async(operation, *args))
        other = make()
        try:
            getattr(other, operation)(*args)
        finally:
            other.close()

    with sw.engine.connect() as holder:
        holder.begin()
        holder.execute(text("SELECT FROM switcher.agents WHERE name = 'alice' FOR UPDATE"))
        with pytest.raises(SwitchBusy, match="lock_timeout"):
            call("handle_failure", "alice", "A", RL)
        with pytest.raises(OperationalError) as refused:
            call("remove_agent", "alice")
        assert isinstance(refused.value.orig, psycopg.errors.LockNotAvailable)
        holder.rollback()
    assert count(sw, "failures") == 0
    assert [a.name for a in sw.agents()] == ["alice"]


@pytest.mark.parametrize("door", [Switcher, AsyncSwitcher])
@pytest.mark.parametrize("watcher", ["listener", "echo"])
def test_a_hosts_statement_listeners_and_sql_log_see_a_reports_statements(
    sw: Switcher, url: str, caplog: pytest.LogCaptureFixture, door: type, watcher: str
) -> None:
    """A report's statements skip SQLAlchemy's execution when nothing watches them (``SqlFile.row``),
    but never hide from a host that does: its cursor listeners and its SQL log see them."""
    _two(sw)
    echo = watcher == "echo"
    engine: Any = (create_engine if door is Switcher else create_async_engine)(url, echo=echo)
    seen: list[str] = []
    if watcher == "listener":
        sync_engine = engine if door is Switcher else engine.sync_engine
        event.listen(sync_engine, "before_cursor_execute", lambda *a: seen.append(a[2]))

    async def report_async() -> Any:
        asw = AsyncSwitcher(engine)
        try:
            return await asw.handle_failure("alice", "A", RL)
        finally:
            await engine.dispose()

    def report() -> Any:
        if door is AsyncSwitcher:
            return asyncio.run(report_async())
        with Switcher(engine) as host:
            return host.handle_failure("alice", "A", RL)

    with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
        assert report().outcome is Outcome.SWITCHED
    if echo:
        seen = [r.getMessage() for r in caplog.records]
    assert any("switcher.handle_failure_v2(" in s for s in seen), "the switch"
    assert any("pg_notify(" in s for s in seen), "the wake-up after it"


class _Deadline(BaseException):
    """What a request deadline raises in some servers (gevent.Timeout, func_timeout): not an Exception."""


def test_a_report_interrupted_mid_statement_does_not_pool_its_connection(sw: Switcher, url: str) -> None:
    """Interrupted by a BaseException while it waits for a lock, a report's connection is mid-statement:
    it is dropped, as SQLAlchemy's execution drops it, and the next report gets a good one."""
    _two(sw)
    sw.add_agent("bob", subscription="A")

    def deadline(*_: object) -> None:
        raise _Deadline()

    def interrupt_once_it_waits() -> None:
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        for _ in range(3000):
            with sw.engine.connect() as conn:  # a transaction per look: the view is a snapshot in one
                if conn.execute(waiting).scalar_one():
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)
                    return
            time.sleep(0.01)

    previous = signal.signal(signal.SIGALRM, deadline)
    long_wait = {"lock_timeout": timedelta(seconds=60), "pool_size": 1, "max_overflow": 0}
    try:
        with Switcher.from_url(url, **long_wait) as door, sw.engine.connect() as holder:
            holder.begin()
            holder.execute(text("SELECT FROM switcher.agents WHERE name = 'alice' FOR UPDATE"))
            threading.Thread(target=interrupt_once_it_waits, daemon=True).start()
            with pytest.raises(_Deadline):
                door.handle_failure("alice", "A", RL)
            holder.rollback()
            assert door.handle_failure("bob", "A", RL).outcome is Outcome.SWITCHED
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_a_report_on_a_pooled_connection_the_driver_closed_reconnects(sw: Switcher, url: str) -> None:
    """A pooled connection that psycopg closed behind SQLAlchemy's back (as after an interrupted
    cancellation) fails when the report makes its cursor: that error too is SQLAlchemy's, the connection
    invalidated and the report retried on a new one."""
    _two(sw)
    with Switcher.from_url(url, pool_size=1, max_overflow=0) as door:
        with door._autocommit.connect() as conn:
            conn.connection.dbapi_connection.close()
        assert door.handle_failure("alice", "A", RL).outcome is Outcome.SWITCHED
