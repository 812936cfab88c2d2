"""Restarts applied to real containers by real drainers (G4, G5, G9), on a real Docker engine."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from docker.types import IPAMConfig, IPAMPool, Mount
from sqlalchemy import text

from switcher import FailureKind, Switcher
from switcher.drainer import Backoff, Drainer, DrainerConfig
from switcher.outbox import Outbox
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


def _deliver(sw: Switcher, url: str, docker: DockerConfig = FAST_STOP, max_attempts: int = 10) -> Any:
    """Run a drainer (in a thread) until every restart message finished; the newest row."""
    config = DrainerConfig(
        poll_interval=timedelta(seconds=0.2),
        backoff=Backoff(timedelta(milliseconds=50), timedelta(milliseconds=200)),
        max_attempts=max_attempts,
    )
    stop = _in_thread(Drainer.from_url(url, config=config, docker=docker))
    try:
        return wait_for(
            lambda: (rs := restart_rows(sw)) and all(r.status in ("done", "dead") for r in rs) and rs[-1],
            timeout=90,
            what="the restart message finished",
        )
    finally:
        stop()


def _intents(sw: Switcher) -> list[Any]:
    with sw.engine.connect() as conn:
        return list(conn.execute(text("SELECT intended_running FROM switcher.deliveries")).scalars())


@pytest.mark.parametrize(
    ("ref", "attempts"),
    [("env:OUTSIDE_THE_ALLOWLIST", 1), ("env:SWITCHER_CRED_NOT_SET", 2)],
    ids=["refused", "missing"],
)
def test_an_unresolvable_credential_leaves_no_recreate_intent_behind(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any], ref: str, attempts: int
) -> None:
    """D1: the credential is resolved before the run state to restore is recorded, so a refused (dead at
    once) or missing (dead after its retries) credential leaves no recreate "in progress"."""
    container = agent_container("agent-alice")
    sw.add_subscription("A", credential_ref="env:SWITCHER_CRED_A")
    sw.add_subscription("B", credential_ref=ref)
    sw.add_agent("alice", subscription="A", container=container.name)
    sw.handle_failure("alice", "A", RL, "429")

    row = _deliver(sw, url, max_attempts=2)

    assert (row.status, row.attempts) == ("dead", attempts), row
    assert _intents(sw) in ([], [None]), "no recreate intent is left for a delivery that changed nothing"
    with sw.engine.connect() as conn:
        assert Outbox(conn).unfinished_deliveries() == [], "switcher check reports nothing interrupted"
    after = docker_client.containers.get(container.name)
    assert (after.id, after.status) == (container.id, "running"), "the container is untouched"


def test_a_restart_interrupted_after_its_stop_is_finished_by_the_redelivery(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any], tmp_path: Path
) -> None:
    """D1 in restart mode: the run state is recorded before the restart. The fault: the bind mount's source
    is gone, so dockerd's restart stops the container and then fails to start it (the attempt fails)."""
    source = tmp_path / "data"
    source.mkdir()
    container = agent_container("agent-alice", mounts=[Mount("/data", str(source), type="bind")])
    _setup(sw, container.name, subs="AB")
    source.rmdir()
    sw.handle_failure("alice", "A", RL, "429")
    config = DrainerConfig(
        poll_interval=timedelta(seconds=0.2),
        backoff=Backoff(timedelta(milliseconds=50), timedelta(milliseconds=200)),
        max_attempts=1000,
    )
    restart = DockerConfig(mode="restart", stop_timeout=timedelta(seconds=2))
    stop = _in_thread(Drainer.from_url(url, config=config, docker=restart))
    try:
        wait_for(
            lambda: (r := restart_rows(sw)[0]).last_error and "Cannot restart" in r.last_error,
            what="the restart failed after its stop",
        )
        container.reload()
        assert container.status == "exited", "the fault left the container stopped"
        source.mkdir()  # the restart can succeed again
        row = wait_for(lambda: (r := restart_rows(sw)[0]).status == "done" and r, what="restart done")
    finally:
        stop()
    assert row.result == "restarted", f"D1: the redelivery restores the recorded run state: {row}"
    container.reload()
    assert container.status == "running", "D1: the agent runs again"
    assert _intents(sw) == [None]


def test_volumes_declared_with_mount_are_kept_by_a_recreate(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    """``--mount type=volume`` (HostConfig.Mounts), named and anonymous: the recreate mounts the same
    volumes once each (not again as Binds: a duplicate mount point is refused), with their data."""
    named = f"switcher-test-{uuid.uuid4().hex[:8]}"
    container = agent_container(
        "agent-alice",
        mounts=[Mount("/named", named, type="volume"), Mount("/anon", None, type="volume")],
    )
    volumes = [m["Name"] for m in container.attrs["Mounts"]]
    try:
        assert container.exec_run(["sh", "-c", "echo n > /named/f; echo a > /anon/f"]).exit_code == 0
        _setup(sw, container.name, subs="AB")
        sw.handle_failure("alice", "A", RL, "429")

        row = _deliver(sw, url)

        assert (row.status, row.result) == ("done", "recreated"), row
        new = docker_client.containers.get(container.name)
        assert new.id != container.id and new.status == "running"
        assert sorted(m["Name"] for m in new.attrs["Mounts"]) == sorted(volumes), "the same volumes"
        assert new.exec_run(["cat", "/named/f", "/anon/f"]).output.decode().split() == ["n", "a"]
    finally:
        for container_ in docker_client.containers.list(all=True, filters={"name": container.name}):
            container_.remove(force=True)
        for volume in volumes:
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.volumes.get(volume).remove(force=True)


def test_a_hex_container_name_never_resolves_to_another_containers_id(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    """An agent's container is looked up by its exact name: ``containers.get`` would also take the name as
    a prefix of an unrelated container's ID, and recreate that one."""
    bystander = agent_container("bystander")
    prefix = bystander.id[:12]
    for name in "AB":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    sw.add_agent("ghost", subscription="A", container=prefix)
    sw.handle_failure("ghost", "A", RL)
    try:
        row = _deliver(sw, url)
    finally:  # the bystander, renamed, should the lookup take it
        for leftover in docker_client.containers.list(all=True, filters={"name": prefix}):
            leftover.remove(force=True)
    assert (row.status, row.result) == ("done", "no_container"), row
    after = docker_client.containers.get(bystander.id)
    assert (after.name, after.status) == (bystander.name, "running"), "the bystander is untouched"
    assert "switcher.agent" not in after.labels


def test_a_recreate_keeps_the_networks_their_aliases_and_static_addresses(
    sw: Switcher,
    url: str,
    docker_client: Any,
    agent_container: Callable[..., Any],
    network: Callable[..., Any],
) -> None:
    primary = network("agents")
    subnet = f"10.{200 + uuid.uuid4().int % 50}.{uuid.uuid4().int % 250}"
    extra = network(
        "tools", ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=f"{subnet}.0/24", gateway=f"{subnet}.1")])
    )
    old = agent_container("agent-alice", network=primary.name)
    extra.connect(old, aliases=["brain"], ipv4_address=f"{subnet}.9")
    _setup(sw, old.name, subs="AB")
    sw.handle_failure("alice", "A", RL, "429")
    stop = _in_thread(
        Drainer.from_url(url, config=DrainerConfig(poll_interval=timedelta(seconds=0.2)), docker=FAST_STOP)
    )
    try:
        wait_for(lambda: restart_rows(sw)[0].status == "done", what="the recreate")
    finally:
        stop()
    new = docker_client.containers.get(old.name)
    assert new.id != old.id and new.status == "running"
    networks = new.attrs["NetworkSettings"]["Networks"]
    assert set(networks) == {primary.name, extra.name}
    assert networks[extra.name]["IPAddress"] == f"{subnet}.9", "the static address is kept"
    assert "brain" in (networks[extra.name]["Aliases"] or []), "and the aliases"
