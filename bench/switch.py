"""Benchmark the switch against real PostgreSQL. Prints figures; asserts nothing about speed.

    python -m bench.switch                      # throwaway embedded PostgreSQL
    python -m bench.switch --database-url URL   # an existing server (creates and drops its own databases)

Measures, in separate OS processes started together on a barrier:
  * throughput: switches per second on distinct agents at 1 and 8 clients, beside
    ``pgbench -b tpcb-like`` at the same client counts on the same server (when pgbench is installed);
  * burst: 64 concurrent reports of one failure of one agent from 8 processes -> switches (must be 1)
    and call latency p50/p99, against the single-switch latency;
  * herd: 200 agents on one subscription failing at once from 8 processes, onto capacity-limited
    alternatives -> all switched, capacity respected, latency p50/p99 and time to settle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import URL

from bench.common import fresh_database, pct, run_processes
from switcher import AsyncSwitcher, FailureKind, Outcome, Switcher, database_url
from switcher.testing import embedded_server

RL = FailureKind.RATE_LIMIT


# --- workers (run in child processes) -------------------------------------------------------------


def throughput_worker(barrier: Any, url: str, agents: list[str], seconds: float) -> tuple[int, list[float]]:
    """Switch its own agents round-robin for ``seconds``; return (switches, latency of every call)."""
    current = dict.fromkeys(agents, "A")
    latencies: list[float] = []
    switches = 0
    with Switcher.from_url(url, pool_size=1) as sw:
        sw.settings()
        barrier.wait()
        deadline = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < deadline:
            agent = agents[i % len(agents)]
            i += 1
            start = time.perf_counter()
            result = sw.handle_failure(agent, current[agent], RL, "429 Too Many Requests")
            latencies.append(time.perf_counter() - start)
            # With a zero cooldown window a concurrent failure can still make every alternative "cooling"
            # for an instant (NO_ALTERNATIVE); only real switches are counted.
            switches += result.outcome is Outcome.SWITCHED
            current[agent] = result.new_subscription or current[agent]
    return switches, latencies


Round = tuple[float, float, list[tuple[str, float]]]  # wall start, wall end, (outcome, latency) per call


def concurrent_worker(
    barrier: Any, url: str, rounds: list[list[tuple[str, str]]], pool_size: int
) -> list[Round]:
    """For each round: wait on the barrier, then report all of the round's failures concurrently."""

    async def main() -> list[Round]:
        asw = AsyncSwitcher.from_url(
            url, pool_size=pool_size, max_overflow=0, lock_timeout=timedelta(seconds=30)
        )
        try:
            await asyncio.gather(*(asw.settings() for _ in range(pool_size)))
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


# --- driver -----------------------------------------------------------------------------------------


def libpq_env(url: URL) -> dict[str, str]:
    env = dict(os.environ)
    host = url.query.get("host") or url.host
    for key, value in (
        ("PGHOST", host),
        ("PGPORT", url.port),
        ("PGUSER", url.username),
        ("PGPASSWORD", url.password),
        ("PGDATABASE", url.database),
    ):
        if value:
            env[key] = str(value)
    return env


def pgbench_tps(url: URL, clients: list[int], seconds: float) -> dict[int, float] | None:
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        return None
    env = libpq_env(url)
    subprocess.run([pgbench, "-i", "-q", "-s", str(max(clients))], env=env, check=True, capture_output=True)
    out: dict[int, float] = {}
    for n in clients:
        run = subprocess.run(
            [pgbench, "-b", "tpcb-like", "-n", "-c", str(n), "-j", str(n), "-T", str(int(seconds))],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        match = re.search(r"tps = ([\d.]+)", run.stdout)
        out[n] = float(match.group(1)) if match else float("nan")
    return out


def setup(url: str, subscriptions: dict[str, int | None], agents: dict[str, str]) -> None:
    with Switcher.from_url(url) as sw:
        sw.migrate()
        sw.set_cooldown_window(0)  # the throughput loop moves agents back and forth on purpose
        for name, cap in subscriptions.items():
            sw.add_subscription(name, credential_ref=f"env:TOKEN_{name}", max_agents=cap)
        for agent, sub in agents.items():
            sw.add_agent(agent, subscription=sub, container=f"agent-{agent}")


AGENTS_PER_CLIENT = 100


def bench_throughput(server: URL, clients: list[int], seconds: float) -> float:
    """Print the throughput table; return the single-client median latency."""
    rows = []
    for n in clients:
        with fresh_database(server, "switcher_bench") as db:
            url = db.render_as_string(hide_password=False)
            agents = {f"t{c}-{i}": "A" for c in range(n) for i in range(AGENTS_PER_CLIENT)}
            setup(url, dict.fromkeys("ABCD"), agents)
            names = list(agents)
            per_client = [names[c::n] for c in range(n)]
            results = run_processes(throughput_worker, [(url, own, seconds) for own in per_client])
        latencies = [x for _, lat in results for x in lat]
        rows.append((n, sum(count for count, _ in results) / seconds, latencies))
    with fresh_database(server, "switcher_pgbench") as db:
        pgb = pgbench_tps(db, clients, seconds)

    print(
        f"throughput: distinct agents ({AGENTS_PER_CLIENT} per client), each call a switch among 4 subscriptions"
    )
    print(
        f"  {'clients':>7}  {'switches/s':>10}  {'p50 ms':>7}  {'p99 ms':>7}  {'pgbench tps':>11}  {'ratio':>5}"
    )
    for n, rate, latencies in rows:
        ref = pgb.get(n) if pgb else None
        ratio = f"{rate / ref:5.2f}" if ref else "  n/a"
        ref_s = f"{ref:11.0f}" if ref else "     (none)"
        p50, p99 = pct(latencies, 50) * 1e3, pct(latencies, 99) * 1e3
        print(f"  {n:>7}  {rate:>10.0f}  {p50:>7.2f}  {p99:>7.2f}  {ref_s}  {ratio}")
    return statistics.median(rows[0][2])


def bench_burst(server: URL, rounds: int, single_latency: float) -> None:
    """Concurrent reports of one failure of one agent from 8 processes, per round: the required 64
    (8 coroutines each), and 8 (one each) to show how much of the latency is client-side queueing.
    A first, unmeasured round warms the connections (PL/pgSQL compiles a function once per session)."""
    print(
        f"\nburst: concurrent reports of one failure of one agent from 8 processes, {rounds} rounds + warm-up"
    )
    print(f"  single-switch latency {single_latency * 1e3:.2f} ms (p50, 1 client)")
    for per_process in (8, 1):
        with fresh_database(server, "switcher_bench") as db:
            url = db.render_as_string(hide_password=False)
            setup(url, {"A": None, "B": None}, {f"burst{r}": "A" for r in range(rounds + 1)})
            reports = [[(f"burst{r}", "A")] * per_process for r in range(rounds + 1)]
            results = run_processes(concurrent_worker, [(url, reports, per_process)] * 8)
        switched = {sum(o == "switched" for p in results for o, _ in p[r][2]) for r in range(rounds + 1)}
        latencies = [t for p in results for rnd in p[1:] for _, t in rnd[2]]
        p50, p99 = pct(latencies, 50), pct(latencies, 99)
        print(
            f"  {8 * per_process:>3} reports (8 x {per_process}): switches per burst {sorted(switched)} (must be [1]); "
            f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms = {p99 / single_latency:.1f}x single"
        )


def bench_herd(server: URL, agents: int = 200, cap: int = 70) -> None:
    """A subscription hits its limit: all its agents fail at once, onto capacity-limited alternatives."""
    with fresh_database(server, "switcher_bench") as db:
        url = db.render_as_string(hide_password=False)
        herd = [f"h{i:03d}" for i in range(agents)]
        setup(url, {"H": None, "X": cap, "Y": cap, "Z": cap}, dict.fromkeys(herd, "H"))
        results = run_processes(
            concurrent_worker, [(url, [[(a, "H") for a in herd[p::8]]], 10) for p in range(8)]
        )
        settle = max(p[0][1] for p in results) - min(p[0][0] for p in results)
        with Switcher.from_url(url) as sw:
            loads = {s.name: s.assigned for s in sw.subscriptions()}
    outcomes = [o for p in results for o, _ in p[0][2]]
    latencies = [t for p in results for _, t in p[0][2]]
    respected = all(v <= cap for k, v in loads.items() if k != "H")
    print(
        f"\nherd: {agents} agents on one subscription fail at once from 8 processes; alternatives capped at {cap}"
    )
    print(f"  switched {outcomes.count('switched')}/{agents}; loads {loads}; caps respected: {respected}")
    p50, p99 = pct(latencies, 50) * 1e3, pct(latencies, 99) * 1e3
    print(
        f"  call latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; all settled {settle:.2f} s after the start signal"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=os.environ.get("SWITCHER_BENCH_DATABASE_URL"))
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    parser.add_argument("--burst-rounds", type=int, default=5)
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.database_url:
            server = database_url(args.database_url)
        else:
            server = stack.enter_context(embedded_server()).url
        with create_engine(server, poolclass=pool.NullPool).connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar()
        print(f"PostgreSQL {version}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}\n")
        single = bench_throughput(server, [1, 8], args.seconds)
        bench_burst(server, args.burst_rounds, single)
        bench_herd(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
