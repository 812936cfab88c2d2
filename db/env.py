"""Alembic environment for switcher. Everything lives in the ``switcher`` schema, version table
included, so switcher's history never collides with the host application's own Alembic."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from switcher.api import database_url
from switcher.schema import SCHEMA, metadata

config = context.config


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    # Never look at (or touch) objects outside our schema.
    return type_ != "schema" or name == SCHEMA


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=metadata,
        version_table="alembic_version",
        version_table_schema=SCHEMA,
        include_schemas=True,
        include_name=_include_name,
        **kwargs,
    )


def _run(connection: Connection) -> None:
    # Concurrent `migrate` calls from several processes take turns.
    connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('switcher.migrate'))"))
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("SWITCHER_DATABASE_URL")
    if not url:
        raise SystemExit("set SWITCHER_DATABASE_URL (or pass -x url=postgresql://...)")
    return url


if context.is_offline_mode():
    _configure(url=database_url(_url()), literal_binds=True)
    with context.begin_transaction():
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    _run(connection)
else:
    with create_engine(database_url(_url()), poolclass=pool.NullPool).begin() as connection:
        _run(connection)
