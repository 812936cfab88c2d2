"""Migrations are tested, not trusted: they create exactly what the head .sql files say, they round-trip,
they live beside a host application's own Alembic, and they hold against a hostile search_path."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from switcher import FailureKind, MigrationError, Switcher, database_url
from switcher.migrate import current, downgrade, function_drift, head, upgrade
from switcher.sql import head_functions

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def engine(url: str) -> Iterator[Any]:
    engine = create_engine(database_url(url), poolclass=pool.NullPool)
    yield engine
    engine.dispose()


def schema_snapshot(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Everything in schema switcher, as the catalog describes it."""
    queries = {
        "columns": """SELECT table_name, column_name, data_type, is_nullable, column_default
                      FROM information_schema.columns WHERE table_schema = 'switcher' ORDER BY 1, 2""",
        "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                          FROM pg_constraint WHERE connamespace = 'switcher'::regnamespace ORDER BY 1, 2""",
        "indexes": """SELECT tablename, indexname, indexdef FROM pg_indexes
                      WHERE schemaname = 'switcher' ORDER BY 1, 2""",
        "functions": """SELECT proname, pg_get_functiondef(oid) FROM pg_proc
                        WHERE pronamespace = 'switcher'::regnamespace ORDER BY 1""",
        "triggers": """SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger
                       WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE 'switcher.%' ORDER BY 1""",
    }
    return {name: [tuple(r) for r in conn.execute(text(query))] for name, query in queries.items()}


def head_drift(conn: Connection, definitions: dict[str, str]) -> list[str]:
    """Functions whose migrated definition differs from ``definitions`` (the head .sql blocks): each head
    block is created over the migrated one inside a transaction that is rolled back, and PostgreSQL's own
    rendering of both is compared."""
    drift = []
    for name, definition in definitions.items():
        query = text(
            "SELECT pg_get_functiondef(p.oid) FROM pg_proc p "
            "WHERE p.pronamespace = 'switcher'::regnamespace AND p.proname = :name"
        )
        migrated = conn.execute(query, {"name": name}).scalar_one_or_none()
        with conn.begin_nested() as trial:
            replace = definition.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
            conn.execute(text(replace.replace(":", r"\:")))
            shipped = conn.execute(query, {"name": name}).scalar_one()
            trial.rollback()
        if migrated != shipped:
            drift.append(name)
    return drift


def test_the_migrated_functions_are_the_head_sql_files(engine: Any) -> None:
    with engine.begin() as conn:
        assert head_drift(conn, head_functions()) == [], "every head function is migrated as written"
        assert function_drift(conn) == [], "switcher check agrees (read-only comparison)"


def test_a_head_function_edited_without_a_migration_is_caught(engine: Any) -> None:
    edited = dict(head_functions())
    edited["eligible_v2"] = edited["eligible_v2"].replace("s.enabled AND", "s.enabled OR", 1)
    assert edited != head_functions()
    with engine.begin() as conn:
        assert head_drift(conn, edited) == ["eligible_v2"]
        conn.execute(text("ALTER FUNCTION switcher.eligible_v2(bigint, interval, bigint) RESET search_path"))
        assert function_drift(conn) == ["eligible_v2"], "a function changed by hand is reported"
        conn.rollback()


def test_upgrade_downgrade_base_and_upgrade_again_round_trip(engine: Any) -> None:
    with engine.begin() as conn:
        at_head = schema_snapshot(conn)
        assert current(conn) == head() == "0004"
    with engine.begin() as conn:
        downgrade(conn, "0001")
        assert current(conn) == "0001"
        assert {r[0] for r in schema_snapshot(conn)["functions"]} == {
            "assign",
            "candidates",
            "enqueue",
            "handle_failure",
            "move_agent",
            "reserve",
        }, "0001's functions are back as 0001 made them"
    with engine.begin() as conn:
        downgrade(conn, "base")
        schema = conn.execute(text("SELECT count(*) FROM pg_namespace WHERE nspname = 'switcher'")).scalar()
        assert schema == 0, "downgrade base removes everything switcher created, its version table included"
    with engine.begin() as conn:
        upgrade(conn)
    with engine.begin() as conn:
        assert schema_snapshot(conn) == at_head, "upgrade after downgrade builds exactly the same schema"
        assert conn.execute(text("SELECT auto_switch FROM switcher.settings")).scalar() is True


@pytest.mark.parametrize(
    ("revision", "without"), [("0003", "jit = off"), ("0002", "enable_seqscan = off and jit = off")]
)
def test_0003_and_0004_change_only_the_settings_of_the_functions_a_caller_enters(
    engine: Any, revision: str, without: str
) -> None:
    entered = {"handle_failure_v2", "assign_v2", "eligible_v2", "enqueue_v2", "claim_v2"}
    entered.add("enter_execution_v2")
    with engine.begin() as conn:
        downgrade(conn, revision)
        assert set(function_drift(conn)) == entered, f"{revision}'s functions, without {without}"
    with engine.begin() as conn:
        upgrade(conn)
        assert function_drift(conn) == []


def test_a_0001_database_with_data_is_upgraded_with_its_load_counted(engine: Any, url: str) -> None:
    with engine.begin() as conn:
        downgrade(conn, "0001")
        conn.execute(
            text(
                "INSERT INTO switcher.subscriptions (name, credential_ref) "
                "VALUES ('A', 'env:A'), ('B', 'env:B');"
                "INSERT INTO switcher.agents (name, subscription_id) "
                "SELECT 'agent' || g, 1 FROM generate_series(1, 40) g;"
                "INSERT INTO switcher.failures (agent_id, subscription_id, kind, message) "
                "VALUES (1, 1, 'auth', 'before 0002')"
            )
        )
    with engine.begin() as conn:
        upgrade(conn)
    with Switcher.from_url(url) as sw:
        assert {s.name: s.assigned for s in sw.subscriptions()} == {"A": 40, "B": 0}
        assert sw.check()[5].ok, "load counters exact after the upgrade"
        assert sw.handle_failure("agent2", "A", FailureKind.AUTH).new_subscription == "B"


def test_host_applications_alembic_is_left_alone(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO public.alembic_version VALUES ('host_rev_1')"))
        conn.execute(text("CREATE TABLE public.host_table (id int)"))
    with engine.begin() as conn:
        upgrade(conn)  # already at head: a no-op that must not look outside its schema
        host = conn.execute(text("SELECT version_num FROM public.alembic_version")).scalar()
        assert host == "host_rev_1"


HOST_ENV = """
from alembic import context
from sqlalchemy import MetaData, Table, Column, Integer, create_engine, pool
import switcher.migrate

metadata = MetaData()
Table("host_table", metadata, Column("id", Integer, primary_key=True))

with create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool).begin() as conn:
    switcher.migrate.upgrade(conn)  # switcher's migrations first, in the host's transaction
    context.configure(
        connection=conn,
        target_metadata=metadata,
        include_schemas=True,
        include_object=switcher.migrate.include_object,
        include_name=switcher.migrate.include_name,
    )
    with context.begin_transaction():
        context.run_migrations()
"""

HOST_REVISION = """
from alembic import op
import sqlalchemy as sa

revision = "host1"
down_revision = None

def upgrade():
    op.create_table("host_table", sa.Column("id", sa.Integer, primary_key=True))

def downgrade():
    op.drop_table("host_table")
"""


@pytest.fixture
def host_alembic(tmp_path: Path, url: str, engine: Any) -> tuple[Path, URL]:
    """A host application's Alembic project, on a database where switcher was never installed."""
    with engine.begin() as conn:
        downgrade(conn, "base")
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(HOST_ENV)
    (tmp_path / "script.py.mako").write_text((ROOT / "db" / "script.py.mako").read_text())
    (tmp_path / "versions" / "host1.py").write_text(HOST_REVISION)
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {tmp_path}\nsqlalchemy.url = {url.replace('%', '%%')}\n")
    return ini, database_url(url)


def _alembic(ini: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_a_host_env_py_runs_switchers_migrations_and_its_own(
    host_alembic: tuple[Path, URL], engine: Any
) -> None:
    ini, _ = host_alembic
    run = _alembic(ini, "upgrade", "head")
    assert run.returncode == 0, run.stderr
    with engine.begin() as conn:
        assert current(conn) == head(), "switcher migrated from the host's env.py"
        assert conn.execute(text("SELECT version_num FROM public.alembic_version")).scalar() == "host1"
        assert conn.execute(text("SELECT count(*) FROM public.host_table")).scalar() == 0


def test_a_host_autogenerate_proposes_nothing_about_switchers_schema(host_alembic: tuple[Path, URL]) -> None:
    ini, _ = host_alembic
    assert _alembic(ini, "upgrade", "head").returncode == 0
    check = _alembic(ini, "check")
    assert check.returncode == 0, (
        f"no change proposed, switcher's tables ignored: {check.stdout}{check.stderr}"
    )


def test_the_repositorys_alembic_ini_works_too(url: str, engine: Any) -> None:
    with engine.begin() as conn:
        downgrade(conn, "base")
    env = {"SWITCHER_DATABASE_URL": url}
    base = [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini")]
    for step in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"]):
        run = subprocess.run(
            [*base, *step], capture_output=True, text=True, check=False, env=env, timeout=120
        )
        assert run.returncode == 0, run.stderr
    offline = subprocess.run(
        [*base, "upgrade", "head", "--sql"], capture_output=True, text=True, check=False, env=env, timeout=120
    )
    assert offline.returncode == 0 and "CREATE FUNCTION switcher.handle_failure_v2" in offline.stdout
    with engine.begin() as conn:
        assert current(conn) == head()


@pytest.fixture
def roles(engine: Any) -> Iterator[dict[str, URL]]:
    """Two roles without CREATE on the database: one owns a pre-created schema switcher, one owns
    nothing."""
    with engine.begin() as conn:
        downgrade(conn, "base")
        database = conn.execute(text("SELECT current_database()")).scalar()
        for role in ("switcher_owner", "switcher_nobody"):
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
            conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        conn.execute(text(f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC'))
        conn.execute(text("CREATE SCHEMA switcher AUTHORIZATION switcher_owner"))
    base = engine.url
    yield {role: base.set(username=role, password="pw") for role in ("switcher_owner", "switcher_nobody")}
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS switcher CASCADE"))
        for role in ("switcher_owner", "switcher_nobody"):
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))


def test_the_owner_of_a_precreated_schema_migrates_without_create_on_the_database(
    roles: dict[str, URL], switcher_postgres: Any
) -> None:
    if switcher_postgres.source == "embedded":
        pytest.skip("the embedded server trusts every local connection as any role (no password check)")
    with Switcher.from_url(roles["switcher_owner"]) as owner:
        assert owner.migrate() == head()
        owner.add_subscription("A", credential_ref="env:A")
    with Switcher.from_url(roles["switcher_nobody"]) as nobody, pytest.raises(MigrationError) as refused:
        nobody.migrate()
    message = str(refused.value)
    assert "\n" not in message and "switcher_nobody" in message and "owner" in message, message


def test_a_hostile_function_in_public_is_never_called(engine: Any, url: str) -> None:
    """H2: pg_catalog.array_position and cardinality are polymorphic, so an exact-typed function of the
    same name in public wins the call -- unless the calling function pins its search_path."""
    with engine.begin() as conn:
        for signature, returns in (
            ("array_position(text[], text)", "integer"),
            ("cardinality(bigint[])", "integer"),
        ):
            conn.execute(
                text(
                    f"CREATE FUNCTION public.{signature} RETURNS {returns} LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'hijacked'; END $$"
                )
            )
        conn.execute(
            text(
                "ALTER DATABASE "
                + conn.execute(text("SELECT current_database()")).scalar()
                + " SET search_path = public, pg_catalog"
            )
        )

    class Prefer:
        def rank(self, candidates: Any) -> Any:
            return sorted(candidates, key=lambda c: c.name)

    with Switcher.from_url(url, policy=Prefer()) as sw:
        sw.add_subscription("A", credential_ref="env:A")
        sw.add_subscription("B", credential_ref="env:B", max_agents=5)
        sw.add_agent("alice", subscription="A")
        sw.add_agent("bob", subscription="A")
        assert sw.handle_failure("alice", "A", FailureKind.AUTH).new_subscription == "B"
        with sw.engine.connect() as conn:
            conn.execute(
                text(
                    "ALTER FUNCTION switcher.handle_failure_v2"
                    "(text, text, text, bigint, text, text, text, boolean, text[], text, text, text) "
                    "RESET search_path"
                )
            )
            conn.commit()
        with pytest.raises(DBAPIError, match="hijacked"):  # the same call, unpinned: the test can fail
            sw.handle_failure("bob", "A", FailureKind.AUTH)
