"""D3 drain-aware restart, across processes: executions held in other OS processes hold up a recreate of
the real container, new executions wait at the closed gate (then ``AgentRestarting``), a dead holder's
execution expires after its ttl, the drain timeout bounds the wait, and an execution's snapshot is what
its failure reports carry."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from switcher import AsyncSwitcher, FailureKind, Outcome, Switcher
from switcher.drainer import Backoff, Drainer, DrainerConfig
from switcher.errors import AgentRestarting
from switcher.registry import GATE_LOCK_CLASS
from switcher.runtime import Delivery, Runtime
from switcher.runtime.docker import DockerConfig
from tests.conftest import restart_rows, wait_for
from tests.drainers import ctx

pytestmark = pytest.mark.docker
RL = FailureKind.RATE_LIMIT
SECRETS = {f"SWITCHER_CRED_{name}": f"secret-{name.lower()}-gate" for name in "ABC"}
RECREATE = DockerConfig(stop_timeout=timedelta(seconds=2), mode="recreate")
WAIT = 60.0  # a bound on failure, never a timing check


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _setup(sw: Switcher, container: str | None) -> None:
    for name in "ABC":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}", priority=ord(name))
    sw.add_agent("alice", subscription="A", container=container)


# -- process bodies (spawned: importable, arguments picklable) ---------------------------------------------


def hold_execution(url: str, agent: str, ttl: float, entered: Any, release: Any, out: Any) -> None:
    """Hold one execution of ``agent`` open until ``release`` is set (or this process is killed)."""
    with Switcher.from_url(url) as sw, sw.execution(agent, ttl=timedelta(seconds=ttl)) as ex:
        out.put(("entered", ex.subscription, ex.generation))
        entered.set()
        release.wait(600)
    out.put(("left",))


def try_execution(url: str, agent: str, gate_timeout: float, out: Any) -> None:
    """Try to start an execution of ``agent``; report what happened and how long it took."""
    with Switcher.from_url(url) as sw:
        sw.settings()  # connected before the clock starts
        started = time.monotonic()
        try:
            with sw.execution(agent, gate_timeout=timedelta(seconds=gate_timeout)) as ex:
                out.put(("entered", ex.subscription, ex.generation, time.monotonic() - started))
        except AgentRestarting as error:
            out.put(("restarting", str(error), time.monotonic() - started))


@contextlib.contextmanager
def holder(url: str, agent: str = "alice", ttl: float = 60.0) -> Iterator[tuple[Any, Any, Any]]:
    """A process holding an execution of ``agent`` open; yields (process, release event, output queue)."""
    entered, release, out = ctx.Event(), ctx.Event(), ctx.Queue()
    process = ctx.Process(target=hold_execution, args=(url, agent, ttl, entered, release, out))
    process.start()
    try:
        assert entered.wait(WAIT), "the holder process entered its execution"
        yield process, release, out
    finally:
        if process.is_alive():  # never set an Event a killed process was waiting on: that set would hang
            release.set()
        process.join(WAIT)
        if process.is_alive():
            process.kill()
            process.join(WAIT)


# -- a drainer, in a thread of this process (so its metrics can be read here) -------------------------------


class Applied:
    """A runtime for agents without a container: records each delivery as applied, at once."""

    def apply(self, delivery: Delivery) -> str:
        delivery.applied()
        return "applied"


@contextlib.contextmanager
def drainer(url: str, drain_timeout: timedelta, runtime: Runtime | None = None) -> Iterator[Drainer]:
    """A real drainer recreating real containers (or delivering through ``runtime``)."""
    config = DrainerConfig(
        poll_interval=timedelta(seconds=0.2),
        backoff=Backoff(timedelta(milliseconds=50), timedelta(seconds=1)),
        lease=timedelta(seconds=30),
    )
    drainer = Drainer.from_url(
        url, config=config, docker=RECREATE, runtime=runtime, drain_timeout=drain_timeout
    )
    thread = threading.Thread(target=drainer.run, name="test-drainer")
    thread.start()
    try:
        yield drainer
    finally:
        drainer.stop()
        thread.join(WAIT)
        drainer.close()
        assert not thread.is_alive(), "the drainer stopped"


def gate_closed(sw: Switcher, agent: str = "alice") -> bool:
    """True while a drainer holds the agent's restart gate (the advisory lock, in this database)."""
    with sw.engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks l JOIN switcher.agents a ON l.objid = a.id % 2147483648 "
                    "WHERE a.name = :agent AND l.locktype = 'advisory' AND l.classid = :gate "
                    "AND l.objsubid = 2 AND l.mode = 'ExclusiveLock' AND l.granted "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"agent": agent, "gate": GATE_LOCK_CLASS},
            ).scalar_one()
        )


def live_executions(sw: Switcher) -> int:
    with sw.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM switcher.executions WHERE expires_at > now()")
            ).scalar_one()
        )


def _restart(sw: Switcher) -> Any:
    [row] = restart_rows(sw)
    return row


def _done(sw: Switcher) -> Any:
    return wait_for(lambda: (r := _restart(sw)).status == "done" and r, timeout=WAIT, what="restart done")


def _settled(sw: Switcher) -> None:
    """Wait until every restart message is finished: the agent's assignment is delivered."""
    wait_for(
        lambda: all(r.status in ("done", "superseded") for r in restart_rows(sw)),
        timeout=WAIT,
        what="the assignment delivered",
    )


def _draining(sw: Switcher) -> None:
    """Wait until the drainer is demonstrably delivering (row running) and waiting at the closed gate."""
    wait_for(lambda: _restart(sw).status == "running", timeout=WAIT, what="the drainer claimed the restart")
    wait_for(lambda: gate_closed(sw), timeout=WAIT, what="the drainer closed the gate and drains")


def _untouched(docker_client: Any, container: Any) -> None:
    found = docker_client.containers.list(all=True, filters={"id": container.id})
    now = found[0] if found else None
    assert now is not None and now.name == container.name and now.status == "running", (
        "D3: while an execution lives, the container is neither stopped nor replaced"
    )


def _drain_waits(outcome: str) -> tuple[float, float]:
    labels = {"outcome": outcome}
    count = REGISTRY.get_sample_value("switcher_drain_wait_seconds_count", labels) or 0.0
    total = REGISTRY.get_sample_value("switcher_drain_wait_seconds_sum", labels) or 0.0
    return count, total


# -- the tests ---------------------------------------------------------------------------------------------


def test_a_live_execution_in_another_process_holds_up_the_recreate_until_it_ends(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    container = agent_container("agent-alice")
    _setup(sw, container.name)
    with holder(url) as (process, release, out):
        assert out.get(timeout=WAIT) == ("entered", "A", 0)
        sw.handle_failure("alice", "A", RL, "429")
        with drainer(url, drain_timeout=timedelta(minutes=10)):
            _draining(sw)
            # A window of several drain polls (they back off to 0.5 s): nothing moves while it lives.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                _untouched(docker_client, container)
                assert _restart(sw).status == "running", "D3: the restart waits for the execution"
                time.sleep(0.2)

            release.set()  # the execution ends
            row = _done(sw)
            assert out.get(timeout=WAIT) == ("left",)
        process.join(WAIT)
        assert process.exitcode == 0
    assert row.result == "recreated", f"D3: once the execution ended, the recreate ran: {row}"
    new = docker_client.containers.get(container.name)
    assert new.id != container.id and new.status == "running"
    assert new.labels["switcher.subscription"] == "B"
    assert not gate_closed(sw), "the gate is open again"


def test_a_new_execution_waits_at_the_closed_gate_then_raises_agent_restarting(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    container = agent_container("agent-alice")
    _setup(sw, container.name)
    with holder(url) as (_, release, _out):
        sw.handle_failure("alice", "A", RL, "429")
        with drainer(url, drain_timeout=timedelta(minutes=10)):
            _draining(sw)  # the old execution keeps the drainer in its drain wait, the gate closed
            out = ctx.Queue()
            latecomer = ctx.Process(target=try_execution, args=(url, "alice", 1.0, out))
            latecomer.start()
            outcome, message, waited = out.get(timeout=WAIT)
            latecomer.join(WAIT)
            assert latecomer.exitcode == 0
            assert outcome == "restarting", (
                f"D3: an execution during the restart raises AgentRestarting: {message}"
            )
            assert "being restarted" in message and "gate_timeout" in message, f"a clear message: {message}"
            assert waited >= 0.95, f"D3: it waited its gate_timeout (1 s) first, not {waited:.2f} s"
            assert waited < 30, f"D3: and not much longer ({waited:.2f} s)"
            assert gate_closed(sw), "the restart was still draining meanwhile"
            _untouched(docker_client, container)

            release.set()
            row = _done(sw)
    assert row.result == "recreated"
    with sw.execution("alice", gate_timeout=timedelta(seconds=30)) as ex:
        assert (ex.subscription, ex.generation) == ("B", 1), "after the restart, executions enter again"


def test_a_killed_holders_execution_expires_after_its_ttl_and_the_restart_proceeds(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    container = agent_container("agent-alice")
    _setup(sw, container.name)
    drained_before, _ = _drain_waits("drained")
    timed_out_before, _ = _drain_waits("timed_out")
    with holder(url, ttl=3.0) as (process, _release, _out):
        sw.handle_failure("alice", "A", RL, "429")
        # The drain timeout is far beyond this test's bounds: only the execution's expiry can free it.
        with drainer(url, drain_timeout=timedelta(minutes=10)):
            _draining(sw)
            _untouched(docker_client, container)
            assert live_executions(sw) == 1, "the holder's execution is live (renewed every ttl/3)"
            os.kill(process.pid, signal.SIGKILL)
            process.join(WAIT)
            assert process.exitcode == -signal.SIGKILL
            row = _done(sw)
    assert row.result == "recreated", f"D3: the dead holder's execution expired and the restart ran: {row}"
    assert docker_client.containers.get(container.name).id != container.id
    assert live_executions(sw) == 0, "D3: the killed holder's execution expired"
    assert _drain_waits("drained")[0] == drained_before + 1, "D3: the drain ended because nothing was live"
    assert _drain_waits("timed_out")[0] == timed_out_before, "D3: not because of the drain timeout"


def test_the_drain_timeout_bounds_the_wait_for_an_execution_that_never_ends(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    container = agent_container("agent-alice")
    _setup(sw, container.name)
    drain_timeout = 2.0
    count_before, sum_before = _drain_waits("timed_out")
    with holder(url, ttl=600.0) as (process, _release, _out):
        sw.handle_failure("alice", "A", RL, "429")
        with drainer(url, drain_timeout=timedelta(seconds=drain_timeout)):
            wait_for(lambda: _restart(sw).status == "running", timeout=WAIT, what="the drainer claimed it")
            row = _done(sw)
        assert process.is_alive() and live_executions(sw) == 1, "the execution is still live"
    assert row.result == "recreated", f"D3: after the drain timeout the recreate proceeds anyway: {row}"
    assert docker_client.containers.get(container.name).id != container.id
    count, total = _drain_waits("timed_out")
    waited = total - sum_before
    assert count == count_before + 1, "D3: the timed-out drain is counted"
    assert drain_timeout <= waited <= drain_timeout + 10, (
        f"D3: the recreate waited the drain timeout ({drain_timeout} s), then proceeded; not {waited:.2f} s"
    )


def test_an_execution_reports_with_its_snapshot_and_an_older_generation_is_stale(
    sw: Switcher, url: str
) -> None:
    _setup(sw, None)
    # Assignments are delivered as they happen (the agent has no container), so that no execution below
    # starts while a restart is pending.
    with drainer(url, timedelta(minutes=1), runtime=Applied()):
        with sw.execution("alice") as old:
            assert (old.subscription, old.generation) == ("A", 0), "the snapshot is the agent's assignment"
            assert sw.assign("alice", "B").generation == 1
            back = sw.assign("alice", "A")
            assert (sw.current_subscription("alice"), back.generation) == ("A", 2), "alice is back on A"

            stale = old.report_failure(RL, "429 from the first stint on A")
            assert stale.outcome is Outcome.STALE, (
                f"G2/D3: a report from generation 0 is stale, though alice is on A again: {stale}"
            )
            assert sw.current_subscription("alice") == "A", "and it moved nothing"

        _settled(sw)
        with sw.execution("alice") as ex:
            assert (ex.subscription, ex.generation) == ("A", 2), "a new execution runs under the current one"
            result = ex.report_failure(RL, "429")
    assert result.outcome is Outcome.SWITCHED, f"D3: a report with the current snapshot switches: {result}"
    assert (result.old_subscription, result.generation) == ("A", 3)
    assert sw.current_subscription("alice") == result.new_subscription != "A"


def test_the_async_door_reports_with_its_snapshot(sw: Switcher, url: str) -> None:
    _setup(sw, None)

    async def main() -> tuple[Any, Any, tuple[str | None, int]]:
        asw = AsyncSwitcher.from_url(url)
        try:
            async with asw.execution("alice") as old:
                snapshot = (old.subscription, old.generation)
                await asw.assign("alice", "B")
                await asw.assign("alice", "A")
                stale = await old.report_failure(FailureKind.AUTH, "401 from an earlier generation")
            await asyncio.to_thread(_settled, sw)
            async with asw.execution("alice") as ex:
                switched = await ex.report_failure(FailureKind.AUTH, "401")
        finally:
            await asw.close()
        return stale, switched, snapshot

    with drainer(url, timedelta(minutes=1), runtime=Applied()):
        stale, switched, snapshot = asyncio.run(main())
    assert snapshot == ("A", 0), "async execution: the snapshot is the agent's assignment"
    assert stale.outcome is Outcome.STALE, f"async: a report from an older generation is stale: {stale}"
    assert switched.outcome is Outcome.SWITCHED and switched.old_subscription == "A", (
        f"async: a report with the current snapshot switches: {switched}"
    )
    assert sw.current_subscription("alice") == switched.new_subscription
