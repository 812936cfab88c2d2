"""The metrics switcher keeps, on prometheus_client (``switcher[metrics]``).

They live in prometheus_client's default registry, next to its process metrics, so a host application
that already exports Prometheus metrics exports these too; ``switcher drain --metrics-port`` serves them
(``exporter``). Without prometheus_client installed they are no-ops and everything else works the same.
"""

from __future__ import annotations

import functools
from typing import Any

try:
    from prometheus_client import Counter, Gauge, Histogram
except ImportError:  # pragma: no cover - exercised by the clean-venv CI step

    class _NoOp:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def labels(self, *args: Any, **kwargs: Any) -> _NoOp:
            return self

        def inc(self, amount: float = 1) -> None:
            pass

        def observe(self, amount: float) -> None:
            pass

        def set(self, value: float) -> None:
            pass

        def set_to_current_time(self) -> None:
            pass

    Counter = Gauge = Histogram = _NoOp  # type: ignore[misc, assignment]


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, made once: a drainer counts thousands of messages a second."""
    return _children(metric, labels)


@functools.cache
def _children(metric: Any, labels: tuple[str, ...]) -> Any:
    return metric.labels(*labels)


CLAIMED = Counter("switcher_drainer_claimed", "Outbox messages claimed", ["kind"])
FINISHED = Counter(
    "switcher_drainer_finished",
    "Outbox messages a drainer finished handling, by the status it recorded "
    "(done, retry, dead, superseded, released, lost_lease)",
    ["kind", "status"],
)
HANDLER_SECONDS = Histogram("switcher_drainer_handler_seconds", "Handler run time", ["kind"])
LAST_TICK = Gauge(
    "switcher_drainer_last_tick_timestamp_seconds", "When the drain loop last went round (Unix time)"
)
DELIVERIES = Counter(
    "switcher_deliveries",
    "Assignments delivered to agents' containers, by mode (reload, recreate, restart) and result",
    ["mode", "result"],
)
RELOAD_FAILURES = Counter(
    "switcher_reload_failures", "Hot reloads that failed (auto mode then recreates)", ["hook"]
)
DRAIN_WAIT_SECONDS = Histogram(
    "switcher_drain_wait_seconds",
    "How long a restart waited for the agent's executions to end, by outcome (drained, timed_out)",
    ["outcome"],
    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800),
)
GATE_WAIT_SECONDS = Histogram(
    "switcher_gate_wait_seconds",
    "How long execution() took to register (it waits while the agent restarts), by outcome "
    "(entered, restarting)",
    ["outcome"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60),
)
NOTIFICATIONS = Counter("switcher_notifications", "Switch notifications POSTed, by result", ["result"])
