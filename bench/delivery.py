"""Delivery to real containers: 50 agents switched at once, until every container runs with its new credential.

* by the drainer's drain-aware recreate, beside a bare docker-py script recreating the same 50 containers
  (stop, rename, create with the new environment, start, remove) with the same concurrency;
* by hot reload (``switcher.reload-command``), beside the recreate.

Needs a Docker engine and the demo's agent image (built from the host's static busybox); rows are
skipped, and say so, without them.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import URL

from bench.common import Row, fresh_database
from switcher import FailureKind, Switcher
from switcher.credentials import CredentialPolicy
from switcher.drainer import Backoff, Drainer, DrainerConfig

AGENTS = 50
CONCURRENCY = 8
SECRETS = {"A": "bench-secret-a", "B": "bench-secret-b"}


def _containers(client: Any, image: str, count: int, labels: dict[str, str]) -> list[str]:
    names = [f"switcher-bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(
            pool.map(
                lambda n: client.containers.run(
                    image,
                    name=n,
                    detach=True,
                    labels={"switcher.bench": "1", **labels},
                    environment={"SWITCHER_CREDENTIAL": SECRETS["A"]},
                ),
                names,
            )
        )
    return names


def _remove_all(client: Any) -> None:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(
            pool.map(
                lambda c: c.remove(force=True),
                client.containers.list(all=True, filters={"label": "switcher.bench=1"}),
            )
        )


def switcher_delivery(server: URL, client: Any, image: str, mode: str) -> tuple[float, list[str]]:
    """Seconds from the drainer's start (50 switches committed) until every message is done; results."""
    labels = {"switcher.reload-command": "cat > /tmp/credential"} if mode == "reload" else {}
    names = _containers(client, image, AGENTS, labels)
    with fresh_database(server, "switcher_bench") as db:
        url = db.render_as_string(hide_password=False)
        with Switcher.from_url(url) as sw:
            sw.migrate()
            for sub in SECRETS:
                sw.add_subscription(sub, credential_ref=f"env:SWITCHER_CRED_BENCH_{sub}")
            for i, name in enumerate(names):
                sw.add_agent(f"agent{i}", subscription="A", container=name)
            for i in range(AGENTS):
                sw.handle_failure(f"agent{i}", "A", FailureKind.AUTH)
        os.environ.update({f"SWITCHER_CRED_BENCH_{k}": v for k, v in SECRETS.items()})
        from switcher.runtime.docker import DockerConfig

        drainer = Drainer.from_url(
            url,
            config=DrainerConfig(
                concurrency=CONCURRENCY,
                poll_interval=timedelta(seconds=0.05),
                backoff=Backoff(timedelta(seconds=0.1)),
            ),
            docker=DockerConfig(
                mode="auto" if mode == "reload" else "recreate", stop_timeout=timedelta(seconds=5)
            ),
            credentials=CredentialPolicy(env_prefixes=("SWITCHER_CRED_BENCH_",)),
        )
        with Switcher.from_url(url) as sw:
            thread = threading.Thread(target=drainer.run)
            start = time.perf_counter()
            thread.start()
            while (box := sw.status(recent=0).outbox).pending + box.running:
                time.sleep(0.01)
            elapsed = time.perf_counter() - start
            drainer.stop()
            thread.join(60)
            drainer.close()
            results = [m.result or m.status for m in sw.messages(limit=1000) if m.kind == "restart_agent"]
    _check_applied(client, names, mode)
    _remove_all(client)
    return elapsed, results


def _check_applied(client: Any, names: list[str], mode: str) -> None:
    for name in names:
        container = client.containers.get(name)
        if mode == "reload":
            applied = container.exec_run(["cat", "/tmp/credential"]).output.decode()
        else:
            env = dict(line.split("=", 1) for line in container.attrs["Config"]["Env"] if "=" in line)
            applied = env.get("SWITCHER_CREDENTIAL", "")
        assert container.status == "running" and applied == SECRETS["B"], (name, container.status, applied)


def bare_recreate(client: Any, image: str) -> float:
    """The reference: docker-py alone, recreating the same 50 containers, 8 at a time."""
    names = _containers(client, image, AGENTS, {})
    api = client.api

    def recreate(name: str) -> None:
        old = client.containers.get(name)
        config = old.attrs["Config"]
        env = [e for e in config["Env"] if not e.startswith("SWITCHER_CREDENTIAL=")]
        old.stop(timeout=5)
        old.rename(f"{name}-old")
        created = api.create_container(
            image=old.attrs["Image"],
            command=config.get("Cmd"),
            environment=[*env, f"SWITCHER_CREDENTIAL={SECRETS['B']}"],
            labels=config.get("Labels"),
            name=name,
            host_config=old.attrs["HostConfig"],
        )
        api.start(created["Id"])
        old.remove(force=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(recreate, names))
    elapsed = time.perf_counter() - start
    _check_applied(client, names, "recreate")
    _remove_all(client)
    return elapsed


def bare_exec(client: Any, image: str) -> float:
    """What Docker alone takes to run the same reload command in 50 containers, 8 at a time."""
    names = _containers(client, image, AGENTS, {})
    containers = [client.containers.get(name) for name in names]
    start = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(
            pool.map(lambda c: c.exec_run(["sh", "-c", f"echo {SECRETS['B']} > /tmp/credential"]), containers)
        )
    elapsed = time.perf_counter() - start
    _remove_all(client)
    return elapsed


def run(server: URL, quick: bool = False) -> list[Row]:
    try:
        import docker

        from switcher.demo.image import ensure_agent_image
        from switcher.runtime.docker import docker_answers
    except ImportError:
        return [Row("delivery to containers (no Docker SDK: skipped)", 0, None, "-", ">= 0")]
    if not docker_answers():
        return [Row("delivery to containers (no Docker engine: skipped)", 0, None, "-", ">= 0")]
    client = docker.from_env()
    try:
        image = ensure_agent_image(client)
        bare = bare_recreate(client, image)
        recreate, recreated = switcher_delivery(server, client, image, "recreate")
        reload, reloaded = switcher_delivery(server, client, image, "reload")
        execs = bare_exec(client, image)
    finally:
        _remove_all(client)
        client.close()
    return [
        Row(
            f"{AGENTS} agents switched at once, recreate: seconds until all run the new credential / bare docker-py",
            recreate,
            bare,
            "s",
            "<= 1.3",
            f"concurrency {CONCURRENCY}; results {sorted(set(recreated))}",
        ),
        Row(
            f"same {AGENTS} delivered by hot reload / by recreate",
            reload,
            recreate,
            "s",
            "<= 0.1",
            f"results {sorted(set(reloaded))}; Docker alone runs the same 50 execs in {execs:.2f} s "
            f"({execs / recreate:.2f} of the recreate)",
        ),
    ]
