"""Hardening: report ids (H1), the credential allowlist (H3), redaction (H4), strict names (H5),
retention (H7) and joined transactions (H9), against real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from switcher import (
    AsyncSwitcher,
    CredentialError,
    CredentialRefused,
    FailureKind,
    InvalidInput,
    Outcome,
    Switcher,
)
from switcher.credentials import CredentialPolicy
from switcher.drainer import Drainer
from tests.conftest import count, row_counts, wait_for

AUTH = FailureKind.AUTH


def _two(sw: Switcher, *more: str) -> None:
    for name in ("A", "B", *more):
        sw.add_subscription(name, credential_ref=f"env:SWITCHER_CRED_{name}")
    sw.add_agent("alice", subscription="A")


# -- H1: a report has an id; a retry with it returns the original answer and writes nothing ----------------


def test_a_retried_switch_returns_the_original_answer_and_switches_no_more(sw: Switcher) -> None:
    _two(sw, "C")
    first = sw.handle_failure("alice", "A", AUTH, "401", report_id="req-1")
    before = row_counts(sw)
    again = sw.handle_failure("alice", "A", AUTH, "401", report_id="req-1")
    assert first.outcome is Outcome.SWITCHED and not first.replayed
    assert again.replayed and (again.outcome, again.new_subscription, again.generation, again.restart_id) == (
        first.outcome,
        first.new_subscription,
        first.generation,
        first.restart_id,
    ), "the retry answers exactly what the lost attempt answered, not STALE"
    assert row_counts(sw) == before, "and writes nothing"
    assert sw.agent("alice").generation == 1


def test_a_retry_queued_behind_its_own_first_attempt_returns_that_attempts_answer(sw: Switcher) -> None:
    """The lost-reply retry that reaches the agent's lock while the first attempt still holds it: once
    the first commits, the retry finds the agent moved -- by this very report -- and answers as it did."""
    _two(sw, "C")
    answers: dict[str, Outcome | object] = {}

    def retry() -> None:
        try:
            answers["retry"] = sw.handle_failure("alice", "A", AUTH, "401", report_id="req-q")
        except Exception as error:  # surfaced by the assertion below
            answers["retry"] = error

    with sw.engine.connect() as first:
        first.begin()
        original = sw.handle_failure("alice", "A", AUTH, "401", report_id="req-q", connection=first)
        waiter = threading.Thread(target=retry)
        waiter.start()
        wait_for(
            lambda: count_lock_waiters(sw) >= 1, what="the retry waiting for the first attempt's row lock"
        )
        first.commit()
    waiter.join(60)
    again = answers["retry"]
    assert not isinstance(again, Exception), again
    assert original.outcome is Outcome.SWITCHED
    assert again.replayed and (again.outcome, again.new_subscription, again.generation, again.restart_id) == (  # type: ignore[union-attr]
        original.outcome,
        original.new_subscription,
        original.generation,
        original.restart_id,
    )
    assert count(sw, "switches") == 1 and count(sw, "failures") == 1


def count_lock_waiters(sw: Switcher) -> int:
    with sw.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one()
        )


@pytest.mark.parametrize("outcome", [Outcome.NO_ALTERNATIVE, Outcome.DISABLED])
def test_a_retried_report_that_did_not_switch_records_its_failure_once(
    sw: Switcher, outcome: Outcome
) -> None:
    _two(sw)
    if outcome is Outcome.DISABLED:
        sw.disable_auto_switch()
    else:
        sw.disable_subscription("B")
    first = sw.handle_failure("alice", "A", AUTH, report_id="req-2")
    sw.enable_auto_switch()
    sw.enable_subscription("B")  # now a fresh report would switch; the retry must not
    again = sw.handle_failure("alice", "A", AUTH, report_id="req-2")
    assert first.outcome is outcome and again.outcome is outcome and again.replayed
    assert count(sw, "failures") == 1, "one failure row per report, however often it is retried"
    assert sw.current_subscription("alice") == "A"


def test_a_report_id_of_another_agents_report_is_refused(sw: Switcher) -> None:
    _two(sw)
    sw.add_agent("bob", subscription="A")
    sw.handle_failure("alice", "A", AUTH, report_id="shared")
    before = row_counts(sw)
    with pytest.raises(InvalidInput, match="already used by a report of another agent"):
        sw.handle_failure("bob", "A", AUTH, report_id="shared")
    assert row_counts(sw) == before


def test_report_ids_are_generated_per_call_when_absent(sw: Switcher) -> None:
    _two(sw)
    first = sw.handle_failure("alice", "A", AUTH)
    second = sw.handle_failure("alice", "B", AUTH)
    assert first.report_id and second.report_id and first.report_id != second.report_id


def test_a_report_survives_a_lost_pooled_connection(url: str) -> None:
    with Switcher.from_url(url, pool_size=1, max_overflow=0) as sw:
        _two(sw)
        sw.handle_failure("alice", "B", AUTH)  # a report's pooled connection, open and idle now
        with Switcher.from_url(url) as admin, admin.engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND datname = current_database()"
                )
            ).scalar_one()
        assert killed >= 1
        # The pooled connection is dead; the report reconnects and goes through.
        assert sw.handle_failure("alice", "A", AUTH).outcome is Outcome.SWITCHED
    with Switcher.from_url(url) as fresh:
        assert fresh.current_subscription("alice") == "B", "and it was committed"


def test_an_executions_report_is_stale_once_the_agent_moved_even_back_again(sw: Switcher) -> None:
    _two(sw)
    with sw.execution("alice") as ex:
        assert (ex.subscription, ex.generation) == ("A", 0)
        sw.assign("alice", "B")
        sw.assign("alice", "A")  # back on A, but a later generation
        late = ex.report_failure(AUTH, "401 from a request that ran on generation 0")
    assert late.outcome is Outcome.STALE and late.generation == 2
    assert count(sw, "failures") == 0, "a stale report writes nothing"


# -- H3: the drainer reads only allowed credentials -------------------------------------------------------


def test_the_allowlist_reads_only_allowed_variables_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "team-a").write_text("file-secret\n")
    outside = tmp_path / "outside"
    outside.write_text("not for agents")
    (secrets / "escape").symlink_to(outside)
    monkeypatch.setenv("SWITCHER_CRED_TEAM_A", "env-secret")
    monkeypatch.setenv("SWITCHER_DATABASE_URL", "postgresql://u:hunter2@db/app")
    policy = CredentialPolicy(directories=(str(secrets),))

    assert policy.resolve("env:SWITCHER_CRED_TEAM_A") == "env-secret"
    assert policy.resolve(f"file:{secrets}/team-a") == "file-secret"
    for reference, says in [
        ("env:SWITCHER_DATABASE_URL", "SWITCHER_CRED_*"),
        ("env:HOME", "--credential-env-prefix"),
        ("file:/etc/shadow", "--credential-dir"),
        (f"file:{secrets}/escape", "--credential-dir"),  # a link out of the directory
        (f"file:{secrets}/../outside", "--credential-dir"),
    ]:
        with pytest.raises(CredentialRefused, match=says) as refused:
            policy.resolve(reference)
        assert "hunter2" not in str(refused.value) and "not for agents" not in str(refused.value)
    with pytest.raises(CredentialError, match="not set") as missing:
        policy.resolve("env:SWITCHER_CRED_NOT_THERE")
    assert not isinstance(missing.value, CredentialRefused), "a missing variable is retried, not refused"
    assert CredentialPolicy().directories == ("/run/secrets",) and CredentialPolicy().env_prefixes == (
        "SWITCHER_CRED_",
    ), "secure defaults"
    assert "SWITCHER_CRED_TEAM_A" in os.environ


# -- H4: secrets in failure messages are stored redacted ---------------------------------------------------


def test_failure_messages_are_stored_redacted(sw: Switcher) -> None:
    _two(sw)
    leaky = (
        "401 Unauthorized; Authorization: Bearer sk-ant-api03-AbC123xyz_secret; "
        "retry with api_key=live_123456 at postgresql://app:hunter2@db/app"
    )
    sw.handle_failure("alice", "A", AUTH, leaky)
    with sw.engine.connect() as conn:
        stored = conn.execute(text("SELECT message FROM switcher.failures")).scalar_one()
        reason = conn.execute(text("SELECT reason FROM switcher.switches")).scalar_one()
    for value in (stored, reason):
        assert "sk-ant" not in value and "live_123456" not in value and "hunter2" not in value, value
        assert "401 Unauthorized" in value and "[redacted]" in value, "the rest of the message is kept"


# -- H5: names are NFC and printable ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("ali\u202ece", "RIGHT-TO-LEFT OVERRIDE"),
        ("\u200balice", "ZERO WIDTH SPACE"),
        ("ali\x85ce", "U+0085"),
        ("ali\udcffce", "U+DCFF"),  # a lone surrogate, as json.loads or surrogateescape leave them
        ("ali\ue000ce", "U+E000"),
        ("alice\n", "U+000A"),
        (" alice", "whitespace"),
    ],
)
def test_names_must_be_printable(sw: Switcher, name: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(says)):
        sw.add_agent(name)
    assert count(sw, "agents") == 0


def test_names_are_stored_nfc(sw: Switcher) -> None:
    sw.add_agent("re\u0301my")  # e + combining acute
    assert [a.name for a in sw.agents()] == ["r\u00e9my"]
    assert sw.agent("re\u0301my").name == sw.agent("r\u00e9my").name == "r\u00e9my"


def test_a_lone_surrogate_in_a_message_is_stored_not_raised(sw: Switcher) -> None:
    _two(sw)
    sw.handle_failure("alice", "A", AUTH, "upstream said \udcff\x00 oops")
    with sw.engine.connect() as conn:
        assert conn.execute(text("SELECT message FROM switcher.failures")).scalar_one() == (
            "upstream said \ufffd\ufffd oops"
        )


# -- H7: retention ----------------------------------------------------------------------------------------


def test_prune_deletes_history_past_retention_but_never_inside_the_cooldown_window(sw: Switcher) -> None:
    _two(sw, "C")
    sw.handle_failure("alice", "A", AUTH)
    sw.update_settings(retention=timedelta(hours=1), cooldown_window=timedelta(hours=3))
    with sw.engine.begin() as conn:  # the switch happened two hours ago
        conn.execute(text("UPDATE switcher.failures SET occurred_at = now() - interval '2 hours'"))
        conn.execute(text("UPDATE switcher.switches SET switched_at = now() - interval '2 hours'"))
    assert sw.prune() == {"failures": 0, "switches": 0, "messages": 0}, "A still cools down: keep it"
    assert sw.subscription("A").cooling_until is not None
    sw.set_cooldown_window(timedelta(minutes=30))
    assert sw.prune(batch=1) == {"failures": 1, "switches": 1, "messages": 0}, "in batches, to the end"
    assert count(sw, "failures") == 0 and count(sw, "switches") == 0
    assert sw.subscription("A").cooling_until is None


def test_retention_is_bounded(sw: Switcher) -> None:
    with pytest.raises(InvalidInput, match="retention"):
        sw.update_settings(retention=timedelta(minutes=5))
    assert sw.settings().retention == timedelta(days=30)


# -- H9: connection= must be a connection inside an open transaction --------------------------------------


def test_connection_must_be_an_open_transaction(sw: Switcher) -> None:
    _two(sw)
    with pytest.raises(InvalidInput, match="got Engine"):
        sw.handle_failure("alice", "A", AUTH, connection=sw.engine)  # type: ignore[arg-type]
    with sw.engine.connect() as conn, pytest.raises(InvalidInput, match="no open transaction"):
        sw.handle_failure("alice", "A", AUTH, connection=conn)
    assert count(sw, "failures") == 0 and sw.current_subscription("alice") == "A"


def test_async_connection_must_be_an_open_async_transaction(sw: Switcher, url: str) -> None:
    _two(sw)

    async def main() -> None:
        async with AsyncSwitcher.from_url(url) as asw:
            with sw.engine.begin() as sync_conn, pytest.raises(InvalidInput, match="AsyncConnection"):
                await asw.handle_failure("alice", "A", AUTH, connection=sync_conn)
            async with asw.engine.connect() as conn:
                with pytest.raises(InvalidInput, match="no open transaction"):
                    await asw.handle_failure("alice", "A", AUTH, connection=conn)
                await conn.begin()
                result = await asw.handle_failure("alice", "A", AUTH, connection=conn)
                assert result.outcome is Outcome.SWITCHED
                await conn.commit()

    asyncio.run(main())
    assert sw.current_subscription("alice") == "B"


def test_front_doors_refuse_the_wrong_engine(sw: Switcher, url: str) -> None:
    with pytest.raises(InvalidInput, match="AsyncSwitcher needs a SQLAlchemy AsyncEngine"):
        AsyncSwitcher(sw.engine)  # type: ignore[arg-type]
    other = create_engine("sqlite://")  # any driver but psycopg 3: its queries would not even parse
    try:
        for door in (Switcher, lambda engine: Drainer(engine, {})):
            with pytest.raises(
                InvalidInput, match=r"psycopg 3 \(postgresql\+psycopg://\), got sqlite\+pysqlite"
            ):
                door(other)
    finally:
        other.dispose()
