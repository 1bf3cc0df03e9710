"""OpenAI's Batches API, plus retry and partial results."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from backburner.api import estimates, idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import inline_schema, json_body, read_json
from backburner.api.errors import DEFAULT_RESPONSES, invalid, responses
from backburner.api.state import AppState, app_state
from backburner.errors import InvalidRequest, NotFound
from backburner.schemas.batch import Batch, BatchCreate, BatchList, BatchRequestOutput
from backburner.schemas.validation import check, quoted
from backburner.webhooks.delivery import UrlGuard


async def create(
    request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
) -> Any:
    payload, raw_bytes = await read_json(request, ctx.settings.max_body_bytes)
    return await idempotency.once(
        ctx, tenant_id, request, raw_bytes, lambda: _create(payload, tenant_id, ctx)
    )


async def _create(payload: Any, tenant_id: str, ctx: AppState) -> dict[str, Any]:
    body, problems = check(BatchCreate, payload)
    if body is None:
        raise invalid(problems)
    try:
        f = await ctx.store.files.get(tenant_id, body.input_file_id)
    except NotFound:
        raise InvalidRequest(
            f"input_file_id {quoted(body.input_file_id)} is not a file of yours; upload one with"
            " POST /v1/files (purpose=batch)",
            param="input_file_id",
        ) from None
    if f.purpose != "batch":
        raise InvalidRequest(
            f"input file '{f.id}' has purpose '{f.purpose}'; a batch needs purpose 'batch'",
            param="input_file_id",
        )
    if body.webhook_url:
        try:
            await UrlGuard(ctx.webhook_targets).check(body.webhook_url)
        except InvalidRequest as exc:  # the guard names the field "url"; here it is webhook_url
            said = exc.message.removeprefix("url ")
            raise type(exc)(f"webhook_url {said}", param="webhook_url", code=exc.code) from exc
    batch = await ctx.store.batches.create(tenant_id, body)
    ctx.wake_batches()
    return batch.to_wire()


async def list_batches(
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    tenant_id: str = Depends(tenant),
    ctx: AppState = Depends(app_state),
) -> dict[str, Any]:
    rows = await ctx.store.batches.list(tenant_id, after=after, limit=limit + 1)
    page = rows[:limit]
    p = await estimates.pace(ctx)
    return {
        "object": "list",
        "data": [b.to_wire(estimates.batch_eta(b, p)) for b in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(rows) > limit,
    }


async def get(
    batch_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
) -> dict[str, Any]:
    b = await ctx.store.batches.get(tenant_id, batch_id)
    return b.to_wire(estimates.batch_eta(b, await estimates.pace(ctx)))


async def cancel(
    batch_id: str,
    request: Request,
    tenant_id: str = Depends(tenant),
    ctx: AppState = Depends(app_state),
) -> Any:
    async def run() -> dict[str, Any]:
        b = await ctx.store.batches.cancel(tenant_id, batch_id)
        ctx.wake_batches()
        return b.to_wire()

    return await idempotency.once(ctx, tenant_id, request, b"", run)


async def retry(
    batch_id: str,
    request: Request,
    tenant_id: str = Depends(tenant),
    ctx: AppState = Depends(app_state),
) -> Any:
    async def run() -> dict[str, Any]:
        b = await ctx.store.batches.retry(tenant_id, batch_id)
        ctx.wake_worker()
        return b.to_wire()

    return await idempotency.once(ctx, tenant_id, request, b"", run)


async def results(
    batch_id: str,
    type: Literal["output", "error"] = "output",
    tenant_id: str = Depends(tenant),
    ctx: AppState = Depends(app_state),
) -> StreamingResponse:
    b = await ctx.store.batches.get(tenant_id, batch_id)
    return StreamingResponse(
        ctx.store.batches.results(b.id, type),
        media_type="application/jsonl",
        headers={
            "X-Backburner-Partial": "false" if b.terminal else "true",
            "X-Backburner-Batch-Status": b.status,
        },
    )


def _result_lines() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "JSONL, one BatchRequestOutput a line, in input order; the headers"
            " X-Backburner-Partial and X-Backburner-Batch-Status tell whether more will come",
            "content": {
                "application/jsonl": {
                    "itemSchema": inline_schema(BatchRequestOutput.model_json_schema())
                }
            },
        }
    }


def batches_router() -> APIRouter:
    r = APIRouter(
        prefix="/v1/batches",
        tags=["batches"],
        responses={**responses(401), **DEFAULT_RESPONSES},
    )
    r.add_api_route(
        "",
        create,
        methods=["POST"],
        summary="Create a batch from an uploaded JSONL file",
        response_model=Batch,
        responses=responses(400, 409, 413, 429),
        openapi_extra=json_body(BatchCreate),
    )
    r.add_api_route(
        "",
        list_batches,
        methods=["GET"],
        summary="List batches, newest first",
        response_model=BatchList,
        responses=responses(400),
    )
    r.add_api_route(
        "/{batch_id}",
        get,
        methods=["GET"],
        summary="Retrieve a batch",
        response_model=Batch,
        responses=responses(404),
    )
    r.add_api_route(
        "/{batch_id}/cancel",
        cancel,
        methods=["POST"],
        summary="Cancel a batch: queued requests stop",
        response_model=Batch,
        responses=responses(404, 409),
    )
    r.add_api_route(
        "/{batch_id}/retry",
        retry,
        methods=["POST"],
        summary="Queue a finished batch's failed requests again",
        response_model=Batch,
        responses=responses(404, 409, 429),
    )
    r.add_api_route(
        "/{batch_id}/results",
        results,
        methods=["GET"],
        summary="Results so far (partial while the batch runs)",
        response_class=StreamingResponse,
        responses={**_result_lines(), **responses(400, 404)},
    )
    return r
