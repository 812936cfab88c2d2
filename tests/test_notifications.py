"""D5 one notification per switch: a real drainer POSTs each switch to a real local webhook, once, with
``Idempotency-Key: switch-<id>``; retries then dead-letters a failing endpoint; enqueues nothing without a
webhook; refuses a webhook reference outside its credential allowlist. No Docker needed: the restart
handler's runtime here finds no container."""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import text

from switcher import FailureKind, Outcome, Switcher
from switcher.drainer import Backoff, Drainer, DrainerConfig
from switcher.outbox import NOTIFY_SWITCH
from switcher.runtime import Delivery
from tests.conftest import outbox_rows, wait_for
from tests.procs import Report, report_async, report_sync, run_together

RL = FailureKind.RATE_LIMIT
WEBHOOK = "env:SWITCHER_CRED_WEBHOOK"
WAIT = 60.0


# -- a webhook endpoint and a drainer ----------------------------------------------------------------------


@dataclass
class Endpoint:
    """A local HTTP server that records every POST (headers, JSON body) and answers ``status``."""

    url: str = ""
    status: int = 200
    posts: list[tuple[dict[str, str], Any]] = field(default_factory=list)


@contextlib.contextmanager
def webhook_endpoint(status: int = 200) -> Iterator[Endpoint]:
    lock = threading.Lock()
    endpoint = Endpoint(status=status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                endpoint.posts.append((dict(self.headers.items()), json.loads(body)))
            self.send_response(endpoint.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/switches?token=webhook-token-xyz"
    thread = threading.Thread(target=server.serve_forever, name="test-webhook", daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class NoContainers:
    """A runtime for agents that run nowhere: every restart finds no container."""

    def apply(self, delivery: Delivery) -> str:
        return "no_container"


@contextlib.contextmanager
def drainer(url: str, max_attempts: int = 10) -> Iterator[Drainer]:
    """A real Drainer with the standard handlers (notify_switch POSTs for real), in a thread."""
    config = DrainerConfig(
        poll_interval=timedelta(seconds=0.2),
        backoff=Backoff(timedelta(milliseconds=50), timedelta(milliseconds=200)),
        max_attempts=max_attempts,
    )
    drainer = Drainer.from_url(url, config=config, runtime=NoContainers())
    thread = threading.Thread(target=drainer.run, name="test-drainer")
    thread.start()
    try:
        assert drainer.listening.wait(WAIT), "the drainer listens"
        yield drainer
    finally:
        drainer.stop()
        thread.join(WAIT)
        drainer.close()
        assert not thread.is_alive(), "the drainer stopped"


def notify_rows(sw: Switcher) -> list[Any]:
    return [r for r in outbox_rows(sw) if r.kind == NOTIFY_SWITCH]


def switch_rows(sw: Switcher) -> list[Any]:
    with sw.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT s.id, a.name AS agent, f.name AS from_, t.name AS to_, s.kind, s.generation, "
                    "s.switched_at FROM switcher.switches s JOIN switcher.agents a ON a.id = s.agent_id "
                    "LEFT JOIN switcher.subscriptions f ON f.id = s.from_subscription_id "
                    "LEFT JOIN switcher.subscriptions t ON t.id = s.to_subscription_id ORDER BY s.id"
                )
            )
        )


def _setup(sw: Switcher) -> None:
    for name in "ABCD":
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}", priority=ord(name))
    for agent in ("alice", "bob"):
        sw.add_agent(agent, subscription="A")
    sw.add_agent("carol", subscription="B")


def report_either(barrier: Any, url: str, reports: Sequence[Report], door: str) -> list[Any]:
    """A process reporting through the sync or the async door (a ``run_together`` target)."""
    if door == "sync":
        return report_sync(barrier, url, reports)
    return report_async(barrier, url, reports)


# -- the tests ---------------------------------------------------------------------------------------------


def test_one_post_per_switch_with_its_idempotency_key_however_many_reports(
    sw: Switcher, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _setup(sw)
    sw.update_settings(webhook=WEBHOOK)
    with webhook_endpoint() as endpoint:
        monkeypatch.setenv("SWITCHER_CRED_WEBHOOK", endpoint.url)
        with drainer(url):
            burst: list[Report] = [("alice", "A", RL.value)] * 3
            outcomes = run_together(
                report_either, [(url, burst, "sync"), (url, burst, "sync"), (url, burst, "async")] * 2
            )
            counted = Counter(outcome for outcome, _ in outcomes)
            assert counted == {Outcome.SWITCHED.value: 1, Outcome.STALE.value: 17}, (
                f"G1: a burst of 18 reports of one failure switches once: {counted}"
            )
            first = sw.current_subscription("alice")
            others = [
                sw.handle_failure("alice", first, RL, "429"),
                sw.handle_failure("bob", "A", FailureKind.AUTH, "401"),
                sw.assign("carol", "D"),
            ]
            assert all(r.switched for r in others), f"a few other switches: {others}"
            switches = switch_rows(sw)
            assert len(switches) == 4
            wait_for(
                lambda: (rows := notify_rows(sw)) and all(r.status == "done" for r in rows),
                timeout=WAIT,
                what="every notification delivered",
            )
        rows = notify_rows(sw)
        posts = list(endpoint.posts)

    assert len(rows) == len(switches), f"D5: one notify_switch message per switch, never per report: {rows}"
    assert all(r.result == "notified" and r.attempts == 1 for r in rows)
    keys = Counter(headers.get("Idempotency-Key") for headers, _ in posts)
    assert keys == Counter(f"switch-{s.id}" for s in switches), (
        f"D5: exactly one POST per switch row, keyed Idempotency-Key: switch-<id>: {keys}"
    )
    bodies = {body["switch_id"]: body for _, body in posts}
    for s in switches:
        body = bodies[s.id]
        assert set(body) == {"switch_id", "agent", "from", "to", "kind", "generation", "switched_at"}, body
        assert (body["agent"], body["from"], body["to"], body["kind"], body["generation"]) == (
            s.agent,
            s.from_,
            s.to_,
            s.kind,
            s.generation,
        ), f"D5: the body describes switch {s.id}: {body}"
        assert datetime.fromisoformat(body["switched_at"]) == s.switched_at, "D5: switched_at is the switch's"
    moves = [(b["agent"], b["from"], b["to"]) for b in sorted(bodies.values(), key=lambda b: b["switch_id"])]
    assert moves == [("alice", "A", first)] + [
        (r.agent, r.old_subscription, r.new_subscription) for r in others
    ]
    assert all(headers.get("Content-Type") == "application/json" for headers, _ in posts)


def test_a_failing_webhook_is_retried_then_dead(
    sw: Switcher, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _setup(sw)
    sw.update_settings(webhook=WEBHOOK)
    with webhook_endpoint(status=500) as endpoint:
        monkeypatch.setenv("SWITCHER_CRED_WEBHOOK", endpoint.url)
        with drainer(url, max_attempts=3):
            switch = sw.handle_failure("alice", "A", RL, "429")
            [row] = wait_for(
                lambda: (rows := notify_rows(sw)) and rows[0].status == "dead" and rows,
                timeout=WAIT,
                what="the notification dead-lettered",
            )
        posts = list(endpoint.posts)
    assert row.attempts == 3, f"D5: retried up to max_attempts (3), then dead: {row}"
    assert "500" in (row.last_error or ""), f"the error says what the webhook answered: {row.last_error}"
    assert "webhook-token-xyz" not in (row.last_error or ""), "the webhook URL (a secret) is never recorded"
    assert len(posts) == 3, f"D5: one POST per attempt: {len(posts)}"
    body = posts[0][1]
    assert all(b == body for _, b in posts), "D5: every retry POSTs the same notification"
    assert body["agent"] == "alice" and body["generation"] == switch.generation
    assert {h.get("Idempotency-Key") for h, _ in posts} == {f"switch-{body['switch_id']}"}, (
        "D5: every retry carries the same Idempotency-Key"
    )


def test_a_malformed_webhook_url_goes_dead_at_once_without_quoting_its_token(
    sw: Switcher, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL the HTTP client refuses (a stray blank in a secret file, say): Python's error would quote its
    path, where chat webhooks keep their token; the stored error and the logs must not."""
    _setup(sw)
    sw.update_settings(webhook=WEBHOOK)
    monkeypatch.setenv("SWITCHER_CRED_WEBHOOK", "http://127.0.0.1:9/hook/webhook-token-xyz oops")
    with drainer(url, max_attempts=5):
        sw.handle_failure("alice", "A", RL, "429")
        [row] = wait_for(
            lambda: (rows := notify_rows(sw)) and rows[0].status == "dead" and rows,
            timeout=WAIT,
            what="the notification dead",
        )
    assert row.attempts == 1, f"a URL that can never work is dead at once: {row}"
    assert "not valid" in (row.last_error or "") and "webhook-token-xyz" not in (row.last_error or ""), row


def test_without_a_webhook_no_notification_is_enqueued(sw: Switcher) -> None:
    _setup(sw)
    assert sw.settings().webhook is None
    sw.handle_failure("alice", "A", RL, "429")
    sw.assign("bob", "C")
    assert notify_rows(sw) == [], "D5: no webhook set, no notify_switch message"

    sw.update_settings(webhook=WEBHOOK)
    sw.handle_failure("carol", "B", RL, "429")
    assert len(notify_rows(sw)) == 1, "with a webhook, a switch enqueues its notification"
    sw.update_settings(webhook="")  # removed again
    assert sw.handle_failure("alice", sw.current_subscription("alice"), RL, "429").switched
    assert len(notify_rows(sw)) == 1, "D5: once the webhook is removed, switches enqueue none"
    assert len(switch_rows(sw)) == 4


@pytest.mark.parametrize("reference", ["env:HOME", "env:OUTSIDE_WEBHOOK_URL"])
def test_a_webhook_reference_outside_the_allowlist_goes_dead_at_once(
    sw: Switcher, url: str, monkeypatch: pytest.MonkeyPatch, reference: str
) -> None:
    _setup(sw)
    sw.update_settings(webhook=reference)
    with webhook_endpoint() as endpoint:
        # Were the allowlist not enforced, this one would reach the endpoint.
        monkeypatch.setenv("OUTSIDE_WEBHOOK_URL", endpoint.url)
        with drainer(url, max_attempts=5):
            sw.handle_failure("alice", "A", RL, "429")
            [row] = wait_for(
                lambda: (rows := notify_rows(sw)) and rows[0].status == "dead" and rows,
                timeout=WAIT,
                what="the notification dead",
            )
        posts = list(endpoint.posts)
    assert row.attempts == 1, f"H3/D5: a refused reference is dead at once, not retried: {row}"
    error = row.last_error or ""
    assert reference in error and "SWITCHER_CRED_*" in error and "--credential-env-prefix" in error, (
        f"H3: the error names the reference and the rule it breaks: {error}"
    )
    assert endpoint.url not in error and "webhook-token-xyz" not in error, "H3: nothing was read or recorded"
    assert posts == [], "H3: nothing is POSTed"
