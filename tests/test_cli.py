"""The `switcher` command through its real entry point (a subprocess), against real Postgres."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from switcher import Switcher
from switcher.testing import embedded_server
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def switcher(
    *args: str, url: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "switcher"]
    if url is not None:
        command += ["--database-url", url]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHER_")}
    environment.update(env or {})
    return subprocess.run(
        [*command, *args], check=False, capture_output=True, text=True, timeout=120, env=environment
    )


def ok(*args: str, url: str) -> Any:
    run = switcher("--json", *args, url=url)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def one_line_error(run: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert run.returncode == code, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, f"one line, no traceback: {run.stderr}"
    assert lines[0].startswith("switcher: ") and says in lines[0], lines[0]


def test_registry_and_operator_commands(url: str) -> None:
    assert ok("migrate", url=url) == {"migrated": True, "schema": "switcher"}
    sub = ok("subscription", "add", "A", "--credential-ref", "env:TOKEN_A", url=url)
    assert sub["name"] == "A" and sub["assigned"] == 0 and sub["cooling_until"] is None
    ok("subscription", "add", "B", "--credential-ref", "file:/run/secrets/b", "--max-agents", "5", url=url)
    assert (
        ok("agent", "add", "alice", "--subscription", "A", "--container", "agent-alice", url=url)[
            "generation"
        ]
        == 0
    )
    ok("agent", "add", "bob", "--subscription", "A", url=url)

    result = ok("fail", "alice", "--snapshot", "A", "--kind", "rate_limit", "--message", "429", url=url)
    assert result["outcome"] == "switched" and result["new_subscription"] == "B" and result["restart_id"]
    again = ok("fail", "alice", "--snapshot", "A", "--kind", "auth", url=url)
    assert again["outcome"] == "stale"

    agents = {a["name"]: a for a in ok("agent", "list", url=url)}
    assert agents["alice"]["subscription"] == "B" and agents["alice"]["generation"] == 1
    subs = {s["name"]: s for s in ok("subscription", "list", url=url)}
    assert subs["A"]["cooling_until"] is not None and subs["B"]["assigned"] == 1

    assert ok("agent", "assign", "bob", "B", url=url)["outcome"] == "switched"
    assert ok("subscription", "disable", "B", url=url)["enabled"] is False
    assert ok("subscription", "enable", "B", url=url)["enabled"] is True

    settings = ok("settings", "set", "--auto-switch", "off", "--cooldown", "600", url=url)
    assert settings == {"auto_switch": False, "cooldown_window": 600.0}
    assert ok("settings", "get", url=url)["auto_switch"] is False

    messages = ok("outbox", "list", url=url)
    assert {m["agent"] for m in messages} == {"alice", "bob"} and {m["status"] for m in messages} == {
        "pending"
    }
    with Switcher.from_url(url) as sw, sw.engine.begin() as conn:
        conn.execute(
            text("UPDATE switcher.outbox SET status = 'dead', last_error = 'boom' WHERE id = :id"),
            {"id": result["restart_id"]},
        )
    shown = ok("outbox", "show", str(result["restart_id"]), url=url)
    assert (
        shown["status"] == "dead" and shown["last_error"] == "boom" and shown["payload"]["agent"] == "alice"
    )

    status = ok("status", url=url)
    assert set(status) == {"agents", "subscriptions", "outbox", "dead", "settings"}
    assert status["outbox"]["dead"] == 1 and status["dead"][0]["id"] == result["restart_id"]

    human = switcher("status", url=url)
    assert human.returncode == 0 and "alice" in human.stdout and "switcher outbox retry" in human.stdout

    assert ok("outbox", "retry", str(result["restart_id"]), url=url) == {
        "id": result["restart_id"],
        "status": "pending",
    }
    assert ok("outbox", "purge", "--older-than", "0", url=url) == {"deleted": 0}


def test_user_mistakes_are_one_line_errors(url: str) -> None:
    with Switcher.from_url(url) as sw:
        sw.add_subscription("A", credential_ref="env:A")
    one_line_error(
        switcher("fail", "nobody", "--snapshot", "A", "--kind", "auth", url=url), 2, "unknown agent 'nobody'"
    )
    one_line_error(
        switcher("subscription", "add", "X", "--credential-ref", "sk-live-123", url=url), 2, "env:"
    )
    one_line_error(
        switcher("subscription", "add", "A", "--credential-ref", "env:A", url=url), 2, "already exists"
    )
    one_line_error(switcher("outbox", "show", "999", url=url), 2, "no outbox message")
    one_line_error(switcher("status", url="mysql://user@host/db"), 2, "PostgreSQL")
    one_line_error(switcher("status", url="postgresql://nobody@127.0.0.1:1/none"), 1, "database error")
    one_line_error(switcher("status"), 2, "no database")
    usage = switcher("fail", "alice", url=url)
    assert usage.returncode == 2 and "--snapshot" in usage.stderr  # argparse's own usage error


def test_every_option_shows_its_environment_variable() -> None:
    commands = [
        [],
        ["drain"],
        ["demo"],
        ["fail"],
        ["subscription", "add"],
        ["agent", "add"],
        ["outbox", "list"],
    ]
    commands += [["outbox", "purge"], ["settings", "set"]]
    for command in commands:
        helped = switcher(*command, "--help")
        assert helped.returncode == 0
        flat = " ".join(helped.stdout.split())
        options = set(re.findall(r"(--[a-z][a-z-]+)", flat)) - {"--help"}
        assert options, command
        assert flat.count("(env SWITCHER_") >= len(options), f"every option of {command} names its variable"
    assert "SWITCHER_METRICS_PORT" in switcher("drain", "--help").stdout


def test_logs_can_be_json_lines_with_structured_fields(url: str) -> None:
    drain = subprocess.Popen(
        [sys.executable, "-m", "switcher", "--database-url", url, "--log-format", "json", "drain"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert drain.stderr is not None
        first = json.loads(drain.stderr.readline())
    finally:
        drain.send_signal(signal.SIGTERM)
        drain.communicate(timeout=60)
    assert first["message"] == "drainer started" and first["level"] == "INFO" and "worker" in first


def test_environment_variables_set_options(url: str) -> None:
    run = switcher("--json", "settings", "get", env={"SWITCHER_DATABASE_URL": url})
    assert run.returncode == 0 and json.loads(run.stdout)["auto_switch"] is True


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


def _metric(body: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


def test_metrics_move_during_a_drain_and_healthz_fails_when_the_database_stops() -> None:
    port = _free_port()
    with embedded_server() as server:  # a server of its own: this test stops it
        url = server.url.render_as_string(hide_password=False)
        with Switcher.from_url(url) as sw:
            sw.migrate()
            sw.add_subscription("A", credential_ref="env:A")
            sw.add_subscription("B", credential_ref="env:B")
            sw.add_agent("alice", subscription="A", container="no-such-container")
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
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            _, body = wait_for(lambda: (r := _get(port, "/metrics"))[0] == 200 and r, what="/metrics up")
            assert _metric(body, "switcher_drainer_claimed_total") == 0
            assert _metric(body, "switcher_database_up") == 1
            assert _get(port, "/healthz")[0] == 200

            with Switcher.from_url(url) as sw:
                sw.handle_failure("alice", "A", "rate_limit")
            body = wait_for(
                lambda: (
                    (b := _get(port, "/metrics")[1])
                    and _metric(b, "switcher_drainer_claimed_total") >= 1
                    and b
                ),
                what="claimed counter moving",
            )
            assert _metric(body, "switcher_switches_total") == 1
            assert 'switcher_failures_total{kind="rate_limit"} 1.0' in body
            assert "switcher_drainer_handler_seconds_bucket" in body
            moved = wait_for(
                lambda: (
                    (b := _get(port, "/metrics")[1])
                    and _metric(b, "switcher_drainer_done_total")
                    + _metric(b, "switcher_drainer_retried_total")
                    >= 1
                ),
                what="done or retried counter moving",
            )
            assert moved

            assert server.stop is not None
            server.stop()
            assert wait_for(lambda: _get(port, "/healthz")[0] == 503, what="/healthz failing")
            assert _metric(_get(port, "/metrics")[1], "switcher_database_up") == 0
        finally:
            drain.send_signal(signal.SIGTERM)
            drain.wait(60)
        assert drain.returncode == 0


def test_the_readme_commands_are_the_ones_ci_and_make_use() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    assert re.search(r"^make test\b", ci, re.MULTILINE), ".ci/run runs the README's test command"
    assert "switcher demo" in makefile, "make demo runs switcher demo"


def _demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    run = switcher("demo", *args, env=env)
    assert time.monotonic() - started < 600
    return run


@pytest.mark.parametrize("runtime", ["simulated", pytest.param("docker", marks=pytest.mark.docker)])
def test_the_demo_passes_every_check(
    switcher_postgres: Any, runtime: str, request: pytest.FixtureRequest
) -> None:
    if runtime == "docker":
        request.getfixturevalue("docker_client")
    url = switcher_postgres.url.render_as_string(hide_password=False)
    run = _demo("--runtime", runtime, env={"SWITCHER_DATABASE_URL": url})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all guarantees hold" in run.stdout and "[FAIL]" not in run.stdout
    assert ("SIMULATED" in run.stdout) == (runtime == "simulated")


def test_a_broken_guarantee_fails_the_demo(switcher_postgres: Any) -> None:
    url = switcher_postgres.url.render_as_string(hide_password=False)
    run = _demo(
        "--runtime", "simulated", "--sabotage", "duplicate-switch", env={"SWITCHER_DATABASE_URL": url}
    )
    assert run.returncode == 1
    assert "[FAIL] one switch per burst" in run.stdout


@pytest.mark.parametrize(
    ("example", "says"),
    [
        ("scheduler_sync.py", "moved from team-a to team-b"),
        ("backend_asyncio.py", "['stale', 'stale', 'stale', 'stale', 'switched']"),
    ],
)
def test_the_readme_examples_run(url: str, example: str, says: str) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SWITCHER_DATABASE_URL": url},
    )
    assert run.returncode == 0, run.stderr
    assert says in run.stdout
