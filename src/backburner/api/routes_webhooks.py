"""Webhook management: endpoints, test events, the delivery log, redelivery."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import json_body, read_json
from backburner.api.errors import DEFAULT_RESPONSES, invalid, responses
from backburner.api.state import AppState, app_state
from backburner.core.states import EventState
from backburner.schemas.events import EventName
from backburner.schemas.validation import check
from backburner.schemas.webhook import (
    DeliveryAttemptList,
    DeliveryQueued,
    Webhook,
    WebhookCreate,
    WebhookCreated,
    WebhookDeleted,
    WebhookList,
    WebhookUpdate,
)
from backburner.webhooks.delivery import UrlGuard
from backburner.webhooks.signing import new_secret


def _guard(ctx: AppState) -> UrlGuard:
    return UrlGuard(ctx.webhook_targets)


async def create(
    request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
) -> Any:
    payload, raw = await read_json(request, ctx.settings.max_body_bytes)

    async def run() -> dict[str, Any]:
        body, problems = check(WebhookCreate, payload)
        if body is None:
            raise invalid(problems)
        await _guard(ctx).check(body.url)
        rec = await ctx.store.webhooks.create(
            tenant_id,
            url=body.url,
            secret=new_secret(),
            name=body.name,
            events=body.events,
            enabled=body.enabled,
        )
        return rec.to_wire(with_secret=True)

    return await idempotency.once(ctx, tenant_id, request, raw, run)


async def list_webhooks(
    tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [w.to_wire() for w in await ctx.store.webhooks.list(tenant_id)],
    }


async def get(
    webhook_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
) -> dict[str, Any]:
    return (await ctx.store.webhooks.get(tenant_id, webhook_id)).to_wire()


async def update(
    webhook_id: str,
    request: Request,
    tenant_id: str = Depends(tenant),
    ctx: AppState = Depends(app_state),
) -> dict[str, Any]:
    payload, _ = await read_json(request, ctx.settings.max_body_bytes)
    body, problems = check(WebhookUpdate, payload)
    if body is None:
        raise invalid(problems)
    await ctx.store.webhooks.get(tenant_id, webhook_id)  # 404 before validating the URL
    changes = body.model_dump(exclude_unset=True)
    if "url" in changes:
        await _guard(ctx).check(changes["url"])
    updated = await ctx.store.webhooks.update(tenant_id, webhook_id, changes)
    if changes.get("enabled") is True:
        ctx.wake_dispatcher()  # events held while it was disabled are due now
    return updated.to_wire()


async def delete(
    webhook_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
) -> dict[str, Any]:
    await ctx.store.webhooks.delete(tenant_id, webhook_id)
    return {"id": webhook_id, "object": "webhook", "deleted": True}


async def test(
    webhook_id: str,
    request: Request,
    tenant_id: str = Depends(tenant),
    ctx: AppState = Depends(app_state),
) -> Any:
    async def run() -> dict[str, Any]:
        event_id = await ctx.store.outbox.enqueue_test(tenant_id, webhook_id)
        ctx.wake_dispatcher()
        return {
            "id": event_id,
            "object": "webhook.delivery",
            "event": EventName.WEBHOOK_TEST.value,
            "webhookId": webhook_id,
            "state": EventState.PENDING.value,
        }

    return await idempotency.once(ctx, tenant_id, request, b"", run)


async def deliveries(
    webhook_id: str,
    limit: int = 100,
    tenant_id: str = Depends(tenant),
    ctx: AppState = Depends(app_state),
) -> dict[str, Any]:
    limit = max(1, min(limit, 1000))
    attempts = await ctx.store.outbox.attempts(tenant_id, webhook_id, limit)
    return {"object": "list", "data": [a.to_wire() for a in attempts]}


async def redeliver(
    delivery_id: str,
    request: Request,
    tenant_id: str = Depends(tenant),
    ctx: AppState = Depends(app_state),
) -> Any:
    async def run() -> dict[str, Any]:
        event_id = await ctx.store.outbox.redeliver(tenant_id, delivery_id)
        ctx.wake_dispatcher()
        return {"id": event_id, "object": "webhook.delivery", "state": EventState.PENDING.value}

    return await idempotency.once(ctx, tenant_id, request, b"", run)


def webhooks_router() -> APIRouter:
    r = APIRouter(
        prefix="/v1/webhooks",
        tags=["webhooks"],
        responses={**responses(401), **DEFAULT_RESPONSES},
    )
    r.add_api_route(
        "",
        create,
        methods=["POST"],
        summary="Register a webhook; the answer holds its signing secret, once",
        response_model=WebhookCreated,
        responses=responses(400, 409, 413),
        openapi_extra=json_body(WebhookCreate),
    )
    r.add_api_route(
        "", list_webhooks, methods=["GET"], summary="List webhooks", response_model=WebhookList
    )
    r.add_api_route(
        "/{webhook_id}",
        get,
        methods=["GET"],
        summary="Retrieve a webhook",
        response_model=Webhook,
        responses=responses(404),
    )
    r.add_api_route(
        "/{webhook_id}",
        update,
        methods=["PATCH"],
        summary="Change a webhook's url, name, events or enabled",
        response_model=Webhook,
        responses=responses(400, 404, 413),
        openapi_extra=json_body(WebhookUpdate),
    )
    r.add_api_route(
        "/{webhook_id}",
        delete,
        methods=["DELETE"],
        summary="Delete a webhook",
        response_model=WebhookDeleted,
        responses=responses(404),
    )
    r.add_api_route(
        "/{webhook_id}/test",
        test,
        methods=["POST"],
        summary="Send a webhook.test event",
        response_model=DeliveryQueued,
        response_model_exclude_unset=True,
        responses=responses(404, 409),
    )
    r.add_api_route(
        "/{webhook_id}/deliveries",
        deliveries,
        methods=["GET"],
        summary="The delivery log: every attempt",
        response_model=DeliveryAttemptList,
        responses=responses(400, 404),
    )
    r.add_api_route(
        "/deliveries/{delivery_id}/redeliver",
        redeliver,
        methods=["POST"],
        summary="Deliver an event again",
        response_model=DeliveryQueued,
        response_model_exclude_unset=True,
        responses=responses(404, 409),
    )
    return r
