"""Alembic environment for ``alembic -c alembic.ini ...`` in a source checkout (URL from
SWITCHER_DATABASE_URL or ``-x url=...``). Applications run ``switcher migrate`` or ``Switcher.migrate()``,
which apply the same migrations without this file (``switcher.migrate``)."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from switcher.api import database_url
from switcher.migrate import SCHEMA, VERSION_TABLE, current, ensure_schema, migrating, remove_schema


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("SWITCHER_DATABASE_URL")
    if not url:
        raise SystemExit("set SWITCHER_DATABASE_URL (or pass -x url=postgresql://...)")
    return url


def _configure(**kwargs: object) -> None:
    context.configure(version_table=VERSION_TABLE, version_table_schema=SCHEMA, **kwargs)


if context.is_offline_mode():
    _configure(url=database_url(_url()), literal_binds=True)
    with context.begin_transaction():
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        context.run_migrations()
else:
    with (
        create_engine(database_url(_url()), poolclass=pool.NullPool).begin() as connection,
        migrating(connection),
    ):
        ensure_schema(connection)
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        if current(connection) is None:  # downgraded to base: nothing of switcher's is left
            remove_schema(connection)
