"""How a drainer drains: the knobs of its loop, and its retry backoff."""

from __future__ import annotations

import os
import random
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Engine

from .. import validate
from ..errors import InvalidInput


def autocommit(engine: Engine) -> Engine:
    """``engine`` in autocommit mode: every statement a drainer runs is a transaction of its own, which
    saves a BEGIN and a COMMIT round trip each. An engine made so (``Drainer.from_url``) is kept as is."""
    if getattr(engine.dialect, "isolation_level", None) == "AUTOCOMMIT":
        return engine
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with equal jitter: attempt n waits between half and all of
    ``base * 2**(n - 1)``, capped at ``cap`` -- never less than half, so retries never stampede at once."""

    base: timedelta = timedelta(seconds=1)
    cap: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        if not timedelta(0) <= self.base <= self.cap:
            raise InvalidInput(f"backoff base must be between 0 and the cap, got {self.base} and {self.cap}")

    def delay(self, attempts: int) -> timedelta:
        ceiling = min(
            self.cap.total_seconds(), self.base.total_seconds() * 2 ** min(max(0, attempts - 1), 62)
        )
        return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


@dataclass(frozen=True)
class DrainerConfig:
    worker_id: str = field(default_factory=default_worker_id)
    """Recorded in the leases this drainer takes."""
    placement: str | None = None
    """Claim only messages about agents placed here (None: agents placed nowhere); events from anywhere."""
    concurrency: int = 4
    """Handlers running at once."""
    prefetch: int = 0
    """Messages claimed ahead, waiting for a handler slot: fewer claims for a drainer of quick handlers,
    but messages it holds are out of other drainers' reach."""
    poll_interval: timedelta = timedelta(seconds=5)
    """Polling, the fallback to LISTEN/NOTIFY."""
    lease: timedelta = timedelta(seconds=30)
    """How long a claim lasts unrenewed (renewed every third of it); a dead drainer's messages come back
    after this."""
    max_attempts: int = 10
    backoff: Backoff = field(default_factory=Backoff)
    """Between a failed message's attempts."""
    reconnect: Backoff = field(
        default_factory=lambda: Backoff(base=timedelta(seconds=0.5), cap=timedelta(seconds=10))
    )
    """Between attempts to reach an unavailable database: short, so a restart costs seconds, not minutes."""
    shutdown_timeout: timedelta = timedelta(seconds=30)
    """How long a stop waits for running handlers."""
    listen: bool = True
    """LISTEN for NOTIFY. Off, the drainer only polls (behind a transaction-pooling proxy that cannot
    hold a LISTEN session)."""
    prune_interval: timedelta = timedelta(minutes=1)
    """How often this drainer deletes one batch of history past the retention period."""

    def __post_init__(self) -> None:
        validate.integer(self.concurrency, "concurrency", minimum=1, maximum=1024)
        validate.integer(self.prefetch, "prefetch", minimum=0, maximum=4096)
        validate.integer(self.max_attempts, "max_attempts", minimum=1, maximum=1_000_000)
        validate.duration(self.lease, "lease", minimum=timedelta(seconds=1), maximum=timedelta(days=1))
        validate.duration(
            self.poll_interval, "poll_interval", exclusive_minimum=True, maximum=timedelta(days=1)
        )
        validate.duration(self.shutdown_timeout, "shutdown_timeout", maximum=timedelta(days=1))
        validate.duration(self.prune_interval, "prune_interval", exclusive_minimum=True)
        validate.optional_name(self.placement, "placement")
        if not self.worker_id or len(self.worker_id) > 200:
            raise InvalidInput("worker_id must be 1 to 200 characters")

    @property
    def renew_every(self) -> float:
        return self.lease.total_seconds() / 3
