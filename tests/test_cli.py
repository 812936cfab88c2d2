"""The `switcher` command through its real entry point (a subprocess), against real PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from switcher import Switcher
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def switcher(
    *args: str | bytes, url: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command: list[str | bytes] = [sys.executable, "-m", "switcher"]
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
    sub = ok("subscription", "add", "A", "--credential-ref", "env:SWITCHER_CRED_A", url=url)
    assert sub["name"] == "A" and sub["assigned"] == 0 and sub["cooling_until"] is None
    ok("subscription", "add", "B", "--credential-ref", "file:/run/secrets/b", "--max-agents", "5", url=url)
    added = ok("agent", "add", "alice", "--subscription", "A", "--container", "agent-alice", url=url)
    assert added["generation"] == 0
    ok("agent", "add", "bob", "--subscription", "A", "--placement", "host-1", url=url)

    result = ok("fail", "alice", "--snapshot", "A", "--kind", "rate_limit", "--report-id", "r-1", url=url)
    assert result["outcome"] == "switched" and result["new_subscription"] == "B" and result["restart_id"]
    again = ok("fail", "alice", "--snapshot", "A", "--kind", "rate_limit", "--report-id", "r-1", url=url)
    assert again["outcome"] == "switched" and again["replayed"], "the same report id answers the same"
    assert ok("fail", "alice", "--snapshot", "A", "--kind", "auth", url=url)["outcome"] == "stale"

    agents = {a["name"]: a for a in ok("agent", "list", url=url)}
    assert agents["alice"]["subscription"] == "B" and agents["alice"]["generation"] == 1
    assert agents["bob"]["placement"] == "host-1"
    subs = {s["name"]: s for s in ok("subscription", "list", url=url)}
    assert subs["A"]["cooling_until"] is not None and subs["B"]["assigned"] == 1

    assert ok("agent", "assign", "bob", "B", url=url)["outcome"] == "switched"
    assert ok("subscription", "disable", "B", url=url)["enabled"] is False
    assert ok("subscription", "enable", "B", url=url)["enabled"] is True
    changed = ok("subscription", "set-credential", "B", "env:SWITCHER_CRED_B2", url=url)
    assert changed["credential_ref"] == "env:SWITCHER_CRED_B2"
    one_line_error(switcher("subscription", "remove", "B", url=url), 2, "still has agents")
    assert ok("subscription", "remove", "A", url=url) == {"removed": "A"}

    settings = ok(
        "settings",
        "set",
        "--auto-switch",
        "off",
        "--cooldown",
        "600",
        "--webhook",
        "env:SWITCHER_CRED_HOOK",
        "--retention",
        "86400",
        url=url,
    )
    assert settings == {
        "auto_switch": False,
        "cooldown_window": 600.0,
        "webhook": "env:SWITCHER_CRED_HOOK",
        "retention": 86400.0,
    }
    assert ok("settings", "set", "--webhook", "", url=url)["webhook"] is None

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
    assert set(status) == {
        "agents",
        "subscriptions",
        "settings",
        "outbox",
        "dead",
        "recent_switches",
        "drainers",
    }
    assert status["outbox"]["dead"] == 1 and status["dead"][0]["id"] == result["restart_id"]
    human = switcher("status", url=url)
    assert human.returncode == 0 and "alice" in human.stdout and "switcher outbox retry" in human.stdout

    assert ok("outbox", "retry", "--all-dead", url=url) == [{"id": result["restart_id"], "status": "pending"}]
    bobs = next(m["id"] for m in messages if m["agent"] == "bob")
    assert ok("outbox", "cancel", str(bobs), url=url) == [{"id": bobs, "status": "cancelled"}]
    assert ok("outbox", "purge", "--older-than", "0", url=url) == {"deleted": 1}
    assert ok("prune", url=url) == {"failures": 0, "switches": 0, "messages": 0}
    assert ok("agent", "remove", "bob", url=url) == {"removed": "bob"}
    assert [a["name"] for a in ok("agent", "list", url=url)] == ["alice"]


def test_migrate_is_quiet_and_says_what_it_did(url: str) -> None:
    with Switcher.from_url(url) as sw:
        sw.uninstall()
    first = switcher("migrate", url=url)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    assert first.stdout.strip() == "schema switcher migrated from nothing to revision 0004"
    again = switcher("migrate", url=url)
    assert again.stdout.strip() == "schema switcher is up to date (revision 0004)" and again.stderr == ""
    assert ok("migrate", url=url) == {"schema": "switcher", "revision": "0004", "previous": "0004"}


def test_check_reports_what_is_wrong(url: str) -> None:
    run = switcher("check", url=url)
    assert run.returncode == 3, "no drainer was ever seen"
    assert "[ok] schema: at 0004" in run.stdout and "[ok] functions: as shipped" in run.stdout
    assert "[FAIL] drainers" in run.stdout
    with Switcher.from_url(url) as sw, sw.engine.begin() as conn:
        conn.execute(text("INSERT INTO switcher.drainers (worker_id) VALUES ('w1')"))
    assert switcher("check", url=url).returncode == 0


def test_uninstall_asks_for_yes_then_drops_everything(url: str) -> None:
    one_line_error(switcher("uninstall", url=url), 2, "--yes")
    assert ok("uninstall", "--yes", url=url) == {"uninstalled": "switcher"}
    with Switcher.from_url(url) as sw:
        assert sw.schema_revision() is None


@pytest.fixture
def registered(url: str) -> str:
    with Switcher.from_url(url) as sw:
        sw.add_subscription("A", credential_ref="env:SWITCHER_CRED_A")
        sw.add_agent("alice", subscription="A")
    return url


BAD_INPUT: list[tuple[str, list[str | bytes], dict[str, str], str]] = [
    ("cooldown nan", ["settings", "set", "--cooldown", "nan"], {}, "'nan' must be at least 0"),
    ("cooldown 1e20", ["settings", "set", "--cooldown", "1e20"], {}, "at most 31622400"),
    ("cooldown negative", ["settings", "set", "--cooldown", "-5"], {}, "--cooldown"),
    ("cooldown text", ["settings", "set", "--cooldown", "soon"], {}, "not a number of seconds"),
    ("retention too short", ["settings", "set", "--retention", "10"], {}, "at least 3600"),
    ("webhook not a reference", ["settings", "set", "--webhook", "https://hooks/x"], {}, "never the secret"),
    ("auto-switch maybe", ["settings", "set", "--auto-switch", "maybe"], {}, "on or off"),
    ("purge nan", ["outbox", "purge", "--older-than", "nan"], {}, "--older-than"),
    ("purge negative", ["outbox", "purge", "--older-than", "-1"], {}, "--older-than"),
    ("list limit -1", ["outbox", "list", "--limit", "-1"], {}, "--limit"),
    ("list bad status", ["outbox", "list", "--status", "lost"], {}, "--status"),
    ("show 0", ["outbox", "show", "0"], {}, "MESSAGE_ID"),
    ("show text", ["outbox", "show", "one"], {}, "MESSAGE_ID"),
    ("show missing", ["outbox", "show", "999"], {}, "no outbox message with id 999"),
    ("retry nothing", ["outbox", "retry"], {}, "--all-dead"),
    ("retry missing", ["outbox", "retry", "999"], {}, "no dead or finished outbox message"),
    ("cancel missing", ["outbox", "cancel", "999"], {}, "no pending outbox message"),
    ("log level", ["--log-level", "bogus", "status"], {}, "--log-level"),
    ("concurrency 0", ["drain", "--concurrency", "0"], {}, "--concurrency"),
    ("metrics port", ["drain", "--metrics-port", "70000"], {}, "--metrics-port"),
    ("lease under stop timeout", ["drain", "--lease", "5"], {}, "twice the stop timeout"),
    ("backoff inverted", ["drain", "--backoff-base", "10", "--backoff-cap", "1"], {}, "--backoff-base"),
    ("poll interval 0", ["drain", "--poll-interval", "0"], {}, "--poll-interval"),
    ("unknown agent", ["fail", "nobody", "--snapshot", "A", "--kind", "auth"], {}, "unknown agent 'nobody'"),
    ("bad kind", ["fail", "alice", "--snapshot", "A", "--kind", "oom"], {}, "--kind"),
    ("non-UTF-8 byte", ["agent", "add", b"ali\xffce"], {}, "U+DCFF"),
    ("bidi override", ["agent", "add", "ali\u202ece"], {}, "RIGHT-TO-LEFT OVERRIDE"),
    ("zero-width space", ["agent", "add", "\u200balice"], {}, "ZERO WIDTH SPACE"),
    ("C1 control", ["agent", "add", "ali\x85ce"], {}, "U+0085"),
    ("raw secret", ["subscription", "add", "X", "--credential-ref", "sk-live-123"], {}, "env:"),
    ("taken name", ["subscription", "add", "A", "--credential-ref", "env:A"], {}, "already exists"),
    ("in use", ["subscription", "remove", "A"], {}, "still has agents"),
    ("uninstall without yes", ["uninstall"], {}, "--yes"),
    ("env: bad concurrency", ["drain"], {"SWITCHER_DRAIN_CONCURRENCY": "abc"}, "SWITCHER_DRAIN_CONCURRENCY"),
    ("env: bad log level", ["status"], {"SWITCHER_LOG_LEVEL": "bogus"}, "SWITCHER_LOG_LEVEL"),
    (
        "env: bad limit",
        ["outbox", "list"],
        {"SWITCHER_OUTBOX_LIST_LIMIT": "-3"},
        "SWITCHER_OUTBOX_LIST_LIMIT",
    ),
]


@pytest.mark.parametrize(("args", "env", "says"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_every_bad_input_is_one_line_and_exit_2(
    registered: str, args: list[str | bytes], env: dict[str, str], says: str
) -> None:
    run = switcher(*args, url=registered, env=env)
    assert "Traceback" not in run.stderr
    one_line_error(run, 2, says)


def test_a_bad_value_in_one_commands_variable_does_not_break_the_others(registered: str) -> None:
    run = switcher("--json", "agent", "list", url=registered, env={"SWITCHER_DRAIN_CONCURRENCY": "abc"})
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    ("url", "code", "says"),
    [
        ("postgresql://u:pw@h:abc/db", 2, "not a database URL"),
        ("mysql://user@host/db", 2, "PostgreSQL"),
        ("postgresql://nobody@127.0.0.1:1/none", 1, "database error"),
    ],
)
def test_database_urls(url: str, code: int, says: str) -> None:
    one_line_error(switcher("status", url=url), code, says)


def test_no_database_is_a_usage_error() -> None:
    one_line_error(switcher("status"), 2, "no database")


def test_with_json_errors_are_json_too(registered: str) -> None:
    run = switcher("--json", "fail", "nobody", "--snapshot", "A", "--kind", "auth", url=registered)
    assert run.returncode == 2
    error = json.loads(run.stderr)
    assert error["exit_code"] == 2 and "unknown agent" in error["error"]
    usage = switcher("--json", "outbox", "list", "--limit", "0", url=registered)
    assert json.loads(usage.stderr)["exit_code"] == 2


def test_version() -> None:
    run = switcher("--version")
    assert run.returncode == 0 and re.fullmatch(r"switcher \d+\.\d+\.\d+\S*\n", run.stdout), run.stdout


COMMANDS = [
    [],
    ["drain"],
    ["demo"],
    ["fail"],
    ["status"],
    ["prune"],
    ["migrate"],
    ["check"],
    ["uninstall"],
    ["subscription", "add"],
    ["agent", "add"],
    ["outbox", "list"],
    ["outbox", "purge"],
    ["outbox", "retry"],
    ["settings", "set"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "switcher")
def test_every_option_names_its_environment_variable(command: list[str]) -> None:
    helped = switcher(*command, "--help")
    assert helped.returncode == 0
    flat = " ".join(helped.stdout.split())
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", flat.split("Options:")[1])) - {
        "--help",
        "--version",
    }
    shown = re.findall(r"env var: (SWITCHER_[A-Z_]+)", flat)
    assert len(shown) >= len(options), f"every option of {command} names its variable: {options} / {shown}"


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
    run = switcher("settings", "get", env={"SWITCHER_DATABASE_URL": url, "SWITCHER_JSON": "1"})
    assert run.returncode == 0 and json.loads(run.stdout)["auto_switch"] is True


def test_status_watch_redraws_until_interrupted(registered: str) -> None:
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "switcher",
            "--database-url",
            registered,
            "status",
            "--watch",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    frames = 0
    seen: list[str] = []
    for line in watch.stdout:
        seen.append(line)
        frames += line.startswith("switcher status --")  # (no screen-clearing codes into a pipe)
        if frames == 2:
            break
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    frame = "".join(seen)
    assert "Ctrl-C to quit" in frame and "outbox: 0 pending" in frame and "A" in frame


def test_status_watch_notes_the_first_ctrl_c_and_raises_on_the_second() -> None:
    # The first press is only noted, so no KeyboardInterrupt can be lost in a finalizer mid-frame.
    from switcher.cli import _first_ctrl_c

    before = signal.getsignal(signal.SIGINT)
    with _first_ctrl_c() as pressed:
        assert not pressed()
        signal.raise_signal(signal.SIGINT)
        assert pressed()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_readme_commands_are_the_ones_ci_and_make_use() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    assert re.search(r"^make test\b", ci, re.MULTILINE), ".ci/run runs the README's test command"
    assert "switcher demo" in makefile, "make demo runs switcher demo"


@pytest.mark.parametrize("runtime", ["simulated", pytest.param("docker", marks=pytest.mark.docker)])
def test_the_demo_passes_every_check(
    switcher_postgres: Any, runtime: str, request: pytest.FixtureRequest
) -> None:
    if runtime == "docker":
        request.getfixturevalue("docker_client")
    url = switcher_postgres.url.render_as_string(hide_password=False)
    run = switcher("demo", "--runtime", runtime, env={"SWITCHER_DATABASE_URL": url})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all guarantees hold" in run.stdout and "[FAIL]" not in run.stdout
    assert ("SIMULATED" in run.stdout) == (runtime == "simulated")
    if runtime == "docker":
        assert ": reloaded" in run.stdout and ": recreated" in run.stdout


def test_the_demo_checker_catches_a_broken_guarantee() -> None:
    from switcher.demo.checks import check
    from switcher.model import Agent

    honest = {
        "answers": [(0, "backend1", "alice", False, "switched"), (1, "backend1", "alice", False, "switched")],
        "switches": [
            {"id": 1, "agent": "alice", "old_subscription": "A", "new_subscription": "C"},
            {"id": 2, "agent": "alice", "old_subscription": "C", "new_subscription": "D"},
        ],
        "agents": [Agent("alice", "D", None, 2)],
        "deliveries": [],
        "applied": {"alice": ("D", "s-d")},
        "expected_secrets": {"D": "s-d"},
        "unfinished": 0,
        "notifications": {"switch-1": 1, "switch-2": 1},
    }
    assert all(c.ok for c in check(**honest))  # type: ignore[arg-type]
    sabotaged: list[tuple[str, dict[str, Any]]] = [
        (
            "one switch per burst",
            {"answers": [*honest["answers"], (0, "backend2", "alice", False, "switched")]},
        ),
        ("no cascade", {"answers": [*honest["answers"], (1, "scheduler", "alice", True, "switched")]}),
        ("every moved agent runs its current credential", {"applied": {"alice": ("C", "s-c")}}),
        ("one notification per switch", {"notifications": {"switch-1": 2, "switch-2": 1}}),
        (
            "no overlapping deliveries",
            {
                "deliveries": [
                    {"agent": "alice", "start": 1.0, "end": 3.0},
                    {"agent": "alice", "start": 2.0, "end": 4.0},
                ]
            },
        ),
    ]
    for name, change in sabotaged:
        failed = [c.name for c in check(**{**honest, **change}) if not c.ok]  # type: ignore[arg-type]
        assert failed == [name], f"sabotaging {name!r} fails exactly that check: {failed}"


@pytest.mark.parametrize(
    ("example", "says"),
    [
        ("scheduler_sync.py", "moved from team-a to team-b"),
        ("backend_asyncio.py", "['stale', 'stale', 'stale', 'stale', 'switched']"),
    ],
)
def test_the_readme_examples_run_and_run_again(url: str, example: str, says: str) -> None:
    for _ in range(2):  # a second run against the same database works too
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


def test_a_drainer_stops_cleanly_on_sigterm_and_says_so(url: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "switcher", "--database-url", url, "drain", "--poll-interval", "0.2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "drainer started" in line:
                break
        with Switcher.from_url(url) as sw:
            wait_for(lambda: sw.status().drainers, what="the drainer in the roll call")
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "drainer stopped" in err
    with Switcher.from_url(url) as sw:
        assert sw.status().drainers[0]["stopped_at"] is not None
    time.sleep(0)  # nothing to wait for: the roll call is written before exit
