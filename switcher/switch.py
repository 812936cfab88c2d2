"""The critical section: move an agent off a failing subscription, once, in one transaction.

Written once, synchronously, against a SQLAlchemy ``Connection``; ``AsyncSwitcher`` runs the same
functions through ``AsyncConnection.run_sync``.

Lock order (the only locks taken, always in this order, so switches cannot deadlock each other):

1. the agent's row, ``FOR UPDATE`` -- serializes every switch and assignment of that agent, in any
   process on any host;
2. at most one capacity-limited subscription row at a time, ``FOR NO KEY UPDATE`` -- only when the
   chosen alternative has ``max_agents``. A candidate found full is released again by rolling back to
   the savepoint taken before locking it. ``NO KEY UPDATE`` still lets failures be recorded against it.

Nothing else is locked: switches of different agents onto unlimited subscriptions never wait on each
other. Deadlocks (40P01) and serialization failures (40001), which only foreign code sharing the
transaction could cause, are retried a bounded number of times; a lock wait longer than
``lock_timeout`` ends in ``SwitchBusy``.
"""

from __future__ import annotations

from collections.abc import Callable
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
        if not timedelta(0) < self.lock_timeout <= timedelta(hours=1):
            raise InvalidInput(f"lock_timeout must be above 0 and at most 1 hour, got {self.lock_timeout}")
        validate.integer(self.max_retries, "max_retries", minimum=0)

    @property
    def lock_timeout_setting(self) -> str:
        return f"{max(1, round(self.lock_timeout.total_seconds() * 1000))}ms"


# Unlocked first look: resolves names, sets the lock timeout, and lets a visibly stale report leave
# without queueing behind the lock holder. current_setting runs before set_config (left to right).
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

# Lock the agent and record the failure (always: the failure is a fact about the subscription, and it
# is what puts that subscription into cooldown). Settings are read here, not cached: every process
# must agree on them.
_LOCK_AND_RECORD = text(
    """
    WITH locked AS (
        SELECT id, subscription_id, generation, container
        FROM switcher.agents WHERE id = :agent_id
        FOR UPDATE
    ), failure AS (
        INSERT INTO switcher.failures (agent_id, subscription_id, kind, message)
        SELECT id, :snapshot_id, :kind, :message FROM locked
        RETURNING id
    )
    SELECT l.subscription_id, l.generation, l.container,
           (SELECT s.name FROM switcher.subscriptions s WHERE s.id = l.subscription_id) AS current_name,
           COALESCE((SELECT auto_switch FROM switcher.settings WHERE id = 1), true) AS auto_switch,
           COALESCE((SELECT cooldown_window FROM switcher.settings WHERE id = 1), interval '2 hours')
               AS cooldown_window,
           (SELECT id FROM failure) AS failure_id
    FROM locked l
    """
)

# A separate statement from the lock on purpose: after waiting for the lock, a new statement sees
# what the previous holder committed (READ COMMITTED takes a fresh snapshot per statement).
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

# Under the subscription's lock: its load, and whether it started failing since we listed candidates.
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
    agent_name = validate.name(agent, "agent")
    snapshot = validate.optional_name(failed_subscription, "failed_subscription")
    failure_kind = validate.kind(kind)
    stored_message = validate.message(message)
    return run_transaction(
        conn,
        joined,
        options,
        lambda: _switch(conn, agent_name, snapshot, failure_kind, stored_message, options, joined),
    )


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


def _switch(
    conn: Connection,
    agent: str,
    snapshot: str | None,
    kind: FailureKind,
    message: str,
    options: SwitchOptions,
    joined: bool,
) -> SwitchResult:
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
        _LOCK_AND_RECORD,
        {"agent_id": look.id, "snapshot_id": snapshot_id, "kind": kind.value, "message": message},
    ).one_or_none()
    if locked is None:
        raise UnknownAgent(agent)  # deleted while we waited for it
    result = _decide(conn, look.id, agent, snapshot_id, kind, message, locked, options)
    if joined:
        conn.execute(_SET_LOCK_TIMEOUT, {"value": look.previous_lock_timeout})
    return result


def _decide(
    conn: Connection,
    agent_id: int,
    agent: str,
    snapshot_id: int,
    kind: FailureKind,
    message: str,
    locked: Row[Any],
    options: SwitchOptions,
) -> SwitchResult:
    if locked.subscription_id is None:
        return _unchanged(Outcome.NOT_SUBSCRIPTION_BACKED, agent, None, locked.generation)
    if locked.subscription_id != snapshot_id:
        # The stale guard: another switch won while we waited for the lock.
        return _unchanged(Outcome.STALE, agent, locked.current_name, locked.generation)
    if not locked.auto_switch:
        return _unchanged(Outcome.DISABLED, agent, locked.current_name, locked.generation)

    rows = conn.execute(
        _CANDIDATES, {"failed_id": snapshot_id, "cooldown_window": locked.cooldown_window}
    ).all()
    candidates = [Candidate(r.id, r.name, r.priority, r.max_agents, r.assigned) for r in rows]
    for candidate in options.policy.rank([c for c in candidates if c.has_room]):
        if candidate.max_agents is None or _reserve(conn, candidate.id, locked.cooldown_window):
            generation, restart_id = _move(
                conn,
                agent_id=agent_id,
                agent=agent,
                container=locked.container,
                from_id=snapshot_id,
                to=candidate,
                kind=kind,
                reason=message,
            )
            return SwitchResult(
                Outcome.SWITCHED, agent, locked.current_name, candidate.name, generation, restart_id
            )
    return _unchanged(Outcome.NO_ALTERNATIVE, agent, locked.current_name, locked.generation)


def _reserve(conn: Connection, subscription_id: int, cooldown_window: timedelta | None) -> bool:
    """Lock a capacity-limited subscription and check it still has room (and is still usable).

    On ``False`` the lock is released again (rollback to the savepoint), so a switch holds at most one
    subscription lock and never waits on a second while holding a first.
    """
    savepoint = conn.begin_nested()
    sub = conn.execute(_LOCK_SUBSCRIPTION, {"id": subscription_id}).one_or_none()
    load = conn.execute(
        _LOAD, {"id": subscription_id, "cooldown_window": cooldown_window or timedelta(0)}
    ).one()
    usable = (
        sub is not None
        and sub.enabled
        and not load.cooling
        and (sub.max_agents is None or load.assigned < sub.max_agents)
    )
    if usable:
        savepoint.commit()
    else:
        savepoint.rollback()
    return usable


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
    to = Candidate(sub.id, sub.name, sub.priority, sub.max_agents, 0)
    generation, restart_id = _move(
        conn,
        agent_id=locked.id,
        agent=agent,
        container=locked.container,
        from_id=locked.subscription_id,
        to=to,
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
