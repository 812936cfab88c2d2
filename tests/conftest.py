from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import text

from switcher import Switcher

T = TypeVar("T")

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
                    "SELECT id, agent_id, generation, status, attempts, leased_by, last_error, result "
                    "FROM switcher.outbox ORDER BY id"
                )
            )
        )


AGENT_IMAGE = os.environ.get("SWITCHER_TEST_AGENT_IMAGE", "switcher-test/agent:1")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A Docker engine with the test agent image; outside CI, tests skip when no engine answers."""
    from switcher.testing import docker_available

    if not docker_available():
        if os.environ.get("CI"):
            pytest.fail("CI must run the Docker-backed tests, but no Docker engine answers")
        pytest.skip("no Docker engine answers (start dockerd, or see tests/images/build.sh)")
    import docker

    client = docker.from_env()
    try:
        client.images.get(AGENT_IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run([str(Path(__file__).parent / "images" / "build.sh")], check=True)
    yield client
    client.close()


@pytest.fixture
def agent_container(docker_client: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Start agent containers that are removed after the test, whatever name they end up with."""
    created: list[str] = []

    def start(name: str, **kwargs: Any) -> Any:
        name = f"{name}-{uuid.uuid4().hex[:6]}"
        created.append(name)
        return docker_client.containers.run(AGENT_IMAGE, name=name, detach=True, **kwargs)

    yield start
    for name in created:
        for container in docker_client.containers.list(all=True, filters={"name": name}):
            container.remove(force=True)
