"""Migrations build exactly the schema that store/tables.py declares, on both databases."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import create_async_engine

from backburner.store.engine import async_url
from backburner.store.migrate import alembic_config, upgrade, upgrade_async
from backburner.store.tables import metadata


def _diff(sync_conn: sa.Connection) -> list[Any]:
    ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, metadata))


def _revision(sync_conn: sa.Connection) -> str | None:
    return MigrationContext.configure(sync_conn).get_current_revision()


async def schema_diff(url: str) -> tuple[str | None, list[Any]]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_revision), await conn.run_sync(_diff)
    finally:
        await engine.dispose()


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


async def test_sqlite_migrations_match_the_metadata(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    await upgrade_async(url)
    revision, diffs = await schema_diff(url)
    assert revision == head()
    assert diffs == []


async def test_postgres_migrations_match_the_metadata(pg_database: str) -> None:
    await upgrade_async(pg_database)  # already at head: a second upgrade is a no-op
    revision, diffs = await schema_diff(pg_database)
    assert revision == head()
    assert diffs == []


async def test_sqlite_downgrade_to_base_and_up_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/roundtrip.db"
    await upgrade_async(url)
    # env.py runs its own event loop, so alembic commands go to a thread here
    await asyncio.to_thread(command.downgrade, alembic_config(url), "base")
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
    finally:
        await engine.dispose()
    assert set(names) <= {"alembic_version"}
    await upgrade_async(url)
    assert await schema_diff(url) == (head(), [])


async def test_the_comparison_does_see_differences(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/sanity.db"
    await upgrade_async(url)
    other = sa.MetaData()
    for t in metadata.tables.values():
        t.to_metadata(other)
    sa.Table("extra", other, sa.Column("id", sa.Integer(), primary_key=True))
    other.tables["groups"].append_column(sa.Column("surprise", sa.Text()))

    def diff(sync_conn: sa.Connection) -> list[Any]:
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, other))

    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as conn:
            diffs = await conn.run_sync(diff)
    finally:
        await engine.dispose()
    kinds = sorted(d[0] for d in diffs if isinstance(d, tuple))
    assert kinds == ["add_column", "add_table"]


def test_one_head() -> None:
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, f"migrations have diverged: {heads}"


@pytest.mark.parametrize("table", sorted(metadata.tables))
def test_every_table_is_created_by_a_migration(tmp_path: Path, table: str) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    engine = sa.create_engine(url)
    try:
        assert sa.inspect(engine).has_table(table)
    finally:
        engine.dispose()
