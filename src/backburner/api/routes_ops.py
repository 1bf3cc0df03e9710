"""Health, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backburner import __version__
from backburner.api.errors import DEFAULT_RESPONSES
from backburner.api.state import AppState, app_state
from backburner.core.states import State
from backburner.schemas.health import Health, Readiness

PROMETHEUS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def ops_router() -> APIRouter:
    r = APIRouter(tags=["operations"], responses=DEFAULT_RESPONSES)

    @r.get("/healthz", summary="The process is up")
    async def healthz() -> Health:
        return Health(status="ok", version=__version__)

    @r.get(
        "/readyz",
        summary="The store and every backend are reachable",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready: what failed is named"}},
    )
    async def readyz(ctx: AppState = Depends(app_state)) -> JSONResponse:
        checks: dict[str, str] = {}
        ok = True
        try:
            await ctx.store.ping()
            checks["store"] = "ok"
        except Exception as exc:
            ok = False
            checks["store"] = f"error: {type(exc).__name__}"
        for name, backend in ctx.engines.backends.items():
            try:
                await backend.check()
                checks[f"backend:{name}"] = "ok"
            except Exception as exc:
                ok = False
                checks[f"backend:{name}"] = f"error: {getattr(exc, 'message', type(exc).__name__)}"
        scheduler: dict[str, Any] = {}
        for name, lane in ctx.engines.lanes.items():
            snap = lane.snapshot()
            load = snap.load
            scheduler[name] = {
                "background_window": snap.window,
                "background_inflight": snap.background_inflight,
                "realtime_inflight": snap.realtime_inflight,
                "held": snap.held.value,
                "regime": snap.regime,
                "probe": lane.probe.url if lane.probe is not None else "own in-flight count",
                "probe_age_seconds": snap.probe_age,
                "probe_error": snap.probe_error,
                "engine": None
                if load is None
                else {
                    "waiting": load.waiting,
                    "running": load.running,
                    "kv_usage": load.kv_usage,
                    "idle_slots": load.idle_slots,
                },
                "preempted": lane.counters.preempted,
            }
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": checks, "scheduler": scheduler},
            status_code=200 if ok else 503,
        )

    @r.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=PROMETHEUS)
    async def metrics(ctx: AppState = Depends(app_state)) -> Response:
        try:
            counts = await ctx.store.generations.count_by_state()
        except Exception:
            counts = None  # the store being down must not hide the process's own metrics
        if counts is not None:
            for state in State:
                ctx.metrics.generations.labels(state.value).set(counts.get(state.value, 0))
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return r
