"""Webhook management (SPEC section 6): endpoints, test events, the delivery log, redelivery."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import read_json
from backburner.api.errors import problems_error
from backburner.api.state import AppState, app_state
from backburner.schemas.validation import Problem, join_path
from backburner.schemas.webhook import WebhookCreate, WebhookUpdate
from backburner.webhooks.delivery import UrlGuard
from backburner.webhooks.signing import new_secret

M = TypeVar("M", bound=BaseModel)


def _parse(body: Any, model: type[M]) -> M | JSONResponse:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            msg = "is not allowed" if e["type"] == "extra_forbidden" else e["msg"]
            if e["type"] == "missing":
                msg = "is required"
            problems.append(Problem(join_path("", tuple(e["loc"][:2])), msg))
        return problems_error(problems)


def webhooks_router() -> APIRouter:
    r = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

    def guard(st: AppState) -> UrlGuard:
        return UrlGuard(deny_private=st.settings.deny_private_webhooks)

    @r.post("", summary="Register a webhook; the answer holds its signing secret, once")
    async def create(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        payload, raw = await read_json(request, st.settings.max_body_bytes)

        async def run() -> Any:
            body = _parse(payload, WebhookCreate)
            if isinstance(body, JSONResponse):
                return body
            await guard(st).check(body.url)
            rec = await st.store.create_webhook(
                t,
                url=body.url,
                secret=new_secret(),
                name=body.name,
                events=body.events,
                enabled=body.enabled,
            )
            return JSONResponse(rec.to_wire(with_secret=True))

        return await idempotency.once(st, t, request, raw, run)

    @r.get("", summary="List webhooks")
    async def list_(t: str = Depends(tenant), st: AppState = Depends(app_state)) -> Any:
        return {"object": "list", "data": [w.to_wire() for w in await st.store.list_webhooks(t)]}

    @r.get("/{webhook_id}", summary="Retrieve a webhook")
    async def get(
        webhook_id: str, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return (await st.store.get_webhook(t, webhook_id)).to_wire()

    @r.patch("/{webhook_id}", summary="Change a webhook's url, name, events or enabled")
    async def update(
        webhook_id: str,
        request: Request,
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        payload, _ = await read_json(request, st.settings.max_body_bytes)
        body = _parse(payload, WebhookUpdate)
        if isinstance(body, JSONResponse):
            return body
        await st.store.get_webhook(t, webhook_id)  # 404 before validating the URL
        changes = body.model_dump(exclude_unset=True)
        for key in ("url", "enabled"):
            if key in changes and changes[key] is None:
                return problems_error([Problem(key, "must not be null")])
        if "url" in changes:
            await guard(st).check(changes["url"])
        return (await st.store.update_webhook(t, webhook_id, changes)).to_wire()

    @r.delete("/{webhook_id}", summary="Delete a webhook")
    async def delete(
        webhook_id: str, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        await st.store.delete_webhook(t, webhook_id)
        return {"id": webhook_id, "object": "webhook", "deleted": True}

    @r.post("/{webhook_id}/test", summary="Send a webhook.test event")
    async def test(
        webhook_id: str,
        request: Request,
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        async def run() -> Any:
            event_id = await st.store.enqueue_test_event(t, webhook_id)
            st.wake_dispatcher()
            return {
                "id": event_id,
                "object": "webhook.delivery",
                "event": "webhook.test",
                "webhookId": webhook_id,
                "state": "pending",
            }

        return await idempotency.once(st, t, request, b"", run)

    @r.get("/{webhook_id}/deliveries", summary="The delivery log: every attempt")
    async def deliveries(
        webhook_id: str,
        limit: int = 100,
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        limit = max(1, min(limit, 1000))
        attempts = await st.store.list_attempts(t, webhook_id, limit)
        return {"object": "list", "data": [a.to_wire() for a in attempts]}

    @r.post("/deliveries/{delivery_id}/redeliver", summary="Deliver an event again")
    async def redeliver(
        delivery_id: str,
        request: Request,
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        async def run() -> Any:
            event_id = await st.store.redeliver(t, delivery_id)
            st.wake_dispatcher()
            return {"id": event_id, "object": "webhook.delivery", "state": "pending"}

        return await idempotency.once(st, t, request, b"", run)

    return r
