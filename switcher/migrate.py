"""switcher's schema migrations, run from the package's own files (``db/``, shipped as
``switcher.migrations``), so an installed switcher migrates itself.

Everything lives in schema ``switcher``, Alembic's version table included, so switcher's history never
meets the host application's. For a host application with Alembic of its own:

* ``include_name`` / ``include_object`` keep the host's autogenerate away from schema ``switcher``;
* ``upgrade(connection)`` can run from the host's ``env.py``, in the host's transaction: it uses no
  Alembic global state, and leaves the host's ``alembic.op`` and ``alembic.context`` as they were.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from . import sql
from .errors import MigrationError

SCHEMA = "switcher"
VERSION_TABLE = "alembic_version"
INSUFFICIENT_PRIVILEGE = "42501"


def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """For a host's Alembic ``context.configure(include_name=...)``: leave schema ``switcher`` alone."""
    if type_ == "schema":
        return name != SCHEMA
    return parent_names.get("schema_name") != SCHEMA


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """For a host's Alembic ``context.configure(include_object=...)``: leave schema ``switcher`` alone."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return getattr(table, "schema", None) != SCHEMA


def script_directory() -> ScriptDirectory:
    return ScriptDirectory(str(files("switcher.migrations")))


def head() -> str:
    revision = script_directory().get_current_head()
    assert revision is not None
    return revision


def current(connection: Connection) -> str | None:
    """The revision the database is at; None when switcher was never migrated there."""
    context = MigrationContext.configure(connection, opts={"version_table_schema": SCHEMA})
    return context.get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrade schema ``switcher`` to ``revision``, in the connection's transaction. Concurrent calls from
    several processes take turns. Raises ``MigrationError`` when the role may not do it."""
    script = script_directory()
    with migrating(connection):
        ensure_schema(connection)
        _run(connection, lambda rev, _: script._upgrade_revs(revision, rev))


def downgrade(connection: Connection, revision: str) -> None:
    """Downgrade schema ``switcher`` to ``revision``; ``base`` removes everything switcher created, the
    schema and Alembic's version table included."""
    script = script_directory()
    with migrating(connection):
        _run(connection, lambda rev, _: script._downgrade_revs(revision, rev))
        if revision == "base":
            remove_schema(connection)


def remove_schema(connection: Connection, cascade: bool = False) -> None:
    """Drop schema ``switcher``; with ``cascade``, whatever it holds (``switcher uninstall``)."""
    connection.execute(text(f"DROP TABLE IF EXISTS {SCHEMA}.{VERSION_TABLE}"))
    connection.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} {'CASCADE' if cascade else 'RESTRICT'}"))


def execute_steps(path: Path, kind: str) -> None:
    """Run the ``upgrade`` or ``downgrade`` statements of a migration's ``.sql`` file, in order (from a
    migration script). Colons are escaped: the statements hold no bound parameters."""
    from alembic import op

    for statement in sql.migration_steps(path, kind):
        op.execute(sa.text(statement.replace(":", r"\:")))


def function_drift(connection: Connection) -> list[str]:
    """Names of the head functions that the database lacks or holds with another body or settings: a
    database migrated by another version of switcher, or edited by hand. Read-only."""
    rows = connection.execute(
        text(
            """
            SELECT p.proname, p.prosrc, p.proconfig
            FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = :schema
            """
        ),
        {"schema": SCHEMA},
    )
    present = {row.proname: (row.prosrc, row.proconfig) for row in rows}
    drift = []
    for name, definition in sql.head_functions().items():
        body = definition.split("$$")[1]
        config = [f"{key}={value}" for key, value in _SETTING.findall(definition.split("$$")[0])]
        if present.get(name) != (body, config):
            drift.append(name)
    return drift


_SETTING = re.compile(r"^SET (\w+) = (.+?)$", re.MULTILINE)


@contextlib.contextmanager
def migrating(connection: Connection) -> Iterator[None]:
    """Take the migration lock; turn a missing privilege into ``MigrationError``."""
    try:
        # Concurrent migrations (several processes starting at once) take turns.
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('switcher.migrate'))"))
        yield
    except ProgrammingError as error:
        if sql.sqlstate(error) == INSUFFICIENT_PRIVILEGE:
            role = connection.engine.url.username or "this role"
            raise MigrationError(
                f"{role} may not migrate schema {SCHEMA}: {_first_line(error)}; migrate as the owner of "
                f"schema {SCHEMA} (or a role that may create it: GRANT CREATE ON DATABASE)"
            ) from None
        raise


def _first_line(error: DBAPIError) -> str:
    return str(error.orig).splitlines()[0] if error.orig is not None else str(error)


def ensure_schema(connection: Connection) -> None:
    # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists: look first,
    # so that the owner of a pre-created schema migrates without it.
    exists = connection.execute(
        text("SELECT true FROM pg_catalog.pg_namespace WHERE nspname = :schema"), {"schema": SCHEMA}
    ).scalar()
    if not exists:
        connection.execute(text(f"CREATE SCHEMA {SCHEMA}"))


def _run(connection: Connection, step: Any) -> None:
    context = MigrationContext.configure(
        connection,
        opts={"version_table": VERSION_TABLE, "version_table_schema": SCHEMA, "fn": step},
    )
    with _alembic_globals_kept(), Operations.context(context):
        context.run_migrations()


@contextlib.contextmanager
def _alembic_globals_kept() -> Iterator[None]:
    """Alembic keeps the running migration in module globals (``alembic.op``, ``alembic.context``) and
    deletes them when it is done. Put back whatever a host's migration run had there."""
    import alembic.context
    import alembic.op

    saved = [(module, dict(vars(module))) for module in (alembic.op, alembic.context)]
    try:
        yield
    finally:
        for module, namespace in saved:
            for key in set(vars(module)) - set(namespace):
                delattr(module, key)
            for key, value in namespace.items():
                setattr(module, key, value)
