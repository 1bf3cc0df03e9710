"""Single slow requests and generation retrieval (SPEC section 2)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import read_json
from backburner.api.errors import problems_error
from backburner.api.state import AppState, app_state
from backburner.core.ids import new_id
from backburner.core.states import Kind
from backburner.schemas.generation import NewGeneration
from backburner.schemas.validation import validate_request
from backburner.store import IdempotencyRace


def new_generation(kind: Kind, body: dict[str, Any]) -> NewGeneration:
    md = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    assert isinstance(md, dict)
    custom = md.get("custom_id")
    hook = md.get("webhook_id")
    return NewGeneration(
        kind=kind,
        model=str(body["model"]),
        request=body,
        custom_id=str(custom) if custom is not None else None,
        webhook_id=hook if isinstance(hook, str) else None,
    )


async def submit(kind: Kind, request: Request, tenant_id: str, st: AppState) -> Any:
    body, raw = await read_json(request, st.settings.max_body_bytes)
    key, replayed = await idempotency.begin(st, tenant_id, request, raw)
    if replayed is not None:
        return replayed
    problems = validate_request(kind, body, st.router.models)
    if problems:
        return problems_error(problems)
    gid = new_id()
    answer = {"id": gid, "object": "generation", "state": "Queued"}
    try:
        await st.store.submit(
            tenant_id,
            new_generation(kind, body),
            expiry_seconds=st.settings.expiry_seconds,
            generation_id=gid,
            idempotency=key.with_answer(answer) if key else None,
            idempotency_ttl=st.settings.idempotency_ttl_seconds,
        )
    except IdempotencyRace:
        assert key is not None
        return await idempotency.replay(st, tenant_id, key)
    st.metrics.submitted.labels(kind.value).inc()
    st.wake_worker()
    return JSONResponse(answer)


def slow_router(prefix: str) -> APIRouter:
    r = APIRouter(prefix=prefix, tags=["slow"])

    @r.post("/chat/completions", summary="Submit one slow chat completion")
    async def slow_chat(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return await submit(Kind.CHAT, request, t, st)

    @r.post("/completions", summary="Submit one slow text completion")
    async def slow_completion(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return await submit(Kind.COMPLETION, request, t, st)

    @r.post("/embeddings", summary="Submit one slow embeddings request")
    async def slow_embeddings(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return await submit(Kind.EMBEDDING, request, t, st)

    return r


def generation_router() -> APIRouter:
    r = APIRouter(prefix="/v1/generation", tags=["generations"])

    @r.get("/{generation_id}", summary="Retrieve a generation")
    async def get_generation(
        generation_id: str, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return JSONResponse((await st.store.get_generation(t, generation_id)).to_wire())

    @r.post("/{generation_id}/cancel", summary="Cancel a queued generation")
    async def cancel_generation(
        generation_id: str,
        request: Request,
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        async def run() -> Any:
            return (await st.store.cancel_generation(t, generation_id)).to_wire()

        return await idempotency.once(st, t, request, b"", run)

    return r
