"""Fixtures and helpers shared by the tests. PostgreSQL comes from switcher's own pytest plugin
(``switcher_database_url``: a fresh migrated database per test), loaded through its entry point."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from sqlalchemy import text

from switcher import Switcher
from switcher.outbox import Outbox

T = TypeVar("T")

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


@contextlib.contextmanager
def outbox(sw: Switcher) -> Iterator[Outbox]:
    """The outbox door on an autocommit connection, as a drainer uses it."""
    with sw.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        yield Outbox(conn)


def wait_for(condition: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy (a bound on failure, not a timing check)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def outbox_rows(sw: Switcher) -> list[Any]:
    with sw.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, kind, agent_id, generation, status, attempts, leased_by, last_error, result "
                    "FROM switcher.outbox ORDER BY id"
                )
            )
        )


def restart_rows(sw: Switcher) -> list[Any]:
    return [r for r in outbox_rows(sw) if r.kind == "restart_agent"]


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A Docker engine with the agent image; outside CI, tests skip when no engine answers."""
    from switcher.runtime.docker import docker_answers

    if not docker_answers():
        if os.environ.get("CI"):
            pytest.fail("CI must run the Docker-backed tests, but no Docker engine answers")
        pytest.skip("no Docker engine answers (start dockerd: tests/images/docker-up.sh)")
    import docker

    from switcher.demo.image import ensure_agent_image

    client = docker.from_env()
    ensure_agent_image(client)
    yield client
    client.close()


@pytest.fixture
def network(docker_client: Any) -> Iterator[Callable[..., Any]]:
    """Make Docker networks; removed after the test, with whatever container is still on them."""
    made: list[Any] = []

    def make(name: str, **kwargs: Any) -> Any:
        made.append(docker_client.networks.create(f"{name}-{uuid.uuid4().hex[:6]}", **kwargs))
        return made[-1]

    yield make
    for net in made:
        net.reload()
        for container in net.containers:
            container.remove(force=True)
        net.remove()


@pytest.fixture
def agent_container(docker_client: Any) -> Iterator[Callable[..., Any]]:
    """Start agent containers that are removed after the test, whatever name they end up with."""
    from switcher.demo.image import AGENT_IMAGE

    created: list[str] = []

    def start(name: str, **kwargs: Any) -> Any:
        name = f"{name}-{uuid.uuid4().hex[:6]}"
        created.append(name)
        return docker_client.containers.run(AGENT_IMAGE, name=name, detach=True, **kwargs)

    yield start
    for name in created:
        for container in docker_client.containers.list(all=True, filters={"name": name}):
            container.remove(force=True)
