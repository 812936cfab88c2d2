"""Report ids, load shards, delivery state, executions, placement, notifications, retention, drainers;
versioned functions with a pinned search_path. The statements are in the .sql file of the same name.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from switcher.migrate import execute_steps

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STEPS = Path(__file__).with_suffix(".sql")
REVISION_0001 = Path(__file__).with_name("0001_initial.sql")


def upgrade() -> None:
    execute_steps(STEPS, "upgrade")


def downgrade() -> None:
    execute_steps(STEPS, "downgrade")
    execute_steps(REVISION_0001, "upgrade")  # 0001's functions, as 0001 created them
