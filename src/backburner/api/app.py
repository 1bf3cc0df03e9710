"""The app factory: the one place (with cli.py) that builds concrete objects from settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

from fastapi import FastAPI

from backburner import __version__
from backburner.api import errors
from backburner.api.limits import BodyLimitMiddleware
from backburner.api.routes_group import group_router
from backburner.api.routes_ops import ops_router
from backburner.api.routes_realtime import realtime_router
from backburner.api.routes_slow import generation_router, slow_router
from backburner.api.state import AppState
from backburner.backends.base import Backend
from backburner.backends.registry import build_backend
from backburner.backends.router import ModelRouter
from backburner.config import Settings
from backburner.core.retry import Backoff
from backburner.metrics import Metrics
from backburner.scheduler import Worker, WorkerOptions
from backburner.store import Store
from backburner.store.migrate import upgrade_async

log = logging.getLogger("backburner")


def worker_options(settings: Settings) -> WorkerOptions:
    return WorkerOptions(
        max_attempts=settings.max_attempts,
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval_seconds,
        maintenance_interval=settings.maintenance_interval_seconds,
        backoff=Backoff(settings.retry_base_seconds, settings.retry_cap_seconds),
    )


def build_router(settings: Settings, backends: Mapping[str, Backend] | None = None) -> ModelRouter:
    given = dict(backends or {})
    built = {s.name: given.get(s.name) or build_backend(s) for s in settings.backends}
    return ModelRouter(settings.backends, built)


def create_app(
    settings: Settings,
    *,
    backends: Mapping[str, Backend] | None = None,
    migrate: bool = True,
) -> FastAPI:
    """Build the app. ``backends`` replaces configured backends by name (tests inject fakes)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            await upgrade_async(settings.database_url)
        store = Store(settings.database_url)
        router = build_router(settings, backends)
        await router.start()
        metrics = Metrics()
        st = AppState(settings=settings, store=store, router=router, metrics=metrics)
        task: asyncio.Task[None] | None = None
        if settings.run_worker:
            st.worker = Worker(store, router, worker_options(settings), metrics=metrics)
            task = asyncio.create_task(st.worker.run(), name="bb-worker")
        app.state.bb = st
        log.info("backburner %s ready: models %s", __version__, ", ".join(router.models))
        try:
            yield
        finally:
            if st.worker is not None and task is not None:
                await st.worker.stop()
                await task
            await router.close()
            await store.close()

    app = FastAPI(
        title="backburner",
        version=__version__,
        summary="The slow lane for LLM inference",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    errors.install(app)
    app.include_router(ops_router())
    app.include_router(realtime_router())
    for prefix in ("/v1/slow", "/v1/async"):
        app.include_router(group_router(prefix))
        app.include_router(slow_router(prefix))
    app.include_router(generation_router())
    return app
