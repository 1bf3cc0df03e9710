"""The Group API: up to 50 requests in one body, tracked as one unit (SPEC section 3)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import read_json
from backburner.api.errors import problems_error
from backburner.api.routes_slow import new_generation
from backburner.api.state import AppState, app_state
from backburner.core.ids import new_id
from backburner.core.states import Kind
from backburner.schemas.validation import Problem, validate_group
from backburner.store import IdempotencyRace


async def submit_group(kind: Kind, request: Request, tenant_id: str, st: AppState) -> Any:
    body, raw = await read_json(request, st.settings.max_body_bytes)
    key, replayed = await idempotency.begin(st, tenant_id, request, raw)
    if replayed is not None:
        return replayed
    problems, requests = validate_group(kind, body, st.router.models)
    webhook_id = body.get("webhook_id") if isinstance(body, dict) else None
    if isinstance(webhook_id, str) and not await st.store.webhook_exists(tenant_id, webhook_id):
        problems.append(
            Problem(
                "webhook_id",
                f"no webhook with id '{webhook_id}'; create one with POST /v1/webhooks",
            )
        )
    if problems:
        return problems_error(problems)
    gid = new_id()
    answer = {"groupId": gid, "groupSize": len(requests)}
    try:
        await st.store.submit_group(
            tenant_id,
            kind,
            [new_generation(kind, r) for r in requests],
            expiry_seconds=st.settings.expiry_seconds,
            metadata=body.get("metadata"),
            webhook_id=webhook_id,
            group_id=gid,
            idempotency=key.with_answer(answer) if key else None,
            idempotency_ttl=st.settings.idempotency_ttl_seconds,
        )
    except IdempotencyRace:
        assert key is not None
        return await idempotency.replay(st, tenant_id, key)
    st.metrics.submitted.labels(kind.value).inc(len(requests))
    st.wake_worker()
    return JSONResponse(answer)


def group_router(prefix: str) -> APIRouter:
    r = APIRouter(prefix=prefix + "/group", tags=["groups"])

    @r.post("/chat/completions", summary="Submit 1 to 50 chat completions as one group")
    async def group_chat(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return await submit_group(Kind.CHAT, request, t, st)

    @r.post("/completions", summary="Submit 1 to 50 text completions as one group")
    async def group_completions(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return await submit_group(Kind.COMPLETION, request, t, st)

    @r.get("/{group_id}/generations", summary="A group with every generation, in order")
    async def group_generations(
        group_id: str, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        group, gens = await st.store.get_group(t, group_id, with_generations=True)
        return JSONResponse(group.to_wire(gens))

    @r.get("/{group_id}", summary="A group's summary")
    async def group_summary(
        group_id: str, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        group, _ = await st.store.get_group(t, group_id)
        return JSONResponse(group.to_wire())

    @r.post("/{group_id}/cancel", summary="Cancel a group's queued generations")
    async def group_cancel(
        group_id: str,
        request: Request,
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        async def run() -> Any:
            return (await st.store.cancel_group(t, group_id)).to_wire()

        return await idempotency.once(st, t, request, b"", run)

    return r
