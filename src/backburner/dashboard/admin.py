"""Webhook endpoints and their delivery log; tenants and keys (admin only)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from backburner.api.errors import invalid
from backburner.dashboard.app import PREFIX, UI, back, form, page, scope_of
from backburner.dashboard.pages import owner
from backburner.dashboard.session import Viewer
from backburner.errors import InvalidRequest, NotFound
from backburner.schemas.events import EventName
from backburner.schemas.validation import check
from backburner.schemas.webhook import WebhookCreate
from backburner.webhooks.delivery import UrlGuard
from backburner.webhooks.signing import new_secret

TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


# ---------------------------------------------------------------------- webhooks
async def webhooks(request: Request, u: UI, viewer: Viewer) -> Response:
    hooks = await u.ctx.store.views.webhooks(scope_of(request, viewer))
    return u.render(
        request,
        viewer,
        "webhooks.html",
        {"hooks": hooks, "events": [e.value for e in EventName], "created": None},
    )


async def webhook_create(request: Request, u: UI, viewer: Viewer) -> Response:
    """A new endpoint, checked as ``POST /v1/webhooks`` checks it; its secret is shown once."""
    data = form(request)
    tenant = viewer.tenant
    if viewer.admin and str(data.get("tenant", "")).strip():
        tenant = str(data.get("tenant", "")).strip()
        if len(tenant) > 128 or not set(tenant) <= TENANT_CHARS:
            raise InvalidRequest("tenant: letters, digits, '-', '_' and '.'", param="tenant")
    chosen = [str(e) for e in data.getlist("events")]
    payload = {
        "url": str(data.get("url", "")).strip(),
        "name": str(data.get("name", "")).strip() or None,
        "events": chosen or None,
    }
    body, problems = check(WebhookCreate, payload)
    if body is None:
        raise invalid(problems)
    await UrlGuard(u.ctx.webhook_targets).check(body.url)
    rec = await u.ctx.store.webhooks.create(
        tenant, url=body.url, secret=new_secret(), name=body.name, events=body.events
    )
    hooks = await u.ctx.store.views.webhooks(scope_of(request, viewer))
    return u.render(
        request,
        viewer,
        "webhooks.html",
        {"hooks": hooks, "events": [e.value for e in EventName], "created": rec},
    )


async def webhook(request: Request, u: UI, viewer: Viewer) -> Response:
    wid = request.path_params["webhook_id"]
    tenant = await owner(u, viewer, "webhook", wid)
    hook = await u.ctx.store.webhooks.get(tenant, wid)
    attempts = await u.ctx.store.outbox.attempts(tenant, wid, limit=100)
    return u.render(request, viewer, "webhook.html", {"hook": hook, "attempts": attempts})


async def webhook_test(request: Request, u: UI, viewer: Viewer) -> Response:
    wid = request.path_params["webhook_id"]
    tenant = await owner(u, viewer, "webhook", wid)
    event_id = await u.ctx.store.outbox.enqueue_test(tenant, wid)
    u.ctx.wake_dispatcher()
    return back(f"{PREFIX}/webhooks/{wid}", f"Test event {event_id} queued.")


async def webhook_enable(request: Request, u: UI, viewer: Viewer) -> Response:
    wid = request.path_params["webhook_id"]
    tenant = await owner(u, viewer, "webhook", wid)
    enabled = form(request).get("enabled") == "true"
    await u.ctx.store.webhooks.update(tenant, wid, {"enabled": enabled})
    if enabled:
        u.ctx.wake_dispatcher()  # what was held while disabled is due now
    return back(f"{PREFIX}/webhooks/{wid}", "Enabled." if enabled else "Disabled.")


async def redeliver(request: Request, u: UI, viewer: Viewer) -> Response:
    """Send an event again: an attempt id from the delivery log, or an event id."""
    delivery = request.path_params["delivery_id"]
    event_id = await u.ctx.store.outbox.event_of(delivery)
    if event_id is None:
        raise NotFound(f"No webhook delivery with id '{delivery}'.")
    tenant = await owner(u, viewer, "event", event_id)
    await u.ctx.store.outbox.redeliver(tenant, event_id)
    u.ctx.wake_dispatcher()
    nxt = str(form(request).get("next", ""))
    if not nxt.startswith(PREFIX + "/") or nxt.startswith("//"):
        nxt = f"{PREFIX}/webhooks"
    return back(nxt, f"Event {event_id} queued for delivery again.")


# ---------------------------------------------------------------------- keys (admin)
async def _tenants(u: UI) -> list[dict[str, Any]]:
    """Every tenant with a key or a row of its own: key counts, weight, open work, state."""
    rows = {
        t.tenant: {"tenant": t.tenant, "keys": t.keys, "live_keys": t.live_keys}
        for t in (await u.ctx.store.views.tenants())
    }
    for t in await u.ctx.store.tenants.list(limit=1000):
        rows.setdefault(t.id, {"tenant": t.id, "keys": 0, "live_keys": 0})["info"] = t
    return [rows[k] for k in sorted(rows)]


async def keys(request: Request, u: UI, viewer: Viewer) -> Response:
    rows = await u.ctx.store.keys.list()
    tenant = request.query_params.get("tenant") or None
    if tenant:
        rows = [k for k in rows if k["tenant"] == tenant]
    return u.render(
        request,
        viewer,
        "keys.html",
        {
            "keys": list(reversed(rows)),
            "tenants": await _tenants(u),
            "tenant": tenant,
            "created": None,
        },
    )


async def tenant_enable(request: Request, u: UI, viewer: Viewer) -> Response:
    """Disable a tenant (keys refused, queued work held) or enable it again."""
    name = request.path_params["tenant"]
    enabled = form(request).get("enabled") == "true"
    await u.ctx.store.tenants.update(name, disabled=not enabled)
    u.ctx.key_cache.clear()  # its keys stop working here at once
    u.sessions.forget_all()
    return back(f"{PREFIX}/keys", f"Tenant {name} {'enabled' if enabled else 'disabled'}.")


async def key_create(request: Request, u: UI, viewer: Viewer) -> Response:
    data = form(request)
    tenant = str(data.get("tenant", "")).strip()
    name = str(data.get("name", "")).strip() or None
    if not tenant or len(tenant) > 128 or not set(tenant) <= TENANT_CHARS:
        raise InvalidRequest(
            "tenant: 1 to 128 characters from letters, digits, '-', '_' and '.'", param="tenant"
        )
    if name is not None and len(name) > 200:
        raise InvalidRequest("name: at most 200 characters", param="name")
    admin = data.get("admin") == "on"
    kid, key = await u.ctx.store.keys.create(tenant, name, admin=admin)
    rows = await u.ctx.store.keys.list()
    # the key is shown once, on this response, and never again (only its hash is stored)
    return u.render(
        request,
        viewer,
        "keys.html",
        {
            "keys": list(reversed(rows)),
            "tenants": await _tenants(u),
            "tenant": None,
            "created": {"id": kid, "key": key, "tenant": tenant, "admin": admin},
        },
    )


async def key_revoke(request: Request, u: UI, viewer: Viewer) -> Response:
    kid = request.path_params["key_id"]
    if not await u.ctx.store.keys.revoke(kid):
        raise NotFound(f"No live key with id '{kid}'.")
    # the caches of this process: the key stops working here at once (elsewhere within seconds)
    u.ctx.key_cache.clear()
    u.sessions.forget_all()
    return back(f"{PREFIX}/keys", f"Key {kid} revoked.")


def routes() -> list[BaseRoute]:
    get, post = ["GET"], ["POST"]
    return [
        Route("/webhooks", page(webhooks), methods=get),
        Route("/webhooks/create", page(webhook_create), methods=post),
        Route("/webhooks/{webhook_id}", page(webhook), methods=get),
        Route("/webhooks/{webhook_id}/test", page(webhook_test), methods=post),
        Route("/webhooks/{webhook_id}/enable", page(webhook_enable), methods=post),
        Route("/deliveries/{delivery_id}/redeliver", page(redeliver), methods=post),
        Route("/keys", page(keys, admin=True), methods=get),
        Route("/keys/create", page(key_create, admin=True), methods=post),
        Route("/keys/{key_id}/revoke", page(key_revoke, admin=True), methods=post),
        Route("/tenants/{tenant}/enable", page(tenant_enable, admin=True), methods=post),
    ]
