"""Prometheus metrics and a health check for ``switcher drain --metrics-port``.

``/metrics``: the drainer's counters and handler-latency histogram, plus what the database says at
scrape time (outbox backlog, oldest pending age, dead messages, switches and failures recorded).
``/healthz``: 200 when the database answers, 503 when it does not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from . import outbox
from .drainer import HANDLER_SECONDS_BUCKETS, Drainer

_COUNTS = text(
    """
    SELECT (SELECT count(*) FROM switcher.switches) AS switches,
           (SELECT count(*) FROM switcher.failures WHERE kind = 'rate_limit') AS rate_limit,
           (SELECT count(*) FROM switcher.failures WHERE kind = 'auth') AS auth
    """
)


class SwitcherCollector(Collector):
    def __init__(self, drainer: Drainer) -> None:
        self.drainer = drainer

    def collect(self) -> Iterator[Metric]:
        m = self.drainer.metrics.snapshot()
        for name, help_text in (
            ("claimed", "messages claimed"),
            ("done", "messages completed"),
            ("retried", "failed attempts scheduled for retry"),
            ("dead", "messages moved to dead"),
            ("superseded", "messages made redundant by a newer one"),
            ("lost_leases", "completions that found their lease taken over"),
        ):
            yield CounterMetricFamily(
                f"switcher_drainer_{name}", f"Drainer: {help_text}", value=getattr(m, name)
            )
        buckets = [
            (str(bound), float(count))
            for bound, count in zip(HANDLER_SECONDS_BUCKETS, m.handler_seconds_buckets, strict=True)
        ]
        buckets.append(("+Inf", float(m.handler_seconds_count)))
        yield HistogramMetricFamily(
            "switcher_drainer_handler_seconds",
            "Handler run time",
            buckets=buckets,
            sum_value=m.handler_seconds_sum,
        )
        yield from self._database()

    def _database(self) -> Iterable[Metric]:
        try:
            with self.drainer.engine.connect() as conn:
                stats = outbox.stats(conn)
                counts = conn.execute(_COUNTS).one()
        except DBAPIError:
            yield GaugeMetricFamily("switcher_database_up", "Database answered this scrape", value=0)
            return
        yield GaugeMetricFamily("switcher_database_up", "Database answered this scrape", value=1)
        backlog = GaugeMetricFamily(
            "switcher_outbox_messages", "Outbox messages by status", labels=["status"]
        )
        for status in ("pending", "running", "dead"):
            backlog.add_metric([status], getattr(stats, status))
        yield backlog
        yield GaugeMetricFamily(
            "switcher_outbox_oldest_pending_seconds",
            "Age of the oldest pending message (0 when none)",
            value=stats.oldest_pending_seconds or 0.0,
        )
        yield CounterMetricFamily("switcher_switches", "Switches recorded", value=counts.switches)
        failures = CounterMetricFamily("switcher_failures", "Failures recorded", labels=["kind"])
        failures.add_metric(["rate_limit"], counts.rate_limit)
        failures.add_metric(["auth"], counts.auth)
        yield failures


def healthy(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except DBAPIError:
        return False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


def serve(drainer: Drainer, port: int, host: str = "0.0.0.0") -> WSGIServer:
    """Serve /metrics and /healthz from a daemon thread; returns the server (``shutdown()`` stops it)."""
    registry = CollectorRegistry()
    registry.register(SwitcherCollector(drainer))
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok = healthy(drainer.engine)
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"database unreachable\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="switcher-metrics", daemon=True).start()
    return server
