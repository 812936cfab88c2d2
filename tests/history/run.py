"""The workload and the fault injector of the history test.

Caller processes (``Switcher`` ones with a few threads, ``AsyncSwitcher`` ones with a few coroutines)
report failures of a few agents through ``PgProxy``, each call with its own report id, against snapshots
that are the agent's current subscription (read just before, sometimes with its generation), another
subscription (stale, or not yet) or none. Each caller appends to a log of its own, flushed line by line:
a ``call`` line before the call, an ``answer`` line after it, so a caller killed with SIGKILL loses at
most the answer of the calls it had in flight (the ``call`` line says that report may have been made).

The test process injects the faults, placed by a seeded generator over the number of calls of the switch
the proxy has seen: a caller killed with SIGKILL and replaced, PostgreSQL restarted (fast shutdown), and
the proxy's lost replies and cuts. A sampler thread reads the subscriptions' loads meanwhile. Afterwards
the tables and the logs are read into a ``checker.History``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from switcher import AsyncSwitcher, FailureKind, Switcher, SwitcherError, SwitchResult
from tests.pgserver import RestartablePostgres

from . import checker
from .pgproxy import CUT_BEFORE, LOSE_REPLY, FaultPlan, PgProxy

SUBSCRIPTIONS: dict[str, int | None] = {"sub-a": None, "sub-b": None, "sub-c": 1, "sub-d": 2, "sub-e": None}
AGENTS: dict[str, str] = {
    "agent-0": "sub-a",
    "agent-1": "sub-a",
    "agent-2": "sub-b",
    "agent-3": "sub-b",
    "agent-4": "sub-c",
    "agent-5": "sub-e",
}
KINDS = (FailureKind.RATE_LIMIT.value, FailureKind.AUTH.value)
CALLER_RETRIES = 40
"""A caller retries a report that ended in a connection error (the product's own retries exhausted,
PostgreSQL restarting) with the same report id, this many times at most."""

_ctx = mp.get_context("spawn")


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run does. Fault positions are drawn from ``seed`` over counts of calls of the switch."""

    seed: int = 20250101
    sync_callers: int = 2
    threads: int = 2
    """Threads per sync caller."""
    async_callers: int = 2
    coroutines: int = 4
    """Coroutines per async caller."""
    calls: int | None = 3000
    """Stop once the proxy has seen this many calls of the switch (the short run)..."""
    seconds: float | None = None
    """... or after this many seconds (the long run)."""
    kill_every: int = 300
    """Mean number of calls between two kills of a caller."""
    restart_every: int = 1200
    """Mean number of calls between two PostgreSQL restarts."""
    lose_reply: float = 0.02
    cut_before: float = 0.02
    force_after: int = 40
    """From this call on, each proxy fault not injected yet is forced (so a short run has each)."""
    timeout: float = 240.0
    """A bound on the whole run, so that a hang fails instead of waiting forever."""


@dataclass(frozen=True, slots=True)
class CallerSpec:
    name: str
    kind: str  # "sync" | "async"
    url: str
    log: str
    seed: int
    concurrency: int
    agents: tuple[str, ...]
    subscriptions: tuple[str, ...]


@dataclass
class RunResult:
    """What a run produced: the history, its figures, and the violations per check."""

    history: checker.History
    figures: dict[str, Any]
    violations: dict[str, list[checker.Violation]] = field(default_factory=dict)


# -- the callers (run in their own processes) ----------------------------------------------------------


class AnswerLog:
    """One caller process's log: JSON lines, each written and flushed before the next call."""

    def __init__(self, path: str, caller: str, answered: Any) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._lock = threading.Lock()
        self._answered = answered
        self.caller = caller
        self.pid = os.getpid()

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps(
            {"event": event, "caller": self.caller, "pid": self.pid, "t": time.time(), **fields}
        )
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
        if event == "answer" and not self._answered.is_set():
            self._answered.set()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class Report:
    report_id: str
    agent: str
    snapshot: str | None
    failed_generation: int | None
    snapshot_kind: str
    kind: str


def _choose(
    rng: random.Random, spec: CallerSpec, agent: str, current: tuple[str | None, int] | None
) -> Report:
    """A report about ``agent``: ``current`` is (subscription, generation) read just before, or None
    when the choice is a stale or absent snapshot."""
    kind = rng.choice(KINDS)
    report_id = uuid.uuid4().hex
    if current is not None:
        subscription, generation = current
        exact = rng.random() < 0.5
        return Report(report_id, agent, subscription, generation if exact else None, "current", kind)
    if rng.random() < 0.25:
        return Report(report_id, agent, None, None, "none", kind)
    return Report(report_id, agent, rng.choice(spec.subscriptions), None, "other", kind)


def _answer(result: SwitchResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome.value,
        "old": result.old_subscription,
        "new": result.new_subscription,
        "generation": result.generation,
        "restart_id": result.restart_id,
        "replayed": result.replayed,
        "answer_report_id": result.report_id,
    }


def _error(error: BaseException) -> dict[str, Any]:
    return {"outcome": f"error:{type(error).__name__}", "message": str(error).splitlines()[0][:200]}


def _retriable(error: BaseException) -> bool:
    """A connection-level error (PostgreSQL restarting, a reply lost more often than the product
    retries): the caller tries the same report id again."""
    return isinstance(error, SQLAlchemyError | OSError) and not isinstance(error, SwitcherError)


def _sync_loop(sw: Switcher, spec: CallerSpec, log: AnswerLog, rng: random.Random, stop: Any) -> None:
    while not stop.is_set():
        agent = rng.choice(spec.agents)
        current = None
        if rng.random() < 0.7:
            try:
                found = sw.agent(agent)
            except SQLAlchemyError:
                stop.wait(0.05)
                continue
            current = (found.subscription, found.generation)
        report = _choose(rng, spec, agent, current)
        log.write("call", **asdict(report))
        attempts = 0
        while True:
            attempts += 1
            try:
                result = sw.handle_failure(
                    report.agent,
                    report.snapshot,
                    report.kind,
                    "429 Too Many Requests",
                    report_id=report.report_id,
                    failed_generation=report.failed_generation,
                )
            except Exception as error:
                if _retriable(error) and attempts < CALLER_RETRIES and not stop.is_set():
                    stop.wait(min(0.02 * attempts, 0.25))
                    continue
                answer = _error(error)
            else:
                answer = _answer(result)
            break
        log.write("answer", **asdict(report), attempts=attempts, **answer)


async def _async_loop(
    asw: AsyncSwitcher, spec: CallerSpec, log: AnswerLog, rng: random.Random, stop: Any
) -> None:
    while not stop.is_set():
        agent = rng.choice(spec.agents)
        current = None
        if rng.random() < 0.7:
            try:
                found = await asw.agent(agent)
            except SQLAlchemyError:
                await asyncio.sleep(0.05)
                continue
            current = (found.subscription, found.generation)
        report = _choose(rng, spec, agent, current)
        log.write("call", **asdict(report))
        attempts = 0
        while True:
            attempts += 1
            try:
                call: Awaitable[SwitchResult] = asw.handle_failure(
                    report.agent,
                    report.snapshot,
                    report.kind,
                    "429 Too Many Requests",
                    report_id=report.report_id,
                    failed_generation=report.failed_generation,
                )
                result = await call
            except Exception as error:
                if _retriable(error) and attempts < CALLER_RETRIES and not stop.is_set():
                    await asyncio.sleep(min(0.02 * attempts, 0.25))
                    continue
                answer = _error(error)
            else:
                answer = _answer(result)
            break
        log.write("answer", **asdict(report), attempts=attempts, **answer)


def caller_main(spec: CallerSpec, stop: Any, ready: Any) -> None:
    """A caller process: report until ``stop`` is set. ``ready`` is set once it has answered once."""
    log = AnswerLog(spec.log, spec.name, ready)
    log.write("start", kind=spec.kind)
    try:
        if spec.kind == "sync":
            with Switcher.from_url(spec.url, pool_size=spec.concurrency) as sw:
                threads = [
                    threading.Thread(
                        target=_sync_loop, args=(sw, spec, log, random.Random(f"{spec.seed}-{i}"), stop)
                    )
                    for i in range(spec.concurrency)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
        else:

            async def main() -> None:
                asw = AsyncSwitcher.from_url(spec.url, pool_size=spec.concurrency)
                try:
                    await asyncio.gather(
                        *(
                            _async_loop(asw, spec, log, random.Random(f"{spec.seed}-{i}"), stop)
                            for i in range(spec.concurrency)
                        )
                    )
                finally:
                    await asw.close()

            asyncio.run(main())
        log.write("stop")
    except BaseException:
        log.write("crash", traceback=traceback.format_exc())
        raise
    finally:
        log.close()


# -- the sampler (a thread of the test process, straight to the server) -------------------------------


class Sampler:
    """Reads every subscription's load and limit (``sw.subscriptions()``) again and again."""

    def __init__(self, url: str) -> None:
        self._sw = Switcher.from_url(url, pool_pre_ping=True)
        self._stop = threading.Event()
        self.samples: list[checker.Sample] = []
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                subscriptions = self._sw.subscriptions()
            except SQLAlchemyError:  # PostgreSQL restarting
                self.errors += 1
                continue
            self.samples.append(
                checker.Sample(
                    time.time(),
                    {s.name: s.assigned for s in subscriptions},
                    {s.name: s.max_agents for s in subscriptions},
                )
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._sw.close()


# -- the run -------------------------------------------------------------------------------------------


def _positions(rng: random.Random, every: int) -> Iterator[int]:
    """Call counts at which a fault happens: gaps drawn uniformly around ``every``, without end."""
    at = 0
    while True:
        at += rng.randint(max(1, every // 2), max(1, every * 3 // 2))
        yield at


def setup(url: str) -> None:
    with Switcher.from_url(url) as sw:
        for i, (name, max_agents) in enumerate(SUBSCRIPTIONS.items()):
            sw.add_subscription(
                name, credential_ref=f"env:SWITCHER_CRED_{i}", priority=i, max_agents=max_agents
            )
        for agent, subscription in AGENTS.items():
            sw.add_agent(agent, subscription=subscription, container=f"agent-{agent}")
        sw.set_cooldown_window(0)


class _Callers:
    """The caller processes, each slot replaced when its process is killed."""

    def __init__(self, plan: Plan, url: str, logs: Path, rng: random.Random) -> None:
        self.plan = plan
        self.url = url
        self.logs = logs
        self.rng = rng
        self.stop = _ctx.Event()
        self.slots: list[tuple[str, int]] = [("sync", plan.threads)] * plan.sync_callers + [
            ("async", plan.coroutines)
        ] * plan.async_callers
        self.running: dict[int, tuple[Any, Any]] = {}  # slot -> (process, ready event)
        self.incarnations: Counter[int] = Counter()
        self.started = 0
        self.exit_codes: list[tuple[str, int | None]] = []

    def start(self, slot: int) -> None:
        kind, concurrency = self.slots[slot]
        self.incarnations[slot] += 1
        name = f"{kind}{slot}-{self.incarnations[slot]}"
        spec = CallerSpec(
            name=name,
            kind=kind,
            url=self.url,
            log=str(self.logs / f"{name}.jsonl"),
            seed=self.rng.randrange(2**32),
            concurrency=concurrency,
            agents=tuple(AGENTS),
            subscriptions=tuple(SUBSCRIPTIONS),
        )
        ready = _ctx.Event()
        process = _ctx.Process(target=caller_main, args=(spec, self.stop, ready), name=name)
        process.start()
        self.running[slot] = (process, ready)
        self.started += 1

    def kill_one(self, timeout: float) -> bool:
        """SIGKILL a caller that has answered at least once (waiting boundedly for one), and replace it."""
        deadline = time.monotonic() + timeout
        while True:
            ready = [slot for slot, (_, event) in sorted(self.running.items()) if event.is_set()]
            if ready:
                break
            if time.monotonic() > deadline:
                return False
            next(iter(self.running.values()))[1].wait(0.05)
        slot = self.rng.choice(ready)
        process, _ = self.running[slot]
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
        self.exit_codes.append((process.name, process.exitcode))
        self.start(slot)
        return True

    def finish(self, timeout: float) -> list[str]:
        """Stop every caller; the names of those that had to be killed to stop."""
        self.stop.set()
        stuck = []
        deadline = time.monotonic() + timeout
        for process, _ in self.running.values():
            process.join(timeout=max(1.0, deadline - time.monotonic()))
            if process.is_alive():
                stuck.append(process.name)
                process.kill()
                process.join(timeout=30)
            self.exit_codes.append((process.name, process.exitcode))
        return stuck


class _Injector:
    """Places the kills and restarts at call counts drawn from the plan's seed, and decides when the
    run is over: enough calls (or seconds), and every kind of fault injected at least once."""

    def __init__(self, plan: Plan, rng: random.Random) -> None:
        self.plan = plan
        self._kills = _positions(random.Random(rng.random()), plan.kill_every)
        self._restarts = _positions(random.Random(rng.random()), plan.restart_every)
        self.next_kill = next(self._kills)
        self.next_restart = next(self._restarts)
        self.done: Counter[str] = Counter()
        self.timeline: list[str] = []
        self.started = time.monotonic()

    def over(self, proxy: dict[str, int]) -> bool:
        elapsed = time.monotonic() - self.started
        if elapsed > self.plan.timeout:
            raise AssertionError(f"the run did not finish within {self.plan.timeout} s: {proxy}, {self.done}")
        if self.plan.calls is not None:
            enough = proxy["calls"] >= self.plan.calls
        else:
            enough = elapsed >= (self.plan.seconds or 0.0)
        every_fault = proxy[LOSE_REPLY] and proxy[CUT_BEFORE] and self.done["kill"] and self.done["restart"]
        return bool(enough and every_fault)

    def step(self, proxy: PgProxy, callers: _Callers, pg: RestartablePostgres) -> None:
        """Inject the next fault that is due, or wait (boundedly) for more calls."""
        calls = proxy.figures()["calls"]
        if calls >= self.next_kill:
            self.next_kill = next(self._kills)
            if callers.kill_one(timeout=30):
                self._did("kill", calls)
        elif calls >= self.next_restart:
            self.next_restart = next(self._restarts)
            pg.restart()
            self._did("restart", calls)
        else:
            proxy.wait_for_calls(min(self.next_kill, self.next_restart, calls + 50), timeout=0.5)

    def _did(self, fault: str, calls: int) -> None:
        self.done[fault] += 1
        self.timeline.append(f"{fault}@{calls} calls/{time.monotonic() - self.started:.1f}s")


def run(plan: Plan, pg: RestartablePostgres, workdir: Path, say: Callable[[str], None] = print) -> RunResult:
    """Run ``plan`` against ``pg`` (a fresh server), then read and check the history."""
    url = pg.migrated_database()
    setup(url)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(plan.seed)
    injector = _Injector(plan, rng)
    faults = FaultPlan(
        lose_reply=plan.lose_reply,
        cut_before=plan.cut_before,
        seed=rng.randrange(2**32),
        force_after={LOSE_REPLY: plan.force_after, CUT_BEFORE: plan.force_after + 7},
    )
    with PgProxy(pg.url, faults) as proxy:
        sampler = Sampler(url).start()
        callers = _Callers(plan, proxy.url, logs, random.Random(rng.random()))
        try:
            for slot in range(len(callers.slots)):
                callers.start(slot)
            while not injector.over(proxy.figures()):
                injector.step(proxy, callers, pg)
        finally:
            stuck = callers.finish(timeout=60)
            sampler.stop()
        proxy_figures = proxy.figures()
    wall = time.monotonic() - injector.started
    history = read_history(url, logs, sampler.samples)
    violations = checker.check_all(history)
    figures: dict[str, Any] = {
        "wall_seconds": round(wall, 1),
        "callers_started": callers.started,
        "reports": len(history.issued),
        "answers": len(history.answers),
        "unanswered (killed in flight)": len(history.issued) - len(history.answers),
        "outcomes": dict(sorted(Counter(a.outcome for a in history.answers).items())),
        "replayed": sum(a.replayed for a in history.answers),
        "switch_calls_seen_by_proxy": proxy_figures["calls"],
        "switches": len(history.switches),
        "failures_rows": len(history.failures),
        "faults": {
            "kill": injector.done["kill"],
            LOSE_REPLY: proxy_figures[LOSE_REPLY],
            CUT_BEFORE: proxy_figures[CUT_BEFORE],
            "pg_restart": injector.done["restart"],
        },
        "lost_replies_of_errors": proxy_figures["lost_errors"],
        "samples": len(history.samples),
        "sampler_errors": sampler.errors,
        "stuck_callers": stuck,
        "crashed_callers": [n for n, code in callers.exit_codes if code not in (0, -signal.SIGKILL)],
        "timeline": injector.timeline[:12]
        + ([f"... {len(injector.timeline) - 12} more"] if len(injector.timeline) > 12 else []),
        "violations": {name: len(found) for name, found in violations.items()},
    }
    say("history figures:\n" + "\n".join(f"  {key}: {value}" for key, value in figures.items()))
    return RunResult(history, figures, violations)


def read_history(url: str, logs: Path, samples: list[checker.Sample]) -> checker.History:
    """The tables (straight from the server) and the callers' logs, as the checker takes them."""
    with Switcher.from_url(url) as sw, sw.engine.connect() as conn:
        switches = [
            checker.SwitchRow(r.id, r.agent, r.from_, r.to, r.generation, r.manual)
            for r in conn.execute(
                text(
                    "SELECT s.id, a.name AS agent, f.name AS from_, t.name AS to, s.generation, "
                    "s.kind IS NULL AS manual "
                    "FROM switcher.switches s JOIN switcher.agents a ON a.id = s.agent_id "
                    "LEFT JOIN switcher.subscriptions f ON f.id = s.from_subscription_id "
                    "JOIN switcher.subscriptions t ON t.id = s.to_subscription_id ORDER BY s.id"
                )
            )
        ]
        failures = [
            checker.FailureRow(
                r.report_id,
                r.agent,
                r.subscription,
                r.outcome,
                r.new_subscription,
                r.generation,
                r.restart_id,
            )
            for r in conn.execute(
                text(
                    "SELECT f.report_id, a.name AS agent, s.name AS subscription, f.outcome, "
                    "n.name AS new_subscription, f.generation, f.restart_id "
                    "FROM switcher.failures f JOIN switcher.agents a ON a.id = f.agent_id "
                    "JOIN switcher.subscriptions s ON s.id = f.subscription_id "
                    "LEFT JOIN switcher.subscriptions n ON n.id = f.new_subscription_id ORDER BY f.id"
                )
            )
        ]
        conn.rollback()
        agents = {a.name: (a.subscription, a.generation) for a in sw.agents()}
        subscriptions = sw.subscriptions()
    issued, answers = checker.read_logs(sorted(logs.glob("*.jsonl")))
    return checker.History(
        initial=dict(AGENTS),
        final_agents=agents,
        final_loads={s.name: s.assigned for s in subscriptions},
        limits={s.name: s.max_agents for s in subscriptions},
        switches=switches,
        failures=failures,
        issued=issued,
        answers=answers,
        samples=samples,
    )
