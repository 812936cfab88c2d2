"""The completion buffer: handlers hand their outcomes here, one thread writes them.

Results that arrive while the previous batch is being written are written together, in one statement,
so a busy drainer pays one round trip for many messages and an idle one none more than before. A failure
is written on its own (it needs its own backoff). While the database is away, writes are retried with
backoff; once the drainer is stopping they are given up after ``shutdown_timeout``, and the leases
expire instead, so the messages are delivered again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .. import metrics
from ..outbox import Message, Outbox
from ..redact import redact
from .config import DrainerConfig
from .leases import Leases

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Completion:
    """How a handler ended."""

    message: Message
    result: str | None = None
    """It succeeded, with this result."""
    error: str | None = None
    """It failed with this error; retried after a backoff unless ``final``."""
    final: bool = False
    give_back: bool = False
    """It gave up before doing anything (shutdown): pending again, the attempt not counted."""
    lost: bool = False
    """Its lease was lost to another drainer: nothing to record."""


def fields(message: Message) -> dict[str, object]:
    """What every log line about a message carries."""
    return {
        "agent": message.agent,
        "message_id": message.id,
        "generation": message.generation,
        "kind": message.kind,
        "attempt": message.attempts,
    }


class CompletionBuffer:
    def __init__(
        self,
        engine: Engine,
        leases: Leases,
        config: DrainerConfig,
        stopping: threading.Event,
        recorded: Callable[[], None],
    ) -> None:
        self.engine = engine  # an autocommit engine
        self.leases = leases
        self.config = config
        self.stopping = stopping
        self.recorded = recorded
        """Called after each write: the agents of those messages may have messages waiting."""
        self._queue: queue.SimpleQueue[Completion | None] = queue.SimpleQueue()

    def put(self, completion: Completion) -> int:
        """Queue a handler's outcome; how many messages are still busy."""
        busy = self.leases.finish(completion.message.id)
        self._queue.put(completion)
        return busy

    def close(self) -> None:
        """Write what is queued, then end ``run``."""
        self._queue.put(None)

    def run(self) -> None:
        closing = False
        while not closing:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = None in batch
            completions = [c for c in batch if c is not None]
            if completions:
                self._record(completions)
                self.recorded()

    def _record(self, completions: list[Completion]) -> None:
        self.leases.recording(c.message.id for c in completions)
        done = [c for c in completions if c.result is not None]
        if done:
            results = [(c.message, str(c.result)) for c in done]
            worker = self.config.worker_id
            held = self._persist(lambda conn: Outbox(conn).complete(worker=worker, results=results))
            counted: Counter[tuple[str, str]] = Counter()
            for c in done:
                if held is not None and c.message.id in held:
                    counted[c.message.kind, "done"] += 1
                    log.info("done", extra={**fields(c.message), "result": c.result})
                else:
                    counted[c.message.kind, "lost_lease"] += 1
                    log.warning("lease lost before completion was recorded", extra=fields(c.message))
            for (kind, status), count in counted.items():
                metrics.child(metrics.FINISHED, kind, status).inc(count)
        for c in completions:
            if c.error is not None or c.give_back:
                self._fail(c)
            elif c.lost:
                self._count(c.message, "lost_lease")
                log.warning("lease lost while the handler ran", extra=fields(c.message))
        self.leases.release(c.message.id for c in completions)

    def _fail(self, c: Completion) -> None:
        cfg, message = self.config, c.message
        worker = cfg.worker_id
        if c.give_back:
            status = self._persist(lambda conn: Outbox(conn).release(worker=worker, message=message))
            self._count(message, "released" if status else "lost_lease")
            return
        error = redact(str(c.error))
        status = self._persist(
            lambda conn: Outbox(conn).fail(
                worker=worker,
                message=message,
                error=error,
                delay=cfg.backoff.delay(message.attempts),
                max_attempts=cfg.max_attempts,
                final=c.final,
            )
        )
        if status == "dead":
            log.error("dead after %d attempt(s): %s", message.attempts, error, extra=fields(message))
        elif status == "pending":
            log.warning("failed, will retry: %s", error, extra=fields(message))
        self._count(message, {"pending": "retry", None: "lost_lease"}.get(status, str(status)))

    @staticmethod
    def _count(message: Message, status: str) -> None:
        metrics.child(metrics.FINISHED, message.kind, status).inc()

    def _persist(self, write: Callable[[Connection], T]) -> T | None:
        """Run a write, retrying while the database is away; None if it never got through (stopping)."""
        failures = 0
        deadline: float | None = None
        while True:
            try:
                with self.engine.connect() as conn:
                    return write(conn)
            except DBAPIError as error:
                failures += 1
                if self.stopping.is_set():
                    deadline = deadline or time.monotonic() + self.config.shutdown_timeout.total_seconds()
                    if time.monotonic() > deadline:
                        return None
                log.warning("cannot record a handler's outcome yet (%s); retrying", error.orig)
                time.sleep(self.config.reconnect.delay(failures).total_seconds())
