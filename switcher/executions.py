"""In-flight executions of agents: what a drain-aware restart waits for, and what it makes wait.

``with sw.execution("alice") as ex:`` (or ``async with asw.execution("alice")``) registers one execution
of the agent -- a chat, a scheduled task -- for as long as the block runs:

* ``ex.subscription`` and ``ex.generation`` are the snapshot the execution runs under, and
  ``ex.report_failure(kind, message)`` reports a failure with exactly that snapshot;
* the registration is renewed every ``ttl / 3`` while the block runs and expires ``ttl`` after the last
  renewal if the process dies, so a restart is never held up for longer than that by a dead holder;
* before a drainer stops the agent's container, it waits until the agent has no live execution (up to
  its ``--drain-timeout``);
* a new execution does not start while a restart of its agent is pending or running (it would run on
  the old credential under the new snapshot): it waits, up to ``gate_timeout``, then raises
  ``AgentRestarting``. A hot reload holds it up only for as long as the reload takes.

How the two sides avoid racing is described in ``sql/executions.sql``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError

from . import metrics, sql, validate
from .errors import AgentRestarting, UnknownAgent
from .model import FailureKind, SwitchResult
from .operations import Context, Operation
from .outbox import RESTART_AGENT

if TYPE_CHECKING:
    from .api import AsyncSwitcher, Switcher

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(minutes=10)
DEFAULT_GATE_TIMEOUT = timedelta(seconds=30)
LOCK_NOT_AVAILABLE = "55P03"
RESTART_ENQUEUED = "SW002"


def _enter(ctx: Context, agent: str, holder: str, ttl: timedelta, gate_timeout: timedelta) -> Row[Any]:
    started = time.monotonic()
    deadline = started + gate_timeout.total_seconds()
    while True:
        remaining = timedelta(seconds=max(0.0, deadline - time.monotonic()))
        try:
            row = ctx.db.enter_execution(
                agent, holder=holder, ttl=ttl, gate_timeout=remaining, restart_kind=RESTART_AGENT
            )
        except DBAPIError as error:
            if sql.sqlstate(error) == RESTART_ENQUEUED:
                continue  # the database waits for that restart on the next try; nothing to sleep here
            if sql.sqlstate(error) == LOCK_NOT_AVAILABLE:
                metrics.GATE_WAIT_SECONDS.labels("restarting").observe(time.monotonic() - started)
                raise AgentRestarting(
                    f"agent {agent!r} is being restarted by a drainer; gave up after gate_timeout "
                    f"({gate_timeout.total_seconds():g} s), try again shortly"
                ) from None
            raise
        if row is None:
            raise UnknownAgent(agent)
        metrics.GATE_WAIT_SECONDS.labels("entered").observe(time.monotonic() - started)
        return row


def _renew(ctx: Context, execution_id: int, ttl: timedelta) -> bool:
    return ctx.db.renew_execution(execution_id, ttl)


def _leave(ctx: Context, execution_id: int) -> None:
    ctx.db.leave_execution(execution_id)


ENTER = Operation(_enter, mode="autocommit")
RENEW = Operation(_renew, mode="autocommit")
LEAVE = Operation(_leave, mode="autocommit")


class _Execution:
    def __init__(self, agent: str, ttl: timedelta | float, gate_timeout: timedelta | float) -> None:
        self.agent = validate.name(agent, "agent")
        self.ttl = validate.duration(ttl, "ttl", minimum=timedelta(seconds=1), maximum=timedelta(days=1))
        self.gate_timeout = validate.duration(gate_timeout, "gate_timeout", maximum=timedelta(hours=1))
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.id: int | None = None
        self.subscription: str | None = None
        """The subscription this execution runs under (None for an agent without one)."""
        self.generation: int = 0
        """The agent's generation this execution runs under."""

    def _entered(self, row: Row[Any]) -> None:
        self.id, self.subscription, self.generation = row.execution_id, row.subscription, row.agent_generation

    def _renewal_failed(self, error: BaseException | None) -> None:
        if error is None:
            log.warning(
                "execution of %s outlived its ttl; a restart may no longer wait for it",
                self.agent,
                extra={"agent": self.agent, "execution": self.id},
            )
        else:
            log.warning(
                "could not renew the execution of %s: %s", self.agent, error, extra={"agent": self.agent}
            )


class Execution(_Execution):
    """An in-flight execution, for ``Switcher`` (see the module's docstring)."""

    def __init__(self, door: Switcher, agent: str, ttl: timedelta, gate_timeout: timedelta) -> None:
        super().__init__(agent, ttl, gate_timeout)
        self._door = door
        self._done = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._entered(self._door._call(ENTER, (self.agent, self.holder, self.ttl, self.gate_timeout), {}))
        self._renewer = threading.Thread(
            target=self._renew, name=f"switcher-execution-{self.id}", daemon=True
        )
        self._renewer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.id is not None:
            self._door._call(LEAVE, (self.id,), {})

    def _renew(self) -> None:
        assert self.id is not None
        while not self._done.wait(self.ttl.total_seconds() / 3):
            try:
                if not self._door._call(RENEW, (self.id, self.ttl), {}):
                    self._renewal_failed(None)
            except DBAPIError as error:
                self._renewal_failed(error)

    def report_failure(
        self, kind: FailureKind | str, message: str | None = "", *, report_id: str | None = None
    ) -> SwitchResult:
        """Report a failure of this execution, with its exact snapshot (subscription and generation)."""
        return self._door.handle_failure(
            self.agent,
            self.subscription,
            kind,
            message,
            report_id=report_id,
            failed_generation=self.generation,
        )


class AsyncExecution(_Execution):
    """An in-flight execution, for ``AsyncSwitcher`` (see the module's docstring)."""

    def __init__(self, door: AsyncSwitcher, agent: str, ttl: timedelta, gate_timeout: timedelta) -> None:
        super().__init__(agent, ttl, gate_timeout)
        self._door = door
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._entered(
            await self._door._call(ENTER, (self.agent, self.holder, self.ttl, self.gate_timeout), {})
        )
        self._renewer = asyncio.create_task(self._renew(), name=f"switcher-execution-{self.id}")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self.id is not None:
            await self._door._call(LEAVE, (self.id,), {})

    async def _renew(self) -> None:
        assert self.id is not None
        while True:
            await asyncio.sleep(self.ttl.total_seconds() / 3)
            try:
                if not await self._door._call(RENEW, (self.id, self.ttl), {}):
                    self._renewal_failed(None)
            except DBAPIError as error:
                self._renewal_failed(error)

    async def report_failure(
        self, kind: FailureKind | str, message: str | None = "", *, report_id: str | None = None
    ) -> SwitchResult:
        """Report a failure of this execution, with its exact snapshot (subscription and generation)."""
        return await self._door.handle_failure(
            self.agent,
            self.subscription,
            kind,
            message,
            report_id=report_id,
            failed_generation=self.generation,
        )
