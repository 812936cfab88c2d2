"""Handlers: what a drainer does with each kind of message.

A handler is any callable taking a ``Claim`` and returning a short result; it runs outside any
transaction and raises to have the message retried (``Undeliverable``: dead at once). Host applications
plug their own kinds in by adding to the handlers given to the ``Drainer``, and enqueue them with
``Outbox(conn).enqueue(...)`` in their own transactions.

* ``restart_agent`` (``RestartAgent``) applies the agent's *current* assignment through a runtime -- read
  when the handler runs, not from the message, which is what makes a burst of switches end with the
  latest one applied, whichever message of the burst runs last;
* ``notify_switch`` (``NotifySwitch``) POSTs one switch to the webhook, with ``Idempotency-Key``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .. import metrics, sql
from ..credentials import CredentialPolicy
from ..errors import Undeliverable
from ..http import post_json
from ..model import AgentTarget
from ..outbox import NOTIFY_SWITCH, RESTART_AGENT, DeliveryState, Outbox
from ..registry import Registry
from ..runtime import Runtime
from .config import autocommit
from .leases import Abandoned, Claim

log = logging.getLogger(__name__)

Handler = Callable[[Claim], str]
GATE_WAIT = "1s"
"""How long one wait for an agent's gate lasts before the drainer checks it still holds its lease."""
LOCK_NOT_AVAILABLE = "55P03"
Handlers = Mapping[str, Handler]


class AgentDelivery:
    """A ``runtime.Delivery``: one delivery of an agent's assignment, backed by the database."""

    def __init__(
        self,
        engine: Engine,
        claim: Claim,
        target: AgentTarget,
        credentials: CredentialPolicy,
        drain_timeout: timedelta,
    ) -> None:
        assert claim.message.agent_id is not None
        self.engine = engine  # an autocommit engine
        self.claim = claim
        self.target = target
        self.agent_id = claim.message.agent_id
        self.credentials = credentials
        self.drain_timeout = drain_timeout

    @contextlib.contextmanager
    def _outbox(self) -> Iterator[Outbox]:
        with self.engine.connect() as conn:
            yield Outbox(conn)

    def state(self) -> DeliveryState:
        with self._outbox() as outbox:
            return outbox.delivery(self.agent_id)

    def secret(self) -> str | None:
        ref = self.target.credential_ref
        return None if ref is None else self.credentials.resolve(ref)

    def fence(self) -> None:
        self.claim.fence()

    def intended_running(self, observed: bool) -> bool:
        self.claim.fence()
        with self._outbox() as outbox:
            return outbox.record_intent(self.agent_id, observed)

    def applied(self) -> None:
        with self._outbox() as outbox:
            outbox.record_applied(self.agent_id, self.target.generation)

    def abandoned(self) -> None:
        with self._outbox() as outbox:
            outbox.clear_intent(self.agent_id)

    @contextlib.contextmanager
    def drained(self) -> Iterator[None]:
        # The gate is a session-level lock: this connection holds it until the block ends (or, if this
        # process dies, until PostgreSQL notices the connection is gone).
        with self.engine.connect() as conn:
            registry = Registry(conn)
            self._close_gate(registry)
            try:
                self._wait_for_executions(registry)
                yield
            finally:
                try:
                    registry.open_gate(self.agent_id)
                except DBAPIError:
                    # A lost connection (PostgreSQL restarted) took the lock with it; any other failure
                    # must not send a session still holding it back to the pool: close it.
                    conn.invalidate()

    def _close_gate(self, registry: Registry) -> None:
        """Take the gate. Executions registering hold it shared for a moment; another drainer holding it
        (one that lost this message but still runs) is waited for a while -- its fenced steps stop it
        soon -- then this attempt fails, to be retried."""
        deadline = time.monotonic() + self.claim.leases.lease.total_seconds() / 3
        while True:
            try:
                registry.close_gate(self.agent_id, GATE_WAIT)
                return
            except DBAPIError as error:
                if sql.sqlstate(error) != LOCK_NOT_AVAILABLE or time.monotonic() >= deadline:
                    raise
            self.claim.fence()

    def _wait_for_executions(self, registry: Registry) -> None:
        started = time.monotonic()
        deadline = started + self.drain_timeout.total_seconds()
        pause = 0.02
        while (live := registry.live_executions(self.agent_id)) > 0:
            if time.monotonic() >= deadline:
                metrics.DRAIN_WAIT_SECONDS.labels("timed_out").observe(time.monotonic() - started)
                log.warning(
                    "%d execution(s) still running after the drain timeout; restarting anyway",
                    live,
                    extra={"agent": self.target.agent, "drain_timeout": self.drain_timeout.total_seconds()},
                )
                return
            if self.claim.stopping.wait(pause):
                raise Abandoned("the drainer is stopping; nothing was changed yet")
            pause = min(pause * 2, 0.5)
        metrics.DRAIN_WAIT_SECONDS.labels("drained").observe(time.monotonic() - started)


@dataclass
class RestartAgent:
    """The ``restart_agent`` handler: apply the agent's current assignment through ``runtime``."""

    engine: Engine
    runtime: Runtime
    credentials: CredentialPolicy
    drain_timeout: timedelta = timedelta(minutes=5)
    mode: str = "custom"
    """For metrics: the runtime's mode."""

    def __post_init__(self) -> None:
        self.engine = autocommit(self.engine)

    def __call__(self, claim: Claim) -> str:
        message = claim.message
        if message.agent_id is None:
            raise Undeliverable("a restart_agent message must name an agent")
        with self.engine.connect() as conn:
            target = Registry(conn).agent_target(message.agent_id)
        if target is None:
            return "no_agent"
        result = self.runtime.apply(
            AgentDelivery(self.engine, claim, target, self.credentials, self.drain_timeout)
        )
        metrics.DELIVERIES.labels(self.mode, result).inc()
        if result == "no_container":
            log.warning(
                "no container for the agent on this Docker host; check its container name and placement",
                extra={"agent": target.agent, "container": target.container, "placement": target.placement},
            )
        return result


@dataclass
class NotifySwitch:
    """The ``notify_switch`` handler: POST the switch to the webhook (settings ``webhook``, a credential
    reference) with ``Idempotency-Key: switch-<id>``; a 2xx answer delivers it."""

    engine: Engine
    credentials: CredentialPolicy
    timeout: timedelta = timedelta(seconds=10)

    def __call__(self, claim: Claim) -> str:
        payload = claim.message.payload
        with self.engine.connect() as conn:
            reference = _webhook(conn)
        if reference is None:
            return "no_webhook"
        url = self.credentials.resolve(reference)
        try:
            status = post_json(
                url,
                payload,
                timeout=self.timeout.total_seconds(),
                headers={"Idempotency-Key": f"switch-{payload.get('switch_id')}"},
            )
        except OSError as error:
            metrics.NOTIFICATIONS.labels("failed").inc()
            raise ConnectionError(f"the webhook did not answer ({type(error).__name__})") from None
        if not 200 <= status < 300:
            metrics.NOTIFICATIONS.labels("failed").inc()
            raise RuntimeError(f"the webhook answered {status}")
        metrics.NOTIFICATIONS.labels("sent").inc()
        return "notified"


def _webhook(conn: Connection) -> str | None:
    return Registry(conn).settings().webhook


def default_handlers(
    engine: Engine,
    runtime: Runtime,
    credentials: CredentialPolicy,
    *,
    drain_timeout: timedelta = timedelta(minutes=5),
    mode: str = "custom",
) -> dict[str, Handler]:
    return {
        RESTART_AGENT: RestartAgent(engine, runtime, credentials, drain_timeout, mode),
        NOTIFY_SWITCH: NotifySwitch(engine, credentials),
    }
