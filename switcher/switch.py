"""The critical section: move an agent off a failing subscription, once, in one transaction.

The work happens in the database function ``switcher.handle_failure`` (created by the migration in
``db/versions``): one round trip per report, no row lock held across a network hop, the same code for
every client. This module calls it, once, for both front doors (``AsyncSwitcher`` goes through
``AsyncConnection.run_sync``), and turns its answer into a ``SwitchResult`` or a typed error.

What one report does (READ COMMITTED):

1. An unlocked read resolves the names. If the agent has visibly left the reported subscription
   already, the answer is ``STALE`` at once: no lock, no write.
2. ``SELECT ... FOR UPDATE`` of the agent row *on condition that it still uses the reported
   subscription*. This is the stale guard, re-checked by Postgres on the newest row version once the
   lock is free: reports queued behind a winning switch find no row and answer ``STALE`` together
   instead of taking the lock in turn.
3. The failure is recorded (always, auto-switch on or off: it is what puts the subscription into
   cooldown). Unless auto-switch is off, the eligible candidates (enabled, not the failed one, no
   failure inside the cooldown window, under ``max_agents``) are tried in the policy's order.
4. The agent is moved, ``generation`` bumped, the switch logged and the restart enqueued in the outbox
   (coalescing with a pending one, with ``NOTIFY``); all of it commits together or not at all.

Lock order (the only locks taken, always in this order, so switches cannot deadlock each other):

1. the agent's row, ``FOR UPDATE`` -- serializes every switch and assignment of that agent, in any
   process on any host;
2. at most one capacity-limited subscription row at a time, ``FOR NO KEY UPDATE`` (failures can still
   be recorded against it) -- only for a candidate with ``max_agents``. A candidate found full is
   released at once (its subtransaction is rolled back). Candidates another switch holds are skipped
   at first and waited for only if no other has room, so a herd spreads over the alternatives.

Nothing else is locked: switches of different agents onto unlimited subscriptions never wait on each
other. A lock wait longer than ``lock_timeout`` ends in ``SwitchBusy``. Deadlocks (40P01) and
serialization failures (40001), which only foreign code sharing the transaction could cause, and a
connection lost mid-call, are retried a bounded number of times: a report is idempotent, since a
repeat finds the agent moved and answers ``STALE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from . import validate
from .errors import CapacityExceeded, InvalidInput, SwitchBusy, UnknownAgent, UnknownSubscription
from .model import Outcome, SwitchResult
from .selection import BuiltinPolicy, Candidate, LeastLoaded, SelectionPolicy

T = TypeVar("T")

RETRIED_SQLSTATES = frozenset({"40P01", "40001"})
LOCK_NOT_AVAILABLE = "55P03"


@dataclass(frozen=True, slots=True)
class SwitchOptions:
    lock_timeout: timedelta = timedelta(seconds=3)
    """Longest wait for a row lock before ``SwitchBusy``."""
    policy: SelectionPolicy = field(default_factory=LeastLoaded)
    max_retries: int = 3
    """Extra attempts after a deadlock, a serialization failure or a lost connection."""

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


_HANDLE_FAILURE = text(
    """
    SELECT outcome, old_subscription, new_subscription, agent_generation, restart_id
    FROM switcher.handle_failure(:agent, :snapshot, :kind, :message, :lock_timeout,
                                 :order, CAST(:ranked AS text[]))
    """
)

_ASSIGN = text(
    """
    SELECT outcome, old_subscription, new_subscription, agent_generation, restart_id
    FROM switcher.assign(:agent, :subscription, :lock_timeout)
    """
)

# Only for a policy written in Python: the candidates it ranks. Built-in policies rank in SQL.
_CANDIDATES = text(
    """
    SELECT c.id, c.name, c.priority, c.max_agents, c.assigned
    FROM switcher.agents a
    CROSS JOIN LATERAL switcher.candidates(
        COALESCE((SELECT s.id FROM switcher.subscriptions s WHERE s.name = :snapshot), a.subscription_id),
        COALESCE((SELECT st.cooldown_window FROM switcher.settings st WHERE st.id = 1), interval '2 hours')
    ) c
    WHERE a.name = :agent
    """
)


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
    """Report a failure on ``conn``: as a transaction of its own, or (``joined``) inside the caller's
    transaction, in a savepoint, taking effect when the caller commits."""
    params: dict[str, Any] = {
        "agent": validate.name(agent, "agent"),
        "snapshot": validate.optional_name(failed_subscription, "failed_subscription"),
        "kind": validate.kind(kind).value,
        "message": validate.message(message),
        "lock_timeout": options.lock_timeout_setting,
    }

    def call() -> SwitchResult:
        policy = options.policy
        if isinstance(policy, BuiltinPolicy):
            params.update(order=policy.sql_order, ranked=None)
        else:
            rows = conn.execute(_CANDIDATES, params).all()
            ranked = policy.rank(
                [Candidate(r.id, r.name, r.priority, r.max_agents, r.assigned) for r in rows]
            )
            params.update(order=LeastLoaded.sql_order, ranked=[c.name for c in ranked])
        row = conn.execute(_HANDLE_FAILURE, params).one()
        return _result(row, params["agent"], params["snapshot"])

    return run_transaction(conn, joined, options, call)


def assign(conn: Connection, *, agent: object, subscription: object, options: SwitchOptions) -> SwitchResult:
    """Move ``agent`` to ``subscription`` by hand (capacity respected) and enqueue its restart."""
    params = {
        "agent": validate.name(agent, "agent"),
        "subscription": validate.name(subscription, "subscription"),
        "lock_timeout": options.lock_timeout_setting,
    }

    def call() -> SwitchResult:
        row = conn.execute(_ASSIGN, params).one()
        if row.outcome == "full":
            raise CapacityExceeded(
                f"subscription {params['subscription']!r} already has its max_agents agents; "
                "raise max_agents or choose another subscription"
            )
        return _result(row, params["agent"], params["subscription"])

    return run_transaction(conn, False, options, call)


def run_transaction(conn: Connection, joined: bool, options: SwitchOptions, body: Callable[[], T]) -> T:
    """Run ``body``: on its own in autocommit mode (each statement its own transaction, no BEGIN or
    COMMIT round trips) or, ``joined``, in a savepoint of the caller's transaction. Deadlocks,
    serialization failures and (on its own) lost connections are retried a bounded number of times."""
    for attempt in range(options.max_retries + 1):
        try:
            if joined:
                with conn.begin_nested():
                    return body()
            if not conn.in_transaction():  # a fresh connection, or a replaced one after an error
                conn.execution_options(isolation_level="AUTOCOMMIT")
            return body()
        except DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            if sqlstate == LOCK_NOT_AVAILABLE:
                raise SwitchBusy(
                    f"a row this switch needs stayed locked longer than lock_timeout "
                    f"({options.lock_timeout_setting}); nothing was written, retry later"
                ) from error
            retry = sqlstate in RETRIED_SQLSTATES or (error.connection_invalidated and not joined)
            if not retry or attempt == options.max_retries:
                raise
            if not joined:
                conn.rollback()  # a lost connection is replaced on the next attempt
    raise AssertionError("unreachable")  # pragma: no cover


def _result(row: Any, agent: str, subscription: str | None) -> SwitchResult:
    if row.outcome == "unknown_agent":
        raise UnknownAgent(agent)
    if row.outcome == "unknown_subscription":
        raise UnknownSubscription(str(subscription))
    return SwitchResult(
        Outcome(row.outcome),
        agent,
        row.old_subscription,
        row.new_subscription,
        row.agent_generation,
        row.restart_id,
    )
