"""Restarts applied to real containers by real drainers (G4, G5, G9), on a real Docker engine."""

from __future__ import annotations

import gc
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from switcher import FailureKind, Switcher
from switcher.drainer import Backoff, Drainer, DrainerConfig
from switcher.runtime.docker import DockerConfig
from tests import drainers
from tests.conftest import restart_rows, wait_for

pytestmark = pytest.mark.docker
RL = FailureKind.RATE_LIMIT
SECRETS = {f"SWITCHER_CRED_{name}": f"secret-{name.lower()}-value" for name in "ABCDEFG"}
FAST_STOP = DockerConfig(stop_timeout=timedelta(seconds=2))


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():  # drainer processes inherit them
        monkeypatch.setenv(name, value)


def _setup(sw: Switcher, container: str | None, subs: str = "ABCDEFG") -> None:
    for name in subs:
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    sw.add_agent("alice", subscription="A", container=container)


def _env(container: Any) -> dict[str, str]:
    """The environment as the running container sees it."""
    output = container.exec_run("env").output.decode()
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def _in_thread(drainer: Drainer) -> Callable[[], None]:
    thread = threading.Thread(target=drainer.run)
    thread.start()

    def stop() -> None:
        drainer.stop()
        thread.join(60)
        drainer.close()

    return stop


def test_a_switch_recreates_the_real_container_with_the_new_credential(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    old = agent_container("agent-alice", environment={"KEEP": "me"}, labels={"team": "blue"})
    _setup(sw, old.name, subs="AB")
    result = sw.handle_failure("alice", "A", RL, "429")

    process = subprocess.Popen(
        [sys.executable, "-m", "switcher", "--database-url", url, "drain", "--poll-interval", "0.2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        row = wait_for(lambda: (r := restart_rows(sw)[0]).status == "done" and r, what="restart done")
    finally:
        process.terminate()
        _, log = process.communicate(timeout=60)
    assert process.returncode == 0, log
    assert (row.id, row.generation, row.result) == (result.restart_id, 1, "recreated")

    new = docker_client.containers.get(old.name)
    assert new.id != old.id and new.status == "running"
    env = _env(new)
    assert env["SWITCHER_CREDENTIAL"] == SECRETS["SWITCHER_CRED_B"], (
        "the new subscription's credential is applied"
    )
    assert env["KEEP"] == "me", "the rest of the environment is kept"
    assert new.labels["team"] == "blue"
    assert (
        new.labels["switcher.agent"],
        new.labels["switcher.subscription"],
        new.labels["switcher.generation"],
    ) == (
        "alice",
        "B",
        "1",
    )
    assert not docker_client.containers.list(all=True, filters={"name": f"{old.name}-switcher-"}), (
        "old removed"
    )
    assert SECRETS["SWITCHER_CRED_B"] not in log and "secret-" not in log, "G9: the secret is never logged"


def test_a_burst_of_switches_under_three_drainers_ends_on_the_last_without_overlap(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any], tmp_path: Path
) -> None:
    container = agent_container("agent-alice")
    _setup(sw, container.name)
    intervals = tmp_path / "intervals.jsonl"
    started = [
        drainers.start(
            url,
            "docker",
            intervals,
            poll_interval=timedelta(seconds=0.2),
            lease=timedelta(seconds=30),
            docker=FAST_STOP,
        )
        for _ in range(3)
    ]
    try:
        for _, events in started:
            assert events["listening"].wait(60)
        current = "A"
        for _ in range(5):  # A -> B -> C -> D -> E -> F, each report carrying the true snapshot
            result = sw.handle_failure("alice", current, RL, "429")
            assert result.switched
            current = result.new_subscription or current
        assert current == "F"
        wait_for(
            lambda: all(r.status in ("done", "superseded") for r in restart_rows(sw)),
            timeout=120,
            what="every restart message finished",
        )
    finally:
        for process, _ in started:
            process.terminate()
            process.join(60)
            assert process.exitcode == 0

    final = docker_client.containers.get(container.name)
    assert final.labels["switcher.subscription"] == "F" and final.labels["switcher.generation"] == "5"
    assert _env(final)["SWITCHER_CREDENTIAL"] == SECRETS["SWITCHER_CRED_F"], (
        "G4: the latest switch is applied"
    )
    runs = sorted(drainers.read_intervals(intervals), key=lambda r: r["start"])
    assert runs, "the drainers ran the restarts"
    for earlier, later in itertools.pairwise(runs):
        assert earlier["end"] <= later["start"], f"G4: restarts of one agent overlapped: {earlier} / {later}"
    assert [r["result"] for r in runs].count("recreated") >= 1
    assert {r["result"] for r in runs} <= {"recreated", "already_applied"}


def test_missing_and_stopped_containers(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    stopped = agent_container("agent-bob")
    stopped.stop(timeout=5)
    for name in "AB":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    sw.add_agent("ghost", subscription="A", container="no-such-container-here")
    sw.add_agent("bob", subscription="A", container=stopped.name)
    sw.handle_failure("ghost", "A", RL)
    sw.handle_failure("bob", "A", RL)

    drainer = Drainer.from_url(
        url, config=DrainerConfig(poll_interval=timedelta(seconds=0.2)), docker=FAST_STOP
    )
    stop = _in_thread(drainer)
    try:
        rows = wait_for(
            lambda: (rs := restart_rows(sw)) and all(r.status == "done" for r in rs) and rs, what="both done"
        )
    finally:
        stop()
    assert sorted(r.result for r in rows) == ["no_container", "not_running"]
    bob = docker_client.containers.get(stopped.name)
    assert bob.status in ("created", "exited"), "a stopped container is left stopped"
    assert bob.labels["switcher.subscription"] == "B", "but recreated with the new configuration"


# The docker SDK leaks the socket of a failed connection to the garbage collector.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_docker_unreachable_is_retried_with_backoff_until_it_is_back(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any], tmp_path: Path
) -> None:
    container = agent_container("agent-alice")
    _setup(sw, container.name, subs="AB")
    socket = tmp_path / "docker.sock"  # nothing there yet: Docker is "down"
    docker = DockerConfig(base_url=f"unix://{socket}", stop_timeout=timedelta(seconds=2))
    config = DrainerConfig(
        poll_interval=timedelta(seconds=0.1),
        backoff=Backoff(timedelta(milliseconds=100), timedelta(milliseconds=300)),
        max_attempts=1000,
    )
    stop = _in_thread(Drainer.from_url(url, config=config, docker=docker))
    try:
        sw.handle_failure("alice", "A", RL)
        row = wait_for(lambda: (r := restart_rows(sw)[0]).attempts >= 3 and r, what="several failed attempts")
        assert row.status in ("pending", "running") and "Connection" in (row.last_error or "")
        os.symlink("/var/run/docker.sock", socket)  # Docker is back
        row = wait_for(
            lambda: (r := restart_rows(sw)[0]).status == "done" and r, what="done once Docker is back"
        )
    finally:
        stop()
    assert row.result == "recreated"
    assert docker_client.containers.get(container.name).labels["switcher.subscription"] == "B"
    gc.collect()  # the leaked sockets, while this test's filters apply


def test_restart_mode_restarts_and_a_redelivery_is_a_no_op(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    container = agent_container("agent-alice")
    _setup(sw, container.name, subs="AB")
    before = container.attrs["State"]["StartedAt"]
    sw.handle_failure("alice", "A", RL)
    config = DrainerConfig(poll_interval=timedelta(seconds=0.2))
    restart = DockerConfig(mode="restart", stop_timeout=timedelta(seconds=2))
    stop = _in_thread(Drainer.from_url(url, config=config, docker=restart))
    try:
        row = wait_for(lambda: (r := restart_rows(sw)[0]).status == "done" and r, what="restart done")
    finally:
        stop()
    assert row.result == "restarted"
    container.reload()
    assert container.id == docker_client.containers.get(container.name).id, "restart keeps the container"
    assert container.attrs["State"]["StartedAt"] != before
    started = container.attrs["State"]["StartedAt"]

    # The same message delivered again (say its drainer died before recording it) does nothing.
    with sw.engine.begin() as conn:
        conn.execute(text("UPDATE switcher.outbox SET status = 'pending', attempts = 0"))
    stop = _in_thread(Drainer.from_url(url, config=config, docker=restart))
    try:
        row = wait_for(lambda: (r := restart_rows(sw)[0]).status == "done" and r, what="redelivery done")
    finally:
        stop()
    assert row.result == "already_applied"
    container.reload()
    assert container.attrs["State"]["StartedAt"] == started, "not restarted twice"
