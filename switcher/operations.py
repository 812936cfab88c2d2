"""Every public operation of ``Switcher`` and ``AsyncSwitcher``, declared once.

An operation is a synchronous body taking a ``Context`` (a connection, the door's options) and the
caller's arguments. Each front door turns it into a method: ``Switcher`` runs it on a connection of its
engine, ``AsyncSwitcher`` runs the same body in a greenlet (SQLAlchemy's bridge to asyncio) and returns an
awaitable.
The body validates its arguments first, so bad input writes nothing, then calls the database's door.

How a door runs a body (``Operation.mode``):

* ``transaction`` -- in a transaction of its own, committed when the body returns;
* ``autocommit`` -- on a connection of its own in autocommit mode: the body manages its statements
  (the switch is one statement, retried honestly; see ``switch``).

A ``joinable`` operation also takes ``connection=``: an open transaction of the caller's to join (a
``Connection`` for ``Switcher``, an ``AsyncConnection`` for ``AsyncSwitcher``); it then takes effect only
when the caller commits.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, Self, TypeVar, overload

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from . import migrate as migrations
from . import switch, validate
from .errors import AlreadyExists, CapacityExceeded, InvalidInput, UnknownAgent, UnknownSubscription
from .model import Agent, FailureKind, Settings, Subscription, SwitchResult
from .outbox import FINISHED_STATUSES, STATUSES, Outbox, OutboxRow, OutboxStats
from .registry import Registry
from .switch import Options, Report

if TYPE_CHECKING:
    from .api import AsyncSwitcher, Switcher

P = ParamSpec("P")
T = TypeVar("T")
Mode = Literal["transaction", "autocommit"]
Joinable = Connection | AsyncConnection | None
"""An open transaction to join: a ``Connection`` (``Switcher``) or ``AsyncConnection`` (``AsyncSwitcher``)."""


@dataclass(frozen=True, slots=True)
class Context:
    """What an operation's body works with."""

    conn: Connection
    options: Options
    joined: bool = False
    """True when running inside the caller's transaction (``connection=``)."""

    @property
    def db(self) -> Registry:
        return Registry(self.conn)

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.conn)


class Operation(Generic[P, T]):
    """A public operation: its body, and how a front door runs it."""

    def __init__(
        self,
        body: Callable[Concatenate[Context, P], T],
        *,
        mode: Mode = "transaction",
        joinable: bool = False,
    ) -> None:
        self.body = body
        self.mode: Mode = mode
        self.joinable = joinable
        self.__doc__ = body.__doc__
        parameters = list(inspect.signature(body).parameters.values())[1:]
        self.signature = inspect.signature(body).replace(parameters=parameters)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, door: None, owner: type) -> Self: ...
    @overload
    def __get__(self, door: Switcher, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, door: AsyncSwitcher, owner: type) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, door: Any, owner: type) -> Any:
        if door is None:
            return self

        @functools.wraps(self.body)
        def method(*args: Any, **kwargs: Any) -> Any:
            return door._call(self, args, kwargs)

        method.__signature__ = self.signature  # type: ignore[attr-defined]
        door.__dict__[self.name] = method  # made once per door: the next lookup finds it there
        return method


def transaction(body: Callable[Concatenate[Context, P], T]) -> Operation[P, T]:
    return Operation(body)


def joined_connection(kwargs: dict[str, Any], expected: type[Connection] | type[AsyncConnection]) -> Any:
    """Take ``connection=`` out of a joinable operation's arguments, checked (H9): it must be an
    ``expected`` connection inside an open transaction."""
    connection = kwargs.pop("connection", None)
    if connection is None:
        return None
    if not isinstance(connection, expected):
        raise InvalidInput(
            f"connection must be a SQLAlchemy {expected.__name__} inside an open transaction, "
            f"got {type(connection).__name__}"
        )
    if not connection.in_transaction():
        raise InvalidInput(
            "connection has no open transaction: call connection.begin() first, so that the switch "
            "commits (or rolls back) with your own writes"
        )
    return connection


@dataclass(frozen=True, slots=True)
class Status:
    """Everything ``switcher status`` shows."""

    agents: list[Agent]
    subscriptions: list[Subscription]
    settings: Settings
    outbox: OutboxStats
    dead: list[OutboxRow]
    recent_switches: list[dict[str, Any]]
    drainers: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class CheckThresholds:
    drainer_seen_within: timedelta = timedelta(minutes=2)
    backlog_age: timedelta = timedelta(minutes=5)


def _subscription(ctx: Context, name: str) -> Subscription:
    found = ctx.db.subscriptions(name)
    if not found:
        raise UnknownSubscription(name)
    return found[0]


def _agent(ctx: Context, name: str) -> Agent:
    found = ctx.db.agents(name)
    if not found:
        raise UnknownAgent(name)
    return found[0]


class Operations:
    """The operations both front doors share (see the module's docstring)."""

    @transaction
    def migrate(ctx: Context) -> str:
        """Upgrade the ``switcher`` schema to the newest migration (Alembic ``upgrade head``); the revision
        it is at now.

        Needs a role that owns schema ``switcher``, or may create it; raises ``MigrationError`` otherwise.
        """
        migrations.upgrade(ctx.conn)
        return migrations.head()

    @transaction
    def schema_revision(ctx: Context) -> str | None:
        """The revision schema ``switcher`` is at (None: never migrated here)."""
        return migrations.current(ctx.conn)

    @transaction
    def uninstall(ctx: Context) -> None:
        """Drop schema ``switcher`` and everything in it: every subscription, agent, message and record.
        The host application's own objects are not touched."""
        migrations.remove_schema(ctx.conn, cascade=True)

    @functools.partial(Operation, mode="autocommit", joinable=True)
    def handle_failure(
        ctx: Context,
        agent: str,
        failed_subscription: str | None,
        kind: FailureKind | str,
        message: str | None = "",
        *,
        report_id: str | None = None,
        failed_generation: int | None = None,
        connection: Joinable = None,
    ) -> SwitchResult:
        """Report that a request of ``agent`` failed on ``failed_subscription`` (the caller's snapshot).

        Switches the agent at most once per failed subscription, however many processes report it.
        ``failed_subscription=None`` means "whatever it uses now" (weaker: a late report can then move an
        agent that was already moved). ``failed_generation`` (``execution().generation``) makes the
        snapshot exact: a report about an earlier generation is ``STALE`` even if the agent came back to
        the same subscription since.

        ``report_id`` identifies the report (one is generated when absent): a retry with the same id --
        by switcher after a lost reply, or by the caller -- returns the original answer, never a second
        switch or a second failure. ``message`` is stored redacted and truncated.

        With ``connection``, the report joins that open transaction (in a savepoint) and takes effect when
        the caller commits.
        """
        del connection  # the front door has put the body on it already
        report = Report(
            report_id=uuid.uuid4().hex if report_id is None else validate.report_id(report_id),
            agent=validate.name(agent, "agent"),
            snapshot=validate.optional_name(failed_subscription, "failed_subscription"),
            generation=(
                None
                if failed_generation is None
                else validate.integer(failed_generation, "failed_generation", minimum=0, maximum=2**62)
            ),
            kind=validate.kind(kind),
            message=validate.message(message),
        )
        return switch.report_failure(ctx.db, report, ctx.options, joined=ctx.joined)

    @functools.partial(Operation, mode="autocommit")
    def assign(ctx: Context, agent: str, subscription: str) -> SwitchResult:
        """Move ``agent`` to ``subscription`` by hand (respecting ``max_agents``) and enqueue its restart.

        Cooldown and ``enabled`` do not apply to a manual assignment. ``UNCHANGED`` when it is there already.
        """
        return switch.assign(
            ctx.db, validate.name(agent, "agent"), validate.name(subscription, "subscription"), ctx.options
        )

    @transaction
    def add_subscription(
        ctx: Context,
        name: str,
        *,
        credential_ref: str,
        priority: int = 0,
        max_agents: int | None = None,
        enabled: bool = True,
    ) -> Subscription:
        """Register a subscription. ``credential_ref`` names where its secret is (``env:NAME`` or
        ``file:/path``), never the secret; lower ``priority`` is preferred; ``max_agents`` caps its agents."""
        subscription = validate.name(name, "subscription")
        row = {
            "name": subscription,
            "credential_ref": validate.credential_ref(credential_ref),
            "priority": validate.integer(priority, "priority"),
            "max_agents": (
                None if max_agents is None else validate.integer(max_agents, "max_agents", minimum=1)
            ),
            "enabled": validate.boolean(enabled, "enabled"),
        }
        if not ctx.db.add_subscription(**row):
            raise AlreadyExists(f"subscription {subscription!r} already exists; choose another name")
        return _subscription(ctx, subscription)

    @transaction
    def set_credential(ctx: Context, name: str, credential_ref: str) -> Subscription:
        """Point a subscription at another credential reference. Agents on it get the new secret at their
        next restart; ``assign`` an agent (or switch it) to apply it sooner."""
        subscription = validate.name(name, "subscription")
        if not ctx.db.set_subscription(subscription, credential_ref=validate.credential_ref(credential_ref)):
            raise UnknownSubscription(subscription)
        return _subscription(ctx, subscription)

    @transaction
    def enable_subscription(ctx: Context, name: str) -> Subscription:
        """Let switches choose this subscription again."""
        subscription = validate.name(name, "subscription")
        if not ctx.db.set_subscription(subscription, enabled=True):
            raise UnknownSubscription(subscription)
        return _subscription(ctx, subscription)

    @transaction
    def disable_subscription(ctx: Context, name: str) -> Subscription:
        """Stop switches from choosing this subscription (agents on it stay until they fail)."""
        subscription = validate.name(name, "subscription")
        if not ctx.db.set_subscription(subscription, enabled=False):
            raise UnknownSubscription(subscription)
        return _subscription(ctx, subscription)

    @transaction
    def remove_subscription(ctx: Context, name: str) -> None:
        """Remove a subscription and its failures. Refused (``InUse``) while agents use it."""
        subscription = validate.name(name, "subscription")
        if not ctx.db.remove_subscription(subscription):
            raise UnknownSubscription(subscription)

    @transaction
    def subscription(ctx: Context, name: str) -> Subscription:
        """One subscription, with its load and the end of its cooldown (if cooling)."""
        return _subscription(ctx, validate.name(name, "subscription"))

    @transaction
    def subscriptions(ctx: Context) -> list[Subscription]:
        """Every subscription, oldest first."""
        return ctx.db.subscriptions()

    @transaction
    def add_agent(
        ctx: Context,
        name: str,
        *,
        subscription: str | None = None,
        container: str | None = None,
        placement: str | None = None,
    ) -> Agent:
        """Register an agent: its subscription (``max_agents`` respected), the Docker container it runs in,
        and its placement (the Docker host whose drainers, ``switcher drain --placement``, restart it)."""
        agent = validate.name(name, "agent")
        row = {
            "name": agent,
            "container": validate.container(container),
            "placement": validate.optional_name(placement, "placement"),
            "subscription_id": None,
        }
        sub_name = validate.optional_name(subscription, "subscription")
        if sub_name is not None:
            found = ctx.db.reserve_for_agent(sub_name)
            if found is None:
                raise UnknownSubscription(sub_name)
            if not found.has_room:
                raise CapacityExceeded(
                    f"subscription {sub_name!r} already has its {found.max_agents} agents; "
                    "raise max_agents or choose another subscription"
                )
            row["subscription_id"] = found.id
        if not ctx.db.add_agent(**row):
            raise AlreadyExists(f"agent {agent!r} already exists; choose another name")
        return _agent(ctx, agent)

    @transaction
    def remove_agent(ctx: Context, name: str) -> None:
        """Remove an agent with its history, its pending messages and its delivery state. Its container is
        left alone."""
        agent = validate.name(name, "agent")
        if not ctx.db.remove_agent(agent):
            raise UnknownAgent(agent)

    @transaction
    def agent(ctx: Context, name: str) -> Agent:
        """One agent: its subscription, container, placement and generation."""
        return _agent(ctx, validate.name(name, "agent"))

    @transaction
    def agents(ctx: Context) -> list[Agent]:
        """Every agent, oldest first."""
        return ctx.db.agents()

    @transaction
    def current_subscription(ctx: Context, agent: str) -> str | None:
        """The subscription ``agent`` uses now: the snapshot to report a failure against. Inside an
        execution, prefer ``execution().subscription``, which also pins the generation."""
        return _agent(ctx, validate.name(agent, "agent")).subscription

    @transaction
    def settings(ctx: Context) -> Settings:
        """The cluster-wide settings every process shares."""
        return ctx.db.settings()

    @transaction
    def update_settings(
        ctx: Context,
        *,
        auto_switch: bool | None = None,
        cooldown_window: timedelta | float | None = None,
        webhook: str | None = None,
        retention: timedelta | float | None = None,
    ) -> Settings:
        """Change what is given, leave the rest. ``webhook`` is a credential reference of the URL to POST
        every switch to (``env:NAME``; an empty string removes it); ``retention`` is how long failures,
        switches and finished messages are kept (never less than the cooldown window, whatever it says)."""
        return ctx.db.update_settings(
            auto_switch=None if auto_switch is None else validate.boolean(auto_switch, "auto_switch"),
            cooldown_window=(
                None if cooldown_window is None else validate.duration(cooldown_window, "cooldown_window")
            ),
            webhook=webhook if webhook in (None, "") else validate.credential_ref(webhook, "webhook"),
            retention=(
                None
                if retention is None
                else validate.duration(retention, "retention", minimum=timedelta(hours=1))
            ),
        )

    @transaction
    def enable_auto_switch(ctx: Context) -> Settings:
        """Switch agents on failures again (cluster-wide)."""
        return ctx.db.update_settings(auto_switch=True)

    @transaction
    def disable_auto_switch(ctx: Context) -> Settings:
        """Record failures but switch nobody (cluster-wide): reports answer ``DISABLED``."""
        return ctx.db.update_settings(auto_switch=False)

    @transaction
    def set_cooldown_window(ctx: Context, window: timedelta | float) -> Settings:
        """How long a failed subscription is skipped as an alternative (default 2 hours)."""
        return ctx.db.update_settings(cooldown_window=validate.duration(window, "cooldown_window"))

    @functools.partial(Operation, mode="autocommit")
    def prune(ctx: Context, batch: int = 1_000) -> dict[str, int]:
        """Delete failures, switches and finished messages older than the retention period (never inside
        the cooldown window), in batches of ``batch`` rows; how many of each. Drainers do the same in the
        background, one batch at a time."""
        size = validate.integer(batch, "batch", minimum=1, maximum=100_000)
        total = {"failures": 0, "switches": 0, "messages": 0}
        while True:
            deleted = ctx.db.prune(size)
            for key, count in deleted.items():
                total[key] += count
            if max(deleted.values()) < size:
                return total

    @transaction
    def status(ctx: Context, recent: int = 10) -> Status:
        """Agents, subscriptions, settings, outbox backlog, dead messages, recent switches and drainers."""
        limit = validate.integer(recent, "recent", minimum=0, maximum=1_000)
        return Status(
            agents=ctx.db.agents(),
            subscriptions=ctx.db.subscriptions(),
            settings=ctx.db.settings(),
            outbox=ctx.outbox.stats(),
            dead=ctx.outbox.messages(status="dead", limit=20),
            recent_switches=ctx.db.recent_switches(limit),
            drainers=ctx.outbox.drainers(),
        )

    @transaction
    def messages(ctx: Context, *, status: str | None = None, limit: int = 50) -> list[OutboxRow]:
        """Outbox messages, newest first, optionally of one ``status``."""
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        return ctx.outbox.messages(status=status, limit=validate.integer(limit, "limit", minimum=1))

    @transaction
    def message(ctx: Context, message_id: int) -> OutboxRow:
        """One outbox message."""
        found = ctx.outbox.messages(message_id=_message_id(message_id), limit=1)
        if not found:
            raise InvalidInput(f"no outbox message with id {message_id}")
        return found[0]

    @transaction
    def retry(ctx: Context, ids: Sequence[int] = (), *, all_dead: bool = False) -> dict[int, str]:
        """Give dead (or finished) messages another full set of attempts, due now; their new statuses:
        ``pending``, or ``superseded`` when a newer message of the agent does the work."""
        wanted = [_message_id(i) for i in ids]
        if not wanted and not validate.boolean(all_dead, "all_dead"):
            raise InvalidInput("name the messages to retry, or pass all_dead=True")
        statuses = ctx.outbox.retry(wanted, all_dead=all_dead)
        if missing := sorted(set(wanted) - set(statuses)):
            raise InvalidInput(f"no dead or finished outbox message with id {', '.join(map(str, missing))}")
        return statuses

    @transaction
    def cancel(ctx: Context, ids: Sequence[int]) -> list[int]:
        """Withdraw pending messages (a running one cannot be withdrawn: its handler is at work)."""
        wanted = [_message_id(i) for i in ids]
        cancelled = ctx.outbox.cancel(wanted)
        if missing := sorted(set(wanted) - set(cancelled)):
            raise InvalidInput(f"no pending outbox message with id {', '.join(map(str, missing))}")
        return cancelled

    @transaction
    def purge(ctx: Context, older_than: timedelta | float = timedelta(days=7), *, dead: bool = False) -> int:
        """Delete finished (done, superseded, cancelled) messages, and with ``dead`` dead ones too, last
        changed more than ``older_than`` ago; how many."""
        age = validate.duration(older_than, "older_than")
        statuses = (*FINISHED_STATUSES, "dead") if validate.boolean(dead, "dead") else FINISHED_STATUSES
        return ctx.outbox.purge(older_than=age, statuses=statuses)

    @transaction
    def check(ctx: Context, thresholds: CheckThresholds | None = None) -> list[CheckResult]:
        """What an operator should know is wrong: schema not at head, database functions that differ from
        the installed package, no drainer seen recently, an old backlog, dead messages, load counters out
        of step, recreates interrupted with nothing left to finish them."""
        limits = thresholds or CheckThresholds()
        results = []
        current, head = migrations.current(ctx.conn), migrations.head()
        results.append(CheckResult("schema", current == head, f"at {current}, head is {head}"))
        drift = migrations.function_drift(ctx.conn)
        results.append(
            CheckResult("functions", not drift, "differ: " + ", ".join(drift) if drift else "as shipped")
        )
        window = limits.drainer_seen_within.total_seconds()
        recent = [
            d for d in ctx.outbox.drainers() if d["stopped_at"] is None and d["seen_seconds_ago"] <= window
        ]
        results.append(
            CheckResult(
                "drainers",
                bool(recent),
                f"{len(recent)} seen within {window:.0f} s",
            )
        )
        stats = ctx.outbox.stats()
        age = stats.oldest_pending_seconds or 0.0
        results.append(
            CheckResult(
                "backlog",
                age <= limits.backlog_age.total_seconds(),
                f"{stats.pending} pending, oldest {age:.0f} s",
            )
        )
        results.append(CheckResult("dead messages", stats.dead == 0, f"{stats.dead} dead"))
        drift_rows = ctx.db.load_drift()
        results.append(
            CheckResult(
                "load counters",
                not drift_rows,
                "; ".join(f"{r.name}: {r.load} counted, {r.agents} agents" for r in drift_rows) or "exact",
            )
        )
        unfinished = ctx.outbox.unfinished_deliveries()
        results.append(
            CheckResult(
                "deliveries",
                not unfinished,
                "interrupted, nothing queued to finish: " + ", ".join(unfinished)
                if unfinished
                else "none interrupted",
            )
        )
        return results


def _message_id(value: object) -> int:
    return validate.integer(value, "message id", minimum=1, maximum=2**62)
