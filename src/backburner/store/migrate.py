"""Alembic, driven from code: ``upgrade(url)`` brings a database to the newest schema."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["database_url"] = url
    return cfg


def _sqlite_file(url: str) -> Path | None:
    u = sa.make_url(url)
    if not u.get_backend_name().startswith("sqlite") or u.database in (None, "", ":memory:"):
        return None
    return Path(u.database)


@contextlib.contextmanager
def _file_lock(db_file: Path) -> Iterator[None]:
    """An exclusive lock beside a SQLite file, held while it migrates (processes on one machine
    share a SQLite file: ``serve`` and ``worker`` starting together both upgrade)."""
    db_file.parent.mkdir(parents=True, exist_ok=True)
    with open(db_file.with_name(db_file.name + ".migrate-lock"), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking; call it before the event loop starts or through :func:`upgrade_async`.

    Safe when several processes start together on one database: PostgreSQL takes an advisory
    lock inside the migration's transaction (migrations/env.py), SQLite a file lock beside the
    database file; whoever comes second finds the schema current and does nothing."""
    db_file = _sqlite_file(url)
    if db_file is None:
        command.upgrade(alembic_config(url), revision)
        return
    with _file_lock(db_file):
        command.upgrade(alembic_config(url), revision)


async def upgrade_async(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade, url, revision)
