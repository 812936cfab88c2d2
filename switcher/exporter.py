"""``/metrics`` and ``/healthz`` for ``switcher drain --metrics-port`` (``switcher[metrics]``).

``/metrics``: prometheus_client's default registry -- switcher's metrics (``switcher.metrics``) and the
process metrics -- plus, read from the database at scrape time, the outbox backlog and the load and
cooldown of every subscription. ``/healthz``: 200 while the database answers and the drain loop goes
round; 503 otherwise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from .drainer import Drainer
from .outbox import Outbox
from .registry import Registry


class DatabaseCollector(Collector):
    """What the database says, at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("switcher_database_up", "1 when the database answered this scrape")
        try:
            with self.engine.connect() as conn:
                stats = Outbox(conn).stats()
                subscriptions = Registry(conn).subscriptions()
        except DBAPIError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
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
        agents = GaugeMetricFamily(
            "switcher_subscription_agents", "Agents per subscription", labels=["subscription"]
        )
        cooling = GaugeMetricFamily(
            "switcher_subscription_cooling",
            "1 while a subscription cools down after a failure",
            labels=["subscription"],
        )
        for sub in subscriptions:
            agents.add_metric([sub.name], sub.assigned)
            cooling.add_metric([sub.name], 1 if sub.cooling_until else 0)
        yield agents
        yield cooling


def healthy(drainer: Drainer) -> tuple[bool, str]:
    """The loop went round lately (it does at least every poll interval and third of a lease) and the
    database answers."""
    cfg = drainer.config
    allowed = 2 * max(cfg.poll_interval.total_seconds(), cfg.renew_every) + 5
    if time.monotonic() - drainer.last_tick > allowed:
        return False, "the drain loop has not gone round lately"
    try:
        with drainer.engine.connect() as conn:
            Outbox(conn).seconds_until_due()
    except DBAPIError:
        return False, "database unreachable"
    return True, "ok"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class MetricsServer:
    """Serves /metrics and /healthz from a daemon thread until ``close()``."""

    def __init__(self, drainer: Drainer, port: int, host: str = "127.0.0.1") -> None:
        self.collector = DatabaseCollector(drainer.engine)
        REGISTRY.register(self.collector)
        metrics_app = make_wsgi_app(REGISTRY)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                ok, why = healthy(drainer)
                start_response(
                    "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
                )
                return [f"{why}\n".encode()]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        self.server: WSGIServer = make_server(host, port, app, handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="switcher-metrics", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        REGISTRY.unregister(self.collector)
