"""D2 hot reload first: a real drainer hands the new credential to a real, running container through its
reload hook (``switcher.reload-command`` via docker exec, ``switcher.reload-url`` via HTTP POST), and
falls back to a drain-aware recreate when the hook fails."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from switcher import FailureKind, Switcher
from switcher.drainer import Backoff, Drainer, DrainerConfig
from switcher.outbox import RESTART_AGENT
from switcher.runtime.docker import LABEL_RELOAD_COMMAND, LABEL_RELOAD_URL, DockerConfig
from tests.conftest import outbox, restart_rows, wait_for

pytestmark = pytest.mark.docker
RL = FailureKind.RATE_LIMIT
SECRETS = {f"SWITCHER_CRED_{name}": f"secret-{name.lower()}-value-{name * 3}" for name in "ABC"}
AUTO = DockerConfig(mode="auto", stop_timeout=timedelta(seconds=2))
FINISHED = ("done", "dead", "superseded")


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _setup(sw: Switcher, container: str) -> None:
    for name in "ABC":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}", priority=ord(name))
    sw.add_agent("alice", subscription="A", container=container)


def _deliver(sw: Switcher, url: str, docker: DockerConfig = AUTO) -> Any:
    """Run a real drainer (in a thread) until alice's restart messages are finished; the newest row."""
    config = DrainerConfig(
        poll_interval=timedelta(seconds=0.2),
        backoff=Backoff(timedelta(milliseconds=50), timedelta(seconds=1)),
    )
    drainer = Drainer.from_url(url, config=config, docker=docker)
    thread = threading.Thread(target=drainer.run, name="test-drainer")
    thread.start()
    try:
        return wait_for(
            lambda: (rows := restart_rows(sw)) and all(r.status in FINISHED for r in rows) and rows[-1],
            timeout=90,
            what="the restart message finished",
        )
    finally:
        drainer.stop()
        thread.join(60)
        drainer.close()
        assert not thread.is_alive(), "the drainer stopped"
        gc.collect()  # a socket left open would warn now, inside this test (warnings are errors)


def _redeliver(sw: Switcher) -> None:
    """Make the finished restart message pending again, as if its drainer died before recording it."""
    with sw.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE switcher.outbox SET status = 'pending', attempts = 0, result = NULL, "
                "available_at = now(), leased_until = NULL WHERE kind = 'restart_agent'"
            )
        )


def _read(container: Any, path: str) -> str:
    result = container.exec_run(["cat", path])
    assert result.exit_code == 0, f"{path} exists in the container: {result.output!r}"
    return str(result.output.decode())


def _env(container: Any) -> dict[str, str]:
    output = container.exec_run("env").output.decode()
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def _agent_id(sw: Switcher) -> int:
    with sw.engine.connect() as conn:
        return int(conn.execute(text("SELECT id FROM switcher.agents WHERE name = 'alice'")).scalar_one())


def _execs(docker_client: Any, container: Any, since: int) -> list[dict[str, Any]]:
    """The execs Docker ran in ``container`` since ``since`` (Unix time), as the Docker API inspects them."""
    events = docker_client.events(
        since=since, until=int(time.time()) + 1, decode=True, filters={"container": container.id}
    )
    ids = [e["Actor"]["Attributes"]["execID"] for e in events if e["Action"].startswith("exec_create")]
    return [docker_client.api.exec_inspect(i) for i in ids]


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Endpoint:
    """A local HTTP server that records every POST and answers ``status``."""

    url: str
    status: int = 200
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@contextlib.contextmanager
def http_endpoint(status: int = 200) -> Iterator[Endpoint]:
    lock = threading.Lock()
    endpoint = Endpoint(url="", status=status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                endpoint.posts.append((dict(self.headers.items()), body))
            self.send_response(endpoint.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/reload"
    thread = threading.Thread(target=server.serve_forever, name="test-reload-endpoint", daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_reload_command_gets_the_credential_on_stdin_without_a_restart(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    hook = "env > /tmp/env; cat > /tmp/credential"
    container = agent_container(
        "agent-alice", environment={"KEEP": "me"}, labels={LABEL_RELOAD_COMMAND: hook}
    )
    container.reload()
    before = container.attrs
    _setup(sw, container.name)
    since = int(time.time()) - 1
    result = sw.handle_failure("alice", "A", RL, "429")
    assert result.switched and result.new_subscription == "B"

    row = _deliver(sw, url)

    assert (row.status, row.result) == ("done", "reloaded"), f"D2: a container with a hook is reloaded: {row}"
    after = docker_client.containers.get(container.name)
    assert after.id == container.id, "D2: a hot reload keeps the container"
    assert after.attrs["State"]["Running"], "D2: the agent kept running"
    assert after.attrs["State"]["StartedAt"] == before["State"]["StartedAt"], (
        "D2: the agent was not restarted"
    )
    assert after.attrs["Config"]["Env"] == before["Config"]["Env"], (
        "D2: the container's environment is unchanged"
    )
    assert after.attrs["Config"]["Labels"] == before["Config"]["Labels"], (
        "D2: the container's labels unchanged"
    )

    # The execs run in the container so far (before this test runs its own), as Docker recorded them.
    execs = _execs(docker_client, after, since)
    reloads = [e for e in execs if hook in e["ProcessConfig"].get("arguments", [])]
    assert len(execs) == len(reloads) == 1, f"D2: the reload command ran once, through docker exec: {execs}"
    assert reloads[0]["ExitCode"] == 0 and reloads[0]["OpenStdin"], "D2: it ran with stdin, and succeeded"
    secret = SECRETS["SWITCHER_CRED_B"]
    assert secret not in json.dumps(reloads[0]), "D2/G9: the credential is not in the exec's argv"

    assert _read(after, "/tmp/credential") == secret, "D2: the hook got the new credential on its stdin"
    exec_env = dict(line.split("=", 1) for line in _read(after, "/tmp/env").splitlines() if "=" in line)
    assert exec_env.get("SWITCHER_SUBSCRIPTION") == "B", (
        f"D2: the hook's env names the subscription: {exec_env}"
    )
    assert exec_env.get("SWITCHER_GENERATION") == "1", f"D2: the hook's env has the generation: {exec_env}"
    assert exec_env.get("KEEP") == "me"
    assert all(secret not in value for value in exec_env.values()), "D2/G9: the credential is not in its env"
    assert secret not in "".join(_env(after).values()), "G9: nor in the container's environment"
    with outbox(sw) as box:
        applied = box.delivery(_agent_id(sw)).applied_generation
    assert applied == 1, "D2: the generation a reload applied is recorded in the database"
    assert secret not in str(row.last_error) + str(row.result), "G9: the secret is never recorded"


def test_a_redelivered_reload_of_an_applied_generation_does_nothing(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    hook = "echo ran >> /tmp/runs; cat > /tmp/credential"
    container = agent_container("agent-alice", labels={LABEL_RELOAD_COMMAND: hook})
    _setup(sw, container.name)
    sw.handle_failure("alice", "A", RL, "429")
    row = _deliver(sw, url)
    assert row.result == "reloaded"
    assert _read(container, "/tmp/runs").splitlines() == ["ran"]

    _redeliver(sw)
    row = _deliver(sw, url)

    assert (row.status, row.result) == ("done", "already_applied"), (
        f"D2: a redelivery of a reloaded generation is recognised as applied: {row}"
    )
    assert _read(container, "/tmp/runs").splitlines() == ["ran"], "D2: the reload command did not run twice"
    assert _read(container, "/tmp/credential") == SECRETS["SWITCHER_CRED_B"], (
        "the credential file is unchanged"
    )
    assert docker_client.containers.get(container.name).id == container.id, "and the container is untouched"


def test_a_failing_reload_command_falls_back_to_a_recreate(
    sw: Switcher,
    url: str,
    docker_client: Any,
    agent_container: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    container = agent_container("agent-alice", labels={LABEL_RELOAD_COMMAND: "exit 3"})
    _setup(sw, container.name)
    caplog.set_level(logging.WARNING, logger="switcher")
    failures = _sample("switcher_reload_failures_total", hook="command")
    sw.handle_failure("alice", "A", RL, "429")

    row = _deliver(sw, url)

    assert (row.status, row.result, row.attempts) == ("done", "recreated", 1), (
        f"D2: a failed reload (exit 3) falls back to a recreate in the same attempt: {row}"
    )
    new = docker_client.containers.get(container.name)
    assert new.id != container.id and new.status == "running", "D2: the fallback recreated the container"
    assert _env(new)["SWITCHER_CREDENTIAL"] == SECRETS["SWITCHER_CRED_B"], "the new credential is in its env"
    assert new.labels["switcher.generation"] == "1" and new.labels["switcher.subscription"] == "B"
    assert _sample("switcher_reload_failures_total", hook="command") == failures + 1, "the failure is counted"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("hot reload failed" in m and "exited with 3" in m for m in said), (
        f"and logged, with why: {said}"
    )
    assert not any(SECRETS["SWITCHER_CRED_B"] in m for m in said), "G9: the secret is never logged"


def test_a_reload_url_receives_one_post_and_the_container_stays(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    with http_endpoint(200) as endpoint:
        container = agent_container("agent-alice", labels={LABEL_RELOAD_URL: endpoint.url})
        container.reload()
        started = container.attrs["State"]["StartedAt"]
        _setup(sw, container.name)
        sw.handle_failure("alice", "A", RL, "429")

        row = _deliver(sw, url)

        assert (row.status, row.result) == ("done", "reloaded"), f"D2: a 2xx answer applies the reload: {row}"
        assert len(endpoint.posts) == 1, f"D2: the reload URL got exactly one POST: {endpoint.posts}"
        headers, body = endpoint.posts[0]
        assert headers.get("Content-Type") == "application/json"
        assert json.loads(body) == {
            "agent": "alice",
            "subscription": "B",
            "generation": 1,
            "credential": SECRETS["SWITCHER_CRED_B"],
        }, "D2: the POST carries {agent, subscription, generation, credential}"
    after = docker_client.containers.get(container.name)
    assert after.id == container.id and after.attrs["State"]["StartedAt"] == started, (
        "D2: a hot reload over HTTP neither recreates nor restarts the container"
    )


def test_a_reload_url_answering_500_falls_back_to_a_recreate(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    with http_endpoint(500) as endpoint:
        container = agent_container("agent-alice", labels={LABEL_RELOAD_URL: endpoint.url})
        _setup(sw, container.name)
        sw.handle_failure("alice", "A", RL, "429")
        failures = _sample("switcher_reload_failures_total", hook="url")

        row = _deliver(sw, url)

        assert len(endpoint.posts) == 1, "the reload was tried once"
    assert (row.status, row.result) == ("done", "recreated"), f"D2: a 500 falls back to a recreate: {row}"
    new = docker_client.containers.get(container.name)
    assert new.id != container.id and new.status == "running", "D2: the fallback recreated the container"
    assert _env(new)["SWITCHER_CREDENTIAL"] == SECRETS["SWITCHER_CRED_B"], "the new credential is in its env"
    assert _sample("switcher_reload_failures_total", hook="url") == failures + 1, "the failure is counted"


def test_reload_mode_without_a_hook_goes_dead_with_a_clear_error(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    container = agent_container("agent-alice")
    _setup(sw, container.name)
    sw.handle_failure("alice", "A", RL, "429")

    row = _deliver(sw, url, DockerConfig(mode="reload", stop_timeout=timedelta(seconds=2)))

    assert (row.status, row.attempts) == ("dead", 1), f"D2: mode reload without a hook is dead at once: {row}"
    assert "restart mode is reload" in row.last_error and LABEL_RELOAD_COMMAND in row.last_error, (
        f"the error says what is missing: {row.last_error}"
    )
    assert container.name in row.last_error, f"and which container lacks it: {row.last_error}"
    after = docker_client.containers.get(container.name)
    assert after.id == container.id and after.status == "running", "mode reload never recreates"


@pytest.mark.parametrize(
    ("labels", "paused", "said"),
    [
        ({LABEL_RELOAD_COMMAND: '["cat", > /tmp/credential'}, False, "not valid JSON"),
        ({LABEL_RELOAD_COMMAND: "cat > /tmp/credential"}, True, "is paused"),
    ],
    ids=["invalid-json-label", "exec-refused-paused"],
)
def test_a_reload_hook_that_cannot_run_falls_back_to_a_recreate(
    sw: Switcher,
    url: str,
    docker_client: Any,
    agent_container: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    labels: dict[str, str],
    paused: bool,
    said: str,
) -> None:
    """D2: a reload command label that does not parse, or an exec Docker refuses (409: the container is
    paused), is a failed reload like any other: it falls back to the recreate in the same attempt."""
    container = agent_container("agent-alice", labels=labels)
    if paused:
        container.pause()
    _setup(sw, container.name)
    caplog.set_level(logging.WARNING, logger="switcher")
    sw.handle_failure("alice", "A", RL, "429")

    row = _deliver(sw, url)

    assert (row.status, row.result, row.attempts) == ("done", "recreated", 1), row
    new = docker_client.containers.get(container.name)
    assert new.id != container.id and new.status == "running", "D2: the fallback recreated the container"
    assert _env(new)["SWITCHER_CREDENTIAL"] == SECRETS["SWITCHER_CRED_B"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("hot reload failed" in m and said in m for m in warnings), warnings


def test_a_reload_of_generation_0_is_recorded_as_applied(
    sw: Switcher, url: str, docker_client: Any, agent_container: Callable[..., Any]
) -> None:
    """Generation 0 applied is a generation applied: a redelivery of it does not reload again."""
    hook = "echo ran >> /tmp/runs; cat > /tmp/credential"
    container = agent_container("agent-alice", labels={LABEL_RELOAD_COMMAND: hook})
    _setup(sw, container.name)
    with outbox(sw) as box:  # a delivery of the agent's assignment before any switch (generation 0)
        box.enqueue(RESTART_AGENT, "alice", {}, generation=0)
    row = _deliver(sw, url)
    assert row.result == "reloaded"
    with outbox(sw) as box:
        assert box.delivery(_agent_id(sw)).applied_generation == 0

    _redeliver(sw)
    row = _deliver(sw, url)

    assert (row.status, row.result) == ("done", "already_applied"), row
    assert _read(container, "/tmp/runs").splitlines() == ["ran"], "the reload command ran once"
