"""Replicas starting together on a fresh database: every ``backburner db upgrade`` succeeds and
the schema is built once (PostgreSQL: an advisory lock; SQLite: a file lock)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tests.migration.test_migrations import head, schema_diff
from tests.support import pgdb, procs


def _upgrade_together(url: str, tmp_path: Path, n: int) -> None:
    cfg = procs.write_config(tmp_path / "bb.toml", url)
    running = [
        subprocess.Popen(
            procs.backburner_argv("db", "upgrade", "--config", str(cfg)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    for p in running:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]


@pytest.mark.timeout(150)
async def test_four_replicas_upgrade_a_fresh_postgres(tmp_path: Path) -> None:
    base = pgdb_base()
    url = await pgdb.create_database(base, prefix="bb_mig")
    try:
        await asyncio.to_thread(_upgrade_together, url, tmp_path, 4)
        revision, diff = await schema_diff(url)
        assert revision == head() and diff == []
    finally:
        await pgdb.drop_database(url)


@pytest.mark.timeout(150)
async def test_four_processes_upgrade_a_fresh_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    await asyncio.to_thread(_upgrade_together, url, tmp_path, 4)
    revision, diff = await schema_diff(url)
    assert revision == head() and diff == []


def pgdb_base() -> str:
    import os

    base = os.environ.get("BACKBURNER_TEST_DATABASE_URL")
    if not base:
        pytest.skip("BACKBURNER_TEST_DATABASE_URL not set")
    return base
