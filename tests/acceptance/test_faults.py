"""Acceptance: the fault suite of issue #10, small enough for every CI run, on SQLite and
PostgreSQL. Each test runs one scenario of ``tests/support/faults/`` (real
``backburner serve`` / ``worker`` processes, a loopback upstream, compressed leases and retry
schedules) and passes when the scenario found no broken promise; ``bench/faults.py`` runs the
same scenarios full size for docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import _pg_base
from tests.support.faults import flaky, kill, poison, postgres, private_pg, webhooks
from tests.support.faults.common import STORES, Report, database

pytestmark = pytest.mark.acceptance


@dataclass(frozen=True)
class Db:
    store: str  # "sqlite" or "postgres"
    url: str


@pytest.fixture(params=STORES)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    """An empty database for one scenario: a SQLite file, or a fresh PostgreSQL database."""
    store: str = request.param
    base = _pg_base() if store == "postgres" else None
    if store == "postgres" and base is None:
        pytest.skip("BACKBURNER_TEST_DATABASE_URL not set")
    async with database(tmp_path, store, base) as url:
        yield Db(store, url)


def passed(report: Report) -> None:
    print(report.summary())  # shown with -s, and with the failure otherwise
    assert report.problems == [], "\n".join([report.summary(), *report.problems])


@pytest.mark.timeout(150)
async def test_kill_9_the_worker_five_times_mid_drain(db: Db, tmp_path: Path) -> None:
    report = await kill.kill_worker_drain(tmp_path, db.url, db.store, n=1000, kills=5, within=100)
    passed(report)


@pytest.mark.timeout(120)
async def test_an_upstream_failing_30_percent(db: Db, tmp_path: Path) -> None:
    report = await flaky.flaky_upstream(tmp_path, db.url, db.store, n=300, within=90)
    passed(report)


@pytest.mark.timeout(120)
async def test_a_webhook_receiver_down_10_seconds(db: Db, tmp_path: Path) -> None:
    report = await webhooks.webhook_outage(
        tmp_path,
        db.url,
        db.store,
        n=200,
        down_seconds=10.0,
        schedule=[0.5, 1.0, *[2.0] * 18],  # ~38 s of retries: the outage is well inside
        within=60.0,
    )
    passed(report)


@pytest.mark.timeout(150)
@pytest.mark.skipif(bool(private_pg.unavailable()), reason=private_pg.unavailable() or "")
async def test_postgres_stopped_and_started_mid_drain(tmp_path: Path) -> None:
    with private_pg.private_postgres() as cluster:
        report = await postgres.postgres_restart(
            tmp_path, cluster, n=600, down_seconds=3.0, within=100
        )
    passed(report)


@pytest.mark.timeout(120)
async def test_poison_lines_and_answers_in_a_normal_drain(db: Db, tmp_path: Path) -> None:
    report = await poison.poison_mix(tmp_path, db.url, db.store, n=200)
    passed(report)
