"""The app factory: routes, middleware and error mapping over :class:`Services`."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Mapping

from fastapi import Depends, FastAPI

from backburner import __version__
from backburner.api import errors
from backburner.api.limits import BodyLimitMiddleware
from backburner.api.params import lookup_safe
from backburner.api.routes_batches import batches_router
from backburner.api.routes_files import files_router
from backburner.api.routes_group import group_router
from backburner.api.routes_ops import ops_router
from backburner.api.routes_realtime import fast_routes, realtime_router
from backburner.api.routes_slow import generation_router, slow_router
from backburner.api.routes_tenants import tenants_router, usage_router
from backburner.api.routes_webhooks import webhooks_router
from backburner.api.state import AppState
from backburner.backends.base import Backend
from backburner.config import Settings
from backburner.services import Services
from backburner.store.migrate import upgrade_async

log = logging.getLogger("backburner")


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
        services = Services.from_settings(settings, backends=backends)
        await services.start()
        app.state.services = services
        app.state.bb = AppState(
            settings=settings,
            store=services.store,
            engines=services.engines,
            metrics=services.metrics,
            blobs=services.blobs,
            wake=services,
            webhook_targets=services.webhook_targets,
            realtime_usage=services.realtime_usage,
        )
        services.start_background()
        # what start-up built lives as long as the process: out of the collector's sight, a
        # full collection no longer walks it (stalls of 90-150 ms every few seconds under load)
        gc.freeze()
        log.info("backburner %s ready: models %s", __version__, ", ".join(services.engines.models))
        try:
            yield
        finally:
            await services.close()

    app = FastAPI(
        title="backburner",
        version=__version__,
        summary="The slow lane for LLM inference",
        lifespan=lifespan,
        dependencies=[Depends(lookup_safe)],
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
    app.include_router(tenants_router())
    app.include_router(usage_router())
    app.router.routes[0:0] = fast_routes()  # matched first; documented by realtime_router
    return app
