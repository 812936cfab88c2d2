"""Initial schema: subscriptions, agents, failures, switches, outbox, settings.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from switcher.migrate import execute_steps

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = "switcher"
STEPS = Path(__file__).with_suffix(".sql")
"""The functions of this revision, frozen."""


def _times() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    ]


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("credential_ref", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("max_agents", sa.Integer),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")),
        *_times(),
        sa.PrimaryKeyConstraint("id", name="subscriptions_pkey"),
        sa.UniqueConstraint("name", name="subscriptions_name_key"),
        sa.CheckConstraint("max_agents IS NULL OR max_agents >= 1", name="subscriptions_max_agents_check"),
        schema=S,
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("subscription_id", sa.BigInteger),
        sa.Column("container", sa.Text),
        sa.Column("generation", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        *_times(),
        sa.PrimaryKeyConstraint("id", name="agents_pkey"),
        sa.UniqueConstraint("name", name="agents_name_key"),
        sa.ForeignKeyConstraint(
            ["subscription_id"], [f"{S}.subscriptions.id"], name="agents_subscription_id_fkey"
        ),
        schema=S,
    )
    op.create_index("agents_subscription_id_idx", "agents", ["subscription_id"], schema=S)

    op.create_table(
        "failures",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("agent_id", sa.BigInteger, nullable=False),
        sa.Column("subscription_id", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="failures_pkey"),
        sa.ForeignKeyConstraint(
            ["agent_id"], [f"{S}.agents.id"], name="failures_agent_id_fkey", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            [f"{S}.subscriptions.id"],
            name="failures_subscription_id_fkey",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("kind IN ('rate_limit', 'auth')", name="failures_kind_check"),
        schema=S,
    )
    op.create_index("failures_subscription_id_idx", "failures", ["subscription_id", "occurred_at"], schema=S)
    op.create_index("failures_agent_id_idx", "failures", ["agent_id"], schema=S)

    op.create_table(
        "switches",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("agent_id", sa.BigInteger, nullable=False),
        sa.Column("from_subscription_id", sa.BigInteger),
        sa.Column("to_subscription_id", sa.BigInteger),
        sa.Column("kind", sa.Text),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("switched_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="switches_pkey"),
        sa.ForeignKeyConstraint(
            ["agent_id"], [f"{S}.agents.id"], name="switches_agent_id_fkey", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["from_subscription_id"],
            [f"{S}.subscriptions.id"],
            name="switches_from_subscription_id_fkey",
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["to_subscription_id"],
            [f"{S}.subscriptions.id"],
            name="switches_to_subscription_id_fkey",
            ondelete="SET NULL",
        ),
        schema=S,
    )
    op.create_index("switches_agent_id_idx", "switches", ["agent_id", "id"], schema=S)

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("agent_id", sa.BigInteger, nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("payload", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("leased_until", sa.DateTime(timezone=True)),
        sa.Column("leased_by", sa.Text),
        sa.Column("last_error", sa.Text),
        sa.Column("result", sa.Text),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        *_times(),
        sa.PrimaryKeyConstraint("id", name="outbox_pkey"),
        sa.ForeignKeyConstraint(
            ["agent_id"], [f"{S}.agents.id"], name="outbox_agent_id_fkey", ondelete="CASCADE"
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'dead', 'superseded')", name="outbox_status_check"
        ),
        schema=S,
    )
    op.create_index(
        "outbox_one_pending_idx",
        "outbox",
        ["agent_id", "kind"],
        unique=True,
        postgresql_where=sa.text("status = 'pending'"),
        schema=S,
    )
    op.create_index(
        "outbox_due_idx",
        "outbox",
        ["available_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
        schema=S,
    )
    op.create_index(
        "outbox_one_running_idx",
        "outbox",
        ["agent_id"],
        unique=True,
        postgresql_where=sa.text("status = 'running'"),
        schema=S,
    )

    op.create_table(
        "settings",
        sa.Column("id", sa.SmallInteger, nullable=False, server_default=sa.text("1")),
        sa.Column("auto_switch", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column(
            "cooldown_window", sa.Interval, nullable=False, server_default=sa.text("'02:00:00'::interval")
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="settings_pkey"),
        sa.CheckConstraint("id = 1", name="settings_single_row_check"),
        sa.CheckConstraint("cooldown_window >= interval '0'", name="settings_cooldown_window_check"),
        schema=S,
    )
    op.execute("INSERT INTO switcher.settings (id) VALUES (1)")
    execute_steps(STEPS, "upgrade")


def downgrade() -> None:
    for signature in FUNCTION_SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS switcher.{signature}")
    for table in ("settings", "outbox", "switches", "failures", "agents", "subscriptions"):
        op.drop_table(table, schema=S)


FUNCTION_SIGNATURES = (
    "assign(text, text, text)",
    "handle_failure(text, text, text, text, text, text, text[])",
    "move_agent(bigint, bigint, bigint, text, text)",
    "reserve(bigint, interval, boolean)",
    "candidates(bigint, interval)",
    "enqueue(text, bigint, bigint, jsonb)",
)
