"""pytest fixtures for tests against real PostgreSQL, loaded by pytest once switcher is installed (entry
point ``switcher``; ``pytest -p no:switcher`` turns them off):

* ``switcher_postgres`` (session) -- a server (see ``switcher.testing.postgres_server``);
* ``switcher_templates`` (session) -- migrated databases cloned from one template;
* ``switcher_database_url`` (function) -- a fresh migrated database for one test, dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import URL

from . import PostgresServer, TemplateDatabases, postgres_server


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
