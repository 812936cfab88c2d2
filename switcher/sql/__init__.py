"""SQL in files: one ``.sql`` file per concern, parsed once.

A file is a sequence of blocks, each opened by a header comment line:

* ``-- name: claim`` -- a query, with bound parameters written ``:name``, run by the concern's door
  (``Registry`` for ``registry.sql``, ``switch.sql`` and ``executions.sql``; ``Outbox`` for
  ``outbox.sql``) in the driver's own parameter style (``SqlFile.run``): a report is a hot path, and
  SQLAlchemy's statement compilation would cost as much client time as the rest of it. The report's
  own statements go one step further (``SqlFile.row``);
* ``-- function: handle_failure_v2`` -- a database function's definition. Functions are DDL: migrations
  create them from frozen copies of these blocks, and a test proves the migrated database holds exactly
  what these blocks say. A changed function gets a new name (``_v3``) in a new migration, so old and new
  code can run side by side during a deploy;
* ``-- upgrade: ...`` / ``-- downgrade: ...`` -- one statement of a migration (``db/versions/*.sql``).

Lines before the first header describe the file. Comment lines right after a header describe the block.
"""

from __future__ import annotations

import re
from collections import namedtuple
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, CursorResult
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import NoResultFound

from ..errors import InvalidInput

_HEADER = re.compile(r"^-- (name|function|upgrade|downgrade): *(.+?) *$", re.MULTILINE)
_FUNCTION_NAME = re.compile(r"CREATE (?:OR REPLACE )?FUNCTION switcher\.(\w+)\(")
_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


@dataclass(frozen=True, slots=True)
class Block:
    kind: str
    """``name``, ``function``, ``upgrade`` or ``downgrade``."""
    name: str
    sql: str


def parse(source: str) -> list[Block]:
    """The blocks of a ``.sql`` file, in order."""
    headers = list(_HEADER.finditer(source))
    blocks = []
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        body = source[header.end() : following.start() if following else len(source)].strip()
        if not body:
            raise ValueError(f"empty SQL block {header.group(0)!r}")
        blocks.append(Block(header.group(1), header.group(2), body.rstrip(";").rstrip()))
        if header.group(1) == "function":
            match = _FUNCTION_NAME.search(body)
            if match is None or match.group(1) != header.group(2):
                raise ValueError(f"block {header.group(0)!r} must define switcher.{header.group(2)}")
    return blocks


@dataclass(frozen=True)
class SqlFile:
    queries: dict[str, str]
    """Query name -> its statement, in the driver's own parameter style (``%(name)s``)."""
    functions: dict[str, str]
    """Function name -> its ``CREATE FUNCTION`` statement."""
    _row_types: dict[str, Any] = field(default_factory=dict, compare=False)

    def run(self, conn: Connection, query: str, **params: Any) -> CursorResult[Any]:
        """Run a named query on ``conn``, in whatever transaction ``conn`` is in."""
        return conn.exec_driver_sql(self.queries[query], params)

    def row(self, conn: Connection, query: str, **params: Any) -> Any:
        """The one row of a named query (fields by name), run on ``conn``'s driver cursor.

        For the statements of a report, which run once per call: SQLAlchemy's execution (its context,
        its result object) costs more client time than the driver's. Nothing else changes: errors go
        through SQLAlchemy's own handler, so they are the exceptions ``run`` raises and a lost
        connection is invalidated; and when something watches the connection's statements (event
        listeners, echo), the query goes through ``run``, which they see."""
        if _watched(conn):
            return self.run(conn, query, **params).one()
        statement = self.queries[query]
        # As SQLAlchemy's execution does: getting the DBAPI connection reconnects an invalidated one
        # (handling its own errors); from the cursor on, every error -- BaseException too: a cancelled
        # task, a deadline -- goes through the handler, which drops a connection left closed or
        # mid-statement instead of pooling it (from_url's autocommit pool resets nothing on return).
        dbapi_connection = conn.connection
        try:
            cursor = dbapi_connection.cursor()
        except BaseException as error:
            conn._handle_dbapi_exception(error, statement, params, None, None)
        try:
            cursor.execute(statement, params)
            values = cursor.fetchone()
            if query not in self._row_types:  # the first call: name the fields as the query does
                self._row_types[query] = namedtuple(query, [c[0] for c in cursor.description])
        except BaseException as error:
            conn._handle_dbapi_exception(error, statement, params, cursor, None)
        finally:
            cursor.close()
        if values is None:
            raise NoResultFound(f"query {query!r} returned no row")
        return self._row_types[query]._make(values)


def _watched(conn: Connection) -> bool:
    """Whether anything sees the statements ``conn`` runs: execute or cursor events on it, its engine or
    their classes, the dialect's ``do_execute``, or SQL logging (``echo``)."""
    events = conn.dispatch
    return bool(
        events.before_execute
        or events.after_execute
        or events.before_cursor_execute
        or events.after_cursor_execute
        or conn.dialect.dispatch.do_execute
        or conn._echo
    )


DRIVER = "psycopg"
"""The driver every query is written for (its parameter style, its LISTEN): psycopg 3, sync or async."""


def require_driver(dialect: Dialect, who: str) -> None:
    """Refuse an engine of another driver up front, not with a syntax error at the first query."""
    if dialect.name != "postgresql" or dialect.driver != DRIVER:
        raise InvalidInput(
            f"{who} needs a PostgreSQL engine on psycopg 3 (postgresql+psycopg://), "
            f"got {dialect.name}+{dialect.driver}"
        )


def driver_statement(sql: str) -> str:
    """A named query as psycopg takes it: comment lines dropped (they are for readers), ``%`` doubled,
    ``:name`` as ``%(name)s`` (``::type`` casts stay)."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return _PARAMETER.sub(r"%(\1)s", code.replace("%", "%%"))


@cache
def load(concern: str) -> SqlFile:
    """``switcher/sql/<concern>.sql``, parsed (once per process)."""
    blocks = parse(files(__package__).joinpath(f"{concern}.sql").read_text(encoding="utf-8"))
    queries = {b.name: driver_statement(b.sql) for b in blocks if b.kind == "name"}
    functions = {b.name: b.sql for b in blocks if b.kind == "function"}
    if len(queries) + len(functions) != len(blocks):
        raise ValueError(f"{concern}.sql: duplicate block names, or migration steps in a head file")
    return SqlFile(queries, functions)


CONCERNS = ("registry", "switch", "executions", "outbox")


def head_functions() -> dict[str, str]:
    """Every function the package's head ``.sql`` files define: what a migrated database must hold."""
    return {name: sql for concern in CONCERNS for name, sql in load(concern).functions.items()}


def migration_steps(path: Path, kind: str) -> list[str]:
    """The ``upgrade`` or ``downgrade`` statements of a migration's ``.sql`` file, in order."""
    return [b.sql for b in parse(path.read_text(encoding="utf-8")) if b.kind == kind]


def violated_constraint(error: BaseException) -> str | None:
    """The name of the constraint a database error reports (``IntegrityError``), if any: a door tells
    the one race it expects from every other failure by this name."""
    diag = getattr(getattr(error, "orig", None), "diag", None)
    return getattr(diag, "constraint_name", None)


def sqlstate(error: BaseException) -> str | None:
    return getattr(getattr(error, "orig", None), "sqlstate", None)
