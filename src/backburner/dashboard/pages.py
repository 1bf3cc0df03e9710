"""Groups, batches, generations and file downloads. An admin acts on an object in its owner's
name (the store's calls stay scoped to a tenant); anyone else sees only their own, and another
tenant's object is a 404 exactly as in the API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from backburner.api.routes_files import file_content
from backburner.core.states import BatchStatus, GroupStatus, State
from backburner.dashboard.app import PREFIX, UI, back, page, scope_of
from backburner.dashboard.session import Viewer
from backburner.errors import NotFound
from backburner.store.views import Owned

PAGE = 25
LINES = 50


def _before(request: Request) -> tuple[datetime, str] | None:
    """The keyset cursor ``?before=<iso time>~<id>`` of a list's next page."""
    raw = request.query_params.get("before", "")
    when, _, oid = raw.partition("~")
    if not when or not oid:
        return None
    try:
        return datetime.fromisoformat(when), oid
    except ValueError:
        return None


def _start(request: Request) -> int:
    try:
        return max(0, int(request.query_params.get("start", "0")))
    except ValueError:
        return 0


async def owner(u: UI, viewer: Viewer, kind: Owned, object_id: str) -> str:
    """The tenant in whose name the viewer acts on an object; 404 when it is not theirs."""
    found = await u.ctx.store.views.owner(kind, object_id)
    if found is None or not (viewer.admin or found == viewer.tenant):
        raise NotFound(f"No {kind} with id '{object_id}'.")
    return found


def _state_filter(request: Request, allowed: list[str]) -> str | None:
    s = request.query_params.get("state") or request.query_params.get("status") or None
    return s if s in allowed else None


# ---------------------------------------------------------------------- groups
async def groups(request: Request, u: UI, viewer: Viewer) -> Response:
    status = _state_filter(request, [s.value for s in GroupStatus])
    rows = await u.ctx.store.views.groups(
        scope_of(request, viewer), status=status, before=_before(request), limit=PAGE
    )
    return u.render(
        request,
        viewer,
        "groups.html",
        {"groups": rows, "status": status, "statuses": [s.value for s in GroupStatus]},
    )


async def group(request: Request, u: UI, viewer: Viewer) -> Response:
    gid = request.path_params["group_id"]
    tenant = await owner(u, viewer, "group", gid)
    rec = await u.ctx.store.views.group(tenant, gid)
    if rec is None:
        raise NotFound(f"No group with id '{gid}'.")
    lines = await u.ctx.store.views.lines(group_id=gid, limit=LINES)
    deliveries = await u.ctx.store.views.deliveries(tenant, gid)
    return u.render(
        request, viewer, "group.html", {"g": rec, "lines": lines, "deliveries": deliveries}
    )


async def group_cancel(request: Request, u: UI, viewer: Viewer) -> Response:
    gid = request.path_params["group_id"]
    tenant = await owner(u, viewer, "group", gid)
    rec = await u.ctx.store.groups.cancel(tenant, gid)
    u.ctx.wake_dispatcher()
    return back(f"{PREFIX}/groups/{gid}", f"Group {rec.status.value}.")


# ---------------------------------------------------------------------- batches
async def batches(request: Request, u: UI, viewer: Viewer) -> Response:
    status = _state_filter(request, [s.value for s in BatchStatus])
    rows = await u.ctx.store.views.batches(
        scope_of(request, viewer), status=status, before=_before(request), limit=PAGE
    )
    return u.render(
        request,
        viewer,
        "batches.html",
        {"batches": rows, "status": status, "statuses": [s.value for s in BatchStatus]},
    )


async def _batch_context(request: Request, u: UI, viewer: Viewer) -> dict[str, Any]:
    bid = request.path_params["batch_id"]
    tenant = await owner(u, viewer, "batch", bid)
    rec = await u.ctx.store.views.batch(tenant, bid)
    if rec is None:
        raise NotFound(f"No batch with id '{bid}'.")
    return {"b": rec, "tenant": tenant}


async def batch(request: Request, u: UI, viewer: Viewer) -> Response:
    ctx = await _batch_context(request, u, viewer)
    state = _state_filter(request, [s.value for s in State])
    start = _start(request)
    lines = await u.ctx.store.views.lines(
        batch_id=ctx["b"].id, start=start, limit=LINES, state=state
    )
    deliveries = await u.ctx.store.views.deliveries(ctx["tenant"], ctx["b"].id)
    ctx.update(
        lines=lines,
        start=start,
        state=state,
        states=[s.value for s in State],
        page_size=LINES,
        deliveries=deliveries,
    )
    return u.render(request, viewer, "batch.html", ctx)


STOP_POLLING = 286  # htmx swaps this answer in and stops polling


async def batch_live(request: Request, u: UI, viewer: Viewer) -> Response:
    ctx = await _batch_context(request, u, viewer)
    status = STOP_POLLING if BatchStatus(ctx["b"].status).finished else 200
    return u.render(request, viewer, "_batch_live.html", ctx, status=status)


async def batch_cancel(request: Request, u: UI, viewer: Viewer) -> Response:
    bid = request.path_params["batch_id"]
    tenant = await owner(u, viewer, "batch", bid)
    rec = await u.ctx.store.batches.cancel(tenant, bid)
    u.ctx.wake_batches()
    return back(f"{PREFIX}/batches/{bid}", f"Batch {rec.status}.")


async def batch_retry(request: Request, u: UI, viewer: Viewer) -> Response:
    bid = request.path_params["batch_id"]
    tenant = await owner(u, viewer, "batch", bid)
    rec = await u.ctx.store.batches.retry(tenant, bid)
    u.ctx.wake_worker()
    u.ctx.wake_batches()
    return back(f"{PREFIX}/batches/{bid}", f"Failed requests queued again; batch {rec.status}.")


# ---------------------------------------------------------------------- generations
async def generation(request: Request, u: UI, viewer: Viewer) -> Response:
    gid = request.path_params["generation_id"]
    tenant = await owner(u, viewer, "generation", gid)
    rec = await u.ctx.store.generations.get(tenant, gid)
    deliveries = await u.ctx.store.views.deliveries(tenant, gid)
    return u.render(request, viewer, "generation.html", {"gen": rec, "deliveries": deliveries})


async def generation_cancel(request: Request, u: UI, viewer: Viewer) -> Response:
    gid = request.path_params["generation_id"]
    tenant = await owner(u, viewer, "generation", gid)
    rec = await u.ctx.store.generations.cancel(tenant, gid)
    u.ctx.wake_dispatcher()
    return back(f"{PREFIX}/generations/{gid}", f"Generation {rec.state.value}.")


async def file_download(request: Request, u: UI, viewer: Viewer) -> Response:
    fid = request.path_params["file_id"]
    tenant = await owner(u, viewer, "file", fid)
    return await file_content(u.ctx, tenant, fid)


def routes() -> list[BaseRoute]:
    get, post = ["GET"], ["POST"]
    return [
        Route("/groups", page(groups), methods=get),
        Route("/groups/{group_id}", page(group), methods=get),
        Route("/groups/{group_id}/cancel", page(group_cancel), methods=post),
        Route("/batches", page(batches), methods=get),
        Route("/batches/{batch_id}", page(batch), methods=get),
        Route("/batches/{batch_id}/live", page(batch_live), methods=get),
        Route("/batches/{batch_id}/cancel", page(batch_cancel), methods=post),
        Route("/batches/{batch_id}/retry", page(batch_retry), methods=post),
        Route("/generations/{generation_id}", page(generation), methods=get),
        Route("/generations/{generation_id}/cancel", page(generation_cancel), methods=post),
        Route("/files/{file_id}/content", page(file_download), methods=get),
    ]
