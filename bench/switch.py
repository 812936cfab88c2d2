"""The switch's benchmarks: each figure beside a reference measured in the same run, on the same server.

* throughput at 1 and 8 clients (switches of distinct agents per second) beside ``pgbench -b tpcb-like``;
* the database function alone, driven by ``pgbench -f`` at 8 clients, beside tpcb-like at 8 clients;
* the latency of one switch with 20,000 (and 100,000) agents registered beside 2,000;
* a herd of 200 agents onto 3 subscriptions capped at 70, from 8 processes: time until all are settled
  (asyncio backends, and beside it the same herd from synchronous callers), the median of three herds;
* a burst of 64 concurrent reports of one agent's failure beside 64 concurrent reports of 64 agents.

Client processes open (and use once) their connections before the start signal, as a running backend's
pool would have: the figures are of switches, not of connecting or of PostgreSQL planning a function's
statements in a brand-new session.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL

from bench.common import Row, fresh_database, pct, pgbench, pgbench_init, run_processes
from switcher import AsyncSwitcher, FailureKind, Outcome, Switcher
from switcher.switch import Options

RL = FailureKind.RATE_LIMIT
AGENTS_PER_CLIENT = 100


def setup(
    url: str, subscriptions: dict[str, int | None], agents: dict[str, str], cooldown: float = 0
) -> None:
    with Switcher.from_url(url) as sw:
        sw.migrate()
        sw.set_cooldown_window(cooldown)
        for name, cap in subscriptions.items():
            sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}", max_agents=cap)
        for agent, sub in agents.items():
            sw.add_agent(agent, subscription=sub, container=f"agent-{agent}")


def bulk_agents(url: str, prefix: str, count: int, subscription: str) -> None:
    """``count`` agents on ``subscription`` in one statement (the load triggers count them), then a VACUUM
    ANALYZE, as autovacuum would have done by then."""
    with Switcher.from_url(url) as sw:
        with sw.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO switcher.agents (name, subscription_id) "
                    "SELECT :prefix || g, (SELECT id FROM switcher.subscriptions WHERE name = :sub) "
                    "FROM generate_series(1, :count) g ON CONFLICT (name) DO NOTHING"
                ),
                {"prefix": prefix, "sub": subscription, "count": count},
            )
        with sw.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


# -- throughput --------------------------------------------------------------------------------------


WARM_UP = 2.0
"""Seconds every throughput run (ours and pgbench's) runs unmeasured first: the figures are of a running
system, not of one whose tables and caches are still empty."""


def throughput_worker(barrier: Any, url: str, agents: list[str], seconds: float) -> tuple[int, list[float]]:
    """Switch its own agents round-robin, ``WARM_UP`` seconds unmeasured, then ``seconds``; (switches,
    latency of every call)."""
    latencies: list[float] = []
    switches = 0
    with Switcher.from_url(url, pool_size=1) as sw:
        mine = set(agents)
        current = {a.name: a.subscription for a in sw.agents() if a.name in mine}

        def call(agent: str) -> Any:
            result = sw.handle_failure(agent, current[agent], RL, "429 Too Many Requests")
            current[agent] = result.new_subscription or current[agent]
            return result

        barrier.wait()
        i = 0
        warm = time.perf_counter() + WARM_UP
        while time.perf_counter() < warm:
            call(agents[i % len(agents)])
            i += 1
        barrier.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            agent = agents[i % len(agents)]
            i += 1
            start = time.perf_counter()
            result = call(agent)
            latencies.append(time.perf_counter() - start)
            switches += result.outcome is Outcome.SWITCHED
    return switches, latencies


LOCK_TIMEOUT = Options().lock_timeout_setting
FUNCTION_SCRIPT = """\\set aid random(1, {agents})
SELECT wake::int AS wake, restart_id FROM switcher.handle_failure_v2(gen_random_uuid()::text, 'p' || :aid, NULL, NULL,
    'rate_limit', '429 Too Many Requests', '{lock_timeout}', false, NULL, NULL, 'restart_agent', 'notify_switch') \\gset
\\if :wake
SELECT pg_notify('switcher_outbox', :restart_id::text);
\\endif
"""
"""What ``Switcher.handle_failure`` sends, without Python: the function, then the wake-up after commit. It
runs in sessions that start with ``FUNCTION_SESSION``, as ``Switcher.from_url``'s do."""
FUNCTION_SESSION = f"-c lock_timeout={LOCK_TIMEOUT}"


HERD_ROUNDS = 3
"""Herds per figure, asyncio and synchronous taking turns: one herd lasts a third of a second, and its
settle time swings by a quarter from one run to the next (0.31-0.44 s within one session)."""

ROUNDS = 3
"""Throughput samples per figure. The figures take turns, round by round, and each is the median of its
samples: a machine that speeds up or slows down during the run does so for the reference as well."""


@dataclass
class Throughput:
    """Per second, one sample per round: pgbench tpcb-like and the Python switch by clients, and the
    function driven by pgbench at 8 clients; every call's latency of the Python switch by clients."""

    tpcb: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    switches: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    function: list[float] = field(default_factory=list)
    latencies: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))


def throughput(server: URL, seconds: float, rounds: int = ROUNDS) -> Throughput:
    """Each figure ``seconds`` per round, in a database of its own; the Python clients warm up before each
    sample (their processes are new), the others once."""
    out = Throughput()
    with contextlib.ExitStack() as stack:
        reference, ours, function = (
            stack.enter_context(fresh_database(server, f"switcher_bench_{name}"))
            for name in ("tpcb", "switch", "function")
        )
        pgbench_init(reference, 8)
        pgbench(reference, 8, WARM_UP)
        url = ours.render_as_string(hide_password=False)
        agents = [f"t{c}-{i}" for c in range(8) for i in range(AGENTS_PER_CLIENT)]
        setup(url, dict.fromkeys("ABCD"), dict.fromkeys(agents, "A"))
        size = 8 * AGENTS_PER_CLIENT
        setup(function.render_as_string(hide_password=False), dict.fromkeys("ABCD"), {})
        bulk_agents(function.render_as_string(hide_password=False), "p", size, "A")
        script = FUNCTION_SCRIPT.format(agents=size, lock_timeout=LOCK_TIMEOUT)
        pgbench(function, 8, WARM_UP, script=script, session=FUNCTION_SESSION)
        for _ in range(rounds):
            for clients in (1, 8):
                out.tpcb[clients].append(pgbench(reference, clients, seconds))
                mine = agents[: clients * AGENTS_PER_CLIENT]  # as many agents per client at 1 and at 8
                results = run_processes(
                    throughput_worker, [(url, mine[c::clients], seconds) for c in range(clients)]
                )
                out.switches[clients].append(sum(count for count, _ in results) / seconds)
                out.latencies[clients].extend(x for _, lat in results for x in lat)
            out.function.append(pgbench(function, 8, seconds, script=script, session=FUNCTION_SESSION))
    return out


# -- latency against the size of the fleet -----------------------------------------------------------


def fleet_latency(server: URL, sizes: list[int], samples: int) -> dict[int, float]:
    """p50 of one switch (one client, distinct agents) with ``size`` agents registered, all on the failing
    subscription, 16 alternatives; a database of its own for each size. The sizes take turns, sample by
    sample, so that a machine that speeds up or slows down during the run does so for all of them."""
    with contextlib.ExitStack() as stack:
        doors = {}
        for size in sizes:
            db = stack.enter_context(fresh_database(server, f"switcher_bench_fleet_{size}"))
            url = db.render_as_string(hide_password=False)
            setup(url, {f"S{i}": None for i in range(17)}, {}, cooldown=7200)
            bulk_agents(url, "f", size, "S0")
            doors[size] = stack.enter_context(Switcher.from_url(url, pool_size=1))
        for size, sw in doors.items():
            for i in range(1, 21):  # warm the session
                sw.handle_failure(f"f{size - i}", "S0", RL)
        timings: dict[int, list[float]] = {size: [] for size in sizes}
        for i in range(samples):
            for size, sw in doors.items():
                start = time.perf_counter()
                sw.handle_failure(f"f{size - 100 - i}", "S0", RL)
                timings[size].append(time.perf_counter() - start)
    return {size: statistics.median(t) for size, t in timings.items()}


# -- many reports at once ----------------------------------------------------------------------------

Round = tuple[float, float, list[tuple[str, float]]]  # wall start, wall end, (outcome, latency) per call


def go_live(sw: Switcher, real: str) -> None:
    """Once every process is warm: the warm-up subscriptions out, the ``real`` alternatives in."""
    for name in ("W1", "W2"):
        sw.disable_subscription(name)
    for name in real:
        sw.enable_subscription(name)


def concurrent_worker(
    barrier: Any, url: str, rounds: list[list[tuple[str, str]]], pool_size: int, warm: list[str], real: str
) -> list[Round]:
    """Warm each pooled connection with one real switch (W1 -> W2), then, once every process is warm,
    swap the warm-up subscriptions for the ``real`` alternatives; per round: wait on the barrier, then
    report all of the round's failures concurrently."""

    async def main() -> list[Round]:
        asw = AsyncSwitcher.from_url(
            url, pool_size=pool_size, max_overflow=0, lock_timeout=timedelta(seconds=30)
        )
        try:
            await asyncio.gather(*(asw.handle_failure(agent, "W1", RL) for agent in warm))
            if await asyncio.to_thread(barrier.wait) == 0:
                with Switcher.from_url(url) as sw:
                    go_live(sw, real)
            out = []
            for reports in rounds:
                await asyncio.to_thread(barrier.wait)
                start = time.time()
                calls = await asyncio.gather(*(timed(asw, a, s) for a, s in reports))
                out.append((start, time.time(), list(calls)))
            return out
        finally:
            await asw.close()

    async def timed(asw: AsyncSwitcher, agent: str, snapshot: str) -> tuple[str, float]:
        start = time.perf_counter()
        result = await asw.handle_failure(agent, snapshot, RL, "429 Too Many Requests")
        return result.outcome.value, time.perf_counter() - start

    return asyncio.run(main())


def sync_worker(
    barrier: Any, url: str, rounds: list[list[tuple[str, str]]], pool_size: int, warm: list[str], real: str
) -> list[Round]:
    """``concurrent_worker`` for a synchronous caller: each round's reports one after another."""
    with Switcher.from_url(url, pool_size=pool_size, lock_timeout=timedelta(seconds=30)) as sw:
        for agent in warm:
            sw.handle_failure(agent, "W1", RL)
        if barrier.wait() == 0:
            go_live(sw, real)
        out = []
        for reports in rounds:
            barrier.wait()
            start, calls = time.time(), []
            for agent, snapshot in reports:
                began = time.perf_counter()
                result = sw.handle_failure(agent, snapshot, RL, "429 Too Many Requests")
                calls.append((result.outcome.value, time.perf_counter() - began))
            out.append((start, time.time(), calls))
        return out


def setup_concurrent(
    url: str,
    home: str,
    alternatives: dict[str, int | None],
    agents: list[str],
    processes: int,
    pool_size: int,
) -> list[list[str]]:
    """``agents`` on ``home``; the ``alternatives`` registered disabled, and warm-up subscriptions W1, W2
    with one warm-up agent per pooled connection; the warm-up agents' names, per process."""
    setup(url, {home: None}, dict.fromkeys(agents, home))
    names = [[f"warm{p}-{i}" for i in range(pool_size)] for p in range(processes)]
    with Switcher.from_url(url) as sw:
        for name, cap in alternatives.items():
            sw.add_subscription(
                name, credential_ref=f"env:SWITCHER_CRED_{name}", max_agents=cap, enabled=False
            )
        for name in ("W1", "W2"):
            sw.add_subscription(name, credential_ref="env:SWITCHER_CRED_W")
        for group in names:
            for agent in group:
                sw.add_agent(agent, subscription="W1")
    return names


@dataclass(frozen=True, order=True)
class Herd:
    settle: float
    """Seconds from the start signal until every agent is settled."""
    detail: str
    sound: bool
    """Every agent switched, and no subscription went over its cap."""


def herd(
    server: URL, agents: int = 200, cap: int | None = 70, processes: int = 8, *, sync: bool = False
) -> Herd:
    """One herd: how long until all ``agents`` are settled, and whether it was sound. Each process is an
    asyncio backend with a pool of 4 reporting its share of the herd at once or, ``sync``, a scheduler
    reporting its share one after another on one connection."""
    with fresh_database(server, "switcher_bench") as db:
        url = db.render_as_string(hide_password=False)
        names = [f"h{i:03d}" for i in range(agents)]
        pool_size = 1 if sync else 4
        warm = setup_concurrent(url, "H", dict.fromkeys("XYZ", cap), names, processes, pool_size)
        args = [
            (url, [[(a, "H") for a in names[p::processes]]], pool_size, warm[p], "XYZ")
            for p in range(processes)
        ]
        results = run_processes(sync_worker if sync else concurrent_worker, args)
        settle = max(p[0][1] for p in results) - min(p[0][0] for p in results)
        with Switcher.from_url(url) as sw:
            loads = {s.name: s.assigned for s in sw.subscriptions() if s.name in "XYZ"}
    outcomes = [o for p in results for o, _ in p[0][2]]
    latencies = [t for p in results for _, t in p[0][2]]
    respected = all(cap is None or v <= cap for v in loads.values())
    detail = (
        f"switched {outcomes.count('switched')}/{agents}; loads {loads}; caps respected: {respected}; "
        f"call p50 {pct(latencies, 50) * 1e3:.1f} ms, p99 {pct(latencies, 99) * 1e3:.1f} ms"
    )
    return Herd(settle, detail, respected and outcomes.count("switched") == agents)


def burst(server: URL, rounds: int, processes: int = 8, per_process: int = 8) -> tuple[float, float, str]:
    """p99 of 64 concurrent reports of one agent's failure, and p99 of 64 concurrent reports of 64
    agents' failures, alternating rounds from the same processes; a detail line."""
    with fresh_database(server, "switcher_bench") as db:
        url = db.render_as_string(hide_password=False)
        total = processes * per_process
        agents = [f"burst{r}" for r in range(rounds)] + [
            f"solo{r}-{i}" for r in range(rounds) for i in range(total)
        ]
        warm = setup_concurrent(url, "A", {"B": None, "C": None}, agents, processes, per_process)
        plan: list[list[list[tuple[str, str]]]] = [[] for _ in range(processes)]
        for r in range(rounds):
            for p in range(processes):
                plan[p].append([(f"burst{r}", "A")] * per_process)
                plan[p].append([(f"solo{r}-{p * per_process + i}", "A") for i in range(per_process)])
        args = [(url, plan[p], per_process, warm[p], "BC") for p in range(processes)]
        results = run_processes(concurrent_worker, args)
    one_agent = [t for p in results for rnd in p[0::2] for _, t in rnd[2]]
    many_agents = [t for p in results for rnd in p[1::2] for _, t in rnd[2]]
    switched = sorted({sum(o == "switched" for p in results for o, _ in p[2 * r][2]) for r in range(rounds)})
    detail = (
        f"switches per burst of one agent {switched} (must be [1]); one agent p50 "
        f"{pct(one_agent, 50) * 1e3:.1f} ms p99 {pct(one_agent, 99) * 1e3:.1f} ms; 64 agents p50 "
        f"{pct(many_agents, 50) * 1e3:.1f} ms p99 {pct(many_agents, 99) * 1e3:.1f} ms"
    )
    return pct(one_agent, 99), pct(many_agents, 99), detail


# -- all of it ---------------------------------------------------------------------------------------


def run(server: URL, seconds: float = 3.0, quick: bool = False) -> list[Row]:
    rows = []
    measured = throughput(server, seconds / 2 if quick else seconds)
    median, rounds = statistics.median, len(measured.function)
    for clients in (1, 8):
        target = ">= 1.0" if clients == 1 else ">= 0.8"
        rows.append(
            Row(
                f"switches/s, distinct agents, {clients} client(s) / pgbench tpcb-like",
                median(measured.switches[clients]),
                median(measured.tpcb[clients]),
                "per s",
                target,
                f"p50 {median(measured.latencies[clients]) * 1e3:.2f} ms; medians of {rounds} rounds taken "
                f"in turns with the reference ({_samples(measured.switches[clients])} / "
                f"{_samples(measured.tpcb[clients])})",
            )
        )
    rows.append(
        Row(
            "pgbench -f handle_failure_v2, 8 clients / tpcb-like 8 clients",
            median(measured.function),
            median(measured.tpcb[8]),
            "per s",
            ">= 0.8",
            f"medians of {rounds} rounds ({_samples(measured.function)} / {_samples(measured.tpcb[8])})",
        )
    )
    sizes = [2_000, 20_000] if quick else [2_000, 20_000, 100_000]
    p50 = fleet_latency(server, sizes, samples=200)
    at_100k = f"; at 100,000 agents p50 {p50[100_000] * 1e3:.2f} ms" if 100_000 in p50 else ""
    rows.append(
        Row(
            "p50 of one switch, 20,000 agents / 2,000 agents",
            p50[20_000] * 1e3,
            p50[2_000] * 1e3,
            "ms",
            "<= 1.2",
            f"2,000: {p50[2_000] * 1e3:.2f} ms; 20,000: {p50[20_000] * 1e3:.2f} ms{at_100k}",
        )
    )
    herds: dict[bool, list[Herd]] = {False: [], True: []}
    for _ in range(1 if quick else HERD_ROUNDS):
        for sync in (False, True):
            herds[sync].append(herd(server, sync=sync))
    median, sync_median = (sorted(herds[sync])[len(herds[sync]) // 2] for sync in (False, True))
    unsound = sum(not h.sound for runs in herds.values() for h in runs)
    rows.append(
        Row(
            "herd of 200 onto 3 x 70 capped, 8 processes: seconds to settle / 0.25 s",
            median.settle,
            0.25,
            "s",
            "<= 1.0",
            f"median of {len(herds[False])} herds ({_settles(herds[False])} s): {median.detail}. The same "
            f"herd from 8 synchronous callers: {sync_median.settle:.3f} s ({_settles(herds[True])} s); "
            f"{sync_median.detail}. "
            + (
                f"{unsound} HERD(S) LEFT AGENTS UNSWITCHED OR WENT OVER A CAP"
                if unsound
                else "All herds sound."
            ),
        )
    )
    one, many, detail = burst(server, rounds=3 if quick else 5)
    rows.append(
        Row(
            "burst p99: 64 reports of one agent / 64 reports of 64 agents",
            one * 1e3,
            many * 1e3,
            "ms",
            "<= 3.0",
            detail,
        )
    )
    return rows


def _samples(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def _settles(runs: list[Herd]) -> str:
    return ", ".join(f"{h.settle:.3f}" for h in runs)
