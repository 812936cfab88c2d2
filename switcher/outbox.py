"""The outbox: messages written inside a switch's transaction, delivered after commit by drainers.

This module is the one door to ``switcher.outbox`` for Python (the switch enqueues through the database
function ``switcher.enqueue``, which coalesces with the agent's pending message and sends ``NOTIFY``).

Life of a message::

    pending --claim--> running --complete--> done
       ^                  |  \\--fail, attempts left--> pending (available_at = now + backoff)
       |                  |   \\-fail, no attempts left--> dead --requeue--> pending
       |                  \\--lease expired (drainer died)--> claimable again
       \\--release (shutdown before the handler started)
    superseded: a newer pending message of the same agent and kind will do the work instead.

Claims use ``FOR UPDATE SKIP LOCKED`` in one short transaction that also sets the lease and counts the
attempt. A message is never claimed while another message of its agent is running (a unique partial
index makes two running messages of one agent impossible, whatever drainers race). Every state change
after the claim is conditional on still holding the lease (``leased_by`` and ``status = 'running'``).
Each function here runs its own short transaction on the connection it is given.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from .errors import InvalidInput

RESTART_AGENT = "restart_agent"
OUTBOX_STATUSES = ("pending", "running", "done", "dead", "superseded")
NOTIFY_CHANNEL = "switcher_outbox"  # also spelled out in switcher.enqueue (db/versions)
MAX_ERROR_LENGTH = 2_000


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    kind: str
    agent: str
    agent_id: int
    generation: int
    payload: dict[str, Any]
    attempts: int
    """Attempts so far, this one included."""
    enqueued_at: datetime
    """When this generation was enqueued: a container started after it already runs it."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: a retry waits up to base * 2**(attempts - 1), capped."""

    base: timedelta = timedelta(seconds=1)
    cap: timedelta = timedelta(minutes=5)

    def delay(self, attempts: int) -> timedelta:
        ceiling = min(self.cap.total_seconds(), self.base.total_seconds() * 2 ** max(0, attempts - 1))
        return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


_ENQUEUE = text("SELECT switcher.enqueue(:kind, :agent_id, :generation, CAST(:payload AS jsonb))")

# A message of an agent that has another running message (live or expired) waits; an expired running
# message is itself claimable (its drainer died), and goes first. One message per agent per claim.
_CLAIM = text(
    """
    WITH claimable AS (
        SELECT o.id, o.agent_id, o.available_at
        FROM switcher.outbox o
        WHERE ((o.status = 'pending' AND o.available_at <= now())
               OR (o.status = 'running' AND o.leased_until < now()))
          AND NOT EXISTS (
              SELECT 1 FROM switcher.outbox r
              WHERE r.agent_id = o.agent_id AND r.status = 'running' AND r.id <> o.id)
        ORDER BY o.available_at, o.id
        LIMIT :limit
        FOR UPDATE OF o SKIP LOCKED
    ), one_per_agent AS (
        SELECT DISTINCT ON (agent_id) id FROM claimable ORDER BY agent_id, available_at, id
    )
    UPDATE switcher.outbox o
    SET status = 'running', attempts = o.attempts + 1, leased_until = now() + :lease,
        leased_by = :worker, updated_at = now()
    FROM one_per_agent c, switcher.agents a
    WHERE o.id = c.id AND a.id = o.agent_id
    RETURNING o.id, o.kind, a.name AS agent, o.agent_id, o.generation, o.payload, o.attempts,
              o.enqueued_at
    """
)

# An abandoned message (its drainer died) whose agent has a newer pending message of the same kind
# is redundant: handlers apply the agent's current state, which the newer message will do. (Pending
# messages need no such check: there is at most one per agent and kind.)
_SUPERSEDE = text(
    """
    UPDATE switcher.outbox o
    SET status = 'superseded', leased_until = NULL, updated_at = now()
    WHERE o.status = 'running' AND o.leased_until < now()
      AND EXISTS (
          SELECT 1 FROM switcher.outbox n
          WHERE n.agent_id = o.agent_id AND n.kind = o.kind AND n.status = 'pending'
            AND n.generation > o.generation)
    """
)

_HEARTBEAT = text(
    """
    UPDATE switcher.outbox SET leased_until = now() + :lease
    WHERE id = ANY(:ids) AND status = 'running' AND leased_by = :worker
    """
)

_COMPLETE = text(
    """
    UPDATE switcher.outbox o
    SET status = 'done', result = d.result, leased_until = NULL, updated_at = now()
    FROM unnest(CAST(:ids AS bigint[]), CAST(:results AS text[])) AS d(id, result)
    WHERE o.id = d.id AND o.status = 'running' AND o.leased_by = :worker
    RETURNING o.id
    """
)

# Back to pending for another attempt -- unless a newer pending message took over meanwhile
# (superseded), or the attempts are used up (dead). ``attempts = 0`` in ``release`` undoes a claim.
_FAIL = text(
    """
    UPDATE switcher.outbox o
    SET status = CASE
            WHEN EXISTS (SELECT 1 FROM switcher.outbox n
                         WHERE n.agent_id = o.agent_id AND n.kind = o.kind AND n.status = 'pending')
                THEN 'superseded'
            WHEN o.attempts >= :max_attempts THEN 'dead'
            ELSE 'pending' END,
        attempts = o.attempts - :undo_attempt,
        available_at = now() + :delay,
        leased_until = NULL,
        last_error = COALESCE(:error, o.last_error),
        updated_at = now()
    WHERE o.id = :id AND o.status = 'running' AND o.leased_by = :worker
    RETURNING o.status
    """
)

_REQUEUE = text(
    """
    UPDATE switcher.outbox o
    SET status = CASE
            WHEN EXISTS (SELECT 1 FROM switcher.outbox n
                         WHERE n.agent_id = o.agent_id AND n.kind = o.kind AND n.status = 'pending')
                THEN 'superseded'
            ELSE 'pending' END,
        attempts = 0, available_at = now(), updated_at = now()
    WHERE o.id = :id AND o.status IN ('dead', 'superseded', 'done')
    RETURNING o.status, pg_notify(:channel, o.id::text)
    """
)

_SECONDS_UNTIL_DUE = text(
    "SELECT EXTRACT(EPOCH FROM min(available_at) - now()) FROM switcher.outbox WHERE status = 'pending'"
)

_STATS = text(
    """
    SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
           count(*) FILTER (WHERE status = 'running') AS running,
           count(*) FILTER (WHERE status = 'dead') AS dead,
           EXTRACT(EPOCH FROM now() - min(enqueued_at) FILTER (WHERE status = 'pending'))
               AS oldest_pending_seconds
    FROM switcher.outbox
    WHERE status IN ('pending', 'running', 'dead')
    """
)


def enqueue(conn: Connection, *, kind: str, agent_id: int, generation: int, payload: dict[str, Any]) -> int:
    """Add (or refresh the pending) message of ``kind`` for an agent, in the caller's transaction.
    ``payload`` must hold names only, never a credential."""
    return int(
        conn.execute(
            _ENQUEUE,
            {"kind": kind, "agent_id": agent_id, "generation": generation, "payload": json.dumps(payload)},
        ).scalar_one()
    )


def claim(conn: Connection, *, worker: str, limit: int, lease: timedelta) -> list[Message]:
    """Lease up to ``limit`` due messages (one per agent) to ``worker``, in one statement.

    The handlers run after it, outside any transaction. When another drainer concurrently claims a
    message of the same agent, the database refuses one of the two claims; that claim comes back
    empty and the next one goes on.
    """
    if limit < 1:
        return []
    try:
        with conn.begin():
            rows = conn.execute(_CLAIM, {"worker": worker, "limit": limit, "lease": lease}).all()
    except IntegrityError:
        return []
    return [Message(**row._mapping) for row in rows]


def supersede(conn: Connection) -> int:
    """Retire abandoned messages that a newer pending one makes redundant; return how many."""
    with conn.begin():
        return conn.execute(_SUPERSEDE).rowcount


def heartbeat(conn: Connection, *, worker: str, ids: Sequence[int], lease: timedelta) -> int:
    """Extend the leases ``worker`` still holds on ``ids``; return how many it still holds."""
    if not ids:
        return 0
    with conn.begin():
        return conn.execute(_HEARTBEAT, {"ids": list(ids), "worker": worker, "lease": lease}).rowcount


def complete(conn: Connection, *, worker: str, message_id: int, result: str) -> bool:
    """Mark done; False if the lease was lost meanwhile (another drainer owns the message now)."""
    return bool(complete_many(conn, worker=worker, results={message_id: result}))


def complete_many(conn: Connection, *, worker: str, results: dict[int, str]) -> set[int]:
    """Mark several messages done in one transaction (one commit for a batch of handlers); return
    the ids whose lease ``worker`` still held."""
    with conn.begin():
        rows = conn.execute(
            _COMPLETE, {"ids": list(results), "results": list(results.values()), "worker": worker}
        ).scalars()
        return set(rows)


def fail(
    conn: Connection,
    *,
    worker: str,
    message_id: int,
    error: str,
    attempts: int,
    max_attempts: int,
    backoff: Backoff,
) -> str | None:
    """Record a failed attempt: back to pending after a backoff, or dead when attempts are used up.
    Returns the new status, or None if the lease was lost meanwhile."""
    return _fail(
        conn,
        id=message_id,
        worker=worker,
        error=error[:MAX_ERROR_LENGTH],
        delay=backoff.delay(attempts),
        max_attempts=max_attempts,
        undo_attempt=0,
    )


def release(conn: Connection, *, worker: str, message_id: int) -> str | None:
    """Give back a claimed message whose handler never started (shutdown): pending again, now,
    with the claim's attempt not counted."""
    return _fail(
        conn,
        id=message_id,
        worker=worker,
        error=None,
        delay=timedelta(0),
        max_attempts=2**31 - 1,
        undo_attempt=1,
    )


def _fail(conn: Connection, **params: Any) -> str | None:
    for attempt in range(2):
        try:
            with conn.begin():
                status = conn.execute(_FAIL, params).scalar_one_or_none()
            return None if status is None else str(status)
        except IntegrityError:
            # A switch enqueued a new pending message between our check and our update; on the
            # second try the check sees it and supersedes this one.
            if attempt:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def requeue(conn: Connection, message_id: int) -> str:
    """Give a dead (or finished) message another full set of attempts, due now. Returns its new status:
    ``pending``, or ``superseded`` when a newer pending message of the agent will do the work."""
    if isinstance(message_id, bool) or not isinstance(message_id, int):
        raise InvalidInput(f"message id must be an int, got {message_id!r}")
    with conn.begin():
        row = conn.execute(_REQUEUE, {"id": message_id, "channel": NOTIFY_CHANNEL}).one_or_none()
    if row is None:
        raise InvalidInput(f"no dead, done or superseded outbox message with id {message_id}")
    return str(row.status)


def seconds_until_due(conn: Connection) -> float | None:
    """How long until the next pending message is due (0 if one is due now; None if none is pending)."""
    with conn.begin():
        value = conn.execute(_SECONDS_UNTIL_DUE).scalar()
    return None if value is None else max(0.0, float(value))


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int
    running: int
    dead: int
    oldest_pending_seconds: float | None


def stats(conn: Connection) -> OutboxStats:
    with conn.begin():
        row = conn.execute(_STATS).one()
    oldest = None if row.oldest_pending_seconds is None else float(row.oldest_pending_seconds)
    return OutboxStats(row.pending, row.running, row.dead, oldest)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message as an operator sees it."""

    id: int
    kind: str
    agent: str
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


_ROWS = """
    SELECT o.id, o.kind, a.name AS agent, o.generation, o.status, o.attempts, o.available_at,
           o.leased_until, o.leased_by, o.last_error, o.result, o.payload, o.enqueued_at, o.updated_at
    FROM switcher.outbox o JOIN switcher.agents a ON a.id = o.agent_id
"""
_LIST = text(
    _ROWS + " WHERE CAST(:status AS text) IS NULL OR o.status = :status ORDER BY o.id DESC LIMIT :limit"
)
_SHOW = text(_ROWS + " WHERE o.id = :id")
_PURGE = text(
    """
    DELETE FROM switcher.outbox
    WHERE status = ANY(CAST(:statuses AS text[])) AND updated_at < now() - :older_than
    """
)
FINISHED_STATUSES = ("done", "superseded")


def list_messages(conn: Connection, *, status: str | None = None, limit: int = 50) -> list[OutboxRow]:
    if status is not None and status not in OUTBOX_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(OUTBOX_STATUSES)}, got {status!r}")
    with conn.begin():
        rows = conn.execute(_LIST, {"status": status, "limit": limit}).all()
    return [OutboxRow(**r._mapping) for r in rows]


def get_message(conn: Connection, message_id: int) -> OutboxRow:
    with conn.begin():
        row = conn.execute(_SHOW, {"id": message_id}).one_or_none()
    if row is None:
        raise InvalidInput(f"no outbox message with id {message_id}")
    return OutboxRow(**row._mapping)


def purge(conn: Connection, *, older_than: timedelta, statuses: Sequence[str] = FINISHED_STATUSES) -> int:
    """Delete finished messages last changed more than ``older_than`` ago; return how many."""
    unknown = set(statuses) - set(OUTBOX_STATUSES)
    if unknown or {"pending", "running"} & set(statuses):
        raise InvalidInput("purge removes only done, superseded or dead messages")
    with conn.begin():
        return conn.execute(_PURGE, {"statuses": list(statuses), "older_than": older_than}).rowcount
