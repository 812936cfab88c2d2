"""G10: bad input raises a typed error that says what to fix, and writes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from switcher import InvalidInput, Switcher, SwitcherError, UnknownAgent, UnknownSubscription
from switcher.errors import DatabaseURLError
from tests.conftest import row_counts

TEN_MB = "x" * (10 * 1024 * 1024)

CASES: list[tuple[str, Callable[[Switcher], Any], type[SwitcherError], str]] = [
    ("unknown agent", lambda sw: sw.handle_failure("nobody", "A", "rate_limit"), UnknownAgent, "add_agent"),
    ("unknown snapshot", lambda sw: sw.handle_failure("alice", "Z", "rate_limit"), UnknownSubscription, "Z"),
    ("bad kind", lambda sw: sw.handle_failure("alice", "A", "oom"), InvalidInput, "rate_limit, auth"),
    ("kind None", lambda sw: sw.handle_failure("alice", "A", None), InvalidInput, "FailureKind"),  # type: ignore[arg-type]
    ("agent None", lambda sw: sw.handle_failure(None, "A", "auth"), InvalidInput, "required"),  # type: ignore[arg-type]
    ("empty agent", lambda sw: sw.handle_failure("  ", "A", "auth"), InvalidInput, "empty"),
    ("long agent", lambda sw: sw.handle_failure("a" * 201, "A", "auth"), InvalidInput, "limit is 200"),
    ("empty snapshot", lambda sw: sw.handle_failure("alice", "", "auth"), InvalidInput, "empty"),
    ("10 MB message", lambda sw: sw.handle_failure("alice", "A", "auth", TEN_MB), InvalidInput, "limit"),
    ("message not str", lambda sw: sw.handle_failure("alice", "A", "auth", 42), InvalidInput, "str"),  # type: ignore[arg-type]
    ("raw secret", lambda sw: sw.add_subscription("C", credential_ref="sk-ant-123"), InvalidInput, "env:"),
    ("ref None", lambda sw: sw.add_subscription("C", credential_ref=None), InvalidInput, "reference"),  # type: ignore[arg-type]
    ("name None", lambda sw: sw.add_subscription(None, credential_ref="env:C"), InvalidInput, "required"),  # type: ignore[arg-type]
    (
        "max_agents 0",
        lambda sw: sw.add_subscription("C", credential_ref="env:C", max_agents=0),
        InvalidInput,
        "at least 1",
    ),
    (
        "priority str",
        lambda sw: sw.add_subscription("C", credential_ref="env:C", priority="1"),
        InvalidInput,
        "int",
    ),  # type: ignore[arg-type]
    ("agent on unknown sub", lambda sw: sw.add_agent("bob", subscription="Z"), UnknownSubscription, "Z"),
    (
        "bad container",
        lambda sw: sw.add_agent("bob", container="no spaces/please"),
        InvalidInput,
        "container",
    ),
    ("assign unknown agent", lambda sw: sw.assign("nobody", "B"), UnknownAgent, "nobody"),
    ("assign unknown sub", lambda sw: sw.assign("alice", "Z"), UnknownSubscription, "Z"),
    ("current of unknown", lambda sw: sw.current_subscription("nobody"), UnknownAgent, "nobody"),
    ("enable unknown", lambda sw: sw.enable_subscription("Z"), UnknownSubscription, "Z"),
    ("negative cooldown", lambda sw: sw.set_cooldown_window(-1), InvalidInput, "at least 0"),
]


@pytest.mark.parametrize(("call", "error", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_typed_error_and_writes_nothing(
    sw: Switcher, call: Callable[[Switcher], Any], error: type[SwitcherError], says: str
) -> None:
    sw.add_subscription("A", credential_ref="env:TOKEN_A")
    sw.add_subscription("B", credential_ref="file:/run/secrets/b")
    sw.add_agent("alice", subscription="A", container="agent-alice")
    before = row_counts(sw)
    with pytest.raises(error, match=says):
        call(sw)
    assert row_counts(sw) == before, "G10: no row written"


def test_long_messages_are_stored_truncated(sw: Switcher) -> None:
    sw.add_subscription("A", credential_ref="env:TOKEN_A")
    sw.add_agent("alice", subscription="A")
    sw.handle_failure("alice", "A", "auth", "y" * 500_000)
    with sw.engine.connect() as conn:
        from sqlalchemy import text

        assert conn.execute(text("SELECT length(message) FROM switcher.failures")).scalar() == 2000


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", "sqlite:///x.db"])
def test_non_postgres_urls_are_refused(url: str) -> None:
    with pytest.raises(DatabaseURLError):
        Switcher.from_url(url)
