"""D1 never worse off: faults injected into the drain-aware recreate, on real PostgreSQL, real Docker and
real drainer processes.

Every fault is placed through ``tests.faults.docker_proxy.DockerProxy``, a proxy in front of the Docker
socket that holds (or reports) the request of the step where the fault goes; nothing waits on a clock.
Once a drainer runs again and the outbox settles, ``delivery_violations`` -- one checker for every test
-- lists what is wrong with an agent: its container exists once under its name, in the run state it had
before the delivery, with the current assignment applied, no parked leftovers, nothing in progress.

The module ends by printing the suite's figures: faults injected per kind, agents checked, violations.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from sqlalchemy import text

from switcher import FailureKind, Switcher
from switcher.runtime.docker import PARKED, DockerConfig
from tests import drainers
from tests.conftest import restart_rows, wait_for
from tests.faults.docker_proxy import DockerProxy, Request, Rule
from tests.pgserver import RestartablePostgres

pytestmark = pytest.mark.docker

RL = FailureKind.RATE_LIMIT
SUBSCRIPTIONS = "ABCDEFGH"
SECRETS = {f"SWITCHER_CRED_{name}": f"secret-{name.lower()}-d1" for name in SUBSCRIPTIONS}
LEASE = timedelta(seconds=6)
STOP_TIMEOUT = timedelta(seconds=2)
SEED = int(os.environ.get("SWITCHER_FAULT_SEED", "20240611"))
SETTLE_TIMEOUT = 120.0

# The requests of the recreate's steps, as the proxy matches them (the path after the API version).
STEPS: dict[str, tuple[str, str]] = {
    "stop": ("POST", r"/containers/[^/]+/stop"),
    "rename": ("POST", r"/containers/[^/]+/rename"),
    "create": ("POST", r"/containers/create"),
    "start": ("POST", r"/containers/[^/]+/start"),
    "remove": ("DELETE", r"/containers/[^/]+"),
}
# The kinds of fault the figures count.
KILLED_AT = {
    "stop": "kill -9 during docker stop",
    "rename": "kill -9 before rename",
    "create": "kill -9 before create",
    "start": "kill -9 before start",
    "remove": "kill -9 before removing the parked container",
}
KILLED_STOPPED = "kill -9 after create, container stopped before"
OUTAGE = "Docker unreachable mid-recreate"
PG_RESTART = "PostgreSQL restarted mid-recreate"
PAUSED = "drainer paused past its lease, its create sent late"


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():  # drainer processes inherit them
        monkeypatch.setenv(name, value)


# -- figures ---------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """The suite's figures, per test and in total."""

    rows: list[tuple[str, Counter[str], int, int]] = field(default_factory=list)

    def add(self, test: str, faults: Counter[str], agents: int, violations: int) -> None:
        self.rows.append((test, faults, agents, violations))
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(faults.items())) or "none"
        print(f"\n[D1] {test}: faults injected {{{kinds}}}; agents checked {agents}; violations {violations}")

    def table(self) -> list[str]:
        total: Counter[str] = Counter()
        for _, faults, _, _ in self.rows:
            total.update(faults)
        width = max([len(k) for k in total] + [len("fault kind")])
        lines = ["", "D1 fault suite figures", f"{'fault kind':<{width}}  injected"]
        lines += [f"{kind:<{width}}  {n:>8}" for kind, n in sorted(total.items())]
        lines.append(f"{'total':<{width}}  {sum(total.values()):>8}")
        agents = sum(r[2] for r in self.rows)
        violations = sum(r[3] for r in self.rows)
        lines.append(f"tests {len(self.rows)}, agents checked {agents}, violations {violations}")
        return lines


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    collected = Figures()
    yield collected
    if not collected.rows:
        return
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    for line in collected.table():
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)


# -- the checker -----------------------------------------------------------------------------------------


def delivery_violations(
    sw: Switcher, docker_client: Any, agent: str, *, running: bool, name: str | None = None
) -> list[str]:
    """What D1 says is wrong with ``agent`` once the outbox settled (empty: nothing).

    ``running`` is the run state the agent's container had before the deliveries began; ``name`` its
    container's name, for an agent registered without one (found by label)."""
    current = sw.agent(agent)
    name = name or current.container
    assert name is not None, f"agent {agent} has no container name"
    problems: list[str] = []
    containers = docker_client.containers.list(all=True, filters={"name": name})
    named = [c for c in containers if c.name == name]
    leftovers = sorted(c.name for c in containers if c.name.startswith(f"{name}{PARKED}"))
    if len(named) != 1:
        problems.append(f"{agent}: {len(named)} containers named {name}")
    if leftovers:
        problems.append(f"{agent}: parked leftovers {leftovers}")
    if len(named) == 1:
        container = named[0]
        config = container.attrs["Config"]
        labels = config.get("Labels") or {}
        state = container.attrs["State"]
        if bool(state.get("Running")) != running:
            problems.append(
                f"{agent}: container is {state.get('Status')}, but was "
                f"{'running' if running else 'stopped'} before the delivery"
            )
        if labels.get("switcher.generation") != str(current.generation):
            problems.append(
                f"{agent}: label switcher.generation={labels.get('switcher.generation')!r}, "
                f"the agent's generation is {current.generation}"
            )
        if labels.get("switcher.subscription") != current.subscription:
            problems.append(
                f"{agent}: label switcher.subscription={labels.get('switcher.subscription')!r}, "
                f"the agent's subscription is {current.subscription!r}"
            )
        env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
        expected = _secret(sw, current.subscription)
        if env.get("SWITCHER_CREDENTIAL") != expected:
            problems.append(
                f"{agent}: SWITCHER_CREDENTIAL is not the secret of subscription {current.subscription!r}"
            )
    with sw.engine.connect() as conn:
        intended = conn.execute(
            text(
                "SELECT d.intended_running FROM switcher.deliveries d "
                "JOIN switcher.agents a ON a.id = d.agent_id WHERE a.name = :agent"
            ),
            {"agent": agent},
        ).all()
        messages = conn.execute(
            text(
                "SELECT o.id, o.status, o.last_error FROM switcher.outbox o "
                "JOIN switcher.agents a ON a.id = o.agent_id "
                "WHERE a.name = :agent AND o.kind = 'restart_agent' ORDER BY o.id"
            ),
            {"agent": agent},
        ).all()
    if any(row.intended_running is not None for row in intended):
        problems.append(f"{agent}: switcher.deliveries still has a recreate in progress")
    for row in messages:
        if row.status not in ("done", "superseded"):
            problems.append(f"{agent}: restart message {row.id} is {row.status} ({row.last_error})")
    return problems


def _secret(sw: Switcher, subscription: str | None) -> str | None:
    if subscription is None:
        return None
    ref = sw.subscription(subscription).credential_ref
    assert ref.startswith("env:"), ref
    return os.environ.get(ref.removeprefix("env:"))


# -- drainers, the proxy, the outbox ---------------------------------------------------------------------


class Fleet:
    """Drainer processes running the real Docker delivery (recreate mode)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.processes: list[Any] = []
        self.events: list[dict[str, Any]] = []
        """Kept while the processes run: a child unpickles its events after it started."""
        self.killed: list[int] = []

    def start(self, base_url: str, concurrency: int = 1) -> Any:
        process, events = drainers.start(
            self.url,
            "docker",
            poll_interval=timedelta(seconds=0.2),
            lease=LEASE,
            max_attempts=1000,
            concurrency=concurrency,
            docker=DockerConfig(base_url=base_url, stop_timeout=STOP_TIMEOUT, mode="recreate"),
        )
        self.add(process, events)
        return process

    def add(self, process: Any, events: dict[str, Any]) -> None:
        self.processes.append(process)
        self.events.append(events)

    def kill(self, pid: int) -> None:
        """SIGKILL one of the drainers, by its pid."""
        process = next(p for p in self.processes if p.pid == pid)
        assert process.is_alive(), f"drainer {pid} already ended"
        os.kill(pid, signal.SIGKILL)
        process.join(30)
        self.killed.append(pid)

    def reach(self, rule: Rule, timeout: float = 90.0) -> Request:
        """Wait until a drainer's request reaches ``rule``; fail at once if no drainer is left."""
        wait_for(
            lambda: rule.reached.is_set() or not self.alive(), timeout=timeout, what=f"a request to {rule}"
        )
        exits = [p.exitcode for p in self.processes]
        assert rule.request is not None, f"no drainer left to reach {rule} (exit codes {exits})"
        return rule.request

    def alive(self) -> list[Any]:
        return [p for p in self.processes if p.is_alive()]

    def stop(self) -> None:
        for process in self.alive():
            process.terminate()
        for process in self.processes:
            process.join(60)
            if process.is_alive():
                process.kill()
                process.join(10)


@pytest.fixture
def fleet() -> Iterator[Callable[[str], Fleet]]:
    """Make drainer fleets; whatever still runs is stopped after the test."""
    fleets: list[Fleet] = []

    def make(url: str) -> Fleet:
        fleets.append(Fleet(url))
        return fleets[-1]

    yield make
    for made in fleets:
        made.stop()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[DockerProxy]:
    path = tmp_path / "docker.sock"
    with contextlib.ExitStack() as stack:
        if len(str(path)) > 100:  # a Unix socket path must fit in sun_path (108 bytes)
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swdp-"))) / "docker.sock"
        with DockerProxy(path) as started:
            yield started


def settled(sw: Switcher) -> bool:
    """No restart message is pending or running."""
    return not any(r.status in ("pending", "running") for r in restart_rows(sw))


def settle(sw: Switcher, timeout: float = SETTLE_TIMEOUT) -> None:
    wait_for(lambda: settled(sw), timeout=timeout, what="the outbox to settle")


def finished_attempts(sw: Switcher) -> int:
    """Attempts of restart messages that ended (a running message's current attempt has not)."""
    return sum(r.attempts - (r.status == "running") for r in restart_rows(sw))


def _reached_or_settled(rule: Rule, sw: Switcher) -> bool:
    return rule.reached.is_set() or settled(sw)


def _attempts_at_least(sw: Switcher, attempts: int) -> bool:
    return finished_attempts(sw) >= attempts


def arm(proxy: DockerProxy, step: str, how: Literal["hold", "notify"] = "hold") -> Rule:
    method, pattern = STEPS[step]
    return proxy.hold(method, pattern) if how == "hold" else proxy.notify(method, pattern)


def where(docker_client: Any, name: str) -> str:
    """The agent's containers at a fault, in a few words (printed, to show where the fault went)."""
    parts = []
    for c in docker_client.containers.list(all=True, filters={"name": name}):
        if c.name == name or c.name.startswith(f"{name}{PARKED}"):
            kind = "named" if c.name == name else "parked"
            generation = (c.attrs["Config"].get("Labels") or {}).get("switcher.generation", "-")
            parts.append(f"{kind}(generation {generation}, {c.status})")
    return ", ".join(sorted(parts)) or "no container"


# -- one fault at a time ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    id: str
    kind: str
    """The figure it counts under."""
    step: str
    inject: Literal["kill", "outage", "postgres_restart", "pause"]
    how: Literal["hold", "notify"] = "hold"
    stopped: bool = False
    """The container is stopped before the delivery."""
    ignores_term: bool = False
    """The agent ignores SIGTERM: ``docker stop`` lasts its whole timeout, then kills it."""


FAULTS = [
    # The agent ignores SIGTERM, so the stop is still running in dockerd when the kill lands.
    Fault("a-killed-during-stop", KILLED_AT["stop"], "stop", "kill", how="notify", ignores_term=True),
    Fault("b-killed-after-stop-before-rename", KILLED_AT["rename"], "rename", "kill"),
    Fault("c-killed-after-rename-before-create", KILLED_AT["create"], "create", "kill"),
    Fault("d-killed-after-create-before-start", KILLED_AT["start"], "start", "kill"),
    Fault("e-killed-before-removing-parked", KILLED_AT["remove"], "remove", "kill"),
    Fault("f-docker-unreachable-at-create", OUTAGE, "create", "outage"),
    Fault("g-postgres-restarted-at-create", PG_RESTART, "create", "postgres_restart"),
    # Stopped: no stop and no start; the step after create is removing the parked container.
    Fault("h-stopped-killed-after-create", KILLED_STOPPED, "remove", "kill", stopped=True),
    # D6 as D1 sees it: a drainer frozen (SIGSTOP) with its create held loses its lease to a fresh one;
    # thawed, its create reaches Docker after all, past the fence it passed before sending it.
    Fault("i-paused-past-lease-create-sent-late", PAUSED, "create", "pause"),
]


@contextlib.contextmanager
def database(
    request: pytest.FixtureRequest, fault: Fault, tmp_path: Path
) -> Iterator[tuple[Switcher, str, RestartablePostgres | None]]:
    """The test's database: a fresh one on the shared server, or a server of its own when it must
    restart."""
    if fault.inject != "postgres_restart":
        yield request.getfixturevalue("sw"), request.getfixturevalue("url"), None
        return
    server = RestartablePostgres(tmp_path)
    try:
        url = server.migrated_database()
        with Switcher.from_url(url, pool_pre_ping=True) as sw:
            yield sw, url, server
    finally:
        server.close()


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_a_fault_mid_recreate_leaves_the_agent_as_it_was_with_the_switch_applied(
    fault: Fault,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    docker_client: Any,
    agent_container: Callable[..., Any],
    proxy: DockerProxy,
    fleet: Callable[[str], Fleet],
    figures: Figures,
) -> None:
    with database(request, fault, tmp_path) as (sw, url, server):
        command = ["sh", "-c", "trap '' TERM; sleep 2147483647 & wait"] if fault.ignores_term else None
        container = agent_container("d1-alice", command=command)
        if fault.stopped:
            container.stop(timeout=5)
        for name in "AB":
            sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
        sw.add_agent("alice", subscription="A", container=container.name)

        drainers_ = fleet(url)
        try:
            _inject(fault, sw, server, docker_client, container.name, proxy, drainers_, figures)
        finally:
            drainers_.stop()  # before the database goes


def _inject(
    fault: Fault,
    sw: Switcher,
    server: RestartablePostgres | None,
    docker_client: Any,
    container: str,
    proxy: DockerProxy,
    drainers_: Fleet,
    figures: Figures,
) -> None:
    """Switch alice, place the fault at its step, let a drainer finish; check."""
    rule = arm(proxy, fault.step, fault.how)
    # Killed "during docker stop": should the stop answer before the kill lands, the drainer gets no
    # further than the rename.
    guard = arm(proxy, "rename") if fault.how == "notify" else None
    drainers_.start(proxy.base_url)
    result = sw.handle_failure("alice", "A", RL, "429")
    assert result.switched and result.new_subscription == "B"

    request_seen = drainers_.reach(rule)
    if fault.inject == "kill":
        drainers_.kill(request_seen.pid)
        at = where(docker_client, container)
        late = guard is not None and guard.reached.is_set()
        proxy.clear()  # drops the held request: Docker never sees it
        drainers_.start(proxy.base_url)  # a fresh drainer, through the (now healthy) proxy
        settle(sw)
    elif fault.inject == "pause":
        os.kill(request_seen.pid, signal.SIGSTOP)
        try:
            at = where(docker_client, container)
            late = False
            drainers_.start(proxy.base_url)
            # The fresh drainer claims the message once the frozen one's lease ran out (and then waits for
            # the agent's gate, which the frozen one holds).
            wait_for(
                lambda: (r := restart_rows(sw)[0]).attempts >= 2 and r.status == "running",
                timeout=90,
                what="the message taken over by the fresh drainer",
            )
        finally:
            os.kill(request_seen.pid, signal.SIGCONT)
        rule.release()
        settle(sw)
    elif fault.inject == "outage":
        proxy.unreachable = True  # cuts the held create with every other connection
        at = where(docker_client, container)
        late = False
        wait_for(
            lambda: (r := restart_rows(sw)[0]).last_error and r.attempts - (r.status == "running") >= 2,
            timeout=90,
            what="two failed attempts while Docker is away",
        )
        proxy.unreachable = False
        settle(sw)  # the same drainer finishes
    else:
        assert server is not None
        at = where(docker_client, container)
        late = False
        server.restart()
        rule.release()
        settle(sw)  # the same drainer finishes

    problems = delivery_violations(sw, docker_client, "alice", running=not fault.stopped)
    print(f"\n[D1] {fault.id}: fault placed at: {at}{' (stop had answered)' if late else ''}")
    print(f"[D1] {fault.id}: messages {[(r.status, r.attempts, r.result) for r in restart_rows(sw)]}")
    figures.add(fault.id, Counter({fault.kind: 1}), agents=1, violations=len(problems))
    assert not problems, "\n".join(problems)


# -- interrupted recreates that need more than a start -----------------------------------------------------


def test_an_interrupted_recreate_of_an_agent_found_by_label_is_finished(
    sw: Switcher,
    url: str,
    docker_client: Any,
    agent_container: Callable[..., Any],
    proxy: DockerProxy,
    fleet: Callable[[str], Fleet],
    figures: Figures,
) -> None:
    """An agent registered without a container name is found by its ``switcher.agent`` label. Killed after
    the rename, before the create: only the parked container is left, and the next delivery finishes the
    recreate under the parked container's name (not ``no_container``)."""
    container = agent_container("d1-label", labels={"switcher.agent": "alice"})
    for name in "AB":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    sw.add_agent("alice", subscription="A")  # no container name
    drainers_ = fleet(url)
    rule = arm(proxy, "create")
    drainers_.start(proxy.base_url)
    assert sw.handle_failure("alice", "A", RL, "429").switched

    drainers_.kill(drainers_.reach(rule).pid)
    at = where(docker_client, container.name)
    assert at == "parked(generation -, exited)", f"the fault left only the parked container: {at}"
    proxy.clear()
    drainers_.start(proxy.base_url)
    settle(sw)

    assert [r.result for r in restart_rows(sw)] == ["recreated"]
    problems = delivery_violations(sw, docker_client, "alice", running=True, name=container.name)
    figures.add("found-by-label-killed-before-create", Counter({KILLED_AT["create"]: 1}), 1, len(problems))
    assert not problems, "\n".join(problems)


def test_a_replacement_interrupted_between_its_network_connects_gets_every_network(
    sw: Switcher,
    url: str,
    docker_client: Any,
    agent_container: Callable[..., Any],
    network: Callable[[str], Any],
    proxy: DockerProxy,
    fleet: Callable[[str], Fleet],
    figures: Figures,
) -> None:
    """The replacement is created on the primary network, then connected to each extra one. Killed between
    two connects, it exists with the target generation but not every network: the next delivery connects
    the missing ones (from the parked old container) before it starts it."""
    primary, first, second = network("d1-net-p"), network("d1-net-a"), network("d1-net-b")
    container = agent_container("d1-nets", network=primary.name)
    first.connect(container, aliases=["alice-a"])
    second.connect(container, aliases=["alice-b"])
    for name in "AB":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    sw.add_agent("alice", subscription="A", container=container.name)
    drainers_ = fleet(url)
    # Networks are connected in name order: the kill lands with the first connected, the second not.
    rule = proxy.hold("POST", rf"/networks/{second.name}/connect")
    drainers_.start(proxy.base_url)
    assert sw.handle_failure("alice", "A", RL, "429").switched

    drainers_.kill(drainers_.reach(rule).pid)
    half = docker_client.containers.get(container.name)
    assert set(half.attrs["NetworkSettings"]["Networks"]) == {primary.name, first.name}, "fault placed"
    proxy.clear()
    drainers_.start(proxy.base_url)
    settle(sw)

    problems = delivery_violations(sw, docker_client, "alice", running=True)
    new = docker_client.containers.get(container.name)
    networks = new.attrs["NetworkSettings"]["Networks"]
    if set(networks) != {primary.name, first.name, second.name}:
        problems.append(f"alice: on networks {sorted(networks)}, not on all three")
    elif "alice-b" not in (networks[second.name].get("Aliases") or []):
        problems.append(f"alice: lost its alias on {second.name}: {networks[second.name]}")
    figures.add(
        "killed-between-network-connects", Counter({"kill -9 between network connects": 1}), 1, len(problems)
    )
    assert not problems, "\n".join(problems)


def test_a_reload_command_running_past_its_timeout_is_reported_as_a_timeout(
    sw: Switcher,
    url: str,
    docker_client: Any,
    agent_container: Callable[..., Any],
    proxy: DockerProxy,
    fleet: Callable[[str], Fleet],
) -> None:
    """The exec's stream ends (its connection cut) while the reload command still runs: at the reload
    timeout the reload failed as timed out -- not "exited with None" from an exit code it does not have."""
    hook = "cat > /tmp/credential; sleep 600"
    container = agent_container("d1-reload", labels={"switcher.reload-command": hook})
    for name in "AB":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    sw.add_agent("alice", subscription="A", container=container.name)
    started = proxy.notify("POST", r"/exec/[^/]+/start")
    drainers_ = fleet(url)
    drainers_.add(
        *drainers.start(
            url,
            "docker",
            poll_interval=timedelta(seconds=0.2),
            lease=LEASE,
            max_attempts=1,
            docker=DockerConfig(
                base_url=proxy.base_url,
                mode="reload",
                stop_timeout=STOP_TIMEOUT,
                reload_timeout=timedelta(seconds=5),
            ),
        )
    )
    sw.handle_failure("alice", "A", RL, "429")
    drainers_.reach(started)
    wait_for(
        lambda: container.exec_run(["cat", "/tmp/credential"]).exit_code == 0,
        what="the reload command read its standard input to the end",
    )
    # Only the exec's upgraded connection is open now (the drainer waits on it); cut it.
    proxy.cut()
    settle(sw)

    [row] = restart_rows(sw)
    assert row.status == "dead" and "reload command still running after 5 s" in (row.last_error or ""), row
    assert "None" not in (row.last_error or ""), row


# -- a randomized run ------------------------------------------------------------------------------------


def test_randomized_faults_across_agents_and_drainers(
    sw: Switcher,
    url: str,
    docker_client: Any,
    agent_container: Callable[..., Any],
    proxy: DockerProxy,
    fleet: Callable[[str], Fleet],
    figures: Figures,
) -> None:
    """6 agents (2 of them stopped), a switch of each per round, 3 drainer processes through the proxy;
    each round a drainer is killed at one step of a recreate (in an order a seeded generator picks, the
    drainer the one whose request reaches the proxy first), or Docker goes away once. Rounds do not wait
    for the previous one to settle, so faults land on recoveries too."""
    rng = random.Random(SEED)
    sw.set_cooldown_window(0)  # every report may switch, however often
    for name in SUBSCRIPTIONS:
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    agents = [f"agent{i}" for i in range(6)]
    stopped = set(rng.sample(agents, 2))
    for i, agent in enumerate(agents):
        container = agent_container(f"d1-{agent}")
        if agent in stopped:
            container.stop(timeout=5)
        sw.add_agent(agent, subscription=SUBSCRIPTIONS[i], container=container.name)

    plan: list[str] = rng.sample(list(STEPS), len(STEPS))  # a drainer killed at each step, in this order
    plan.insert(rng.randrange(len(plan) + 1), "outage")
    print(f"\n[D1] randomized run, seed {SEED}: plan {plan}, stopped {sorted(stopped)}")

    drainers_ = fleet(url)
    for _ in range(3):
        drainers_.start(proxy.base_url, concurrency=2)
    injected: Counter[str] = Counter()
    switches = 0
    for number, fault in enumerate(plan):
        rule = (
            arm(proxy, "create")
            if fault == "outage"
            else arm(proxy, fault, "notify" if fault == "stop" else "hold")
        )
        for agent in rng.sample(agents, len(agents)):
            if sw.handle_failure(agent, sw.agent(agent).subscription, RL, "429").switched:
                switches += 1
        wait_for(
            functools.partial(_reached_or_settled, rule, sw),
            timeout=SETTLE_TIMEOUT,
            what=f"round {number}: {fault} placed",
        )
        if not rule.reached.is_set():  # every delivery of the round finished without that step
            proxy.clear()
            print(f"[D1] round {number}: {fault} not placed (no such step this round)")
            continue
        if fault == "outage":
            before = finished_attempts(sw)
            proxy.unreachable = True
            wait_for(
                functools.partial(_attempts_at_least, sw, before + 3),
                timeout=90,
                what="failed attempts while Docker is away",
            )
            proxy.unreachable = False
        else:
            drainers_.kill(rule.pid)
            rule.drop()
            drainers_.start(proxy.base_url, concurrency=2)
        injected[OUTAGE if fault == "outage" else KILLED_AT[fault]] += 1
        print(f"[D1] round {number}: {fault} injected ({rule.request})")
    settle(sw)

    problems = [
        problem
        for agent in agents
        for problem in delivery_violations(sw, docker_client, agent, running=agent not in stopped)
    ]
    rows = restart_rows(sw)
    print(
        f"[D1] randomized run: {switches} switches, {len(rows)} restart messages "
        f"({Counter(r.status for r in rows)}), {len(drainers_.killed)} drainers killed"
    )
    figures.add(f"randomized (seed {SEED})", injected, agents=len(agents), violations=len(problems))
    assert not problems, "\n".join(problems)


# -- the proxy itself ------------------------------------------------------------------------------------


def test_the_proxy_carries_a_hot_reload_with_its_half_close(
    sw: Switcher,
    url: str,
    docker_client: Any,
    agent_container: Callable[..., Any],
    proxy: DockerProxy,
    fleet: Callable[[str], Fleet],
) -> None:
    """An exec with ``socket=True`` upgrades its connection; the credential goes to its stdin, whose end
    the runtime signals with a half-close: the proxy must pass both on, or the reload never ends."""
    container = agent_container("d1-reload", labels={"switcher.reload-command": "cat > /tmp/credential"})
    for name in "AB":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    sw.add_agent("alice", subscription="A", container=container.name)
    drainers_ = fleet(url)
    process, events = drainers.start(
        url,
        "docker",
        poll_interval=timedelta(seconds=0.2),
        lease=LEASE,
        docker=DockerConfig(base_url=proxy.base_url, stop_timeout=STOP_TIMEOUT, mode="auto"),
    )
    drainers_.add(process, events)
    sw.handle_failure("alice", "A", RL, "429")
    settle(sw)
    assert [r.result for r in restart_rows(sw)] == ["reloaded"]
    assert proxy.count("POST", r"/exec/[^/]+/start") == 1
    written = container.exec_run(["cat", "/tmp/credential"]).output.decode()
    assert written == SECRETS["SWITCHER_CRED_B"]
    assert docker_client.containers.get(container.name).id == container.id, "hot reload keeps the container"
