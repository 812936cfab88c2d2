"""The drainer's benchmarks: no-op throughput beside PgQueuer (same server, same run), and the latency
from a switch's commit to its handler, with LISTEN/NOTIFY and with polling only.

PgQueuer (``pip install -e .[bench]``) drains the same number of no-op jobs with as many worker processes,
using asyncpg, its fastest driver, in drain mode.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import URL

from bench.common import CTX, Row, fresh_database, pct
from switcher import FailureKind, Switcher, database_url
from switcher.drainer import Claim, Drainer, DrainerConfig
from switcher.outbox import RESTART_AGENT

CONCURRENCY = 16
PREFETCH = 48
"""Claimed ahead of free handler threads, as PgQueuer's batches claim ahead of its workers."""


def drainer_process(
    url: str, ready: Any, go: Any, *, starts: Any = None, listen: bool = True, poll: float = 0.05
) -> None:
    """A drainer with a no-op handler; reports each handler start (id, CLOCK_MONOTONIC) if asked."""

    def noop(claim: Claim) -> str:
        if starts is not None:
            starts.put((claim.message.id, time.monotonic()))
        return "noop"

    config = DrainerConfig(
        concurrency=CONCURRENCY,
        prefetch=PREFETCH,
        poll_interval=timedelta(seconds=poll),
        listen=listen,
        lease=timedelta(minutes=5),
    )
    drainer = Drainer.from_url(url, config=config, handlers={RESTART_AGENT: noop, "notify_switch": noop})
    drainer.install_signal_handlers()
    with drainer.engine.connect():
        pass  # connected before the start signal
    ready.set()
    go.wait()
    drainer.run()
    drainer.close()


def fill_backlog(url: str, n: int) -> None:
    with Switcher.from_url(url) as sw:
        sw.migrate()
        sw.add_subscription("A", credential_ref="env:SWITCHER_CRED_A")
        with sw.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO switcher.agents (name, subscription_id) "
                    "SELECT 'a' || i, (SELECT id FROM switcher.subscriptions) FROM generate_series(1, :n) i"
                ),
                {"n": n},
            )
            conn.execute(
                text(
                    "SELECT switcher.enqueue_v2('restart_agent', id, 1, '{}'::jsonb, 'switcher_outbox') "
                    "FROM switcher.agents"
                )
            )


def done_count(url: str) -> int:
    engine = create_engine(database_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(text("SELECT count(*) FROM switcher.outbox WHERE status = 'done'")).scalar_one()
            )
    finally:
        engine.dispose()


def wait_until_drained(url: str) -> None:
    """Poll (one connection, 10 ms apart) until no message is pending or running."""
    engine = create_engine(database_url(url), poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    query = text("SELECT EXISTS (SELECT FROM switcher.outbox WHERE status IN ('pending', 'running'))")
    try:
        with engine.connect() as conn:
            while conn.execute(query).scalar_one():
                time.sleep(0.01)
    finally:
        engine.dispose()


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
        wait_until_drained(url)
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
    """Seconds from a switch's commit to its handler's start, one idle drainer."""
    with fresh_database(server, "switcher_bench") as db:
        url = db.render_as_string(hide_password=False)
        with Switcher.from_url(url) as sw:
            sw.migrate()
            sw.set_cooldown_window(0)
            for name in "AB":
                sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
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
                while done_count(url) < len(out):  # the next switch gets a fresh message
                    time.sleep(0.001)
            proc.terminate()
            proc.join(60)
    return out


def run(server: URL, quick: bool = False) -> list[Row]:
    messages = 2_000 if quick else 5_000
    rows = []
    for processes in (1, 4):
        ours = switcher_throughput(server, processes, messages)
        theirs = pgqueuer_throughput(server, processes, messages)
        rows.append(
            Row(
                f"drainer no-op msg/s, {processes} process(es) / PgQueuer",
                ours,
                theirs,
                "per s",
                ">= 1.5",
                f"{messages} messages, {CONCURRENCY} handler threads and {PREFETCH} prefetched per drainer; "
                "PgQueuer batch 10, asyncpg",
            )
        )
    notify = latency(server, True, 20 if quick else 100)
    polled = latency(server, False, 10 if quick else 30)
    rows.append(
        Row(
            "commit -> handler start, LISTEN/NOTIFY p50 / poll-only (0.5 s) p50",
            pct(notify, 50) * 1e3,
            pct(polled, 50) * 1e3,
            "ms",
            "<= 0.1",
            f"NOTIFY p99 {pct(notify, 99) * 1e3:.2f} ms",
        )
    )
    return rows
