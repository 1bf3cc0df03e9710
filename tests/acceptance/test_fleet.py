"""Acceptance: the fleet of issue #15. Two ``backburner serve --no-worker`` and three
``backburner worker`` processes on one PostgreSQL, files on S3 (``moto_server`` on loopback),
no shared disk; one worker SIGKILLed mid-drain and one started late
(tests/support/faults/fleet.py has the scenario and its promises)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _pg_base
from tests.support import pgdb
from tests.support.faults import fleet

pytestmark = pytest.mark.acceptance


@pytest.fixture
async def pg() -> AsyncIterator[str]:
    base = _pg_base()
    if base is None:
        pytest.skip("BACKBURNER_TEST_DATABASE_URL not set")
    url = await pgdb.create_database(base, "bb_fleet")
    try:
        yield url
    finally:
        await pgdb.drop_database(url)


@pytest.mark.timeout(200)
async def test_two_apis_three_workers_postgres_and_s3(pg: str, s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.create_bucket("fleet-" + uuid.uuid4().hex[:10])
    report = await fleet.fleet(
        tmp_path,
        pg,
        files_url=f"s3://{bucket}/files",
        files_endpoint_url=s3_env.endpoint_url,
    )
    print(report.summary())
    assert report.problems == [], "\n".join([report.summary(), *report.problems])
    # nothing was written to a local directory: every file is in the bucket
    assert not (tmp_path / "files").exists()
    assert len(s3_env.objects(bucket)) == 2  # the input and the output file
