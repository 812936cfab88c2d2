"""The critical section: move an agent off a failing subscription, once, in one transaction.

Written once, synchronously, against a SQLAlchemy ``Connection``; ``AsyncSwitcher`` runs the same
functions through ``AsyncConnection.run_sync``.

How one report is handled (READ COMMITTED, one transaction or a savepoint of the caller's):

1. An unlocked look resolves the names and sets ``lock_timeout``. If the agent has visibly left the
   reported subscription already, the answer is ``STALE`` at once: no lock, no write.
2. ``SELECT ... FOR UPDATE`` of the agent row *on condition that it still uses the reported
   subscription*. This is the stale guard, evaluated by Postgres against the newest row version once
   the lock is free: reports that queued behind the winner's switch find no row and answer ``STALE``
   together, instead of taking the lock one after another. The failure is recorded in the same
   statement (always, auto-switch on or off: it is what puts the subscription into cooldown).
3. Candidates are read in a new statement (so they include what the previous lock holder committed),
   ranked by the policy, and the first one with room is taken.
4. The agent is moved, the switch logged and the restart enqueued (with ``NOTIFY``); commit.

Lock order (the only locks taken, always in this order, so switches cannot deadlock each other):

1. the agent's row, ``FOR UPDATE`` -- serializes every switch and assignment of that agent, in any
   process on any host;
2. at most one capacity-limited subscription row at a time, ``FOR NO KEY UPDATE`` (which still lets
   failures be recorded against it) -- only when the chosen alternative has ``max_agents``. A
   candidate found full is released by rolling back to the savepoint taken before locking it.
   Candidates locked by another switch are skipped at first and waited for only if no other has room,
   so a herd spreads over the alternatives instead of queueing on the first.

Nothing else is locked: switches of different agents onto unlimited subscriptions never wait on each
other. Deadlocks (40P01) and serialization failures (40001), which only foreign code sharing the
transaction could cause, are retried a bounded number of times; a lock wait longer than
``lock_timeout`` ends in ``SwitchBusy``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Row, text
from sqlalchemy.exc import DBAPIError

from . import outbox, validate
from .errors import CapacityExceeded, InvalidInput, SwitchBusy, UnknownAgent, UnknownSubscription
from .model import FailureKind, Outcome, SwitchResult
from .selection import Candidate, LeastLoaded, SelectionPolicy

T = TypeVar("T")

RETRIED_SQLSTATES = frozenset({"40P01", "40001"})
LOCK_NOT_AVAILABLE = "55P03"


@dataclass(frozen=True, slots=True)
class SwitchOptions:
    lock_timeout: timedelta = timedelta(seconds=3)
    """Longest wait for a row lock before ``SwitchBusy``."""
    policy: SelectionPolicy = field(default_factory=LeastLoaded)
    max_retries: int = 3
    """Extra attempts after a deadlock or serialization failure."""

    def __post_init__(self) -> None:
        if not isinstance(self.lock_timeout, timedelta) or not (
            timedelta(0) < self.lock_timeout <= timedelta(hours=1)
        ):
            raise InvalidInput(
                f"lock_timeout must be a timedelta above 0 and at most 1 hour, got {self.lock_timeout!r}"
            )
        validate.integer(self.max_retries, "max_retries", minimum=0)

    @property
    def lock_timeout_setting(self) -> str:
        return f"{max(1, round(self.lock_timeout.total_seconds() * 1000))}ms"


_LOOK = text(
    """
    SELECT a.id, a.subscription_id, a.generation, cur.name AS current_name,
           (SELECT s.id FROM switcher.subscriptions s WHERE s.name = :snapshot) AS snapshot_id,
           current_setting('lock_timeout') AS previous_lock_timeout,
           set_config('lock_timeout', :lock_timeout, true) AS lock_timeout
    FROM switcher.agents a
    LEFT JOIN switcher.subscriptions cur ON cur.id = a.subscription_id
    WHERE a.name = :agent
    """
)

# Settings are read here, not cached: every process must agree on them.
_LOCK_IF_CURRENT_AND_RECORD = text(
    """
    WITH locked AS (
        SELECT id, subscription_id, generation, container
        FROM switcher.agents
        WHERE id = :agent_id AND subscription_id = :snapshot_id
        FOR UPDATE
    ), failure AS (
        INSERT INTO switcher.failures (agent_id, subscription_id, kind, message)
        SELECT id, subscription_id, :kind, :message FROM locked
    )
    SELECT l.generation, l.container,
           COALESCE((SELECT auto_switch FROM switcher.settings WHERE id = 1), true) AS auto_switch,
           COALESCE((SELECT cooldown_window FROM switcher.settings WHERE id = 1), interval '2 hours')
               AS cooldown_window
    FROM locked l
    """
)

# After the guarded lock found no row: why not (gone, unassigned, or moved on)?
_CURRENT = text(
    """
    SELECT a.subscription_id, a.generation, s.name AS current_name
    FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
    WHERE a.id = :agent_id
    """
)

_CANDIDATES = text(
    """
    SELECT s.id, s.name, s.priority, s.max_agents,
           (SELECT count(*) FROM switcher.agents a WHERE a.subscription_id = s.id) AS assigned
    FROM switcher.subscriptions s
    WHERE s.enabled
      AND s.id <> :failed_id
      AND NOT EXISTS (
          SELECT 1 FROM switcher.failures f
          WHERE f.subscription_id = s.id AND f.occurred_at > now() - :cooldown_window
      )
    """
)

_LOCK_SUBSCRIPTION = text(
    "SELECT max_agents, enabled FROM switcher.subscriptions WHERE id = :id FOR NO KEY UPDATE"
)
_LOCK_SUBSCRIPTION_SKIP_LOCKED = text(
    "SELECT max_agents, enabled FROM switcher.subscriptions WHERE id = :id FOR NO KEY UPDATE SKIP LOCKED"
)

# A separate statement from the lock: after a lock wait, only a new statement sees what the previous
# holder committed (READ COMMITTED takes a snapshot per statement).
_LOAD = text(
    """
    SELECT (SELECT count(*) FROM switcher.agents WHERE subscription_id = :id) AS assigned,
           EXISTS (SELECT 1 FROM switcher.failures
                   WHERE subscription_id = :id AND occurred_at > now() - :cooldown_window) AS cooling
    """
)

_LOCK_AGENT = text(
    """
    SELECT a.id, a.subscription_id, a.generation, a.container, s.name AS current_name
    FROM switcher.agents a
    LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
    WHERE a.name = :agent
    FOR UPDATE OF a
    """
)

_MOVE = text(
    """
    WITH moved AS (
        UPDATE switcher.agents
        SET subscription_id = :to_id, generation = generation + 1, updated_at = now()
        WHERE id = :agent_id
        RETURNING id, generation
    )
    INSERT INTO switcher.switches
        (agent_id, from_subscription_id, to_subscription_id, kind, generation, reason)
    SELECT id, :from_id, :to_id, :kind, generation, :reason FROM moved
    RETURNING generation
    """
)

_SET_LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', :value, true)")


def handle_failure(
    conn: Connection,
    *,
    agent: object,
    failed_subscription: object,
    kind: object,
    message: object,
    options: SwitchOptions,
    joined: bool,
) -> SwitchResult:
    """Run the switch on ``conn``: in a transaction of its own, or (``joined``) in a savepoint of the
    caller's transaction, which the caller then commits or rolls back."""
    report = _Report(
        agent=validate.name(agent, "agent"),
        snapshot=validate.optional_name(failed_subscription, "failed_subscription"),
        kind=validate.kind(kind),
        message=validate.message(message),
    )
    return run_transaction(conn, joined, options, lambda: _switch(conn, report, options, joined))


def assign(conn: Connection, *, agent: object, subscription: object, options: SwitchOptions) -> SwitchResult:
    """Assign the agent to ``subscription`` by hand (capacity respected) and enqueue its restart."""
    agent_name = validate.name(agent, "agent")
    target = validate.name(subscription, "subscription")
    return run_transaction(conn, False, options, lambda: _assign(conn, agent_name, target, options))


def run_transaction(conn: Connection, joined: bool, options: SwitchOptions, body: Callable[[], T]) -> T:
    """Run ``body`` in a transaction (or savepoint), retrying deadlocks a bounded number of times."""
    for attempt in range(options.max_retries + 1):
        transaction = conn.begin_nested() if joined else conn.begin()
        try:
            with transaction:
                return body()
        except DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            if sqlstate == LOCK_NOT_AVAILABLE:
                raise SwitchBusy(
                    f"a row this switch needs stayed locked longer than lock_timeout "
                    f"({options.lock_timeout_setting}); nothing was written, retry later"
                ) from error
            if sqlstate not in RETRIED_SQLSTATES or attempt == options.max_retries:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class _Report:
    agent: str
    snapshot: str | None
    kind: FailureKind
    message: str


def _switch(conn: Connection, report: _Report, options: SwitchOptions, joined: bool) -> SwitchResult:
    agent, snapshot = report.agent, report.snapshot
    look = conn.execute(
        _LOOK, {"agent": agent, "snapshot": snapshot, "lock_timeout": options.lock_timeout_setting}
    ).one_or_none()
    if look is None:
        raise UnknownAgent(agent)
    if snapshot is not None and look.snapshot_id is None:
        raise UnknownSubscription(snapshot)
    if look.subscription_id is None:
        return _unchanged(Outcome.NOT_SUBSCRIPTION_BACKED, agent, None, look.generation)
    snapshot_id = look.subscription_id if snapshot is None else look.snapshot_id
    if snapshot_id != look.subscription_id:
        # Visibly stale: someone already moved the agent and committed. Leave without waiting.
        return _unchanged(Outcome.STALE, agent, look.current_name, look.generation)

    locked = conn.execute(
        _LOCK_IF_CURRENT_AND_RECORD,
        {
            "agent_id": look.id,
            "snapshot_id": snapshot_id,
            "kind": report.kind.value,
            "message": report.message,
        },
    ).one_or_none()
    if locked is None:
        result = _not_locked(conn, agent, look.id)
    else:
        result = _decide(
            conn,
            report,
            agent_id=look.id,
            from_subscription=(snapshot_id, look.current_name),
            locked=locked,
            options=options,
        )
    if joined:
        conn.execute(_SET_LOCK_TIMEOUT, {"value": look.previous_lock_timeout})
    return result


def _not_locked(conn: Connection, agent: str, agent_id: int) -> SwitchResult:
    """The guarded lock found no row: the stale guard fired (or the agent changed under us)."""
    current = conn.execute(_CURRENT, {"agent_id": agent_id}).one_or_none()
    if current is None:
        raise UnknownAgent(agent)  # deleted while we waited for it
    if current.subscription_id is None:
        return _unchanged(Outcome.NOT_SUBSCRIPTION_BACKED, agent, None, current.generation)
    return _unchanged(Outcome.STALE, agent, current.current_name, current.generation)


def _decide(
    conn: Connection,
    report: _Report,
    *,
    agent_id: int,
    from_subscription: tuple[int, str],
    locked: Row[Any],
    options: SwitchOptions,
) -> SwitchResult:
    agent = report.agent
    from_id, from_name = from_subscription
    if not locked.auto_switch:
        return _unchanged(Outcome.DISABLED, agent, from_name, locked.generation)

    rows = conn.execute(_CANDIDATES, {"failed_id": from_id, "cooldown_window": locked.cooldown_window}).all()
    candidates = [Candidate(r.id, r.name, r.priority, r.max_agents, r.assigned) for r in rows]
    ranked = options.policy.rank([c for c in candidates if c.has_room])
    chosen = _reserve_first(conn, ranked, locked.cooldown_window)
    if chosen is None:
        return _unchanged(Outcome.NO_ALTERNATIVE, agent, from_name, locked.generation)
    generation, restart_id = _move(
        conn,
        agent_id=agent_id,
        agent=agent,
        container=locked.container,
        from_id=from_id,
        to=chosen,
        kind=report.kind,
        reason=report.message,
    )
    return SwitchResult(Outcome.SWITCHED, agent, from_name, chosen.name, generation, restart_id)


class _Reservation(enum.Enum):
    RESERVED = enum.auto()
    FULL = enum.auto()
    BUSY = enum.auto()


def _reserve_first(
    conn: Connection, ranked: Sequence[Candidate], cooldown_window: timedelta
) -> Candidate | None:
    """The first ranked candidate that has room. Unlimited ones need no lock; capacity-limited ones
    are locked and re-counted, first without waiting on other switches, then (if needed) waiting."""
    busy: list[Candidate] = []
    for candidate in ranked:
        if candidate.max_agents is None:
            return candidate
        reservation = _reserve(conn, candidate.id, cooldown_window, wait=False)
        if reservation is _Reservation.RESERVED:
            return candidate
        if reservation is _Reservation.BUSY:
            busy.append(candidate)
    for candidate in busy:
        if _reserve(conn, candidate.id, cooldown_window, wait=True) is _Reservation.RESERVED:
            return candidate
    return None


def _reserve(
    conn: Connection, subscription_id: int, cooldown_window: timedelta, *, wait: bool
) -> _Reservation:
    """Lock a capacity-limited subscription and check it still has room and is still usable.

    Unless reserved, the lock is released again (rollback to the savepoint), so a switch holds at most
    one subscription lock and never waits on a second while holding a first.
    """
    savepoint = conn.begin_nested()
    lock = _LOCK_SUBSCRIPTION if wait else _LOCK_SUBSCRIPTION_SKIP_LOCKED
    sub = conn.execute(lock, {"id": subscription_id}).one_or_none()
    if sub is None:
        savepoint.rollback()
        return _Reservation.BUSY  # locked by another switch (SKIP LOCKED), or deleted
    load = conn.execute(_LOAD, {"id": subscription_id, "cooldown_window": cooldown_window}).one()
    if sub.enabled and not load.cooling and (sub.max_agents is None or load.assigned < sub.max_agents):
        savepoint.commit()
        return _Reservation.RESERVED
    savepoint.rollback()
    return _Reservation.FULL


def _move(
    conn: Connection,
    *,
    agent_id: int,
    agent: str,
    container: str | None,
    from_id: int | None,
    to: Candidate,
    kind: FailureKind | None,
    reason: str,
) -> tuple[int, int]:
    """Reassign the locked agent, log the switch and enqueue its restart; return (generation, restart_id)."""
    generation = conn.execute(
        _MOVE,
        {
            "agent_id": agent_id,
            "from_id": from_id,
            "to_id": to.id,
            "kind": kind.value if kind else None,
            "reason": reason,
        },
    ).scalar_one()
    restart_id = outbox.enqueue(
        conn,
        kind=outbox.RESTART_AGENT,
        agent_id=agent_id,
        generation=generation,
        payload={"agent": agent, "container": container, "subscription": to.name},
    )
    return generation, restart_id


def _assign(conn: Connection, agent: str, target: str, options: SwitchOptions) -> SwitchResult:
    conn.execute(_SET_LOCK_TIMEOUT, {"value": options.lock_timeout_setting})
    locked = conn.execute(_LOCK_AGENT, {"agent": agent}).one_or_none()
    if locked is None:
        raise UnknownAgent(agent)
    sub = conn.execute(
        text("SELECT id, name, priority, max_agents FROM switcher.subscriptions WHERE name = :name"),
        {"name": target},
    ).one_or_none()
    if sub is None:
        raise UnknownSubscription(target)
    if sub.id == locked.subscription_id:
        return _unchanged(Outcome.UNCHANGED, agent, target, locked.generation)
    if sub.max_agents is not None:
        reserve_capacity(conn, sub.id, target)
    generation, restart_id = _move(
        conn,
        agent_id=locked.id,
        agent=agent,
        container=locked.container,
        from_id=locked.subscription_id,
        to=Candidate(sub.id, sub.name, sub.priority, sub.max_agents, 0),
        kind=None,
        reason="manual assignment",
    )
    return SwitchResult(Outcome.SWITCHED, agent, locked.current_name, target, generation, restart_id)


def reserve_capacity(conn: Connection, subscription_id: int, name: str) -> None:
    """Lock a capacity-limited subscription for an explicit assignment; raise when it is full."""
    sub = conn.execute(_LOCK_SUBSCRIPTION, {"id": subscription_id}).one()
    assigned = conn.execute(_LOAD, {"id": subscription_id, "cooldown_window": timedelta(0)}).one().assigned
    if sub.max_agents is not None and assigned >= sub.max_agents:
        raise CapacityExceeded(
            f"subscription {name!r} already has {assigned} of its {sub.max_agents} agents; "
            "raise max_agents or choose another subscription"
        )


def _unchanged(outcome: Outcome, agent: str, current: str | None, generation: int) -> SwitchResult:
    return SwitchResult(outcome, agent, current, current, generation)
