"""The one door to subscriptions, agents, settings, the switch and executions.

Every statement it runs is a named query from ``sql/registry.sql``, ``sql/switch.sql`` or
``sql/executions.sql``. It takes values that ``operations`` has validated, runs on the connection it is
given (in whatever transaction that connection is in) and returns plain values.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Row
from sqlalchemy.exc import IntegrityError

from . import sql
from .errors import InUse
from .model import Agent, AgentTarget, Settings, Subscription
from .selection import Candidate

_REGISTRY = sql.load("registry")
_SWITCH = sql.load("switch")
_EXECUTIONS = sql.load("executions")

GATE_LOCK_CLASS = 0x53574754
"""First key of the advisory lock that is an agent's restart gate (the second is the agent's id):
ASCII 'SWGT', chosen so as not to meet a host application's own advisory locks."""


class Registry:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _one(self, query: str, queries: sql.SqlFile = _REGISTRY, **params: Any) -> Row[Any] | None:
        return queries.run(self.conn, query, **params).one_or_none()

    # -- the switch ------------------------------------------------------------------------------------

    def handle_failure(self, **params: Any) -> Any:
        return _SWITCH.row(self.conn, "handle_failure", **params)

    def assign(self, **params: Any) -> Any:
        return _SWITCH.row(self.conn, "assign", **params)

    def candidates(self, agent: str, snapshot: str | None) -> list[Candidate]:
        rows = _SWITCH.run(self.conn, "candidates", agent=agent, snapshot=snapshot)
        return [Candidate(r.id, r.name, r.priority, r.max_agents, r.load) for r in rows]

    # -- subscriptions ---------------------------------------------------------------------------------

    def add_subscription(self, **row: Any) -> bool:
        """False when the name is taken."""
        return self._one("add_subscription", **row) is not None

    def subscriptions(self, name: str | None = None) -> list[Subscription]:
        rows = _REGISTRY.run(self.conn, "subscriptions", name=name)
        return [Subscription(**r._mapping) for r in rows]

    def set_subscription(
        self, name: str, *, enabled: bool | None = None, credential_ref: str | None = None
    ) -> bool:
        """False when there is no such subscription."""
        found = self._one("set_subscription", name=name, enabled=enabled, credential_ref=credential_ref)
        return found is not None

    def remove_subscription(self, name: str) -> bool:
        try:
            return self._one("remove_subscription", name=name) is not None
        except IntegrityError as error:
            if sql.violated_constraint(error) == "agents_subscription_id_fkey":
                raise InUse(f"subscription {name!r} still has agents; assign them elsewhere first") from None
            raise

    # -- agents ----------------------------------------------------------------------------------------

    def bound_lock_waits(self, lock_timeout: str) -> None:
        """Lock waits of this transaction end after ``lock_timeout``."""
        _REGISTRY.run(self.conn, "set_lock_timeout", lock_timeout=lock_timeout)

    def reserve_for_agent(self, subscription: str) -> Row[Any] | None:
        """Lock a capacity-limited subscription as a switch onto it would; (id, max_agents, has_room)."""
        return self._one("reserve_for_agent", name=subscription)

    def add_agent(self, **row: Any) -> bool:
        """False when the name is taken."""
        return self._one("add_agent", **row) is not None

    def agents(self, name: str | None = None) -> list[Agent]:
        return [Agent(**r._mapping) for r in _REGISTRY.run(self.conn, "agents", name=name)]

    def remove_agent(self, name: str) -> bool:
        return self._one("remove_agent", name=name) is not None

    def agent_target(self, agent_id: int) -> AgentTarget | None:
        row = self._one("agent_target", agent_id=agent_id)
        return None if row is None else AgentTarget(**row._mapping)

    # -- settings and history --------------------------------------------------------------------------

    def settings(self) -> Settings:
        row = self._one("settings")
        assert row is not None, "the migration inserts the settings row"
        return Settings(**row._mapping)

    def update_settings(
        self,
        *,
        auto_switch: bool | None = None,
        cooldown_window: timedelta | None = None,
        webhook: str | None = None,
        retention: timedelta | None = None,
    ) -> Settings:
        row = self._one(
            "update_settings",
            auto_switch=auto_switch,
            cooldown_window=cooldown_window,
            webhook=webhook,
            retention=retention,
        )
        assert row is not None
        return Settings(**row._mapping)

    def recent_switches(self, limit: int) -> list[dict[str, Any]]:
        rows = _REGISTRY.run(self.conn, "recent_switches", limit=limit)
        return [dict(r._mapping) for r in rows]

    def prune(self, batch: int) -> dict[str, int]:
        """Delete one batch of each kind of history past retention; how many of each."""
        row = self._one("prune", batch=batch)
        assert row is not None
        return dict(row._mapping)

    def load_drift(self) -> list[Row[Any]]:
        return list(_REGISTRY.run(self.conn, "load_drift"))

    # -- executions and the restart gate ---------------------------------------------------------------

    def enter_execution(
        self, agent: str, *, holder: str, ttl: timedelta, gate_timeout: timedelta, restart_kind: str
    ) -> Row[Any] | None:
        """Register an execution once no restart of the agent is pending or running and its gate is open;
        None for an unknown agent. Raises ``lock_not_available`` after ``gate_timeout``, and ``SW002``
        when a restart was enqueued while it registered."""
        return self._one(
            "enter",
            _EXECUTIONS,
            agent=agent,
            holder=holder,
            ttl=ttl,
            gate_timeout=gate_timeout,
            gate_class=GATE_LOCK_CLASS,
            restart_kind=restart_kind,
        )

    def renew_execution(self, execution_id: int, ttl: timedelta) -> bool:
        return self._one("renew", _EXECUTIONS, id=execution_id, ttl=ttl) is not None

    def leave_execution(self, execution_id: int) -> None:
        _EXECUTIONS.run(self.conn, "leave", id=execution_id)

    def close_gate(self, agent_id: int, lock_timeout: str) -> None:
        """Hold the agent's gate on this autocommit connection (session-level) until ``open_gate``. Raises
        ``lock_not_available`` after ``lock_timeout``."""
        params = {"gate_class": GATE_LOCK_CLASS, "agent_id": agent_id, "lock_timeout": lock_timeout}
        _EXECUTIONS.run(self.conn, "close_gate", **params)

    def open_gate(self, agent_id: int) -> None:
        _EXECUTIONS.run(self.conn, "open_gate", gate_class=GATE_LOCK_CLASS, agent_id=agent_id)

    def live_executions(self, agent_id: int) -> int:
        return int(_EXECUTIONS.run(self.conn, "live_executions", agent_id=agent_id).scalar_one())

    def forget_expired_executions(self) -> int:
        return _EXECUTIONS.run(self.conn, "forget_expired").rowcount
