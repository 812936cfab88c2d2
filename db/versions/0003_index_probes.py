"""What a caller's call reads does not grow with the history: the functions a caller enters plan every
lookup as an index probe, whatever the statistics say, and an execution's registration has an index to
probe. The statements are in the .sql file of the same name.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from switcher.migrate import execute_steps

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STEPS = Path(__file__).with_suffix(".sql")


def upgrade() -> None:
    execute_steps(STEPS, "upgrade")


def downgrade() -> None:
    execute_steps(STEPS, "downgrade")
