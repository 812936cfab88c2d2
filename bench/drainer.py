"""Benchmark the outbox drainer against real PostgreSQL. Prints figures; asserts nothing about speed.

    python -m bench.drainer                     # throwaway embedded PostgreSQL
    python -m bench.drainer --database-url URL  # an existing server (creates and drops its own databases)

Measures, with drainers in separate OS processes:
  * throughput: a backlog of no-op messages (distinct agents) drained by 1 and by 4 drainer processes,
    beside PgQueuer draining the same number of no-op jobs with as many worker processes, on the same
    server in the same run (when ``pgqueuer`` is installed: ``pip install -e .[bench]``);
  * latency from a switch's commit to its handler starting, with LISTEN/NOTIFY and poll-only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import URL

from bench.common import CTX, fresh_database, pct
from switcher import FailureKind, Switcher, database_url
from switcher.drainer import Drainer, DrainerConfig
from switcher.outbox import RESTART_AGENT, Message
from switcher.testing import embedded_server

CONCURRENCY = 16


def drainer_process(
    url: str, ready: Any, go: Any, *, starts: Any = None, listen: bool = True, poll: float = 0.05
) -> None:
    """A drainer with a no-op handler; reports each handler start (id, CLOCK_MONOTONIC) if asked."""
    engine = create_engine(database_url(url), pool_size=CONCURRENCY + 2)

    def noop(message: Message) -> str:
        if starts is not None:
            starts.put((message.id, time.monotonic()))
        return "noop"

    config = DrainerConfig(
        concurrency=CONCURRENCY,
        poll_interval=timedelta(seconds=poll),
        listen=listen,
        lease=timedelta(minutes=5),
    )
    drainer = Drainer(engine, {RESTART_AGENT: noop}, config)
    drainer.install_signal_handlers()
    with engine.connect():
        pass  # connected before the start signal
    ready.set()
    go.wait()
    drainer.run()
    engine.dispose()


def fill_backlog(url: str, n: int) -> None:
    with Switcher.from_url(url) as sw:
        sw.migrate()
        sw.add_subscription("A", credential_ref="env:A")
        with sw.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO switcher.agents (name, subscription_id) "
                    "SELECT 'a' || i, 1 FROM generate_series(1, :n) i"
                ),
                {"n": n},
            )
            conn.execute(
                text("SELECT switcher.enqueue('restart_agent', id, 1, '{}'::jsonb) FROM switcher.agents")
            )


def done_count(url: str) -> int:
    engine = create_engine(database_url(url), poolclass=pool.NullPool)
    with engine.connect() as conn:
        return int(
            conn.execute(text("SELECT count(*) FROM switcher.outbox WHERE status = 'done'")).scalar_one()
        )


def start_ready(target: Any, url: str, processes: int) -> tuple[list[Any], Any]:
    """Start ``target(url, ready, go)`` in each process; return once all are ready, with the go event."""
    go = CTX.Event()
    readies = [CTX.Event() for _ in range(processes)]
    procs = [CTX.Process(target=target, args=(url, ready, go)) for ready in readies]
    for p in procs:
        p.start()
    for ready in readies:
        ready.wait(60)
    return procs, go


def switcher_throughput(server: URL, processes: int, n: int) -> float:
    with fresh_database(server, "switcher_bench") as db:
        url = db.render_as_string(hide_password=False)
        fill_backlog(url, n)
        procs, go = start_ready(drainer_process, url, processes)
        start = time.perf_counter()
        go.set()
        while done_count(url) < n:
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        for p in procs:
            p.terminate()
            p.join(60)
    return n / elapsed


async def pgqueuer_driver(url: str) -> Any:
    """PgQueuer's fastest driver available: asyncpg (its primary one), else psycopg."""
    try:
        import asyncpg
        from pgqueuer import AsyncpgDriver

        return AsyncpgDriver(await asyncpg.connect(url))
    except ImportError:
        import psycopg
        from pgqueuer import PsycopgDriver

        return PsycopgDriver(await psycopg.AsyncConnection.connect(url, autocommit=True))


def pgqueuer_worker(url: str, ready: Any, go: Any) -> None:
    from pgqueuer import Job, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    async def main() -> None:
        qm = QueueManager(Queries(await pgqueuer_driver(url)))

        @qm.entrypoint(RESTART_AGENT)
        async def noop(job: Job) -> None:
            return None

        ready.set()
        await asyncio.to_thread(go.wait)
        await qm.run(batch_size=10, mode=QueueExecutionMode.drain, dequeue_timeout=timedelta(seconds=1))

    asyncio.run(main())


def pgqueuer_throughput(server: URL, processes: int, n: int) -> float | None:
    try:
        from pgqueuer import Queries
    except ImportError:
        return None
    with fresh_database(server, "pgqueuer_bench") as db:
        url = db.set(drivername="postgresql").render_as_string(hide_password=False)

        async def setup() -> None:
            queries = Queries(await pgqueuer_driver(url))
            await queries.install()
            await queries.enqueue([RESTART_AGENT] * n, [None] * n, [0] * n)

        asyncio.run(setup())
        procs, go = start_ready(pgqueuer_worker, url, processes)
        start = time.perf_counter()
        go.set()
        for p in procs:
            p.join(600)  # drain mode: each worker exits once the queue is empty
        elapsed = time.perf_counter() - start
    return n / elapsed


def latency(server: URL, listen: bool, samples: int) -> list[float]:
    with fresh_database(server, "switcher_bench") as db:
        url = db.render_as_string(hide_password=False)
        with Switcher.from_url(url) as sw:
            sw.migrate()
            sw.set_cooldown_window(0)
            for name in "AB":
                sw.add_subscription(name, credential_ref=f"env:{name}")
            sw.add_agent("alice", subscription="A")
            ready, go, starts = CTX.Event(), CTX.Event(), CTX.Queue()
            proc = CTX.Process(
                target=drainer_process,
                args=(url, ready, go),
                kwargs={"starts": starts, "listen": listen, "poll": 0.5},
            )
            proc.start()
            ready.wait(60)
            go.set()
            time.sleep(1)  # let it connect and LISTEN; not a measurement
            current, out = "A", []
            for _ in range(samples):
                result = sw.handle_failure("alice", current, FailureKind.RATE_LIMIT)
                committed = time.monotonic()
                current = result.new_subscription or current
                message_id, started = starts.get(timeout=60)
                assert message_id == result.restart_id
                out.append(started - committed)
                # wait until it is done, so the next switch gets a fresh message
                while done_count(url) < len(out):
                    time.sleep(0.001)
            proc.terminate()
            proc.join(60)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=os.environ.get("SWITCHER_BENCH_DATABASE_URL"))
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        server = (
            database_url(args.database_url)
            if args.database_url
            else stack.enter_context(embedded_server()).url
        )
        print(
            f"{os.cpu_count()} CPUs; {args.messages} no-op messages; {CONCURRENCY} handler threads per drainer\n"
        )
        print("throughput (messages/s)")
        print(f"  {'processes':>9}  {'switcher':>9}  {'PgQueuer':>9}  {'ratio':>5}")
        for processes in (1, 4):
            ours = switcher_throughput(server, processes, args.messages)
            theirs = pgqueuer_throughput(server, processes, args.messages)
            ratio = f"{ours / theirs:5.2f}" if theirs else "  n/a"
            theirs_s = f"{theirs:9.0f}" if theirs else "  (none)"
            print(f"  {processes:>9}  {ours:>9.0f}  {theirs_s}  {ratio}")
        print("\ncommit -> handler start latency, one idle drainer")
        for listen, label in ((True, "LISTEN/NOTIFY"), (False, "poll-only (0.5 s)")):
            lat = latency(server, listen, args.samples)
            print(f"  {label:<18} p50 {pct(lat, 50) * 1e3:7.2f} ms   p99 {pct(lat, 99) * 1e3:7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
