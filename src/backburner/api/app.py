"""The app factory: the one place (with cli.py) that builds concrete objects from settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
from fastapi import FastAPI

from backburner import __version__
from backburner.api import errors
from backburner.api.limits import BodyLimitMiddleware
from backburner.api.routes_batches import batches_router
from backburner.api.routes_files import files_router
from backburner.api.routes_group import group_router
from backburner.api.routes_ops import ops_router
from backburner.api.routes_realtime import realtime_router
from backburner.api.routes_slow import generation_router, slow_router
from backburner.api.routes_webhooks import webhooks_router
from backburner.api.state import AppState
from backburner.backends.base import Backend
from backburner.backends.registry import build_backend
from backburner.backends.router import ModelRouter
from backburner.config import Settings
from backburner.core.retry import Backoff
from backburner.metrics import LaneCollector, Metrics
from backburner.scheduler import Worker, WorkerOptions
from backburner.scheduler.batches import BatchRunner
from backburner.store import Store
from backburner.store.blobs import LocalBlobStore
from backburner.store.migrate import upgrade_async
from backburner.webhooks.delivery import Deliverer, UrlGuard
from backburner.webhooks.dispatcher import Dispatcher, DispatcherOptions

log = logging.getLogger("backburner")


def _report_crash(task: asyncio.Task[None]) -> None:
    """A background loop that dies takes its lane with it: say so loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped with an error", task.get_name(), exc_info=task.exception())


def worker_options(settings: Settings) -> WorkerOptions:
    return WorkerOptions(
        max_attempts=settings.max_attempts,
        max_lost_leases=settings.max_lost_leases,
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval_seconds,
        maintenance_interval=settings.maintenance_interval_seconds,
        backoff=Backoff(settings.retry_base_seconds, settings.retry_cap_seconds),
    )


def build_router(settings: Settings, backends: Mapping[str, Backend] | None = None) -> ModelRouter:
    given = dict(backends or {})
    built = {s.name: given.get(s.name) or build_backend(s) for s in settings.backends}
    return ModelRouter(settings.backends, built)


def build_dispatcher(
    settings: Settings, store: Store, metrics: Metrics
) -> tuple[Dispatcher, httpx.AsyncClient]:
    client = httpx.AsyncClient(
        follow_redirects=False,
        timeout=settings.webhook_timeout_seconds,
        limits=httpx.Limits(max_connections=settings.webhook_concurrency * 2),
    )
    deliverer = Deliverer(
        client,
        UrlGuard(deny_private=settings.deny_private_webhooks),
        timeout=settings.webhook_timeout_seconds,
    )
    opts = DispatcherOptions(
        max_retries=settings.webhook_max_retries,
        retry_base=settings.webhook_retry_base_seconds,
        retry_cap=settings.webhook_retry_cap_seconds,
        poll_interval=settings.webhook_poll_interval_seconds,
        concurrency=settings.webhook_concurrency,
    )
    return Dispatcher(store, deliverer, opts, metrics=metrics), client


def build_batch_runner(
    settings: Settings, store: Store, blobs: LocalBlobStore, router: ModelRouter
) -> BatchRunner:
    return BatchRunner(
        store,
        blobs,
        router.models,
        max_lines=settings.batch_max_lines,
        poll_interval=max(settings.poll_interval_seconds, 0.05) * 5,
    )


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
        metrics.registry.register(LaneCollector(router.lanes))
        blobs = LocalBlobStore(Path(settings.files_dir))
        st = AppState(settings=settings, store=store, router=router, metrics=metrics, blobs=blobs)
        tasks: list[asyncio.Task[None]] = []
        hook_client: httpx.AsyncClient | None = None
        if settings.run_worker:
            st.dispatcher, hook_client = build_dispatcher(settings, store, metrics)
            st.worker = Worker(
                store,
                router,
                worker_options(settings),
                metrics=metrics,
                after_write=st.dispatcher.wake,
            )
            tasks.append(asyncio.create_task(st.worker.run(), name="bb-worker"))
            tasks.append(asyncio.create_task(st.dispatcher.run(), name="bb-dispatcher"))
            st.batches = build_batch_runner(settings, store, blobs, router)
            tasks.append(asyncio.create_task(st.batches.run(), name="bb-batches"))
        for t in tasks:
            t.add_done_callback(_report_crash)
        app.state.bb = st
        log.info("backburner %s ready: models %s", __version__, ", ".join(router.models))
        try:
            yield
        finally:
            if st.worker is not None:
                await st.worker.stop()
            if st.dispatcher is not None:
                await st.dispatcher.stop()
            if st.batches is not None:
                await st.batches.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            if hook_client is not None:
                await hook_client.aclose()
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
    app.include_router(webhooks_router())
    app.include_router(files_router())
    app.include_router(batches_router())
    return app
