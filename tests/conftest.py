from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from switcher import Switcher

pytest_plugins = ["switcher.testing"]

TABLES = ("subscriptions", "agents", "failures", "switches", "outbox")


@pytest.fixture
def url(switcher_database_url) -> str:  # type: ignore[no-untyped-def]
    """A fresh migrated database, as a string that can cross a process boundary."""
    return str(switcher_database_url.render_as_string(hide_password=False))


@pytest.fixture
def sw(url: str) -> Iterator[Switcher]:
    with Switcher.from_url(url) as switcher:
        yield switcher


def count(sw: Switcher, table: str, where: str = "true") -> int:
    with sw.engine.connect() as conn:
        query = text(f"SELECT count(*) FROM switcher.{table} WHERE {where}")  # noqa: S608 (fixed names)
        return int(conn.execute(query).scalar_one())


def row_counts(sw: Switcher) -> dict[str, int]:
    return {table: count(sw, table) for table in TABLES}
