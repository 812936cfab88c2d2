"""Helpers shared by the benchmarks: worker processes on a barrier, throwaway databases, percentiles."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Iterator
from typing import Any

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import URL

CTX = mp.get_context("spawn")


def run_processes(target: Any, args: list[tuple[Any, ...]]) -> list[Any]:
    barrier = CTX.Barrier(len(args))
    queue = CTX.Queue()
    procs = [CTX.Process(target=_call, args=(queue, i, target, barrier, *a)) for i, a in enumerate(args)]
    for p in procs:
        p.start()
    results: list[Any] = [None] * len(args)
    for _ in procs:
        i, ok, value = queue.get(timeout=600)
        if not ok:
            raise RuntimeError(value)
        results[i] = value
    for p in procs:
        p.join()
    return results


def _call(queue: Any, index: int, target: Any, barrier: Any, *args: Any) -> None:
    import traceback

    try:
        queue.put((index, True, target(barrier, *args)))
    except BaseException:
        queue.put((index, False, traceback.format_exc()))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@contextlib.contextmanager
def fresh_database(server_url: URL, name: str) -> Iterator[URL]:
    admin = create_engine(server_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
