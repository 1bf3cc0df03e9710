"""Single slow requests and generation retrieval."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import json_body, read_json
from backburner.api.errors import DEFAULT_RESPONSES, invalid, responses
from backburner.api.state import AppState, app_state
from backburner.core.ids import new_id
from backburner.core.states import Kind
from backburner.schemas.generation import Generation, NewGeneration
from backburner.schemas.openai import SLOW_REQUESTS, GenerationSubmitted
from backburner.schemas.validation import Problem, validate_request
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


def metadata_webhook_id(body: Any) -> str | None:
    md = body.get("metadata") if isinstance(body, dict) else None
    hook = md.get("webhook_id") if isinstance(md, dict) else None
    return hook if isinstance(hook, str) else None


async def unknown_webhooks(
    ctx: AppState,
    tenant_id: str,
    bodies: list[tuple[str, Any]],
    *,
    known: dict[str, bool] | None = None,
) -> list[Problem]:
    """A problem for each ``metadata.webhook_id`` (under its path prefix) that names no webhook of
    this tenant: accepted, it would announce nothing. Each distinct id is looked up once;
    ``known`` (id -> exists) holds what the caller already looked up, and gets what this
    looks up."""
    seen = {} if known is None else known
    problems = []
    for prefix, body in bodies:
        hook = metadata_webhook_id(body)
        if hook is None:
            continue
        exists = seen.get(hook)
        if exists is None:
            exists = seen[hook] = await ctx.store.webhooks.exists(tenant_id, hook)
        if not exists:
            path = f"{prefix}.metadata.webhook_id" if prefix else "metadata.webhook_id"
            problems.append(
                Problem(path, f"no webhook with id '{hook}'; create one with POST /v1/webhooks")
            )
    return problems


async def submit(kind: Kind, request: Request, tenant_id: str, ctx: AppState) -> JSONResponse:
    body, raw = await read_json(request, ctx.settings.max_body_bytes)
    key, replayed = await idempotency.begin(ctx, tenant_id, request, raw)
    if replayed is not None:
        return replayed
    problems = validate_request(kind, body, ctx.engines.models)
    if not problems:
        problems = await unknown_webhooks(ctx, tenant_id, [("", body)])
    if problems:
        raise invalid(problems)
    gid = new_id()
    answer = GenerationSubmitted(id=gid).model_dump()
    try:
        await ctx.store.generations.submit(
            tenant_id,
            new_generation(kind, body),
            expiry_seconds=ctx.settings.expiry_seconds,
            generation_id=gid,
            idempotency=key.with_answer(answer) if key else None,
            idempotency_ttl=ctx.settings.idempotency_ttl_seconds,
        )
    except IdempotencyRace:
        assert key is not None
        replayed = await idempotency.replay(ctx, tenant_id, key)
        assert replayed is not None
        return replayed
    ctx.metrics.submitted.labels(kind.value).inc()
    ctx.wake_worker()
    return JSONResponse(answer)


def _submit_route(kind: Kind) -> dict[str, Any]:
    """What a submission route declares: the body of its kind, the answer and its refusals."""
    return {
        "response_model": GenerationSubmitted,
        "responses": responses(400, 409, 413, 429),
        "openapi_extra": json_body(SLOW_REQUESTS[kind]),
    }


def slow_router(prefix: str) -> APIRouter:
    r = APIRouter(prefix=prefix, tags=["slow"], responses={**responses(401), **DEFAULT_RESPONSES})

    @r.post(
        "/chat/completions",
        summary="Submit one slow chat completion",
        **_submit_route(Kind.CHAT),
    )
    async def slow_chat(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> JSONResponse:
        return await submit(Kind.CHAT, request, tenant_id, ctx)

    @r.post(
        "/completions",
        summary="Submit one slow text completion",
        **_submit_route(Kind.COMPLETION),
    )
    async def slow_completion(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> JSONResponse:
        return await submit(Kind.COMPLETION, request, tenant_id, ctx)

    @r.post(
        "/embeddings",
        summary="Submit one slow embeddings request",
        **_submit_route(Kind.EMBEDDING),
    )
    async def slow_embeddings(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> JSONResponse:
        return await submit(Kind.EMBEDDING, request, tenant_id, ctx)

    return r


def generation_router() -> APIRouter:
    r = APIRouter(
        prefix="/v1/generation",
        tags=["generations"],
        responses={**responses(401, 404), **DEFAULT_RESPONSES},
    )

    @r.get(
        "/{generation_id}",
        summary="Retrieve a generation",
        response_model=Generation,
        response_model_exclude_unset=True,
    )
    async def get_generation(
        generation_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> dict[str, Any]:
        return (await ctx.store.generations.get(tenant_id, generation_id)).to_wire()

    @r.post(
        "/{generation_id}/cancel",
        summary="Cancel a queued generation (it becomes Failed, 'Cancelled')",
        response_model=Generation,
        response_model_exclude_unset=True,
        responses=responses(409),
    )
    async def cancel_generation(
        generation_id: str,
        request: Request,
        tenant_id: str = Depends(tenant),
        ctx: AppState = Depends(app_state),
    ) -> Any:
        async def run() -> Any:
            return (await ctx.store.generations.cancel(tenant_id, generation_id)).to_wire()

        return await idempotency.once(ctx, tenant_id, request, b"", run)

    return r
