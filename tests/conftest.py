"""Shared fixtures: real stores on SQLite and PostgreSQL, a fake engine, an in-process app."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from backburner.config import BackendSettings, Settings
from backburner.store import Store
from backburner.store.migrate import upgrade
from backburner.store.tables import metadata
from tests.support.fake_backend import FakeBackend
from tests.support.pgdb import create_database, drop_database

PG_ENV = "BACKBURNER_TEST_DATABASE_URL"
FAKE_MODEL = "fake-model"


def _pg_base() -> str | None:
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} must be set under CI: the PostgreSQL tests must run")
        return None
    return url


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    base = _pg_base()
    if base is None:
        pytest.skip(f"{PG_ENV} not set")
    test_url = asyncio.run(create_database(base))
    upgrade(test_url)
    yield test_url
    asyncio.run(drop_database(test_url))


async def _truncate(store: Store) -> None:
    async with store.engine.begin() as conn:
        names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
        await conn.execute(sa.text(f"TRUNCATE {names}"))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One migrated SQLite file per session; each test gets a copy (migrations run once)."""
    path = tmp_path_factory.mktemp("template") / "bb.db"
    upgrade(f"sqlite:///{path}")
    return path


def _fresh_sqlite(template: Any, tmp_path: Any) -> str:
    dest = tmp_path / "bb.db"
    shutil.copyfile(template, dest)
    return f"sqlite:///{dest}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any, sqlite_template: Any) -> str:
    """Parametrises a test over both databases."""
    if request.param == "sqlite":
        return _fresh_sqlite(sqlite_template, tmp_path)
    pg: str = request.getfixturevalue("pg_database")
    return pg


@pytest.fixture
def sqlite_url(tmp_path: Any, sqlite_template: Any) -> str:
    return _fresh_sqlite(sqlite_template, tmp_path)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = Store(db_url)
    if not s.sqlite:
        await _truncate(s)
    yield s
    await s.close()


@pytest.fixture
async def sqlite_store(sqlite_url: str) -> AsyncIterator[Store]:
    s = Store(sqlite_url)
    yield s
    await s.close()


def make_settings(db_url: str, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "database_url": db_url,
        "backends": [
            BackendSettings(
                name="fake",
                type="openai",
                base_url="http://fake.invalid/v1",
                models=[FAKE_MODEL],
                max_concurrency=4,
            )
        ],
        "retry_base_seconds": 0.0,
        "poll_interval_seconds": 0.02,
        "maintenance_interval_seconds": 0.5,
        "lease_seconds": 5.0,
        # the in-process clients address the app by these names (open mode checks Host)
        "allowed_hosts": ["testserver", "t"],
    }
    defaults.update(overrides)
    return Settings(**defaults)


@pytest.fixture
def fake_backend() -> FakeBackend:
    return FakeBackend("fake")


class AppHarness:
    """An app running in-process (lifespan included) and an httpx client for it."""

    def __init__(self, app: Any, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    @property
    def state(self) -> Any:
        return self.app.state.bb

    async def wait_terminal(self, generation_id: str, timeout: float = 20.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                r = await self.client.get(f"/v1/generation/{generation_id}")
                body: dict[str, Any] = r.json()
                if body.get("state") in ("Success", "Failed"):
                    return body
                await asyncio.sleep(0.02)


@pytest.fixture
async def harness_factory(fake_backend: FakeBackend, sqlite_url: str) -> AsyncIterator[Any]:
    """Call with settings overrides; yields a running AppHarness. Defaults: SQLite, fake engine."""
    from backburner.api.app import create_app
    from backburner.dashboard import mount

    stack: list[Any] = []

    async def factory(
        db: str | None = None, backend: FakeBackend | None = None, **overrides: Any
    ) -> AppHarness:
        settings = make_settings(db or sqlite_url, **overrides)
        app = create_app(settings, backends={"fake": backend or fake_backend}, migrate=False)
        if settings.dashboard:
            mount(app)
        ctx = app.router.lifespan_context(app)
        await ctx.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        stack.append((ctx, client))
        return AppHarness(app, client)

    yield factory
    for ctx, client in reversed(stack):
        await client.aclose()
        await ctx.__aexit__(None, None, None)


@pytest.fixture
async def harness(harness_factory: Any) -> AppHarness:
    h: AppHarness = await harness_factory()
    return h


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``moto_server`` on loopback for the whole session (tests/support/s3.py)."""
    from tests.support.s3 import running_s3

    with running_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: Any) -> Any:
    """The AWS variables the S3 client reads, for moto; returns the server."""
    from tests.support.s3 import ENV

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    return s3_server
