"""The drainer daemon, in real OS processes, against real Postgres (handlers are test handlers here;
tests/test_docker_runtime.py drives the Docker one)."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from switcher import FailureKind, Switcher
from switcher.api import database_url
from switcher.drainer import Backoff, Claim, Drainer, DrainerConfig, LeaseLost
from switcher.drainer.signals import read_signals
from switcher.outbox import RESTART_AGENT, Outbox
from tests import drainers
from tests.conftest import outbox, outbox_rows, restart_rows, wait_for

RL = FailureKind.RATE_LIMIT


def _setup(sw: Switcher, agents: int = 1) -> None:
    for name in "ABCDEFG":
        sw.add_subscription(name, credential_ref=f"env:TOKEN_{name}")
    for i in range(agents):
        sw.add_agent(f"agent{i}", subscription="A")


def _stop(process: drainers.ctx.Process) -> int | None:  # type: ignore[name-defined]
    if process.is_alive():
        process.terminate()
    process.join(60)
    return process.exitcode


def test_notify_wakes_an_idle_drainer_at_once(sw: Switcher, url: str) -> None:
    _setup(sw)
    # Polls once an hour: only the switch's NOTIFY can make it claim within the test's bounds.
    process, events = drainers.start(
        url, "record", poll_interval=timedelta(hours=1), lease=timedelta(hours=1)
    )
    try:
        assert events["listening"].wait(60)
        sw.handle_failure("agent0", "A", RL)
        assert events["handled"].wait(60), "the committed switch woke the drainer"
        wait_for(lambda: restart_rows(sw)[0].status == "done", what="message done")
    finally:
        assert _stop(process) == 0


def test_kill_9_mid_handler_then_another_drainer_completes_after_the_lease(
    sw: Switcher, url: str, tmp_path: Path
) -> None:
    _setup(sw)
    lease = timedelta(seconds=2)
    doomed, doomed_events = drainers.start(url, "block", poll_interval=timedelta(seconds=1), lease=lease)
    survivor = None
    try:
        sw.handle_failure("agent0", "A", RL)
        assert doomed_events["started"].wait(60)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join(30)
        [row] = restart_rows(sw)
        assert row.status == "running", "the dead drainer's lease is still there"

        survivor, events = drainers.start(
            url, "record", tmp_path / "runs", poll_interval=timedelta(seconds=0.2), lease=lease
        )
        assert events["handled"].wait(60), "after the lease ran out, another drainer took the message"
        row = wait_for(lambda: (r := restart_rows(sw)[0]).status == "done" and r, what="message done")
        assert row.attempts == 2 and f":{doomed.pid}:" not in row.leased_by
    finally:
        if survivor is not None:
            assert _stop(survivor) == 0


def test_sigterm_lets_the_running_handler_finish_and_exits_0(sw: Switcher, url: str) -> None:
    _setup(sw)
    process, events = drainers.start(url, "block", poll_interval=timedelta(seconds=1))
    sw.handle_failure("agent0", "A", RL)
    assert events["started"].wait(60)
    process.terminate()  # SIGTERM while the handler is running
    events["release"].set()
    process.join(60)
    assert process.exitcode == 0
    [row] = restart_rows(sw)
    assert (row.status, row.result) == ("done", "released"), "the handler finished and was recorded"
    assert all(r.status != "running" for r in restart_rows(sw)), "no message left leased"


def test_a_handler_that_always_fails_goes_dead_and_can_be_requeued(sw: Switcher, url: str) -> None:
    _setup(sw)
    process, _ = drainers.start(url, "fail", poll_interval=timedelta(seconds=0.2), max_attempts=3)
    try:
        sw.handle_failure("agent0", "A", RL)
        row = wait_for(lambda: (r := restart_rows(sw)[0]).status == "dead" and r, what="dead message")
        assert row.attempts == 3 and "always fails" in row.last_error
    finally:
        assert _stop(process) == 0
    process, events = drainers.start(url, "record", poll_interval=timedelta(seconds=0.2))
    try:
        with outbox(sw) as box:
            assert box.retry([row.id]) == {row.id: "pending"}
        assert events["handled"].wait(60)
        wait_for(lambda: restart_rows(sw)[0].status == "done", what="requeued message done")
    finally:
        assert _stop(process) == 0


def test_the_drainer_survives_losing_its_database_connections(sw: Switcher, url: str) -> None:
    _setup(sw, agents=2)
    engine = create_engine(database_url(url))
    seen: list[int] = []
    handled = threading.Event()

    def record(claim: Claim) -> str:
        seen.append(claim.message.id)
        handled.set()
        return "ok"

    config = DrainerConfig(poll_interval=timedelta(hours=1), backoff=Backoff(timedelta(milliseconds=50)))
    drainer = Drainer(engine, {RESTART_AGENT: record}, config)
    thread = threading.Thread(target=drainer.run)
    thread.start()
    try:
        assert drainer.listening.wait(60)
        sw.handle_failure("agent0", "A", RL)
        assert handled.wait(60)
        handled.clear()
        with sw.engine.connect() as conn:  # the database drops every connection of the drainer
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND datname = current_database()"
                )
            ).scalar_one()
        assert killed >= 2, "the LISTEN connection and a pooled one"
        # Whether the listener is back before the NOTIFY or not, nothing is lost: it wakes the loop
        # on every reconnect, and the loop claims what is due.
        sw.handle_failure("agent1", "A", RL)
        assert handled.wait(60), "after reconnecting, the drainer still hears NOTIFY and claims"
    finally:
        drainer.stop()
        thread.join(60)
        engine.dispose()
    assert len(seen) == 2


def test_switcher_drain_cli_stops_cleanly_on_sigterm(sw: Switcher, url: str) -> None:
    _setup(sw)
    process = subprocess.Popen(
        [sys.executable, "-m", "switcher", "--database-url", url, "drain", "--poll-interval", "0.2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "drainer started" in line:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "drainer stopped" in err


def test_a_host_application_plugs_in_its_own_message_kind(sw: Switcher, url: str) -> None:
    _setup(sw)
    reloaded = threading.Event()

    def hot_reload(claim: Claim) -> str:
        assert claim.message.payload == {"reason": "config changed"}
        reloaded.set()
        return "reloaded"

    engine = create_engine(database_url(url))
    drainer = Drainer(engine, {"hot_reload": hot_reload}, DrainerConfig(poll_interval=timedelta(hours=1)))
    thread = threading.Thread(target=drainer.run)
    thread.start()
    try:
        assert drainer.listening.wait(60)
        with sw.engine.begin() as conn:  # in the host's own transaction
            Outbox(conn).enqueue("hot_reload", "agent0", {"reason": "config changed"})
        assert reloaded.wait(60)
        wait_for(lambda: outbox_rows(sw)[0].result == "reloaded", what="recorded")
    finally:
        drainer.stop()
        thread.join(60)
        engine.dispose()


def test_without_a_database_the_drainer_waits_out_its_reconnect_backoff() -> None:
    """Each failed round waits the delay it logs, housekeeping included (it once retried at once, in a
    tight loop, because housekeeping was overdue)."""
    with socket.socket() as closed:  # a port nobody listens on: every connection is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg://switcher@127.0.0.1:{port}/switcher")
    logged: list[tuple[float, float]] = []  # (when, the delay announced)
    enough = threading.Event()

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("database unavailable"):
                logged.append((time.monotonic(), float(record.args[0])))  # type: ignore[index, arg-type]
                if len(logged) == 4:
                    enough.set()

    handler = Record()
    logging.getLogger("switcher").addHandler(handler)
    config = DrainerConfig(listen=False, reconnect=Backoff(timedelta(milliseconds=50), timedelta(seconds=1)))
    drainer = Drainer(engine, {RESTART_AGENT: lambda claim: "ok"}, config)
    thread = threading.Thread(target=drainer.run)
    thread.start()
    try:
        assert enough.wait(60)
    finally:
        drainer.stop()
        thread.join(60)
        logging.getLogger("switcher").removeHandler(handler)
        engine.dispose()
    for (before, delay), (after, _) in itertools.pairwise(logged[:4]):
        assert after - before >= delay * 0.95, logged


def test_prefetched_messages_wait_for_a_handler_and_are_given_back_on_stop(sw: Switcher, url: str) -> None:
    """With one handler and a prefetch of 2, the drainer holds three messages while one runs; stopping,
    it gives back the two that never started (pending again, the attempt uncounted)."""
    _setup(sw, agents=4)
    for i in range(4):
        sw.handle_failure(f"agent{i}", "A", RL)
    engine = create_engine(database_url(url))
    started: list[int] = []
    running, release = threading.Event(), threading.Event()

    def hold(claim: Claim) -> str:
        started.append(claim.message.id)
        running.set()
        release.wait(60)
        return "ok"

    config = DrainerConfig(concurrency=1, prefetch=2, listen=False, poll_interval=timedelta(hours=1))
    drainer = Drainer(engine, {RESTART_AGENT: hold}, config)
    thread = threading.Thread(target=drainer.run)
    thread.start()
    try:
        assert running.wait(60)
        held = wait_for(lambda: [r for r in restart_rows(sw) if r.status == "running"] or None, what="claims")
        assert len(held) == 3, "one running, two prefetched; the fourth left to other drainers"
        assert all(r.leased_by == config.worker_id for r in held)
        drainer.stop()
        release.set()
    finally:
        release.set()
        thread.join(60)
        engine.dispose()
    rows = {r.id: r for r in restart_rows(sw)}
    assert started and len(started) == 1
    assert rows[started[0]].status == "done"
    pending = [r for r in rows.values() if r.status == "pending"]
    assert len(pending) == 3 and all(r.attempts == 0 for r in pending), pending


def test_a_message_claimed_again_while_its_old_handler_runs_gets_one_handler_at_a_time(
    sw: Switcher, url: str
) -> None:
    """The drainer's lease ran out (say the database was away), another drainer reclaimed the message, and
    this drainer claimed it again while the first handler still ran: no second handler starts beside the
    first, whose next fence fails; the message is delivered afterwards, under a new lease."""
    _setup(sw)
    sw.handle_failure("agent0", "A", RL)
    engine = create_engine(database_url(url))
    leases: list[int] = []
    fences: list[str] = []
    first_running, go_on = threading.Event(), threading.Event()

    def handler(claim: Claim) -> str:
        leases.append(claim.message.lease_no)
        if len(leases) == 1:
            first_running.set()
            go_on.wait(60)
            try:
                claim.fence()
                fences.append("held")
            except LeaseLost:
                fences.append("lost")
                raise
        return "ok"

    config = DrainerConfig(
        concurrency=2, listen=False, poll_interval=timedelta(milliseconds=50), lease=timedelta(seconds=3)
    )
    drainer = Drainer(engine, {RESTART_AGENT: handler}, config)
    thread = threading.Thread(target=drainer.run)
    thread.start()
    try:
        assert first_running.wait(60)
        with outbox(sw) as box:  # its lease runs out and is reclaimed, as by any drainer's housekeeping
            box.conn.execute(text("UPDATE switcher.outbox SET leased_until = now() - interval '1 second'"))
            assert box.reclaim_expired(max_attempts=10) != {}
        wait_for(lambda: lease_no(sw) >= 2, what="the drainer claiming the message again")
        go_on.set()
        wait_for(lambda: [r.status for r in restart_rows(sw)] == ["done"], what="delivery under a new lease")
    finally:
        go_on.set()
        drainer.stop()
        thread.join(60)
        engine.dispose()
    assert fences == ["lost"], "the first handler learns at its fence that it no longer holds the message"
    assert leases[0] == 1 and len(leases) == 2 and leases[1] >= 3, leases


def lease_no(sw: Switcher) -> int:
    with sw.engine.connect() as conn:
        return int(conn.execute(text("SELECT max(lease_no) FROM switcher.outbox")).scalar_one())


def _python(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by a Python of its own: signal handlers and the wake-up fd are per process."""
    return subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60
    )


SIGNAL_INSIDE_THE_WAIT = r"""
import os, signal, sys
from sqlalchemy import create_engine
from switcher.drainer import Drainer

drainer = Drainer(create_engine("postgresql+psycopg://nobody@/nowhere"), {})
drainer.install_signal_handlers()
sent = 0

def signal_at_every_call_inside_the_wait(frame, event, arg):
    global sent
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    if event in ("call", "c_call") and "wait" in names and "note" not in names and sent < 50:
        sent += 1  # "note": the handler itself, which may run at any of these calls
        os.kill(os.getpid(), signal.SIGTERM)

sys.setprofile(signal_at_every_call_inside_the_wait)  # the main thread's, where handlers run
woken = drainer._wake.wait(30)
sys.setprofile(None)
print(woken, sent, drainer.stopping.is_set())
"""


def test_a_sigterm_at_any_instant_of_the_loops_wait_stops_the_drainer() -> None:
    """A signal handler runs between two bytecodes of the main thread: one that set the loop's wake-up
    (a threading.Event) could wait for the lock the waiting loop itself held, and hung the drainer for
    good. Here SIGTERM arrives at every call inside the wait."""
    result = _python(SIGNAL_INSIDE_THE_WAIT)
    woken, sent, stopping = result.stdout.split()
    assert (woken, stopping) == ("True", "True"), result.stderr
    assert int(sent) >= 1


SIGNAL_WHILE_THE_LOOP_IS_BUSY = r"""
import os, signal, threading
from sqlalchemy import create_engine
from switcher.drainer import Drainer, DrainerConfig

drainer = Drainer(create_engine("postgresql+psycopg://nobody@/nowhere"), {}, DrainerConfig(listen=False))
drainer.install_signal_handlers()
busy, release = threading.Event(), threading.Event()

def keep_house():  # a database call that takes its time
    busy.set()
    release.wait(60)

def watch():
    busy.wait(60)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # taken by this thread, not the main one
    print(drainer.stopping.wait(10), flush=True)  # the loop is still inside keep_house
    release.set()

drainer._keep_house = keep_house
threading.Thread(target=watch).start()
drainer.run()
print("returned")
"""


def test_a_sigterm_reaches_the_handlers_while_the_loop_is_busy() -> None:
    """Handlers watch ``stopping`` (to give up waiting for executions, to give prefetched messages back):
    it is set when the signal comes, not when the loop next comes round."""
    result = _python(SIGNAL_WHILE_THE_LOOP_IS_BUSY)
    assert result.stdout.split() == ["True", "returned"], result.stderr


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_only_sigterm_and_sigint_stop_the_drainer(caplog: pytest.LogCaptureFixture, stop: int) -> None:
    """The wake-up fd also carries the signals the host handles itself."""
    drainer = Drainer(create_engine("postgresql+psycopg://nobody@/nowhere"), {})
    reader, writer = os.pipe()
    os.write(writer, bytes([signal.SIGUSR1, signal.SIGCHLD, stop]))
    with caplog.at_level(logging.INFO, logger="switcher.drainer.loop"):
        read_signals(reader, -1, drainer._stop_on_signal)
    os.close(reader)
    os.close(writer)
    assert drainer.stopping.is_set()
    assert f"stopping on {signal.Signals(stop).name}" in caplog.text


SIGNAL_TO_A_FORKED_CHILD = r"""
import multiprocessing, time
from sqlalchemy import create_engine
from switcher.drainer import Drainer

drainer = Drainer(create_engine("postgresql+psycopg://nobody@/nowhere"), {})
drainer.install_signal_handlers()
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
child.start()
child.terminate()
child.join(10)
print(child.exitcode, drainer.stopping.wait(1))
"""


def test_a_sigterm_to_a_forked_child_ends_the_child_not_the_drainer() -> None:
    """The child inherits the wake-up fd and the handlers; its signals must not reach the parent's thread."""
    result = _python(SIGNAL_TO_A_FORKED_CHILD)
    assert result.stdout.split() == [str(-signal.SIGTERM), "False"], result.stderr


SIGNAL_WITH_AN_ASYNCIO_LOOP = r"""
import asyncio, os, signal
from sqlalchemy import create_engine
from switcher.drainer import Drainer

drainer = Drainer(create_engine("postgresql+psycopg://nobody@/nowhere"), {})

async def main():
    hup = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hup.set)  # takes the wake-up fd
    drainer.install_signal_handlers()  # takes it over
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.wait_for(hup.wait(), 10)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: None)  # takes it back
    os.kill(os.getpid(), signal.SIGTERM)
    print(await asyncio.to_thread(drainer.stopping.wait, 10))

asyncio.run(main())
"""


def test_an_asyncio_loops_signal_handlers_and_the_drainers_work_together() -> None:
    result = _python(SIGNAL_WITH_AN_ASYNCIO_LOOP)
    assert result.stdout.split() == ["True"], result.stderr


def test_a_stop_just_before_the_loop_clears_its_wake_up_is_not_slept_through() -> None:
    """The loop clears its wake-up, then looks at ``stopping``: a stop() landing right before the clear
    (a signal's, at the worst instant) ends the loop now, not after a poll interval of an hour."""
    hours = DrainerConfig(listen=False, lease=timedelta(hours=3))  # housekeeping every hour: no early wake
    drainer = Drainer(create_engine("postgresql+psycopg://nobody@/nowhere"), {}, hours)
    drainer._keep_house = drainer._prune = drainer._say_goodbye = lambda: None  # type: ignore[method-assign]
    drainer._claim = lambda executor: 3600.0  # type: ignore[method-assign]

    class StopJustBeforeTheClear(threading.Event):
        def clear(self) -> None:
            drainer.stop()
            super().clear()

    drainer._wake = StopJustBeforeTheClear()
    loop = threading.Thread(target=drainer.run, daemon=True)
    loop.start()
    loop.join(20)
    assert not loop.is_alive(), "the loop slept through a stop"
