"""The outbox drainer: runs each committed message's handler, after commit, at least once.

Any number of drainers, on any number of hosts, can share one database:

* a dedicated autocommit connection ``LISTEN``s on the switch's ``NOTIFY`` and wakes the loop at
  once; polling every ``poll_interval`` is the fallback (notifications sent while disconnected are
  lost, so the listener also wakes the loop after every reconnect);
* claims lease messages (``FOR UPDATE SKIP LOCKED``), at most one per agent, never while another
  message of that agent runs; leases of running handlers are renewed every ``lease / 3``, so a
  drainer that dies (kill -9, lost host) gives its messages back after at most ``lease``;
* up to ``concurrency`` handlers run at once, in threads, outside any transaction; a failure is
  retried with exponential backoff and jitter, and moves the message to ``dead`` after
  ``max_attempts``, where ``switcher outbox retry`` (``outbox.requeue``) brings it back;
* the database may go away: claims, completions and the listener retry with backoff until it is back;
* ``stop()`` (SIGTERM/SIGINT with ``install_signal_handlers``) stops claiming, gives back messages
  whose handler has not started, and waits up to ``shutdown_timeout`` for running handlers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from typing import TypeVar

import psycopg
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import outbox
from .handlers import Handlers
from .outbox import NOTIFY_CHANNEL, Backoff, Message, OutboxStats

log = logging.getLogger(__name__)
T = TypeVar("T")

HANDLER_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class DrainerConfig:
    worker_id: str = field(default_factory=default_worker_id)
    concurrency: int = 4
    poll_interval: timedelta = timedelta(seconds=5)
    lease: timedelta = timedelta(seconds=30)
    """How long a claim lasts without renewal; a dead drainer's messages come back after this."""
    max_attempts: int = 10
    backoff: Backoff = field(default_factory=Backoff)
    shutdown_timeout: timedelta = timedelta(seconds=30)
    listen: bool = True
    """LISTEN for NOTIFY. Off, the drainer only polls (e.g. behind a transaction-pooling proxy that
    cannot hold a LISTEN session)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be at least 1")
        if self.lease < timedelta(seconds=1) or self.poll_interval <= timedelta(0):
            raise ValueError("lease must be at least 1 s and poll_interval above 0")


@dataclass
class DrainerMetrics:
    """Counters since start, safe to read from any thread (``snapshot``)."""

    claimed: int = 0
    done: int = 0
    retried: int = 0
    dead: int = 0
    superseded: int = 0
    lost_leases: int = 0
    handler_seconds_sum: float = 0.0
    handler_seconds_count: int = 0
    handler_seconds_buckets: list[int] = field(default_factory=lambda: [0] * len(HANDLER_SECONDS_BUCKETS))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def observe_handler(self, seconds: float) -> None:
        with self._lock:
            self.handler_seconds_sum += seconds
            self.handler_seconds_count += 1
            for i, bound in enumerate(HANDLER_SECONDS_BUCKETS):
                if seconds <= bound:
                    self.handler_seconds_buckets[i] += 1

    def snapshot(self) -> DrainerMetrics:
        """A consistent copy. Buckets are cumulative: ``handler_seconds_buckets[i]`` counts runs of at
        most ``HANDLER_SECONDS_BUCKETS[i]`` seconds."""
        with self._lock:
            return replace(self, handler_seconds_buckets=list(self.handler_seconds_buckets))


class Drainer:
    def __init__(self, engine: Engine, handlers: Handlers, config: DrainerConfig | None = None) -> None:
        # Every outbox write is a single statement: autocommit saves a BEGIN and a COMMIT round trip each.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.handlers = dict(handlers)
        self.config = config or DrainerConfig()
        self.metrics = DrainerMetrics()
        self.listening = threading.Event()
        """Set while the LISTEN connection is up (tests and health checks wait on it)."""
        self._stopping = threading.Event()
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._inflight: dict[int, Future[None]] = {}  # claimed, handler not finished
        self._started: set[int] = set()  # handler started, completion not yet written: leases to renew
        self._finished: dict[int, tuple[Message, str]] = {}  # handler returned, waiting for the acker
        self._finished_ready = threading.Event()
        self._lock = threading.Lock()

    # -- control ---------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._on_signal(signum))

    def _on_signal(self, signum: int) -> None:
        log.info("stopping on %s", signal.Signals(signum).name, extra={"worker": self.config.worker_id})
        self.stop()

    def backlog(self) -> OutboxStats:
        with self.engine.connect() as conn:
            return outbox.stats(conn)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> bool:
        """Drain until ``stop()``. True when every started handler finished before returning."""
        cfg = self.config
        log.info("drainer started", extra={"worker": cfg.worker_id, "concurrency": cfg.concurrency})
        listener = threading.Thread(target=self._listen, name="switcher-listen", daemon=True)
        if cfg.listen:
            listener.start()
        executor = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="switcher-handler")
        acker = threading.Thread(target=self._acknowledge, name="switcher-ack")
        acker.start()
        next_housekeeping = time.monotonic()
        failures = 0
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    if time.monotonic() >= next_housekeeping:
                        self._housekeeping()
                        next_housekeeping = time.monotonic() + cfg.lease.total_seconds() / 3
                    wait = self._claim_and_submit(executor)
                    failures = 0
                except DBAPIError as error:
                    failures += 1
                    wait = cfg.backoff.delay(failures).total_seconds()
                    log.warning("database unavailable, retrying in %.1f s: %s", wait, error.orig)
                with self._lock:
                    renewing = bool(self._started)
                if renewing:
                    wait = min(wait, max(0.0, next_housekeeping - time.monotonic()))
                self._wake.wait(wait)
        finally:
            clean = self._shut_down(executor)
            self._closing.set()  # the acker writes what has finished, then ends
            self._finished_ready.set()
            acker.join()
            if listener.is_alive():
                listener.join(timeout=5)
        log.info("drainer stopped", extra={"worker": cfg.worker_id, "clean": clean})
        return clean

    def _claim_and_submit(self, executor: ThreadPoolExecutor) -> float:
        """Claim what fits in the free handler slots; return how long to wait before looking again."""
        cfg = self.config
        with self._lock:
            busy = len(self._inflight)
        free = cfg.concurrency - busy
        if free <= 0 or (busy and free < cfg.concurrency // 2):
            # Claim in batches: wait until half the slots are free (a finishing handler wakes us).
            return cfg.poll_interval.total_seconds()
        with self.engine.connect() as conn:
            claimed = outbox.claim(conn, worker=cfg.worker_id, limit=free, lease=cfg.lease)
            until_due = None if claimed else outbox.seconds_until_due(conn)
        self.metrics.add(claimed=len(claimed))
        for message in claimed:
            log.info("claimed", extra=_fields(message))
            with self._lock:  # held across submit: the handler's own bookkeeping waits for this entry
                self._inflight[message.id] = executor.submit(self._handle, message)
        if claimed:
            return 0.0 if len(claimed) < free else cfg.poll_interval.total_seconds()
        poll = cfg.poll_interval.total_seconds()
        return poll if until_due is None else min(poll, until_due)

    def _housekeeping(self) -> None:
        """Every lease / 3: renew the leases of running handlers; retire abandoned redundant messages."""
        with self._lock:
            ids = list(self._started)
        with self.engine.connect() as conn:
            if ids:
                held = outbox.heartbeat(conn, worker=self.config.worker_id, ids=ids, lease=self.config.lease)
                if held < len(ids):
                    log.warning("lost %d lease(s) of running handlers", len(ids) - held)
            self.metrics.add(superseded=outbox.supersede(conn))

    def _handle(self, message: Message) -> None:
        with self._lock:
            self._started.add(message.id)
        started = time.monotonic()
        try:
            handler = self.handlers.get(message.kind)
            if handler is None:
                raise LookupError(f"no handler for message kind {message.kind!r}")
            result = handler(message)
        except Exception as error:
            self.metrics.observe_handler(time.monotonic() - started)
            self._record_failure(message, f"{type(error).__name__}: {error}")
        else:
            self.metrics.observe_handler(time.monotonic() - started)
            with self._lock:
                self._finished[message.id] = (message, result)
            self._finished_ready.set()
        finally:
            with self._lock:
                if message.id not in self._finished:
                    self._started.discard(message.id)
                self._inflight.pop(message.id, None)
            self._wake.set()

    def _acknowledge(self) -> None:
        """Write completions in batches: whatever finished while the previous batch was being written
        commits together, so a busy drainer pays one commit for many messages and an idle one none
        more than before."""
        worker = self.config.worker_id
        while True:
            self._finished_ready.wait(1.0)
            self._finished_ready.clear()
            with self._lock:
                batch, self._finished = self._finished, {}
            if batch:
                results = {message_id: result for message_id, (_, result) in batch.items()}
                held = self._persist(partial(outbox.complete_many, worker=worker, results=results))
                for message_id, (message, result) in batch.items():
                    if held is not None and message_id in held:
                        self.metrics.add(done=1)
                        log.info("done", extra={**_fields(message), "result": result})
                    else:
                        self.metrics.add(lost_leases=1)
                        log.warning("lease lost before completion was recorded", extra=_fields(message))
                with self._lock:
                    self._started.difference_update(batch)
                self._wake.set()  # the agents of this batch may have messages waiting behind these
            elif self._closing.is_set():
                return

    def _record_failure(self, message: Message, error: str) -> None:
        cfg = self.config
        status = self._persist(
            lambda conn: outbox.fail(
                conn,
                worker=cfg.worker_id,
                message_id=message.id,
                error=error,
                attempts=message.attempts,
                max_attempts=cfg.max_attempts,
                backoff=cfg.backoff,
            )
        )
        if status == "dead":
            self.metrics.add(dead=1)
            log.error("dead after %d attempts: %s", message.attempts, error, extra=_fields(message))
        elif status == "pending":
            self.metrics.add(retried=1)
            log.warning("failed, will retry: %s", error, extra=_fields(message))
        elif status == "superseded":
            self.metrics.add(superseded=1)
        elif status is None:
            self.metrics.add(lost_leases=1)

    def _persist(self, write: Callable[[Connection], T]) -> T | None:
        """Run a completion write, retrying while the database is away; None if it never got through
        (shutting down): the lease then expires and the message is delivered again."""
        failures = 0
        deadline: float | None = None
        while True:
            try:
                with self.engine.connect() as conn:
                    return write(conn)
            except DBAPIError as error:
                failures += 1
                if self._stopping.is_set():
                    deadline = deadline or time.monotonic() + self.config.shutdown_timeout.total_seconds()
                    if time.monotonic() > deadline:
                        return None
                delay = self.config.backoff.delay(failures).total_seconds()
                log.warning("cannot record a handler's outcome yet (%s); retrying", error.orig)
                time.sleep(min(delay, 5.0))

    def _shut_down(self, executor: ThreadPoolExecutor) -> bool:
        with self._lock:
            inflight = dict(self._inflight)
        for message_id, future in inflight.items():
            if future.cancel():  # claimed, never started: give it back now
                try:
                    with self.engine.connect() as conn:
                        outbox.release(conn, worker=self.config.worker_id, message_id=message_id)
                except DBAPIError as error:
                    log.warning(
                        "could not give back message %d (%s); its lease will expire", message_id, error.orig
                    )
        running = [f for f in inflight.values() if not f.cancelled()]
        _, unfinished = wait_futures(running, timeout=self.config.shutdown_timeout.total_seconds())
        executor.shutdown(wait=False, cancel_futures=True)
        if unfinished:
            log.error("%d handler(s) still running at shutdown; their leases will expire", len(unfinished))
        return not unfinished

    # -- LISTEN ----------------------------------------------------------------------------------

    def _listen(self) -> None:
        conninfo = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        failures = 0
        while not self._stopping.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.listening.set()
                    self._wake.set()  # whatever was notified while we were away
                    failures = 0
                    while not self._stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._wake.set()
            except psycopg.Error as error:
                self.listening.clear()
                failures += 1
                delay = self.config.backoff.delay(failures).total_seconds()
                log.warning("LISTEN connection lost (%s); reconnecting in %.1f s", error, delay)
                self._stopping.wait(delay)
        self.listening.clear()


def _fields(message: Message) -> dict[str, object]:
    return {
        "agent": message.agent,
        "message_id": message.id,
        "generation": message.generation,
        "kind": message.kind,
        "attempt": message.attempts,
    }
