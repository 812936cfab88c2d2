"""What the demo plays: its subscriptions, agents and phases, and the bodies of its processes.

Two asyncio "backend" processes and one sync "scheduler" process report overlapping failures of the same
and of different agents, each inside an ``execution()`` with its true snapshot, plus late reports about
subscriptions the agents already left (which would cascade A->B->C without the stale guard). Two drainer
processes deliver the switches: hot reload to agents whose container has a reload hook, drain-aware
recreate to the others, and one webhook notification per switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..api import AsyncSwitcher, Switcher
from ..credentials import CredentialPolicy
from ..drainer import Backoff, Drainer, DrainerConfig
from ..runtime import Runtime
from .runtime import RecordingRuntime, SimulatedRuntime

SUBSCRIPTIONS = {"A": 0, "B": 1, "C": 2, "D": 3}  # name: priority
AGENTS = {"alice": "A", "bob": "A", "carol": "B", "dave": "B"}
RELOADING = ("bob", "dave")
"""Agents whose container declares a reload hook: they get the new credential without a restart."""
SECRETS = {name: f"demo-secret-{name.lower()}" for name in SUBSCRIPTIONS}
CREDENTIAL_PREFIX = "SWITCHER_CRED_DEMO_"
WEBHOOK_VARIABLE = f"{CREDENTIAL_PREFIX}WEBHOOK"
RELOAD_COMMAND = "cat > /tmp/credential"
FAILURE = "429 Too Many Requests"

Report = tuple[str, str | None]
"""(agent, snapshot). Snapshot None: the agent's true snapshot (an execution's); a name: a late report
about a subscription the agent has already left."""
Answer = tuple[int, str, str, bool, str]
"""(phase, process, agent, late, outcome)."""


@dataclass(frozen=True)
class Phase:
    title: str
    scheduler: list[Report]
    backends: list[list[Report]]
    bursts: tuple[str, ...] = ()
    """Agents whose concurrent true reports in this phase carry one snapshot: exactly one may switch."""


def now(agent: str) -> Report:
    return (agent, None)


def late(agent: str, left: str) -> Report:
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


def credential_environment() -> dict[str, str]:
    return {f"{CREDENTIAL_PREFIX}{name}": secret for name, secret in SECRETS.items()}


def drainer_process(url: str, runtime: str, record: str, ready: Any) -> None:
    """A drainer, in its own process, recording what it delivers."""
    inner: Runtime
    if runtime == "docker":
        from ..runtime.docker import DockerConfig, DockerRuntime

        inner = DockerRuntime(DockerConfig(stop_timeout=timedelta(seconds=2)))
    else:
        inner = SimulatedRuntime()
    config = DrainerConfig(
        concurrency=2,
        poll_interval=timedelta(seconds=1),
        lease=timedelta(seconds=10),
        backoff=Backoff(timedelta(seconds=0.2), timedelta(seconds=2)),
        shutdown_timeout=timedelta(seconds=10),
    )
    drainer = Drainer.from_url(
        url,
        config=config,
        runtime=RecordingRuntime(inner, record),
        credentials=CredentialPolicy(env_prefixes=(CREDENTIAL_PREFIX,)),
        drain_timeout=timedelta(seconds=10),
    )
    drainer.install_signal_handlers()
    threading_ready(drainer, ready)
    drainer.run()
    drainer.close()


def threading_ready(drainer: Drainer, ready: Any) -> None:
    import threading

    threading.Thread(target=lambda: drainer.listening.wait() and ready.set(), daemon=True).start()


def scheduler_process(url: str, start: Any, together: Any, answers: Any) -> None:
    """The scheduler: the sync API, one report after another."""
    with Switcher.from_url(url) as sw:
        for index, phase in enumerate(PHASES):
            start.wait()  # the previous phase's deliveries are done
            with contextlib.ExitStack() as running:
                executions = {
                    agent: running.enter_context(sw.execution(agent))
                    for agent, snapshot in phase.scheduler
                    if snapshot is None
                }
                together.wait()  # every process has its executions running: now they fail together
                for agent, snapshot in phase.scheduler:
                    if snapshot is None:
                        result = executions[agent].report_failure("rate_limit", FAILURE)
                    else:
                        result = sw.handle_failure(agent, snapshot, "rate_limit", FAILURE)
                    answers.put((index, "scheduler", agent, snapshot is not None, result.outcome.value))


def backend_process(url: str, number: int, start: Any, together: Any, answers: Any) -> None:
    """A backend: the asyncio API, all of a phase's reports at once, each true one from its execution."""

    async def main() -> None:
        asw = AsyncSwitcher.from_url(url, pool_size=8)
        try:
            for index, phase in enumerate(PHASES):
                reports = phase.backends[number]
                await asyncio.to_thread(start.wait)
                async with contextlib.AsyncExitStack() as running:
                    executions = await asyncio.gather(
                        *(running.enter_async_context(asw.execution(a)) for a, s in reports if s is None)
                    )
                    await asyncio.to_thread(together.wait)
                    pending = iter(executions)
                    results = await asyncio.gather(
                        *(
                            next(pending).report_failure("rate_limit", FAILURE)
                            if snapshot is None
                            else asw.handle_failure(agent, snapshot, "rate_limit", FAILURE)
                            for agent, snapshot in reports
                        )
                    )
                for (agent, snapshot), result in zip(reports, results, strict=True):
                    late_one = snapshot is not None
                    answers.put((index, f"backend{number + 1}", agent, late_one, result.outcome.value))
        finally:
            await asw.close()

    asyncio.run(main())


def environment_for_drainers(webhook_url: str) -> None:
    """Drainer processes inherit the credentials and the webhook's URL from this process."""
    os.environ.update(credential_environment())
    os.environ[WEBHOOK_VARIABLE] = webhook_url
