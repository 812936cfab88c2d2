"""/metrics and /healthz of a real `switcher drain`, and the Grafana dashboard checked against them."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

from switcher import Switcher
from switcher.drainer import Drainer, DrainerConfig
from switcher.exporter import MetricsServer
from switcher.testing import embedded_server
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def _value(body: str, sample: str) -> float:
    """The value of one sample line (``name{labels}``), or -1 when absent."""
    for line in body.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return -1.0


def exposed_names(body: str) -> set[str]:
    """Every metric name a scrape exposes, the suffixes of counters and histograms included."""
    names = set()
    for match in re.finditer(r"^# TYPE (\S+) (\S+)$", body, re.MULTILINE):
        name, kind = match.groups()
        names.add(name)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
        names.update(name + s for s in suffixes.get(kind, ()))
    return names


def dashboard_names() -> set[str]:
    dashboard = json.loads((ROOT / "dashboards" / "switcher.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs, "the dashboard has queries"
    return {name for expr in exprs for name in re.findall(r"\b((?:switcher|process)_[a-z_]+)\b", expr)}


def test_metrics_move_during_a_drain_healthz_follows_the_database_and_the_dashboard_fits() -> None:
    port = _free_port()
    with embedded_server() as server:  # a server of its own: this test stops it
        url = server.url.render_as_string(hide_password=False)
        with Switcher.from_url(url) as sw:
            sw.migrate()
            sw.add_subscription("A", credential_ref="env:SWITCHER_CRED_A")
            sw.add_subscription("B", credential_ref="env:SWITCHER_CRED_B")
            sw.add_agent("alice", subscription="A", container="no-such-container-here")
        drain = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "switcher",
                "--database-url",
                url,
                "drain",
                "--metrics-port",
                str(port),
                "--poll-interval",
                "0.2",
                "--backoff-base",
                "0.1",
                "--backoff-cap",
                "0.2",
                "--restart-mode",
                "recreate",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            _, body = wait_for(lambda: (r := _get(port, "/metrics"))[0] == 200 and r, what="/metrics up")
            assert _value(body, "switcher_database_up") == 1
            assert _value(body, 'switcher_outbox_messages{status="pending"}') == 0
            assert _value(body, "process_cpu_seconds_total") >= 0, "process metrics are exported"
            assert _get(port, "/healthz") == (200, "ok\n")

            with Switcher.from_url(url) as sw:
                sw.handle_failure("alice", "A", "rate_limit")
            body = wait_for(
                lambda: (
                    (b := _get(port, "/metrics")[1])
                    and _value(b, 'switcher_deliveries_total{mode="recreate",result="no_container"}') == 1
                    and b
                ),
                what="the delivery counted",
            )
            assert _value(body, 'switcher_drainer_claimed_total{kind="restart_agent"}') == 1
            assert _value(body, 'switcher_drainer_finished_total{kind="restart_agent",status="done"}') == 1
            assert _value(body, 'switcher_subscription_agents{subscription="B"}') == 1
            assert _value(body, 'switcher_subscription_cooling{subscription="A"}') == 1
            assert 'switcher_drainer_handler_seconds_bucket{kind="restart_agent",le="+Inf"} 1.0' in body

            missing = dashboard_names() - exposed_names(body)
            assert not missing, f"the dashboard queries only metrics the exporter exposes; unknown: {missing}"

            assert server.stop is not None
            server.stop()
            assert wait_for(lambda: _get(port, "/healthz")[0] == 503, what="/healthz failing")
            assert _value(_get(port, "/metrics")[1], "switcher_database_up") == 0
        finally:
            drain.send_signal(signal.SIGTERM)
            drain.wait(60)
        assert drain.returncode == 0


def test_healthz_fails_while_the_drain_loop_does_not_go_round(url: str) -> None:
    drainer = Drainer.from_url(
        url, config=DrainerConfig(poll_interval=timedelta(seconds=0.2)), handlers={"restart_agent": str}
    )
    metrics = MetricsServer(drainer, 0)
    try:
        assert _get(metrics.port, "/healthz") == (503, "the drain loop has not gone round lately\n")
        thread = threading.Thread(target=drainer.run)
        thread.start()
        try:
            assert wait_for(lambda: _get(metrics.port, "/healthz")[0] == 200, what="healthy once it runs")
        finally:
            drainer.stop()
            thread.join(60)
    finally:
        metrics.close()
        drainer.close()


def test_the_metrics_server_listens_on_localhost_by_default(url: str) -> None:
    drainer = Drainer.from_url(url, handlers={"restart_agent": str})
    metrics = MetricsServer(drainer, 0)
    try:
        assert metrics.server.server_address[0] == "127.0.0.1"
    finally:
        metrics.close()
        drainer.close()
