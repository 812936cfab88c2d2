"""Registering subscriptions and agents, and the cluster-wide settings. One door to those rows."""

from __future__ import annotations

import re

from sqlalchemy import Connection, text

from . import validate
from .errors import AlreadyExists, CapacityExceeded, InvalidInput, UnknownAgent, UnknownSubscription
from .model import Agent, AgentTarget, Settings, Subscription

_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")

_RESERVE = text("SELECT switcher.reserve(:id, NULL, true)")

_SUBSCRIPTIONS = """
    SELECT s.name, s.credential_ref, s.priority, s.max_agents, s.enabled,
           (SELECT count(*) FROM switcher.agents a WHERE a.subscription_id = s.id) AS assigned,
           NULLIF(GREATEST(
               (SELECT max(f.occurred_at) FROM switcher.failures f WHERE f.subscription_id = s.id)
                   + (SELECT st.cooldown_window FROM switcher.settings st WHERE st.id = 1),
               now()), now()) AS cooling_until
    FROM switcher.subscriptions s
"""
_AGENTS = """
    SELECT a.name, s.name AS subscription, a.container, a.generation
    FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
"""


def add_subscription(
    conn: Connection,
    name: object,
    *,
    credential_ref: object,
    priority: object = 0,
    max_agents: object = None,
    enabled: object = True,
) -> Subscription:
    row = {
        "name": validate.name(name, "subscription"),
        "credential_ref": validate.credential_ref(credential_ref),
        "priority": validate.integer(priority, "priority"),
        "max_agents": None if max_agents is None else validate.integer(max_agents, "max_agents", minimum=1),
        "enabled": validate.boolean(enabled, "enabled"),
    }
    inserted = conn.execute(
        text(
            """
            INSERT INTO switcher.subscriptions (name, credential_ref, priority, max_agents, enabled)
            VALUES (:name, :credential_ref, :priority, :max_agents, :enabled)
            ON CONFLICT (name) DO NOTHING
            RETURNING id
            """
        ),
        row,
    ).one_or_none()
    if inserted is None:
        raise AlreadyExists(f"subscription {row['name']!r} already exists; choose another name")
    return subscription(conn, row["name"])


def add_agent(
    conn: Connection, name: object, *, subscription: object = None, container: object = None
) -> Agent:
    agent_name = validate.name(name, "agent")
    sub_name = validate.optional_name(subscription, "subscription")
    if container is not None and not (
        isinstance(container, str)
        and _CONTAINER_NAME.fullmatch(container)
        and len(container) <= validate.MAX_NAME_LENGTH
    ):
        raise InvalidInput(
            f"container must be a Docker container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*), got {container!r}"
        )
    sub_id = None
    if sub_name is not None:
        sub = conn.execute(
            text("SELECT id, max_agents FROM switcher.subscriptions WHERE name = :name"), {"name": sub_name}
        ).one_or_none()
        if sub is None:
            raise UnknownSubscription(sub_name)
        # Same lock as a switch onto this subscription, so capacity holds against both.
        if sub.max_agents is not None and conn.execute(_RESERVE, {"id": sub.id}).scalar_one() != "reserved":
            raise CapacityExceeded(
                f"subscription {sub_name!r} already has its {sub.max_agents} agents; "
                "raise max_agents or choose another subscription"
            )
        sub_id = sub.id
    inserted = conn.execute(
        text(
            """
            INSERT INTO switcher.agents (name, subscription_id, container)
            VALUES (:name, :subscription_id, :container)
            ON CONFLICT (name) DO NOTHING
            RETURNING id
            """
        ),
        {"name": agent_name, "subscription_id": sub_id, "container": container},
    ).one_or_none()
    if inserted is None:
        raise AlreadyExists(f"agent {agent_name!r} already exists; choose another name")
    return Agent(agent_name, sub_name, container, 0)


def subscription(conn: Connection, name: object) -> Subscription:
    sub_name = validate.name(name, "subscription")
    row = conn.execute(text(_SUBSCRIPTIONS + " WHERE s.name = :name"), {"name": sub_name}).one_or_none()
    if row is None:
        raise UnknownSubscription(sub_name)
    return Subscription(**row._mapping)


def subscriptions(conn: Connection) -> list[Subscription]:
    return [Subscription(**r._mapping) for r in conn.execute(text(_SUBSCRIPTIONS + " ORDER BY s.id"))]


def agent(conn: Connection, name: object) -> Agent:
    agent_name = validate.name(name, "agent")
    row = conn.execute(text(_AGENTS + " WHERE a.name = :name"), {"name": agent_name}).one_or_none()
    if row is None:
        raise UnknownAgent(agent_name)
    return Agent(**row._mapping)


def agents(conn: Connection) -> list[Agent]:
    return [Agent(**r._mapping) for r in conn.execute(text(_AGENTS + " ORDER BY a.id"))]


def set_subscription_enabled(conn: Connection, name: object, enabled: object) -> None:
    sub_name = validate.name(name, "subscription")
    updated = conn.execute(
        text("UPDATE switcher.subscriptions SET enabled = :enabled, updated_at = now() WHERE name = :name"),
        {"name": sub_name, "enabled": validate.boolean(enabled, "enabled")},
    )
    if updated.rowcount == 0:
        raise UnknownSubscription(sub_name)


def settings(conn: Connection) -> Settings:
    row = conn.execute(text("SELECT auto_switch, cooldown_window FROM switcher.settings WHERE id = 1")).one()
    return Settings(row.auto_switch, row.cooldown_window)


def update_settings(
    conn: Connection, *, auto_switch: object = None, cooldown_window: object = None
) -> Settings:
    values = {
        "auto_switch": None if auto_switch is None else validate.boolean(auto_switch, "auto_switch"),
        "cooldown_window": (
            None if cooldown_window is None else validate.duration(cooldown_window, "cooldown_window")
        ),
    }
    row = conn.execute(
        text(
            """
            UPDATE switcher.settings
            SET auto_switch = COALESCE(:auto_switch, auto_switch),
                cooldown_window = COALESCE(CAST(:cooldown_window AS interval), cooldown_window),
                updated_at = now()
            WHERE id = 1
            RETURNING auto_switch, cooldown_window
            """
        ),
        values,
    ).one()
    return Settings(row.auto_switch, row.cooldown_window)


def agent_target(conn: Connection, agent_id: int) -> AgentTarget | None:
    row = conn.execute(
        text(
            """
            SELECT a.name AS agent, a.container, a.generation, s.name AS subscription, s.credential_ref
            FROM switcher.agents a LEFT JOIN switcher.subscriptions s ON s.id = a.subscription_id
            WHERE a.id = :id
            """
        ),
        {"id": agent_id},
    ).one_or_none()
    return None if row is None else AgentTarget(**row._mapping)
