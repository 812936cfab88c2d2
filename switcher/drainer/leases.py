"""Which messages this drainer holds, and in what state: the one place that knows.

A message is ``QUEUED`` once claimed, ``RUNNING`` while its handler runs, ``FINISHED`` when the handler
is done and its outcome waits in the completion buffer, ``RECORDING`` while the buffer writes it; then it
is no longer held. Every held message's lease is renewed every third of the lease. A lease that a renewal
does not find any more was lost -- unless its message was being recorded at that moment, which is why the
buffer marks ``RECORDING`` before it writes.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine

from ..outbox import Message, Outbox

log = logging.getLogger(__name__)


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    RECORDING = "recording"


class LeaseLost(Exception):
    """This drainer no longer holds the message: another one took it over. Do nothing more with it."""


class Leases:
    def __init__(self, engine: Engine, worker: str, lease: timedelta) -> None:
        self.engine = engine  # an autocommit engine
        self.worker = worker
        self.lease = lease
        self._states: dict[int, State] = {}
        self._lease_nos: dict[int, int] = {}
        self._busy = 0  # queued or running: what takes a handler slot
        self._lost: set[int] = set()  # found lost and reported; still held until their handler ends
        self._lock = threading.Lock()

    def take(self, messages: Iterable[Message]) -> list[Message]:
        """Hold newly claimed messages; those already held are left out of what it returns: their lease
        ran out and this drainer claimed them again while their handler still runs. That handler fails its
        next fence; the caller gives the new claim back."""
        taken = []
        with self._lock:
            for message in messages:
                if message.id in self._states:
                    continue
                self._states[message.id] = State.QUEUED
                self._lease_nos[message.id] = message.lease_no
                self._busy += 1
                taken.append(message)
        return taken

    def start(self, message_id: int) -> bool:
        """Mark a queued message running; False if it is no longer held (given back at shutdown)."""
        with self._lock:
            if self._states.get(message_id) is not State.QUEUED:
                return False
            self._states[message_id] = State.RUNNING
            return True

    def finish(self, message_id: int) -> int:
        """The handler is done (or will never start); how many messages are still busy."""
        with self._lock:
            if self._states.get(message_id) in (State.QUEUED, State.RUNNING):
                self._busy -= 1
            self._states[message_id] = State.FINISHED
            return self._busy

    def recording(self, message_ids: Iterable[int]) -> None:
        with self._lock:
            for message_id in message_ids:
                self._states[message_id] = State.RECORDING

    def release(self, message_ids: Iterable[int]) -> None:
        """No longer held: recorded, lost, or given back."""
        with self._lock:
            for message_id in message_ids:
                if self._states.pop(message_id, None) in (State.QUEUED, State.RUNNING):
                    self._busy -= 1
                self._lease_nos.pop(message_id, None)
                self._lost.discard(message_id)

    def busy(self) -> int:
        """Messages claimed whose handler has not finished: what takes a handler slot."""
        with self._lock:
            return self._busy

    def held(self) -> int:
        with self._lock:
            return len(self._states)

    def renew(self) -> list[int]:
        """Extend every held lease; the ids newly found lost. Their handlers learn it at their next
        ``fence``, their outcomes when the buffer finds the lease gone."""
        with self._lock:
            leases = dict(self._lease_nos)
        if not leases:
            return []
        with self.engine.connect() as conn:
            renewed = Outbox(conn).heartbeat(worker=self.worker, leases=leases, lease=self.lease)
        with self._lock:
            lost = [
                i
                for i in leases
                if i not in renewed
                and i not in self._lost
                and self._states.get(i) in (State.QUEUED, State.RUNNING, State.FINISHED)
            ]
            self._lost.update(lost)
        return lost

    def fence(self, message: Message) -> None:
        """Renew this claim's lease now, or raise ``LeaseLost``: what a handler calls before a destructive
        step."""
        with self.engine.connect() as conn:
            held = Outbox(conn).heartbeat(
                worker=self.worker, leases={message.id: message.lease_no}, lease=self.lease
            )
        if message.id not in held:
            raise LeaseLost(f"message {message.id} (lease {message.lease_no}) is no longer {self.worker}'s")


class Abandoned(Exception):
    """A handler gave up before doing anything (the drainer is stopping): give the message back."""


@dataclass(frozen=True)
class Claim:
    """A claimed message, as its handler sees it."""

    message: Message
    leases: Leases
    stopping: threading.Event
    """Set when the drainer is stopping: a handler that waits (say, for executions to drain) should raise
    ``Abandoned`` if it has changed nothing yet."""

    def fence(self) -> None:
        """Raise ``LeaseLost`` unless this drainer still holds the message; renews its lease."""
        self.leases.fence(self.message)
