"""D4 placement: a drainer with a placement claims only the messages of agents placed there, one without
claims only agents placed nowhere; ``no_container`` is a logged warning and a metric, never silent."""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from switcher import FailureKind, Switcher
from switcher.drainer import Backoff, Drainer, DrainerConfig
from switcher.runtime import Delivery
from switcher.runtime.docker import DockerConfig
from tests.conftest import restart_rows, wait_for

RL = FailureKind.RATE_LIMIT
WAIT = 60.0


class Recording:
    """A runtime that records which drainer delivered what."""

    def __init__(self, drainer: str, handled: list[tuple[str, str]], lock: threading.Lock) -> None:
        self.drainer, self.handled, self.lock = drainer, handled, lock

    def apply(self, delivery: Delivery) -> str:
        with self.lock:
            self.handled.append((self.drainer, delivery.target.agent))
        return "recorded"


@contextlib.contextmanager
def drainers(url: str, specs: dict[str, Any]) -> Iterator[dict[str, Drainer]]:
    """Real drainers in threads of this process: name -> (placement, runtime or DockerConfig)."""
    started: dict[str, tuple[Drainer, threading.Thread]] = {}
    try:
        for name, (placement, runtime) in specs.items():
            config = DrainerConfig(
                worker_id=f"{name}-{uuid.uuid4().hex[:6]}",
                placement=placement,
                poll_interval=timedelta(seconds=0.2),
                backoff=Backoff(timedelta(milliseconds=50), timedelta(seconds=1)),
            )
            if isinstance(runtime, DockerConfig):
                drainer = Drainer.from_url(url, config=config, docker=runtime)
            else:
                drainer = Drainer.from_url(url, config=config, runtime=runtime)
            thread = threading.Thread(target=drainer.run, name=f"test-drainer-{name}")
            thread.start()
            started[name] = (drainer, thread)
        for drainer, _ in started.values():
            assert drainer.listening.wait(WAIT), "every drainer listens before the switches"
        yield {name: drainer for name, (drainer, _) in started.items()}
    finally:
        for drainer, _ in started.values():
            drainer.stop()
        for drainer, thread in started.values():
            thread.join(WAIT)
            drainer.close()
            assert not thread.is_alive(), "the drainer stopped"


def _rows_by_agent(sw: Switcher) -> dict[str, list[Any]]:
    """Restart messages by agent name."""
    with sw.engine.connect() as conn:
        names = {row.id: row.name for row in conn.execute(text("SELECT id, name FROM switcher.agents"))}
    rows: dict[str, list[Any]] = {}
    for row in restart_rows(sw):
        rows.setdefault(names[row.agent_id], []).append(row)
    return rows


def test_each_drainer_handles_only_the_agents_of_its_placement(sw: Switcher, url: str) -> None:
    for name in "ABC":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    placed = {"a1": "host-a", "a2": "host-a", "b1": "host-b", "n1": None, "n2": None, "c1": "host-c"}
    for agent, placement in placed.items():
        sw.add_agent(agent, subscription="A", container=f"agent-{agent}", placement=placement)
    handled: list[tuple[str, str]] = []
    lock = threading.Lock()
    specs = {
        name: (placement, Recording(name, handled, lock))
        for name, placement in (("host-a", "host-a"), ("host-b", "host-b"), ("nowhere", None))
    }

    with drainers(url, specs):
        # c1 first: when every later message is done, every drainer has passed over c1's.
        for agent in ("c1", "a1", "n1", "b1", "a2", "n2"):
            assert sw.handle_failure(agent, "A", RL, "429").switched
        for agent in ("a1", "b1", "n1"):  # a second round for some of them, by hand
            assert sw.assign(agent, "A").switched
        wait_for(
            lambda: all(
                r.status in ("done", "superseded")
                for a, rs in _rows_by_agent(sw).items()
                if a != "c1"
                for r in rs
            ),
            timeout=WAIT,
            what="every message of a placed-with-a-drainer agent finished",
        )
        rows = _rows_by_agent(sw)

    expected = {"a1": "host-a", "a2": "host-a", "b1": "host-b", "n1": "nowhere", "n2": "nowhere"}
    with lock:
        by_agent = {agent: {d for d, a in handled if a == agent} for agent in placed}
    for agent, drainer in expected.items():
        assert by_agent[agent] == {drainer}, (
            f"D4: {agent} (placed {placed[agent]}) is handled only by drainer {drainer}: {by_agent[agent]}"
        )
        claimed_by = {r.leased_by for r in rows[agent] if r.leased_by is not None}
        assert claimed_by and all(w.startswith(f"{drainer}-") for w in claimed_by), (
            f"D4: the outbox says the same: {agent}'s messages were leased by {claimed_by}"
        )
    assert by_agent["c1"] == set(), "D4: an agent placed where no drainer runs is handled by none"
    [c1] = rows["c1"]
    assert (c1.status, c1.attempts, c1.leased_by) == ("pending", 0, None), (
        f"D4: its message waits, never claimed: {c1}"
    )

    with drainers(url, {"host-c": ("host-c", Recording("host-c", handled, lock))}):
        wait_for(lambda: _rows_by_agent(sw)["c1"][0].status == "done", timeout=WAIT, what="c1 delivered")
    with lock:
        assert [d for d, a in handled if a == "c1"] == ["host-c"], (
            "D4: a drainer of its placement delivers it"
        )


@pytest.mark.docker
def test_no_container_is_a_warning_and_a_metric(
    sw: Switcher, url: str, docker_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for name in "AB":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    missing = f"switcher-test-missing-{uuid.uuid4().hex[:8]}"
    sw.add_agent("ghost", subscription="A", container=missing, placement="host-a")
    labels = {"mode": "recreate", "result": "no_container"}
    before = REGISTRY.get_sample_value("switcher_deliveries_total", labels) or 0.0
    caplog.set_level(logging.WARNING, logger="switcher")
    recreate = DockerConfig(mode="recreate", stop_timeout=timedelta(seconds=2))

    with drainers(url, {"host-a": ("host-a", recreate)}):
        sw.handle_failure("ghost", "A", RL, "429")
        [row] = wait_for(
            lambda: (rows := restart_rows(sw)) and rows[0].status == "done" and rows,
            timeout=WAIT,
            what="done",
        )

    assert row.result == "no_container", f"the delivery found no container: {row}"
    after = REGISTRY.get_sample_value("switcher_deliveries_total", labels) or 0.0
    assert after == before + 1, (
        'D4: counted in switcher_deliveries_total{mode="recreate",result="no_container"}'
    )
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and getattr(r, "agent", None) == "ghost"
    ]
    assert len(warnings) == 1, f"D4: no_container is logged as a warning, once: {caplog.records}"
    [warning] = warnings
    assert "no container" in warning.getMessage(), warning.getMessage()
    assert (getattr(warning, "container", None), getattr(warning, "placement", None)) == (
        missing,
        "host-a",
    ), "the warning names the container and placement to check"
