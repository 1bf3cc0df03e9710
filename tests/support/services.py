"""The composition root on a real database with a scripted engine, for tests that drive the
worker, the batch runner and the dispatcher in burst mode (no HTTP, no sleeps)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from backburner.backends.base import Backend
from backburner.config import BackendSettings, Settings
from backburner.services import Services

MODEL = "fake-model"


def burst_settings(database_url: str, files_dir: Path, **overrides: Any) -> Settings:
    """One ``fake`` backend serving :data:`MODEL`; retries at once; fast polls."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "files_dir": str(files_dir),
        "backends": [
            BackendSettings(
                name="fake",
                type="openai",
                base_url="http://fake.invalid/v1",
                models=[MODEL],
                max_concurrency=4,
            )
        ],
        "retry_base_seconds": 0.0,
        "retry_cap_seconds": 0.0,
        "poll_interval_seconds": 0.01,
        "max_attempts": 3,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def burst_services(
    database_url: str, files_dir: Path, engine: Backend | Mapping[str, Backend], **overrides: Any
) -> AsyncIterator[Services]:
    """Started :class:`Services` with the background loops built but not running: call
    ``services.worker.run(burst=True)`` (or ``services.run_burst()``) to drain."""
    settings = burst_settings(database_url, files_dir, **overrides)
    backends = dict(engine) if isinstance(engine, Mapping) else {"fake": engine}
    built = Services.from_settings(settings, backends=backends, run_worker=True)
    await built.start()
    try:
        yield built
    finally:
        await built.close()
