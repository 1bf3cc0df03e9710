"""The realtime lane: straight to the backend, never queued behind slow work."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import json_body, read_json
from backburner.api.errors import DEFAULT_RESPONSES, invalid, responses
from backburner.api.routes_slow import metadata_webhook_id, new_generation, unknown_webhooks
from backburner.api.state import AppState, app_state
from backburner.core.clock import utcnow
from backburner.core.states import Kind, State, StateMessage
from backburner.errors import BackendError
from backburner.schemas.openai import (
    REQUESTS,
    ChatCompletion,
    Completion,
    EmbeddingList,
    ModelList,
)
from backburner.schemas.stream import fold_chunks
from backburner.schemas.validation import validate_request


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


async def _stream(
    ctx: AppState, tenant_id: str, kind: Kind, body: dict[str, Any]
) -> StreamingResponse:
    started = utcnow()
    keep = metadata_webhook_id(body) is not None  # then the folded answer is kept and announced
    chunks = ctx.engines.stream_realtime(kind, body)
    try:
        first = await anext(chunks)  # errors before the first chunk get a proper status
    except StopAsyncIteration:
        first = None
    except BackendError as exc:
        if keep:
            await _record(ctx, tenant_id, kind, body, started, None, exc.message)
        raise

    async def events() -> AsyncIterator[bytes]:
        seen: list[dict[str, Any]] = [first] if first is not None else []
        error: str | None = None
        try:
            if first is not None:
                yield _sse(first)
            async for chunk in chunks:
                if keep:
                    seen.append(chunk)
                yield _sse(chunk)
        except BackendError as exc:
            error = exc.message
            yield _sse({"error": {"message": exc.message, "type": exc.error_type}})
        finally:
            await chunks.aclose()
        yield b"data: [DONE]\n\n"
        if keep:
            folded = None if error else fold_chunks(seen, chat=kind is Kind.CHAT)
            await _record(ctx, tenant_id, kind, body, started, folded, error)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _record(
    ctx: AppState,
    tenant_id: str,
    kind: Kind,
    body: dict[str, Any],
    started: datetime,
    response: dict[str, Any] | None,
    error: str | None,
) -> None:
    await ctx.store.generations.record_realtime(
        tenant_id,
        new_generation(kind, body),
        state=State.FAILED if error is not None else State.SUCCESS,
        message=error if error is not None else StateMessage.COMPLETED,
        response=response,
        dispatched_at=started,
        expiry_seconds=ctx.settings.expiry_seconds,
    )
    ctx.wake_dispatcher()


async def _run_and_notify(
    ctx: AppState, tenant_id: str, kind: Kind, body: dict[str, Any]
) -> dict[str, Any]:
    """Run now; when ``metadata.webhook_id`` is set, keep the generation and fire
    ``generation.completed`` for it, success or failure."""
    if metadata_webhook_id(body) is None:
        return await ctx.engines.run_realtime(kind, body)
    started = utcnow()
    try:
        resp = await ctx.engines.run_realtime(kind, body)
    except BackendError as exc:
        await _record(ctx, tenant_id, kind, body, started, None, exc.message)
        raise
    await _record(ctx, tenant_id, kind, body, started, resp, None)
    return resp


async def realtime(kind: Kind, request: Request, tenant_id: str, ctx: AppState) -> Response:
    body, raw = await read_json(request, ctx.settings.max_body_bytes)
    problems = validate_request(kind, body, ctx.engines.models, slow=False)
    if not problems:
        problems = await unknown_webhooks(ctx, tenant_id, [("", body)])
    if problems:
        raise invalid(problems)
    started = time.perf_counter()
    status = "ok"
    try:
        if body.get("stream") is True:
            return await _stream(ctx, tenant_id, kind, body)
        key, replayed = await idempotency.begin(ctx, tenant_id, request, raw)
        if replayed is not None:
            return replayed
        resp = await _run_and_notify(ctx, tenant_id, kind, body)
        if key is not None:
            await ctx.store.idempotency.save(
                tenant_id, key.with_answer(resp), ctx.settings.idempotency_ttl_seconds
            )
        return JSONResponse(resp)
    except BackendError:
        status = "error"
        raise
    finally:
        ctx.metrics.realtime.labels(kind.value, status).inc()
        ctx.metrics.backend_seconds.labels(
            ctx.engines.route(str(body["model"])).backend.name, "realtime"
        ).observe(time.perf_counter() - started)


SSE_EVENTS: dict[str, Any] = {
    "text/event-stream": {
        "itemSchema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": "One chunk as JSON (chat.completion.chunk or"
                    " text_completion), an {error} if the engine fails mid-stream,"
                    " and [DONE] last",
                }
            },
        }
    }
}


def _route(kind: Kind, answer: type[BaseModel], *, streams: bool) -> dict[str, Any]:
    """What a realtime route declares: its body, its answer (and stream) and its refusals."""
    said = responses(400, 409, 413, 502)
    passes = "; an engine's own 4xx passes through with its status and body"
    said[400] = {**said[400], "description": said[400]["description"] + passes}
    if streams:
        said[200] = {"description": "The answer; with stream: true, server-sent events"}
        said[200]["content"] = SSE_EVENTS
    return {"response_model": answer, "responses": said, "openapi_extra": json_body(REQUESTS[kind])}


def realtime_router() -> APIRouter:
    r = APIRouter(
        prefix="/v1", tags=["realtime"], responses={**responses(401), **DEFAULT_RESPONSES}
    )

    @r.post(
        "/chat/completions",
        summary="Chat completion, now (streaming with stream: true)",
        **_route(Kind.CHAT, ChatCompletion, streams=True),
    )
    async def chat(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> Response:
        return await realtime(Kind.CHAT, request, tenant_id, ctx)

    @r.post(
        "/completions",
        summary="Text completion, now (streaming with stream: true)",
        **_route(Kind.COMPLETION, Completion, streams=True),
    )
    async def completions(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> Response:
        return await realtime(Kind.COMPLETION, request, tenant_id, ctx)

    @r.post(
        "/embeddings",
        summary="Embeddings, now",
        **_route(Kind.EMBEDDING, EmbeddingList, streams=False),
    )
    async def embeddings(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> Response:
        return await realtime(Kind.EMBEDDING, request, tenant_id, ctx)

    @r.get("/models", summary="Models served here", response_model=ModelList)
    async def models(
        tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "backburner"}
                for m in ctx.engines.models
            ],
        }

    return r
