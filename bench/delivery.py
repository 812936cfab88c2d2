"""Delivery to real containers: 50 agents switched at once, until every container runs with its new credential.

* by the drainer's drain-aware recreate, beside a bare docker-py script recreating the same 50 containers
  (stop, rename, create with the new environment, start, remove) with the same concurrency;
* by hot reload, beside the recreate: through ``switcher.reload-url`` (each container runs busybox httpd,
  whose CGI script stores the POSTed JSON; the drainer reaches it on a port published on 127.0.0.1) and
  through ``switcher.reload-command`` (``docker exec``, whose own cost is shown beside it).

Needs a Docker engine and the demo's agent image (built from the host's static busybox); rows are
skipped, and say so, without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy.engine import URL

from bench.common import Row, fresh_database
from switcher import FailureKind, Switcher
from switcher.credentials import CredentialPolicy
from switcher.drainer import Backoff, Drainer, DrainerConfig

AGENTS = 50
CONCURRENCY = 8
SECRETS = {"A": "bench-secret-a", "B": "bench-secret-b"}
RELOAD_COMMAND = "cat > /tmp/credential"
# The reload-url agent: busybox httpd in the background, its CGI script writing the POSTed body to a file
# before it answers, and the usual sleep in the foreground.
RELOAD_CGI = '#!/bin/sh\nhead -c "$CONTENT_LENGTH" > /tmp/credential\nprintf "Content-Type: text/plain\\r\\n\\r\\nok\\n"\n'
HTTPD_AGENT = [
    "sh",
    "-c",
    'mkdir -p /www/cgi-bin && printf "%s" "$RELOAD_CGI" > /www/cgi-bin/reload && chmod +x /www/cgi-bin/reload'
    ' && httpd -p 8080 -h /www && trap "exit 0" TERM INT; sleep 2147483647 & wait',
]
Hook = Literal["none", "command", "url"]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 (all held open while choosing, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def _containers(client: Any, image: str, count: int, hook: Hook = "none") -> list[str]:
    names = [f"switcher-bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    ports = dict(zip(names, _free_ports(count) if hook == "url" else [], strict=False))

    def run(name: str) -> None:
        labels = {"switcher.bench": "1"}
        options: dict[str, Any] = {"environment": {"SWITCHER_CREDENTIAL": SECRETS["A"]}}
        if hook == "command":
            labels["switcher.reload-command"] = RELOAD_COMMAND
        elif hook == "url":
            port = ports[name]
            labels["switcher.reload-url"] = f"http://127.0.0.1:{port}/cgi-bin/reload"
            options = {
                "command": HTTPD_AGENT,
                "ports": {"8080/tcp": ("127.0.0.1", port)},
                "environment": {**options["environment"], "RELOAD_CGI": RELOAD_CGI},
            }
        client.containers.run(image, name=name, detach=True, labels=labels, **options)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(run, names))
    if hook == "url":  # every httpd answers before the clock starts
        for name in names:
            _wait_for_http(client.containers.get(name).labels["switcher.reload-url"])
    return names


def _wait_for_http(url: str, timeout: float = 30.0) -> None:
    """Until the server behind ``url`` answers a GET with any HTTP status (the CGI runs only on POST)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _remove_all(client: Any) -> None:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(
            pool.map(
                lambda c: c.remove(force=True),
                client.containers.list(all=True, filters={"label": "switcher.bench=1"}),
            )
        )


def switcher_delivery(server: URL, client: Any, image: str, hook: Hook) -> tuple[float, list[str]]:
    """Seconds from the drainer's start (50 switches committed) until every message is done; results.
    Without a hook the drainer recreates; with one it reloads."""
    names = _containers(client, image, AGENTS, hook)
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
                mode="recreate" if hook == "none" else "reload", stop_timeout=timedelta(seconds=5)
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
    _check_applied(client, names, hook)
    _remove_all(client)
    return elapsed, results


def _check_applied(client: Any, names: list[str], hook: Hook) -> None:
    for name in names:
        container = client.containers.get(name)
        if hook == "command":
            applied = container.exec_run(["cat", "/tmp/credential"]).output.decode()
        elif hook == "url":
            applied = json.loads(container.exec_run(["cat", "/tmp/credential"]).output)["credential"]
        else:
            env = dict(line.split("=", 1) for line in container.attrs["Config"]["Env"] if "=" in line)
            applied = env.get("SWITCHER_CREDENTIAL", "")
        assert container.status == "running" and applied == SECRETS["B"], (name, container.status, applied)


def bare_recreate(client: Any, image: str) -> float:
    """The reference: docker-py alone, recreating the same 50 containers, 8 at a time."""
    names = _containers(client, image, AGENTS)
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
    _check_applied(client, names, "none")
    _remove_all(client)
    return elapsed


def bare_exec(client: Any, image: str) -> float:
    """What Docker alone takes to run the same reload command in 50 containers, 8 at a time."""
    names = _containers(client, image, AGENTS)
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
        recreate, recreated = switcher_delivery(server, client, image, "none")
        posted, posts = switcher_delivery(server, client, image, "url")
        execed, execs = switcher_delivery(server, client, image, "command")
        bare_execs = bare_exec(client, image)
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
            f"same {AGENTS} delivered by hot reload (reload-url) / by recreate",
            posted,
            recreate,
            "s",
            "<= 0.1",
            f"results {sorted(set(posts))}",
        ),
        Row(
            f"same {AGENTS} delivered by hot reload (reload-command) / by recreate",
            execed,
            recreate,
            "s",
            "<= 0.1",
            f"results {sorted(set(execs))}; Docker alone runs the same {AGENTS} execs in {bare_execs:.2f} s "
            f"({bare_execs / recreate:.2f} of the recreate)",
        ),
    ]
