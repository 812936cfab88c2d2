"""The functions a caller enters are never compiled by JIT: with 0003's enable_seqscan = off, PostgreSQL
15-17 cost a plan that still scans at 1e10, past every JIT threshold. The statements are in the .sql file
of the same name.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from switcher.migrate import execute_steps

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STEPS = Path(__file__).with_suffix(".sql")


def upgrade() -> None:
    execute_steps(STEPS, "upgrade")


def downgrade() -> None:
    execute_steps(STEPS, "downgrade")
