"""The Group API: up to 50 requests in one body, tracked as one unit."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from backburner.api import estimates, idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import json_body, read_json
from backburner.api.errors import DEFAULT_RESPONSES, invalid, responses
from backburner.api.routes_slow import new_generation, unknown_webhooks
from backburner.api.state import AppState, app_state
from backburner.core.ids import new_id
from backburner.core.states import Kind
from backburner.schemas.generation import Group, GroupSubmitted, GroupWithGenerations
from backburner.schemas.group import GROUP_REQUESTS
from backburner.schemas.validation import Problem, validate_group
from backburner.store import IdempotencyRace


async def submit_group(kind: Kind, request: Request, tenant_id: str, ctx: AppState) -> Response:
    body, raw = await read_json(request, ctx.settings.max_body_bytes)
    key, replayed = await idempotency.begin(ctx, tenant_id, request, raw)
    if replayed is not None:
        return replayed
    problems, requests = validate_group(kind, body, ctx.engines.models)
    webhook_id = body.get("webhook_id") if isinstance(body, dict) else None
    known: dict[str, bool] = {}  # webhook id -> exists: each distinct id is looked up once
    refused = any(p.param == "webhook_id" for p in problems)  # one refused is never looked up
    if isinstance(webhook_id, str) and not refused:
        known[webhook_id] = await ctx.store.webhooks.exists(tenant_id, webhook_id)
        if not known[webhook_id]:
            problems.append(
                Problem(
                    "webhook_id",
                    f"no webhook with id '{webhook_id}'; create one with POST /v1/webhooks",
                )
            )
    if not problems:
        problems = await unknown_webhooks(
            ctx, tenant_id, [(f"requests[{i}]", r) for i, r in enumerate(requests)], known=known
        )
    if problems:
        raise invalid(problems)
    gid = new_id()
    answer = GroupSubmitted(groupId=gid, groupSize=len(requests)).model_dump()
    try:
        await ctx.store.groups.submit(
            tenant_id,
            kind,
            [new_generation(kind, r) for r in requests],
            expiry_seconds=ctx.settings.expiry_seconds,
            metadata=body.get("metadata"),
            webhook_id=webhook_id,
            group_id=gid,
            idempotency=key.with_answer(answer) if key else None,
            idempotency_ttl=ctx.settings.idempotency_ttl_seconds,
        )
    except IdempotencyRace:
        assert key is not None
        replayed = await idempotency.replay(ctx, tenant_id, key)
        assert replayed is not None
        return replayed
    ctx.metrics.submitted.labels(kind.value).inc(len(requests))
    ctx.wake_worker()
    # the same bytes JSONResponse would write (compact, UTF-8), without its json.dumps pass
    return Response(orjson.dumps(answer), media_type="application/json")


def _submit_route(kind: Kind) -> dict[str, Any]:
    """What a group submission route declares: its body, the answer and its refusals."""
    return {
        "response_model": GroupSubmitted,
        "responses": responses(400, 409, 413, 429),
        "openapi_extra": json_body(GROUP_REQUESTS[kind]),
    }


def group_router(prefix: str) -> APIRouter:
    r = APIRouter(
        prefix=prefix + "/group",
        tags=["groups"],
        responses={**responses(401), **DEFAULT_RESPONSES},
    )

    @r.post(
        "/chat/completions",
        summary="Submit 1 to 50 chat completions as one group",
        **_submit_route(Kind.CHAT),
    )
    async def group_chat(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> Response:
        return await submit_group(Kind.CHAT, request, tenant_id, ctx)

    @r.post(
        "/completions",
        summary="Submit 1 to 50 text completions as one group",
        **_submit_route(Kind.COMPLETION),
    )
    async def group_completions(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> Response:
        return await submit_group(Kind.COMPLETION, request, tenant_id, ctx)

    @r.get(
        "/{group_id}/generations",
        summary="A group with every generation, in order",
        response_model=GroupWithGenerations,
        response_model_exclude_unset=True,
        responses=responses(404),
    )
    async def group_generations(
        group_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> dict[str, Any]:
        group, gens = await ctx.store.groups.get(tenant_id, group_id, with_generations=True)
        return group.to_wire(gens, estimates.group_eta(group, await estimates.pace(ctx)))

    @r.get(
        "/{group_id}",
        summary="A group's summary",
        response_model=Group,
        response_model_exclude_unset=True,
        responses=responses(404),
    )
    async def group_summary(
        group_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> dict[str, Any]:
        group, _ = await ctx.store.groups.get(tenant_id, group_id)
        return group.to_wire(expected=estimates.group_eta(group, await estimates.pace(ctx)))

    @r.post(
        "/{group_id}/cancel",
        summary="Cancel a group's queued generations",
        response_model=Group,
        response_model_exclude_unset=True,
        responses=responses(404, 409),
    )
    async def group_cancel(
        group_id: str,
        request: Request,
        tenant_id: str = Depends(tenant),
        ctx: AppState = Depends(app_state),
    ) -> Any:
        async def run() -> Any:
            return (await ctx.store.groups.cancel(tenant_id, group_id)).to_wire()

        return await idempotency.once(ctx, tenant_id, request, b"", run)

    return r
