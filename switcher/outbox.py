"""The one door to the outbox, delivery state and the drainers' roll call (``sql/outbox.sql``).

A switch enqueues its restart (and notification) through the database function ``switcher.enqueue_v2``,
in its own transaction. Host applications enqueue their own kinds of message the same way, inside their
own transactions, with ``Outbox(conn).enqueue(...)``. Drainers run everything else here, each call one
statement on an autocommit connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from . import sql
from .errors import InvalidInput, UnknownAgent

_QUERIES = sql.load("outbox")

NOTIFY_CHANNEL = "switcher_outbox"
"""Every enqueue sends NOTIFY on this channel (payload: the message id); drainers LISTEN to it."""
RESTART_AGENT = "restart_agent"
"""Apply an agent's current assignment to its container."""
NOTIFY_SWITCH = "notify_switch"
"""Tell the webhook about one switch."""
STATUSES = ("pending", "running", "done", "dead", "superseded", "cancelled")
FINISHED_STATUSES = ("done", "superseded", "cancelled")
MAX_ERROR_LENGTH = 2_000

# The races the outbox's queries can lose, named by the unique index that decides them.
ONE_PENDING = "outbox_one_pending_idx"
ONE_RUNNING = "outbox_one_running_idx"


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    kind: str
    agent_id: int | None
    """The agent the message acts on; None for an event (a notification), which belongs to no agent."""
    agent: str | None
    generation: int
    payload: dict[str, Any]
    attempts: int
    """Attempts so far, this one included."""
    lease_no: int
    """This claim's lease: every write of its holder must carry it (a fencing token)."""
    enqueued_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int
    running: int
    dead: int
    oldest_pending_seconds: float | None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message as an operator sees it."""

    id: int
    kind: str
    agent: str | None
    generation: int
    status: str
    attempts: int
    available_at: datetime
    leased_until: datetime | None
    leased_by: str | None
    last_error: str | None
    result: str | None
    payload: dict[str, Any]
    enqueued_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DeliveryState:
    intended_running: bool | None
    """The run state an interrupted recreate must restore; None when no recreate is in progress."""
    applied_generation: int | None


class Outbox:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _run(self, query: str, **params: Any) -> Any:
        return _QUERIES.run(self.conn, query, **params)

    # -- writing messages ------------------------------------------------------------------------------

    def enqueue(self, kind: str, agent: str | None, payload: dict[str, Any], generation: int = 0) -> int:
        """Add a message in the connection's transaction; it is delivered once that commits.

        A message about ``agent`` coalesces with the agent's pending message of the same ``kind`` and never
        runs while another message of the agent runs; without ``agent`` it is an event, delivered once.
        ``payload`` must hold names only, never a credential.
        """
        if not isinstance(kind, str) or not kind.isidentifier():
            raise InvalidInput(f"message kind must be an identifier, got {kind!r}")
        try:
            encoded = json.dumps(payload)
        except TypeError as error:
            raise InvalidInput(f"payload must be JSON: {error}") from None
        agent_id = None
        if agent is not None:
            agent_id = self._run("agent_id", agent=agent).scalar_one_or_none()
            if agent_id is None:
                raise UnknownAgent(agent)
        return int(
            self._run(
                "enqueue",
                kind=kind,
                agent_id=agent_id,
                generation=generation,
                payload=encoded,
                channel=NOTIFY_CHANNEL,
            ).scalar_one()
        )

    def wake(self, message_id: int | None) -> None:
        """Wake the drainers (NOTIFY), once what they are woken for has committed."""
        _QUERIES.row(
            self.conn, "wake", channel=NOTIFY_CHANNEL, message="" if message_id is None else str(message_id)
        )

    # -- a drainer's side ------------------------------------------------------------------------------

    def claim(
        self, *, worker: str, limit: int, lease: timedelta, placement: str | None, kinds: Sequence[str]
    ) -> list[Message]:
        """Lease up to ``limit`` due messages of ``kinds`` to ``worker``. When another drainer concurrently
        claims a message of the same agent, the database refuses one of the two claims; that one comes
        back empty."""
        try:
            rows = self._run(
                "claim", worker=worker, limit=limit, lease=lease, placement=placement, kinds=list(kinds)
            ).all()
        except IntegrityError as error:
            if sql.violated_constraint(error) == ONE_RUNNING:
                return []
            raise
        return [Message(**row._mapping) for row in rows]

    def heartbeat(self, *, worker: str, leases: Mapping[int, int], lease: timedelta) -> set[int]:
        """Extend the ``leases`` (message id: lease number) ``worker`` still holds; the ids it still holds."""
        if not leases:
            return set()
        rows = self._run(
            "heartbeat", worker=worker, ids=list(leases), lease_nos=list(leases.values()), lease=lease
        )
        return set(rows.scalars())

    def complete(self, *, worker: str, results: Iterable[tuple[Message, str]]) -> set[int]:
        """Mark messages done with their results, in one statement; the ids whose lease ``worker``
        still held."""
        done = list(results)
        rows = self._run(
            "complete",
            ids=[m.id for m, _ in done],
            lease_nos=[m.lease_no for m, _ in done],
            results=[result for _, result in done],
            worker=worker,
        )
        return set(rows.scalars())

    def fail(
        self,
        *,
        worker: str,
        message: Message,
        error: str,
        delay: timedelta,
        max_attempts: int,
        final: bool = False,
    ) -> str | None:
        """Record a failed attempt: pending again after ``delay``, or dead when attempts are used up (or
        ``final``). The new status, or None if the lease was lost meanwhile."""
        return self._fail(
            id=message.id,
            lease_no=message.lease_no,
            worker=worker,
            error=error[:MAX_ERROR_LENGTH],
            delay=delay,
            max_attempts=max_attempts,
            final=final,
            undo_attempt=0,
        )

    def release(self, *, worker: str, message: Message, delay: timedelta = timedelta(0)) -> str | None:
        """Give back a claimed message whose handler never started: pending again after ``delay``,
        the attempt uncounted."""
        return self._fail(
            id=message.id,
            lease_no=message.lease_no,
            worker=worker,
            error=None,
            delay=delay,
            max_attempts=2**31 - 1,
            final=False,
            undo_attempt=1,
        )

    def _fail(self, **params: Any) -> str | None:
        # A switch may enqueue a new pending message between the check and the update; the second try's
        # check sees it and supersedes this one instead.
        for attempt in range(2):
            try:
                status = self._run("fail", **params).scalar_one_or_none()
                return None if status is None else str(status)
            except IntegrityError as error:
                if sql.violated_constraint(error) != ONE_PENDING or attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def reclaim_expired(self, *, max_attempts: int) -> dict[int, str]:
        """Messages whose drainer died, due again (or superseded, or dead): their new statuses."""
        for attempt in range(2):
            try:
                rows = self._run("reclaim_expired", max_attempts=max_attempts)
                return {row.id: row.status for row in rows}
            except IntegrityError as error:
                if sql.violated_constraint(error) != ONE_PENDING or attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def seconds_until_due(self) -> float | None:
        """How long until the next pending message is due (0 if one is due now; None if none is)."""
        value = self._run("seconds_until_due").scalar()
        return None if value is None else max(0.0, float(value))

    # -- delivery state --------------------------------------------------------------------------------

    def delivery(self, agent_id: int) -> DeliveryState:
        row = self._run("delivery", agent_id=agent_id).one_or_none()
        return DeliveryState(None, None) if row is None else DeliveryState(**row._mapping)

    def record_intent(self, agent_id: int, running: bool) -> bool:
        """Record the run state to restore, unless an interrupted delivery did; the one that holds."""
        return bool(self._run("record_intent", agent_id=agent_id, running=running).scalar_one())

    def record_applied(self, agent_id: int, generation: int) -> None:
        self._run("record_applied", agent_id=agent_id, generation=generation)

    def clear_intent(self, agent_id: int) -> None:
        self._run("clear_intent", agent_id=agent_id)

    def unfinished_deliveries(self) -> list[str]:
        return list(self._run("unfinished_deliveries").scalars())

    # -- drainers' roll call ---------------------------------------------------------------------------

    def drainer_seen(self, worker: str, placement: str | None) -> None:
        self._run("drainer_seen", worker=worker, placement=placement)

    def drainer_stopped(self, worker: str) -> None:
        self._run("drainer_stopped", worker=worker)

    def drainers(self) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in self._run("drainers")]

    def forget_drainers(self) -> None:
        self._run("forget_drainers")

    # -- an operator's side ----------------------------------------------------------------------------

    def retry(self, ids: Sequence[int] = (), *, all_dead: bool = False) -> dict[int, str]:
        """Another full set of attempts for finished or dead messages; their new statuses (``pending``,
        or ``superseded`` when a newer message of the agent does the work)."""
        for attempt in range(2):
            try:
                rows = self._run("retry", ids=list(ids), all_dead=all_dead, channel=NOTIFY_CHANNEL).all()
                return {row.id: row.status for row in rows}
            except IntegrityError as error:
                if sql.violated_constraint(error) != ONE_PENDING or attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def cancel(self, ids: Sequence[int]) -> list[int]:
        """Withdraw pending messages; the ids that were pending."""
        return sorted(self._run("cancel", ids=list(ids)).scalars())

    def stats(self) -> OutboxStats:
        row = self._run("stats").one()
        oldest = None if row.oldest_pending_seconds is None else float(row.oldest_pending_seconds)
        return OutboxStats(row.pending, row.running, row.dead, oldest)

    def messages(
        self, *, message_id: int | None = None, status: str | None = None, limit: int = 50
    ) -> list[OutboxRow]:
        rows = self._run("messages", id=message_id, status=status, limit=limit)
        return [OutboxRow(**r._mapping) for r in rows]

    def purge(self, *, older_than: timedelta, statuses: Sequence[str]) -> int:
        """Delete messages in ``statuses`` last changed more than ``older_than`` ago; how many."""
        return int(self._run("purge", statuses=list(statuses), older_than=older_than).rowcount)
