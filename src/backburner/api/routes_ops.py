"""Health, readiness and metrics."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backburner import __version__
from backburner.api.errors import DEFAULT_RESPONSES, declared
from backburner.api.state import AppState, app_state
from backburner.core.states import State
from backburner.errors import Unauthorized
from backburner.schemas.health import Health, Readiness

PROMETHEUS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
OPS_TOKEN: dict[int | str, dict[str, Any]] = {401: declared(401)}
"""The refusal of :func:`ops_access` when ``ops_token`` is set."""


async def ops_access(request: Request, ctx: AppState = Depends(app_state)) -> AppState:
    """With ``ops_token`` set, ``/readyz`` and ``/metrics`` need ``Authorization: Bearer <it>``
    (they show engine addresses and the whole service's volume, across tenants)."""
    token = ctx.settings.ops_token
    if token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise Unauthorized("this endpoint needs the operations token (ops_token)")
    return ctx


async def _backend_checks(ctx: AppState) -> dict[str, str]:
    """Each backend's check, at most once per ``readyz_cache_seconds``: a probe of /readyz must not
    become load on the engines. Errors are named by kind, never echoed."""
    now = ctx.now()
    cached = ctx.ops_cache.get("backends")
    if cached is not None and now - cached[0] < ctx.settings.readyz_cache_seconds:
        result: dict[str, str] = cached[1]
        return result
    checks: dict[str, str] = {}
    for name, backend in ctx.engines.backends.items():
        try:
            await backend.check()
            checks[f"backend:{name}"] = "ok"
        except Exception as exc:
            checks[f"backend:{name}"] = f"error: {type(exc).__name__}"
    ctx.ops_cache["backends"] = (now, checks)
    return checks


async def _counts(ctx: AppState) -> dict[str, int] | None:
    """Generations by state, counted at most once per ``metrics_cache_seconds`` (a count of the
    whole table on every scrape would be a cheap way to load the database)."""
    now = ctx.now()
    cached = ctx.ops_cache.get("counts")
    if cached is not None and now - cached[0] < ctx.settings.metrics_cache_seconds:
        result: dict[str, int] = cached[1]
        return result
    try:
        counts = await ctx.store.generations.count_by_state()
    except Exception:
        return None  # the store being down must not hide the process's own metrics
    ctx.ops_cache["counts"] = (now, counts)
    return counts


def ops_router() -> APIRouter:
    r = APIRouter(tags=["operations"], responses=DEFAULT_RESPONSES)

    @r.get("/healthz", summary="The process is up")
    async def healthz() -> Health:
        return Health(status="ok", version=__version__)

    @r.get(
        "/readyz",
        summary="The store and every backend are reachable",
        response_model=Readiness,
        responses={
            **OPS_TOKEN,
            503: {"model": Readiness, "description": "Not ready: what failed is named"},
        },
    )
    async def readyz(ctx: AppState = Depends(ops_access)) -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            await ctx.store.ping()
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"error: {type(exc).__name__}"
        checks.update(await _backend_checks(ctx))
        ok = all(v == "ok" for v in checks.values())
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

    @r.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={**PROMETHEUS, **OPS_TOKEN},
    )
    async def metrics(ctx: AppState = Depends(ops_access)) -> Response:
        counts = await _counts(ctx)
        if counts is not None:
            for state in State:
                ctx.metrics.generations.labels(state.value).set(counts.get(state.value, 0))
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return r
