"""Migrations are tested, not trusted: upgrade head matches the metadata; down and up round-trip."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, create_engine, inspect, pool, text

from switcher.migrate import downgrade, upgrade
from switcher.schema import SCHEMA, metadata


def _differences(conn: Connection) -> list[object]:
    context = MigrationContext.configure(
        conn,
        opts={
            "include_schemas": True,
            "include_name": lambda name, type_, _: type_ != "schema" or name == SCHEMA,
            "version_table_schema": SCHEMA,
            "compare_server_default": False,
        },
    )
    return list(compare_metadata(context, metadata))


def test_upgrade_head_matches_metadata_and_round_trips(url: str) -> None:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            assert _differences(conn) == [], "alembic upgrade head and switcher.schema agree"
        with engine.begin() as conn:
            downgrade(conn, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names(schema=SCHEMA)) == {"alembic_version"}
            assert len(_differences(conn)) >= 6, "the comparison sees missing tables"
        with engine.begin() as conn:
            upgrade(conn)
        with engine.begin() as conn:
            assert _differences(conn) == []
            assert conn.execute(text("SELECT auto_switch FROM switcher.settings")).scalar() is True
            assert conn.execute(text("SELECT version_num FROM switcher.alembic_version")).scalar() == "0001"
    finally:
        engine.dispose()


def test_host_applications_alembic_is_left_alone(url: str) -> None:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)"))
            conn.execute(text("INSERT INTO public.alembic_version VALUES ('host_rev_1')"))
            conn.execute(text("CREATE TABLE public.host_table (id int)"))
        with engine.begin() as conn:
            upgrade(conn)  # already at head: a no-op that must not look outside its schema
            assert _differences(conn) == []
            assert (
                conn.execute(text("SELECT version_num FROM public.alembic_version")).scalar() == "host_rev_1"
            )
    finally:
        engine.dispose()
