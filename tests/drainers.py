"""Drainer processes for tests: real Drainers, in their own OS processes, with test handlers.

Handlers are named (so they cross the process boundary) and report through multiprocessing events
and an append-only file of handler intervals (CLOCK_MONOTONIC is shared by all processes).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

from switcher.api import database_url
from switcher.drainer import Drainer, DrainerConfig
from switcher.handlers import RestartAgent
from switcher.outbox import RESTART_AGENT, Backoff, Message
from switcher.runtime.docker import DockerRuntime

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


def _handler(
    name: str, engine: Any, events: dict[str, Any], intervals: str | None
) -> Callable[[Message], str]:
    docker_restart = RestartAgent(engine, DockerRuntime(stop_timeout=2)) if name == "docker" else None

    def handle(message: Message) -> str:
        start = time.monotonic()
        if "started" in events:
            events["started"].set()
        if name == "block":
            events["release"].wait()
            result = "released"
        elif name == "fail":
            raise RuntimeError("this handler always fails")
        elif docker_restart is not None:
            result = docker_restart(message)
        else:
            result = "recorded"
        record_interval(intervals, message, start, result)
        if "handled" in events:
            events["handled"].set()
        return result

    return handle


def drain(url: str, handler: str, events: dict[str, Any], intervals: str | None, **config: Any) -> None:
    """Process body: run a Drainer until SIGTERM; exit 0 if every handler finished."""
    engine = create_engine(database_url(url), pool_size=6)
    settings = {"poll_interval": timedelta(seconds=3600), "backoff": Backoff(timedelta(milliseconds=50))}
    settings.update(config)
    drainer = Drainer(
        engine, {RESTART_AGENT: _handler(handler, engine, events, intervals)}, DrainerConfig(**settings)
    )
    drainer.install_signal_handlers()
    if "listening" in events:
        threading.Thread(
            target=lambda: drainer.listening.wait() and events["listening"].set(), daemon=True
        ).start()
    clean = drainer.run()
    engine.dispose()
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
