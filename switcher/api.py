"""The two front doors: ``Switcher`` (sync) and ``AsyncSwitcher`` (asyncio).

Both run the same synchronous functions from ``switch`` and ``registry``; the async one through
``AsyncConnection.run_sync``. The methods here only open connections and transactions.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import registry, switch
from .errors import DatabaseURLError
from .model import Agent, FailureKind, Settings, Subscription, SwitchResult
from .selection import SelectionPolicy
from .switch import SwitchOptions

P = ParamSpec("P")
T = TypeVar("T")
E = TypeVar("E")


def database_url(url: str | URL) -> URL:
    """Normalise a PostgreSQL URL to SQLAlchemy's psycopg 3 dialect (``postgresql://`` is accepted)."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise DatabaseURLError(f"not a database URL: {error}") from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg_async"):
        return parsed.set(drivername="postgresql+psycopg")
    raise DatabaseURLError(
        f"switcher needs PostgreSQL through psycopg 3 (postgresql:// or postgresql+psycopg://), "
        f"got {parsed.drivername}://"
    )


def _options(lock_timeout: timedelta, policy: SelectionPolicy | None, max_retries: int) -> SwitchOptions:
    if policy is None:
        return SwitchOptions(lock_timeout=lock_timeout, max_retries=max_retries)
    return SwitchOptions(lock_timeout=lock_timeout, policy=policy, max_retries=max_retries)


class _FrontDoor(Generic[E]):
    """What both front doors share: an engine and the switch's options."""

    def __init__(
        self,
        engine: E,
        *,
        lock_timeout: timedelta = timedelta(seconds=3),
        policy: SelectionPolicy | None = None,
        max_retries: int = 3,
    ) -> None:
        self.engine: E = engine
        self.options = _options(lock_timeout, policy, max_retries)

    @staticmethod
    def _create_engine(url: URL, **options: Any) -> E:
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
        SQLAlchemy (``pool_size``, ``pool_pre_ping``, ...)."""
        engine = cls._create_engine(database_url(url), **engine_options)
        return cls(engine, lock_timeout=lock_timeout, policy=policy, max_retries=max_retries)


class Switcher(_FrontDoor[Engine]):
    """Synchronous API, for schedulers, scripts and threaded servers.

    ``lock_timeout`` bounds every row-lock wait (then ``SwitchBusy``); ``policy`` ranks alternatives
    (default ``LeastLoaded``); ``max_retries`` bounds internal retries of deadlocks.
    """

    @staticmethod
    def _create_engine(url: URL, **options: Any) -> Engine:
        return create_engine(url, **options)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _in_transaction(self, fn: Callable[Concatenate[Connection, P], T], *a: P.args, **k: P.kwargs) -> T:
        with self.engine.begin() as conn:
            return fn(conn, *a, **k)

    def migrate(self) -> None:
        """Upgrade the ``switcher`` schema to the newest migration (Alembic ``upgrade head``)."""
        from .migrate import upgrade

        self._in_transaction(upgrade)

    def handle_failure(
        self,
        agent: str,
        failed_subscription: str | None,
        kind: FailureKind | str,
        message: str | None = "",
        connection: Connection | None = None,
    ) -> SwitchResult:
        """Report that a request of ``agent`` failed on ``failed_subscription`` (the caller's snapshot).

        Switches the agent at most once per failed subscription, however many processes report it.
        ``failed_subscription=None`` means "whatever it uses now" (weaker: a late report can then move an
        agent that was already moved). With ``connection``, the switch joins that connection's
        transaction (in a savepoint) and takes effect when the caller commits.
        """
        call = partial(
            switch.handle_failure,
            agent=agent,
            failed_subscription=failed_subscription,
            kind=kind,
            message=message,
            options=self.options,
        )
        if connection is not None:
            return call(connection, joined=True)
        with self.engine.connect() as conn:
            return call(conn, joined=False)

    def assign(self, agent: str, subscription: str) -> SwitchResult:
        """Move ``agent`` to ``subscription`` by hand (respecting ``max_agents``) and enqueue its restart."""
        with self.engine.connect() as conn:
            return switch.assign(conn, agent=agent, subscription=subscription, options=self.options)

    def add_subscription(
        self,
        name: str,
        *,
        credential_ref: str,
        priority: int = 0,
        max_agents: int | None = None,
        enabled: bool = True,
    ) -> Subscription:
        return self._in_transaction(
            registry.add_subscription,
            name,
            credential_ref=credential_ref,
            priority=priority,
            max_agents=max_agents,
            enabled=enabled,
        )

    def add_agent(self, name: str, *, subscription: str | None = None, container: str | None = None) -> Agent:
        return self._in_transaction(registry.add_agent, name, subscription=subscription, container=container)

    def current_subscription(self, agent: str) -> str | None:
        return self._in_transaction(registry.agent, agent).subscription

    def agent(self, name: str) -> Agent:
        return self._in_transaction(registry.agent, name)

    def agents(self) -> list[Agent]:
        return self._in_transaction(registry.agents)

    def subscription(self, name: str) -> Subscription:
        return self._in_transaction(registry.subscription, name)

    def subscriptions(self) -> list[Subscription]:
        return self._in_transaction(registry.subscriptions)

    def enable_subscription(self, name: str) -> None:
        self._in_transaction(registry.set_subscription_enabled, name, True)

    def disable_subscription(self, name: str) -> None:
        self._in_transaction(registry.set_subscription_enabled, name, False)

    def settings(self) -> Settings:
        return self._in_transaction(registry.settings)

    def enable_auto_switch(self) -> Settings:
        return self._in_transaction(registry.update_settings, auto_switch=True)

    def disable_auto_switch(self) -> Settings:
        return self._in_transaction(registry.update_settings, auto_switch=False)

    def set_cooldown_window(self, window: timedelta | float) -> Settings:
        return self._in_transaction(registry.update_settings, cooldown_window=window)

    def update_settings(
        self, *, auto_switch: bool | None = None, cooldown_window: timedelta | float | None = None
    ) -> Settings:
        """Change what is given, leave the rest."""
        return self._in_transaction(
            registry.update_settings, auto_switch=auto_switch, cooldown_window=cooldown_window
        )


class AsyncSwitcher(_FrontDoor[AsyncEngine]):
    """The same API for asyncio backends, on an async engine; same semantics, same code underneath."""

    @staticmethod
    def _create_engine(url: URL, **options: Any) -> AsyncEngine:
        return create_async_engine(url, **options)

    async def close(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _in_transaction(
        self, fn: Callable[Concatenate[Connection, P], T], *a: P.args, **k: P.kwargs
    ) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn, *a, **k)

    async def migrate(self) -> None:
        from .migrate import upgrade

        await self._in_transaction(upgrade)

    async def handle_failure(
        self,
        agent: str,
        failed_subscription: str | None,
        kind: FailureKind | str,
        message: str | None = "",
        connection: AsyncConnection | None = None,
    ) -> SwitchResult:
        """See ``Switcher.handle_failure``; ``connection`` is an ``AsyncConnection`` here."""
        call = partial(
            switch.handle_failure,
            agent=agent,
            failed_subscription=failed_subscription,
            kind=kind,
            message=message,
            options=self.options,
        )
        if connection is not None:
            return await connection.run_sync(call, joined=True)
        async with self.engine.connect() as conn:
            return await conn.run_sync(call, joined=False)

    async def assign(self, agent: str, subscription: str) -> SwitchResult:
        async with self.engine.connect() as conn:
            return await conn.run_sync(
                switch.assign, agent=agent, subscription=subscription, options=self.options
            )

    async def add_subscription(
        self,
        name: str,
        *,
        credential_ref: str,
        priority: int = 0,
        max_agents: int | None = None,
        enabled: bool = True,
    ) -> Subscription:
        return await self._in_transaction(
            registry.add_subscription,
            name,
            credential_ref=credential_ref,
            priority=priority,
            max_agents=max_agents,
            enabled=enabled,
        )

    async def add_agent(
        self, name: str, *, subscription: str | None = None, container: str | None = None
    ) -> Agent:
        return await self._in_transaction(
            registry.add_agent, name, subscription=subscription, container=container
        )

    async def current_subscription(self, agent: str) -> str | None:
        return (await self._in_transaction(registry.agent, agent)).subscription

    async def agent(self, name: str) -> Agent:
        return await self._in_transaction(registry.agent, name)

    async def agents(self) -> list[Agent]:
        return await self._in_transaction(registry.agents)

    async def subscription(self, name: str) -> Subscription:
        return await self._in_transaction(registry.subscription, name)

    async def subscriptions(self) -> list[Subscription]:
        return await self._in_transaction(registry.subscriptions)

    async def enable_subscription(self, name: str) -> None:
        await self._in_transaction(registry.set_subscription_enabled, name, True)

    async def disable_subscription(self, name: str) -> None:
        await self._in_transaction(registry.set_subscription_enabled, name, False)

    async def settings(self) -> Settings:
        return await self._in_transaction(registry.settings)

    async def enable_auto_switch(self) -> Settings:
        return await self._in_transaction(registry.update_settings, auto_switch=True)

    async def disable_auto_switch(self) -> Settings:
        return await self._in_transaction(registry.update_settings, auto_switch=False)

    async def set_cooldown_window(self, window: timedelta | float) -> Settings:
        return await self._in_transaction(registry.update_settings, cooldown_window=window)

    async def update_settings(
        self, *, auto_switch: bool | None = None, cooldown_window: timedelta | float | None = None
    ) -> Settings:
        return await self._in_transaction(
            registry.update_settings, auto_switch=auto_switch, cooldown_window=cooldown_window
        )
