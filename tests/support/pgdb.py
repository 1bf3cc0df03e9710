"""Throwaway PostgreSQL databases for tests and benchmarks (created and dropped with asyncpg)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import sqlalchemy as sa


async def _admin(base_url: str, sql: str) -> None:
    import asyncpg

    url = sa.make_url(base_url)
    conn = await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=url.database or "postgres",
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(base_url: str, prefix: str = "bb_test") -> str:
    """A new empty database on ``base_url``'s server; returns its URL."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    await _admin(base_url, f'CREATE DATABASE "{name}"')
    return sa.make_url(base_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(url: str) -> None:
    """Drop the database ``url`` names (connecting to its server's ``postgres`` database)."""
    u = sa.make_url(url)
    admin = u.set(database="postgres").render_as_string(hide_password=False)
    await _admin(admin, f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def fresh_database(base_url: str, prefix: str = "bb_bench") -> AsyncIterator[str]:
    """A new database for the duration of the block, dropped afterwards."""
    url = await create_database(base_url, prefix)
    try:
        yield url
    finally:
        await drop_database(url)
