"""Run functions in separate OS processes that start their work together on a barrier.

Each worker connects before the barrier, so the race is on the switch, not on connecting. Workers
return plain tuples: (outcome, new_subscription) per report, or ("error:<ExceptionName>", message).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from switcher import AsyncSwitcher, Switcher, SwitcherError

Report = tuple[str, str, str]  # agent, snapshot, kind
Outcome = tuple[str, str | None]

_ctx = mp.get_context("spawn")


def run_together(
    target: Callable[..., list[Any]], args: Sequence[tuple[Any, ...]], timeout: float = 120
) -> list[Any]:
    """Start ``target(barrier, *a)`` for each ``a`` in its own process; return their lists, concatenated."""
    barrier = _ctx.Barrier(len(args))
    queue = _ctx.Queue()
    processes = [_ctx.Process(target=_wrap, args=(queue, target, barrier, *a)) for a in args]
    for p in processes:
        p.start()
    results: list[Any] = []
    for _ in processes:
        ok, value = queue.get(timeout=timeout)
        if not ok:
            raise AssertionError(f"worker failed:\n{value}")
        results.extend(value)
    for p in processes:
        p.join(timeout=timeout)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    return results


def _wrap(queue: Any, target: Callable[..., list[Any]], barrier: Any, *args: Any) -> None:
    try:
        queue.put((True, target(barrier, *args)))
    except BaseException:
        queue.put((False, traceback.format_exc()))


def _outcome(call: Callable[[], Any]) -> Outcome:
    try:
        result = call()
    except SwitcherError as error:
        return (f"error:{type(error).__name__}", str(error))
    return (result.outcome.value, result.new_subscription)


def report_sync(
    barrier: Any, url: str, reports: Sequence[Report], lock_timeout: float = 10.0
) -> list[Outcome]:
    """A scheduler-like process: reports failures one after another through the sync API."""
    with Switcher.from_url(url, lock_timeout=timedelta(seconds=lock_timeout)) as sw:
        sw.settings()  # connect before the start signal
        barrier.wait()
        return [
            _outcome(lambda r=r: sw.handle_failure(r[0], r[1], r[2], "429 Too Many Requests"))
            for r in reports
        ]


def report_async(barrier: Any, url: str, reports: Sequence[Report]) -> list[Outcome]:
    """A backend-like process: reports all its failures at once from concurrent coroutines."""

    async def main() -> list[Outcome]:
        asw = AsyncSwitcher.from_url(url, lock_timeout=timedelta(seconds=10), pool_size=len(reports))
        try:
            await asyncio.gather(*(asw.settings() for _ in reports))  # open the pool's connections
            barrier.wait()
            results = await asyncio.gather(
                *(asw.handle_failure(a, s, k, "429 Too Many Requests") for a, s, k in reports),
                return_exceptions=True,
            )
        finally:
            await asw.close()
        outcomes: list[Outcome] = []
        for r in results:
            if isinstance(r, SwitcherError):
                outcomes.append((f"error:{type(r).__name__}", str(r)))
            elif isinstance(r, BaseException):
                raise r
            else:
                outcomes.append((r.outcome.value, r.new_subscription))
        return outcomes

    return asyncio.run(main())
