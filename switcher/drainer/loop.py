"""The drain loop: claims committed messages and runs their handlers, after commit, at least once.

Any number of drainers, on any number of hosts, can share one database. A drainer is a few parts, each
owning its state:

* the loop (this module) claims due messages into free handler slots and keeps house every third of the
  lease: it renews the leases it holds, gives back messages whose drainer died (their lease ran out), and
  says it is alive (``switcher check``); once a ``prune_interval`` it deletes a batch of old history;
* ``Leases`` knows which messages this drainer holds and in which state, and fences handlers' steps;
* handlers run in threads, outside any transaction;
* the ``CompletionBuffer`` records their outcomes in batches, retrying while the database is away;
* the ``Listener`` wakes the loop on NOTIFY; polling every ``poll_interval`` is the fallback.

``stop()`` (SIGTERM/SIGINT once ``install_signal_handlers`` ran) stops claiming, gives back messages whose
handler has not started, and waits up to ``shutdown_timeout`` for the running ones.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from .. import metrics, sql
from ..api import database_url
from ..credentials import CredentialPolicy
from ..errors import InvalidInput, Undeliverable
from ..outbox import NOTIFY_CHANNEL, NOTIFY_SWITCH, RESTART_AGENT, Message, Outbox
from ..registry import Registry
from ..runtime import Runtime
from . import signals
from .completions import Completion, CompletionBuffer, fields
from .config import DrainerConfig, autocommit
from .handlers import Handler, Handlers, NotifySwitch, RestartAgent
from .leases import Abandoned, Claim, LeaseLost, Leases
from .listener import Listener

log = logging.getLogger(__name__)

PRUNE_BATCH = 500


class Drainer:
    def __init__(self, engine: Engine, handlers: Handlers, config: DrainerConfig | None = None) -> None:
        """Drain with ``engine`` (``from_url`` makes one). An engine of your own should connect with
        ``connect_args={"prepare_threshold": None}``, as ``from_url``'s does, for the reason given there."""
        sql.require_driver(engine.dialect, "Drainer")
        self.engine = autocommit(engine)
        self.handlers = dict(handlers)
        self.config = config or DrainerConfig()
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self.leases = Leases(self.engine, self.config.worker_id, self.config.lease)
        self.completions = CompletionBuffer(
            self.engine, self.leases, self.config, self.stopping, self._wake.set
        )
        self.listener = Listener(
            self.engine, NOTIFY_CHANNEL, self._wake, self.stopping, self.config.reconnect
        )
        self.last_tick = 0.0
        """``time.monotonic()`` when the loop last went round (``/healthz``)."""
        self._futures: dict[int, tuple[Message, Future[None]]] = {}
        self._owns_engine = False

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        config: DrainerConfig | None = None,
        handlers: Handlers | None = None,
        runtime: Runtime | None = None,
        docker: Any = None,
        credentials: CredentialPolicy | None = None,
        drain_timeout: timedelta = timedelta(minutes=5),
        webhook_timeout: timedelta = timedelta(seconds=10),
    ) -> Drainer:
        """A drainer with its own engine and the standard handlers: ``restart_agent`` through ``runtime``
        (default: the Docker runtime, configured by ``docker``, a ``DockerConfig``) and ``notify_switch``;
        ``handlers`` adds kinds or replaces these. ``credentials`` is where secrets may be read from."""
        config = config or DrainerConfig()
        credentials = credentials or CredentialPolicy()
        engine = create_engine(
            database_url(url),
            pool_size=config.concurrency + 4,
            max_overflow=4,
            pool_pre_ping=True,
            isolation_level="AUTOCOMMIT",
            pool_reset_on_return=None,  # autocommit connections have nothing to roll back
            # A drainer's statements run thousands of times per session. Prepared, they would keep a
            # generic plan made while the outbox was nearly empty, which scans it whole on every
            # completion until the next ANALYZE as finished messages pile up. Planned for each call,
            # they probe its index. (The functions it calls pin their own plans: db/versions/0003.)
            connect_args={"prepare_threshold": None},
        )
        chosen: dict[str, Handler] = dict(handlers or {})
        if RESTART_AGENT not in chosen:
            mode = "custom"
            if runtime is None:
                from ..runtime.docker import DockerConfig, DockerRuntime

                docker = docker or DockerConfig()
                check_lease(config, docker.stop_timeout)
                runtime, mode = DockerRuntime(docker), docker.mode
            chosen[RESTART_AGENT] = RestartAgent(engine, runtime, credentials, drain_timeout, mode)
        if NOTIFY_SWITCH not in chosen:
            chosen[NOTIFY_SWITCH] = NotifySwitch(engine, credentials, webhook_timeout)
        drainer = cls(engine, chosen, config)
        drainer._owns_engine = True
        return drainer

    @property
    def listening(self) -> threading.Event:
        """Set while the LISTEN connection is up."""
        return self.listener.listening

    # -- control ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """Stop on SIGTERM or SIGINT (``signals`` says how). Call it from the main thread."""
        signals.stop_on_signals(self._stop_on_signal)

    def _stop_on_signal(self, signum: signal.Signals) -> None:
        log.info("stopping on %s", signum.name, extra={"worker": self.config.worker_id})
        self.stop()

    def close(self) -> None:
        """Dispose of the engine, if ``from_url`` made it."""
        if self._owns_engine:
            self.engine.dispose()

    # -- the loop --------------------------------------------------------------------------------------

    def run(self) -> bool:
        """Drain until ``stop()``. True when every started handler finished before returning."""
        cfg = self.config
        log.info(
            "drainer started",
            extra={"worker": cfg.worker_id, "concurrency": cfg.concurrency, "placement": cfg.placement},
        )
        threads = [threading.Thread(target=self.completions.run, name="switcher-completions")]
        if cfg.listen:
            threads.append(threading.Thread(target=self.listener.run, name="switcher-listen", daemon=True))
        for thread in threads:
            thread.start()
        executor = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="switcher-handler")
        next_house = next_prune = time.monotonic()
        failures = 0
        try:
            while True:
                self._wake.clear()
                if self.stopping.is_set():  # after the clear: a stop() after it leaves the wake-up set
                    break
                self.last_tick = now = time.monotonic()
                metrics.LAST_TICK.set_to_current_time()
                try:
                    if now >= next_house:
                        self._keep_house()
                        next_house = now + cfg.renew_every
                    if now >= next_prune:
                        self._prune()
                        next_prune = now + cfg.prune_interval.total_seconds()
                    wait = self._claim(executor)
                    failures = 0
                except DBAPIError as error:
                    failures += 1
                    wait = cfg.reconnect.delay(failures).total_seconds()
                    log.warning("database unavailable, retrying in %.1f s: %s", wait, error.orig)
                    # Housekeeping is due but needs the database too: wait the backoff out (the listener's
                    # reconnect wakes us early).
                    next_house = max(next_house, time.monotonic() + wait)
                self._wake.wait(max(0.0, min(wait, next_house - time.monotonic())))
        finally:
            clean = self._shut_down(executor)
            self.completions.close()
            for thread in threads:
                thread.join(timeout=None if thread.name == "switcher-completions" else 5)
            self._say_goodbye()
        log.info("drainer stopped", extra={"worker": cfg.worker_id, "clean": clean})
        return clean

    def _claim(self, executor: ThreadPoolExecutor) -> float:
        """Claim what fits in the free handler slots; how long to wait before looking again."""
        cfg = self.config
        capacity = cfg.concurrency + cfg.prefetch
        busy = self.leases.busy()
        free = capacity - busy
        poll = cfg.poll_interval.total_seconds()
        if free <= 0 or (busy and free < capacity // 2):
            return poll  # claim in batches: a finishing handler wakes the loop
        with self.engine.connect() as conn:
            outbox = Outbox(conn)
            claimed = outbox.claim(
                worker=cfg.worker_id,
                limit=free,
                lease=cfg.lease,
                placement=cfg.placement,
                kinds=list(self.handlers),
            )
            until_due = None if claimed else outbox.seconds_until_due()
            taken = self.leases.take(claimed)
            for message in claimed:
                if message not in taken:  # its previous lease's handler still runs here: after it ends
                    outbox.release(worker=cfg.worker_id, message=message, delay=cfg.lease / 3)
            claimed = taken
        for kind, count in Counter(m.kind for m in claimed).items():
            metrics.child(metrics.CLAIMED, kind).inc(count)
        for message in claimed:
            log.info("claimed", extra=fields(message))
            future = executor.submit(self._handle, message)
            self._futures[message.id] = (message, future)
            future.add_done_callback(functools.partial(self._forget, message.id))
        if claimed:
            return 0.0 if len(claimed) < free else poll
        return poll if until_due is None else min(poll, until_due)

    def _forget(self, message_id: int, _: Future[None]) -> None:
        self._futures.pop(message_id, None)

    def _handle(self, message: Message) -> None:
        if self.stopping.is_set():  # prefetched, its turn came after a stop: another drainer's now
            self.completions.put(Completion(message, give_back=True))
            return
        if not self.leases.start(message.id):
            return
        started = time.monotonic()
        try:
            result = self.handlers[message.kind](Claim(message, self.leases, self.stopping))
            completion = Completion(message, result=str(result))
        except LeaseLost:
            completion = Completion(message, lost=True)
        except Abandoned:
            completion = Completion(message, give_back=True)
        except Undeliverable as error:
            completion = Completion(message, error=f"{type(error).__name__}: {error}", final=True)
        except Exception as error:
            completion = Completion(message, error=f"{type(error).__name__}: {error}")
        metrics.child(metrics.HANDLER_SECONDS, message.kind).observe(time.monotonic() - started)
        busy = self.completions.put(completion)
        if busy <= (self.config.concurrency + self.config.prefetch) // 2:
            self._wake.set()  # enough slots free for the next batch

    def _keep_house(self) -> None:
        cfg = self.config
        for message_id in self.leases.renew():
            log.warning("lost the lease of message %d to another drainer", message_id)
        with self.engine.connect() as conn:
            outbox = Outbox(conn)
            outbox.drainer_seen(cfg.worker_id, cfg.placement)
            for message_id, status in outbox.reclaim_expired(max_attempts=cfg.max_attempts).items():
                log.warning(
                    "message %d outlived its drainer's lease; now %s",
                    message_id,
                    status,
                    extra={"status": status},
                )
            Registry(conn).forget_expired_executions()

    def _prune(self) -> None:
        with self.engine.connect() as conn:
            deleted = Registry(conn).prune(PRUNE_BATCH)
            Outbox(conn).forget_drainers()
        if any(deleted.values()):
            log.info("pruned history past retention", extra=deleted)

    def _shut_down(self, executor: ThreadPoolExecutor) -> bool:
        futures = list(self._futures.values())
        for message, future in futures:
            if future.cancel():  # claimed, never started: give it back now
                self.completions.put(Completion(message, give_back=True))
        running = [f for _, f in futures if not f.cancelled()]
        _, unfinished = wait_for_futures(running, timeout=self.config.shutdown_timeout.total_seconds())
        executor.shutdown(wait=False, cancel_futures=True)
        if unfinished:
            log.error("%d handler(s) still running at shutdown; their leases will expire", len(unfinished))
        return not unfinished

    def _say_goodbye(self) -> None:
        try:
            with self.engine.connect() as conn:
                Outbox(conn).drainer_stopped(self.config.worker_id)
        except DBAPIError:
            pass  # it will look gone once it is not seen for a while


def check_lease(config: DrainerConfig, stop_timeout: timedelta) -> None:
    """A lease must outlast the slowest fenced step, ``docker stop``: at least twice the stop timeout."""
    if config.lease < 2 * stop_timeout:
        raise InvalidInput(
            f"lease ({config.lease.total_seconds():g} s) must be at least twice the stop timeout "
            f"({stop_timeout.total_seconds():g} s), so that no Docker step outlives the lease it runs under"
        )
