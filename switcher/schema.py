"""The tables, described once. Alembic owns the DDL (``db/versions``); a test proves the two agree.

Everything lives in the ``switcher`` schema so it can share a database with the host application.
No column is updated by every switch of every agent: cooldown is derived from ``failures`` and load
from ``agents`` through indexes, so a herd of agents leaving one subscription never queues on one row.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Interval,
    MetaData,
    SmallInteger,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

SCHEMA = "switcher"

metadata = MetaData(
    schema=SCHEMA,
    naming_convention={
        "pk": "%(table_name)s_pkey",
        "fk": "%(table_name)s_%(column_0_name)s_fkey",
        "uq": "%(table_name)s_%(column_0_name)s_key",
        "ck": "%(table_name)s_%(constraint_name)s_check",
        "ix": "%(table_name)s_%(column_0_name)s_idx",
    },
)


def _created() -> Column[object]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


def _updated() -> Column[object]:
    return Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now())


subscriptions = Table(
    "subscriptions",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    # A reference such as ``env:NAME`` or ``file:/path``; the secret itself is never stored.
    Column("credential_ref", Text, nullable=False),
    # Lower is preferred when loads are equal.
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("max_agents", Integer),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    _created(),
    _updated(),
    CheckConstraint("max_agents IS NULL OR max_agents >= 1", name="max_agents"),
)

agents = Table(
    "agents",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("subscription_id", BigInteger, ForeignKey("subscriptions.id")),
    Column("container", Text),
    # Bumped by every change of assignment; restarts carry it so a drainer can tell old from new.
    Column("generation", BigInteger, nullable=False, server_default=text("0")),
    _created(),
    _updated(),
    # Load per subscription (selection and capacity) is counted through this index.
    Index("agents_subscription_id_idx", "subscription_id"),
)

failures = Table(
    "failures",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("agent_id", BigInteger, ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    Column("subscription_id", BigInteger, ForeignKey("subscriptions.id", ondelete="CASCADE"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('rate_limit', 'auth')", name="kind"),
    # Cooldown: "any failure of this subscription since now() - window".
    Index("failures_subscription_id_idx", "subscription_id", "occurred_at"),
    Index("failures_agent_id_idx", "agent_id"),
)

switches = Table(
    "switches",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("agent_id", BigInteger, ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    Column("from_subscription_id", BigInteger, ForeignKey("subscriptions.id", ondelete="SET NULL")),
    Column("to_subscription_id", BigInteger, ForeignKey("subscriptions.id", ondelete="SET NULL")),
    # NULL for a manual assignment.
    Column("kind", Text),
    Column("generation", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("switched_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("switches_agent_id_idx", "agent_id", "id"),
)


outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("kind", Text, nullable=False),
    Column("agent_id", BigInteger, ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    Column("generation", BigInteger, nullable=False),
    # Names only (agent, container, subscription): never a credential.
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("available_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("leased_until", DateTime(timezone=True)),
    Column("leased_by", Text),
    Column("last_error", Text),
    Column("result", Text),
    # When the current generation was enqueued (coalescing refreshes it): a container started after
    # this already runs that generation.
    Column("enqueued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    _created(),
    _updated(),
    CheckConstraint(
        "status IN ('pending', 'running', 'done', 'dead', 'superseded')",
        name="status",
    ),
    # Coalescing: at most one pending message of a kind per agent.
    Index(
        "outbox_one_pending_idx",
        "agent_id",
        "kind",
        unique=True,
        postgresql_where=text("status = 'pending'"),
    ),
    # Claiming: due pending messages, oldest first.
    Index("outbox_due_idx", "available_at", "id", postgresql_where=text("status = 'pending'")),
    # Never two running messages for one agent (two drainers, two kinds): the database refuses.
    Index("outbox_one_running_idx", "agent_id", unique=True, postgresql_where=text("status = 'running'")),
)

settings = Table(
    "settings",
    metadata,
    # A single row, shared by every process; the migration inserts it.
    Column("id", SmallInteger, primary_key=True, server_default=text("1")),
    Column("auto_switch", Boolean, nullable=False, server_default=text("true")),
    Column("cooldown_window", Interval, nullable=False, server_default=text("'02:00:00'::interval")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("id = 1", name="single_row"),
    CheckConstraint("cooldown_window >= interval '0'", name="cooldown_window"),
)
