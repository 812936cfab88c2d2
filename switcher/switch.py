"""The switch, from the caller's side: one call of ``switcher.handle_failure_v2`` per report.

The critical section -- what is locked, in which order, and why a burst of reports ends in exactly one
switch -- lives in the database, next to the rows it locks: ``sql/switch.sql``, read it there. This
module validates nothing (``operations`` does), runs that call in the right transaction, retries it
honestly and turns its answer into a ``SwitchResult`` or a typed error.

Retries. A deadlock or serialization failure (only foreign code sharing a joined transaction can cause
them) is retried a bounded number of times. So is a connection lost mid-call, outside a joined
transaction: the reply may be lost *after* the database committed. Every report carries a report id, which
the database stores with the failure it records, so the retry finds its own earlier answer and returns it
(``replayed``) instead of answering ``STALE`` about the switch it made itself, or switching again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import sql, validate
from .errors import CapacityExceeded, InvalidInput, SwitchBusy, UnknownAgent, UnknownSubscription
from .model import FailureKind, Outcome, SwitchResult
from .outbox import NOTIFY_CHANNEL, NOTIFY_SWITCH, RESTART_AGENT, Outbox
from .registry import Registry
from .selection import BuiltinPolicy, LeastLoaded, SelectionPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)

RETRIED_SQLSTATES = frozenset({"40P01", "40001"})
LOCK_NOT_AVAILABLE = "55P03"
REPORT_ID_KEY = "failures_report_id_key"


@dataclass(frozen=True, slots=True)
class Options:
    """How a front door switches."""

    lock_timeout: timedelta = timedelta(seconds=3)
    """Longest wait for a row lock before ``SwitchBusy``."""
    policy: SelectionPolicy = field(default_factory=LeastLoaded)
    max_retries: int = 3
    """Extra attempts after a deadlock, a serialization failure or a lost connection."""

    def __post_init__(self) -> None:
        if not isinstance(self.lock_timeout, timedelta):
            raise InvalidInput(f"lock_timeout must be a timedelta, got {self.lock_timeout!r}")
        validate.duration(
            self.lock_timeout, "lock_timeout", maximum=timedelta(hours=1), exclusive_minimum=True
        )
        if not callable(getattr(self.policy, "rank", None)):
            raise InvalidInput(f"policy must have a rank(candidates) method, got {self.policy!r}")
        validate.integer(self.max_retries, "max_retries", minimum=0, maximum=100)

    @property
    def lock_timeout_setting(self) -> str:
        """PostgreSQL's ``lock_timeout`` for these options, spelled as ``SHOW lock_timeout`` spells it (the
        largest unit that divides it), so the switch can tell that a session has it already."""
        ms = max(1, round(self.lock_timeout.total_seconds() * 1000))
        for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1_000)):
            if ms % size == 0:
                return f"{ms // size}{unit}"
        return f"{ms}ms"


@dataclass(frozen=True, slots=True)
class Report:
    """A validated report of a failure."""

    report_id: str
    agent: str
    snapshot: str | None
    generation: int | None
    kind: FailureKind
    message: str


def report_failure(db: Registry, report: Report, options: Options, *, joined: bool) -> SwitchResult:
    """Report a failure: as a statement of its own (autocommit), or inside the caller's transaction
    (``joined``, in a savepoint), taking effect when the caller commits."""
    params: dict[str, Any] = {
        "report_id": report.report_id,
        "agent": report.agent,
        "snapshot": report.snapshot,
        "generation": report.generation,
        "kind": report.kind.value,
        "message": report.message,
        "lock_timeout": options.lock_timeout_setting,
        "channel": _channel(joined),
        "restart_kind": RESTART_AGENT,
        "notify_kind": NOTIFY_SWITCH,
    }

    def call() -> SwitchResult:
        policy = options.policy
        if isinstance(policy, BuiltinPolicy):
            params.update(priority_first=policy.priority_first, ranked=None)
        else:
            ranked = policy.rank(db.candidates(report.agent, report.snapshot))
            params.update(priority_first=False, ranked=[c.name for c in ranked])
        try:
            row = db.handle_failure(**params)
        except IntegrityError as error:
            if sql.violated_constraint(error) == REPORT_ID_KEY:
                raise _reused(report.report_id) from None
            raise
        if row.outcome == "report_id_reused":
            raise _reused(report.report_id)
        _wake_after_commit(db, row, joined)
        return _result(row, report.agent, report.snapshot, report.report_id)

    return run(db.conn, joined, options, call)


def _channel(joined: bool) -> str | None:
    """Where the database function sends its NOTIFY: inside a joined transaction it must (only the caller
    knows when that commits); on its own, the switch has committed when the call returns, and the wake-up
    follows outside it (see ``enqueue_v2`` in sql/outbox.sql for why)."""
    return NOTIFY_CHANNEL if joined else None


def _wake_after_commit(db: Registry, row: Any, joined: bool) -> None:
    if row.wake and not joined:
        try:
            Outbox(db.conn).wake(row.restart_id)
        except DBAPIError as error:  # the switch stands; drainers find its message when they poll
            log.info("could not wake the drainers after a switch (%s); they will poll", error.orig)


def _reused(report_id: str) -> InvalidInput:
    return InvalidInput(f"report_id {report_id!r} was already used by a report of another agent")


def assign(db: Registry, agent: str, subscription: str, options: Options) -> SwitchResult:
    """Move ``agent`` to ``subscription`` by hand (capacity respected) and enqueue its restart."""
    params = {
        "agent": agent,
        "subscription": subscription,
        "lock_timeout": options.lock_timeout_setting,
        "channel": _channel(False),
        "restart_kind": RESTART_AGENT,
        "notify_kind": NOTIFY_SWITCH,
    }

    def call() -> SwitchResult:
        row = db.assign(**params)
        if row.outcome == "full":
            raise CapacityExceeded(
                f"subscription {subscription!r} already has its max_agents agents; "
                "raise max_agents or choose another subscription"
            )
        _wake_after_commit(db, row, False)
        return _result(row, agent, subscription, None)

    # A manual assignment has no report id: a lost reply is not retried (the operator looks and decides).
    return run(db.conn, False, options, call, retry_lost_connection=False)


def run(
    conn: Connection,
    joined: bool,
    options: Options,
    body: Callable[[], T],
    *,
    retry_lost_connection: bool = True,
) -> T:
    """Run ``body`` on an autocommit connection (each statement its own transaction: no BEGIN or COMMIT
    round trips) or, ``joined``, in a savepoint of the caller's transaction; with bounded retries."""
    for attempt in range(options.max_retries + 1):
        try:
            if joined:
                with conn.begin_nested():
                    return body()
            return body()  # the front door gave an autocommit connection
        except DBAPIError as error:
            state = sql.sqlstate(error)
            if state == LOCK_NOT_AVAILABLE:
                raise SwitchBusy(
                    f"a row this switch needs stayed locked longer than lock_timeout "
                    f"({options.lock_timeout_setting}); nothing was written, retry later"
                ) from error
            lost = error.connection_invalidated and not joined and retry_lost_connection
            if not (state in RETRIED_SQLSTATES or lost) or attempt == options.max_retries:
                raise
            if not joined:
                conn.rollback()  # a lost connection is replaced on the next attempt
    raise AssertionError("unreachable")  # pragma: no cover


def _result(row: Any, agent: str, subscription: str | None, report_id: str | None) -> SwitchResult:
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
        report_id,
        bool(getattr(row, "replayed", False)),
    )
