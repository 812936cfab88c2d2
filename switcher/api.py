"""The two front doors: ``Switcher`` (sync) and ``AsyncSwitcher`` (asyncio).

Both are ``operations.Operations``: every method is declared there once, as a synchronous body; the doors
only decide where it runs. ``Switcher`` runs it on a connection of its engine; ``AsyncSwitcher`` runs the
same dispatch, on the sync face of its engine, in one greenlet (as ``AsyncConnection.run_sync`` does), so
both have one body of logic and the same semantics.

Either door takes an engine of the host application's (``Switcher(engine)``, ``AsyncSwitcher(async_engine)``,
on psycopg 3: every query is written in its parameter style) or makes its own (``from_url``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any, Generic, Self, TypeVar, final

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from . import sql
from .errors import DatabaseURLError, InvalidInput
from .executions import DEFAULT_GATE_TIMEOUT, DEFAULT_TTL, AsyncExecution, Execution
from .operations import Context, Operation, Operations, joined_connection
from .registry import Registry
from .selection import SelectionPolicy
from .switch import Options

T = TypeVar("T")
E = TypeVar("E", Engine, AsyncEngine)
X = TypeVar("X", Execution, AsyncExecution)


def database_url(url: str | URL) -> URL:
    """Normalise a PostgreSQL URL to SQLAlchemy's psycopg 3 dialect (``postgresql://`` is accepted)."""
    try:
        parsed = make_url(url)
        port = parsed.port  # SQLAlchemy parses the port lazily; a bad one raises ValueError here
    except (ArgumentError, ValueError) as error:
        raise DatabaseURLError(f"not a database URL: {error}") from None
    if port is not None and not 0 < port < 65536:
        raise DatabaseURLError(f"not a database URL: port {port} is out of range")
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg_async"):
        return parsed.set(drivername="postgresql+psycopg")
    raise DatabaseURLError(
        f"switcher needs PostgreSQL through psycopg 3 (postgresql:// or postgresql+psycopg://), "
        f"got {parsed.drivername}://"
    )


def _session_options(url: URL, connect_args: dict[str, Any]) -> str | None:
    """The settings sessions of ``url`` start with, which the door's ``options`` must repeat: an
    ``options`` given to psycopg replaces them. Those of ``connect_args``, else the URL's, else
    ``PGOPTIONS``; None when a libpq service is named instead, whose file may hold options that libpq
    ranks above ``PGOPTIONS`` and that cannot be read here: its sessions are left as libpq makes them."""
    if "options" in connect_args:
        given = connect_args["options"]
    elif "options" in url.query:
        given = url.query["options"]
    elif "service" in connect_args or "service" in url.query or os.environ.get("PGSERVICE"):
        return None
    else:
        given = os.environ.get("PGOPTIONS", "")
    return given if isinstance(given, str) else " ".join(given)


class _Door(Operations, Generic[E, X]):
    """What both front doors share: an engine, the switch's options, and ``execution``."""

    _execution_class: type[X]

    def __init__(
        self,
        engine: E,
        *,
        lock_timeout: timedelta = timedelta(seconds=3),
        policy: SelectionPolicy | None = None,
        max_retries: int = 3,
    ) -> None:
        if not isinstance(engine, self._engine_class()):
            raise InvalidInput(
                f"{type(self).__name__} needs a SQLAlchemy {self._engine_class().__name__}, "
                f"got {type(engine).__name__}"
            )
        sql.require_driver(engine.dialect, type(self).__name__)
        self.engine: E = engine
        # Reports run in autocommit mode (one statement each); on the host's engine that means switching
        # a pooled connection to autocommit and back for every call. from_url gives them a pool of their own.
        self._autocommit: E = engine.execution_options(isolation_level="AUTOCOMMIT")
        options: dict[str, Any] = {"lock_timeout": lock_timeout, "max_retries": max_retries}
        if policy is not None:
            options["policy"] = policy
        self.options = Options(**options)

    @staticmethod
    def _engine_class() -> type[E]:
        raise NotImplementedError

    @classmethod
    def _create_engine(cls, url: URL, **options: Any) -> E:
        raise NotImplementedError

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        lock_timeout: timedelta = timedelta(seconds=3),
        policy: SelectionPolicy | None = None,
        max_retries: int = 3,
        **engine_options: Any,
    ) -> Self:
        """Connect with psycopg 3 (a plain ``postgresql://`` URL is fine); ``engine_options`` go to
        SQLAlchemy (``pool_size``, ``pool_pre_ping``, ...). The door has two pools, each made with them:
        one for reports and assignments (in autocommit mode), one for everything else, so it may hold
        up to twice ``pool_size + max_overflow`` connections.

        Sessions start with the settings given in ``connect_args={"options": ...}``, else in the URL's
        ``options``, else in ``PGOPTIONS``, and with ``lock_timeout`` after them. With a libpq service
        (``?service=``, ``service`` in ``connect_args``, ``PGSERVICE``) and no options given, they start
        as libpq makes them, and every operation sets ``lock_timeout`` for its own transaction.

        ``lock_timeout`` bounds every row-lock wait (a switch's ends in ``SwitchBusy``, another's in
        SQLAlchemy's ``OperationalError``); ``policy`` ranks alternatives (default ``LeastLoaded``);
        ``max_retries`` bounds internal retries (deadlocks, lost connections).
        """
        options = Options(lock_timeout=lock_timeout, max_retries=max_retries)  # checked before connecting
        url = database_url(url)
        connect_args = dict(engine_options.pop("connect_args", {}))
        # Sessions start with the switch's lock_timeout, so the switch need not set it for every call (it
        # does when they lack it). It comes last: of two -c of one setting, the later wins. Not a SET once
        # connected: behind a transaction-pooling proxy, that would change other clients' sessions.
        given = _session_options(url, connect_args)
        if given is not None:
            connect_args["options"] = f"{given} -c lock_timeout={options.lock_timeout_setting}".strip()
        door = cls(
            cls._create_engine(url, connect_args=connect_args, **engine_options),
            lock_timeout=lock_timeout,
            policy=policy,
            max_retries=max_retries,
        )
        # Connections that are in autocommit mode from birth: nothing to set or reset around a report.
        door._autocommit = cls._create_engine(
            url,
            connect_args=connect_args,
            isolation_level="AUTOCOMMIT",
            pool_reset_on_return=None,
            **engine_options,
        )
        return door

    def _transaction(self, conn: Connection) -> Context:
        """The context of an operation in a transaction of its own, whose lock waits end after the
        door's lock_timeout, as a switch's do, whatever the session's is: a host's engine's, a libpq
        service's, or from_url's own behind a proxy that drops its options (PgBouncer's
        ``ignore_startup_parameters``). One statement more, for operations that are not the hot path."""
        Registry(conn).bound_lock_waits(self.options.lock_timeout_setting)
        return Context(conn, self.options)

    def _run(
        self,
        engine: Engine,
        autocommit: Engine,
        operation: Operation[Any, T],
        joined: Connection | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """Run ``operation`` where its mode says: in the caller's transaction, in one of its own, or on an
        autocommit connection. Both doors come here, the async one inside a single greenlet."""
        if joined is not None:
            return operation.body(Context(joined, self.options, joined=True), *args, **kwargs)
        if operation.mode == "transaction":
            with engine.begin() as conn:
                return operation.body(self._transaction(conn), *args, **kwargs)
        with autocommit.connect() as conn:
            return operation.body(Context(conn, self.options), *args, **kwargs)

    def execution(
        self,
        agent: str,
        *,
        ttl: timedelta = DEFAULT_TTL,
        gate_timeout: timedelta = DEFAULT_GATE_TIMEOUT,
    ) -> X:
        """Register an in-flight execution of ``agent`` for the duration of a ``with`` block (``async
        with`` on ``AsyncSwitcher``).

        A drain-aware restart of the agent waits for it (up to the drainer's ``--drain-timeout``); while a
        restart runs, ``execution()`` waits for it up to ``gate_timeout``, then raises
        ``AgentRestarting``. ``ttl`` bounds how long a holder that died keeps a restart waiting. Inside,
        ``ex.subscription``/``ex.generation`` are the execution's snapshot and ``ex.report_failure(kind,
        message)`` reports with it.
        """
        return self._execution_class(self, agent, ttl, gate_timeout)  # type: ignore[arg-type]


@final
class Switcher(_Door[Engine, Execution]):
    """Synchronous API, for schedulers, scripts and threaded servers."""

    _execution_class = Execution

    @staticmethod
    def _engine_class() -> type[Engine]:
        return Engine

    @classmethod
    def _create_engine(cls, url: URL, **options: Any) -> Engine:
        return create_engine(url, **options)

    def _call(self, operation: Operation[Any, T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        joined = joined_connection(kwargs, Connection) if operation.joinable else None
        return self._run(self.engine, self._autocommit, operation, joined, args, kwargs)

    def close(self) -> None:
        self._autocommit.dispose()
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@final
class AsyncSwitcher(_Door[AsyncEngine, AsyncExecution]):
    """The same API for asyncio backends, awaited; same semantics, same code underneath."""

    _execution_class = AsyncExecution

    @staticmethod
    def _engine_class() -> type[AsyncEngine]:
        return AsyncEngine

    @classmethod
    def _create_engine(cls, url: URL, **options: Any) -> AsyncEngine:
        return create_async_engine(url, **options)

    def _call(
        self, operation: Operation[Any, T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[T]:
        # Checked now, so that a bad ``connection=`` raises where the call is made.
        joined = joined_connection(kwargs, AsyncConnection) if operation.joinable else None
        # The whole operation -- checkout, statements, commit, checkin -- in one greenlet, as the sync
        # door runs it: AsyncConnection would spawn one for each step, about a third of a report's
        # client time.
        return greenlet_spawn(
            self._run,
            self.engine.sync_engine,
            self._autocommit.sync_engine,
            operation,
            None if joined is None else joined.sync_connection,
            args,
            kwargs,
        )

    async def close(self) -> None:
        await self._autocommit.dispose()
        await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
