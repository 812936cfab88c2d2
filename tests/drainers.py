"""Drainer processes for tests: real Drainers, in their own OS processes.

A drainer runs one of the test handlers (``record``, ``block``, ``fail``) or the real Docker delivery
(``docker``); each reports through multiprocessing events and an append-only file of handler intervals
(CLOCK_MONOTONIC is shared by all processes).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from switcher.credentials import CredentialPolicy
from switcher.drainer import Backoff, Claim, Drainer, DrainerConfig, Handler
from switcher.outbox import RESTART_AGENT, Message

ctx = mp.get_context("spawn")


def record_interval(path: str | None, message: Message, start: float, result: str) -> None:
    if path:
        line = {
            "pid": os.getpid(),
            "id": message.id,
            "agent": message.agent,
            "generation": message.generation,
            "start": start,
            "end": time.monotonic(),
            "result": result,
        }
        with open(path, "a") as f:  # one short line per write: appends do not interleave
            f.write(json.dumps(line) + "\n")


def _handler(name: str, inner: Handler | None, events: dict[str, Any], intervals: str | None) -> Handler:
    def handle(claim: Claim) -> str:
        message = claim.message
        start = time.monotonic()
        if "started" in events:
            events["started"].set()
        if name == "block":
            events["release"].wait()
            result = "released"
        elif name == "fail":
            raise RuntimeError("this handler always fails")
        elif inner is not None:
            result = inner(claim)
        else:
            result = "recorded"
        record_interval(intervals, message, start, result)
        if "handled" in events:
            events["handled"].set()
        return result

    return handle


def drain(url: str, handler: str, events: dict[str, Any], intervals: str | None, **config: Any) -> None:
    """Process body: run a Drainer until SIGTERM; exit 0 if every handler finished."""
    docker = config.pop("docker", None)
    settings: dict[str, Any] = {
        "poll_interval": timedelta(seconds=3600),
        "backoff": Backoff(timedelta(milliseconds=50), timedelta(seconds=1)),
    }
    settings.update(config)
    drainer = Drainer.from_url(
        url,
        config=DrainerConfig(**settings),
        handlers={} if handler == "docker" else {RESTART_AGENT: lambda claim: "unused"},
        docker=docker,
        credentials=CredentialPolicy(),
        drain_timeout=timedelta(seconds=30),
    )
    inner = drainer.handlers[RESTART_AGENT] if handler == "docker" else None
    drainer.handlers[RESTART_AGENT] = _handler(handler, inner, events, intervals)
    drainer.install_signal_handlers()
    if "listening" in events:
        threading.Thread(
            target=lambda: drainer.listening.wait() and events["listening"].set(), daemon=True
        ).start()
    clean = drainer.run()
    drainer.close()
    os._exit(0 if clean else 3)


def start(url: str, handler: str, intervals: Path | None = None, **config: Any) -> tuple[Any, dict[str, Any]]:
    """Start a drainer process; return it and its events (listening, started, release, handled)."""
    events = {name: ctx.Event() for name in ("listening", "started", "release", "handled")}
    process = ctx.Process(
        target=drain, args=(url, handler, events, str(intervals) if intervals else None), kwargs=config
    )
    process.start()
    return process, events


def read_intervals(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]
