"""The realtime lane: straight to the backend, never queued behind slow work."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.routing import Route

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import json_body, read_json
from backburner.api.errors import DEFAULT_RESPONSES, invalid, responses
from backburner.api.params import lookup_safe
from backburner.api.routes_slow import metadata_webhook_id, new_generation, unknown_webhooks
from backburner.api.state import AppState, app_state
from backburner.backends.openai import loads
from backburner.core.clock import utcnow
from backburner.core.states import Kind, State, StateMessage
from backburner.errors import BackendError, TenantDisabled, TooManyRequests
from backburner.schemas.openai import (
    REQUESTS,
    ChatCompletion,
    Completion,
    EmbeddingList,
    ModelList,
)
from backburner.schemas.stream import fold_chunks, unfold
from backburner.schemas.validation import validate_request


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _sse_response(events: AsyncIterator[bytes], **headers: str) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **headers},
    )


def _replay_stream(kind: Kind, replayed: Response) -> Response:
    """The answer saved for a streamed request's Idempotency-Key, streamed again (an error
    answer, such as 409, as it is)."""
    if replayed.status_code != 200:
        return replayed
    answer = json.loads(bytes(replayed.body))

    async def events() -> AsyncIterator[bytes]:
        for chunk in unfold(answer, chat=kind is Kind.CHAT):
            yield _sse(chunk)
        yield b"data: [DONE]\n\n"

    return _sse_response(events(), **{"Idempotent-Replayed": "true"})


async def _stream(
    ctx: AppState,
    tenant_id: str,
    kind: Kind,
    body: dict[str, Any],
    key: idempotency.IdemKey | None,
) -> StreamingResponse:
    """Stream the engine's chunks as they come. The folded answer is kept when it is to be
    announced (``metadata.webhook_id``) or replayed (an Idempotency-Key, released again when
    the stream fails or the client leaves before its end)."""
    started = utcnow()
    notify = metadata_webhook_id(body) is not None
    keep = notify or key is not None
    chunks = ctx.engines.stream_realtime_raw(kind, body)
    try:
        first = await anext(chunks)  # errors before the first chunk get a proper status
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        if key is not None:
            await idempotency.drop(ctx, tenant_id, key)
        if notify and isinstance(exc, BackendError):
            await _record(ctx, tenant_id, kind, body, started, None, exc.message)
        raise

    async def events() -> AsyncIterator[bytes]:
        seen: list[bytes] = [first] if first is not None and keep else []
        error: str | None = None
        ended = False
        used: dict[str, Any] | None = None
        try:
            try:
                if first is not None:
                    used = _usage_in(first) or used
                    yield b"data: " + first + b"\n\n"
                async for data in chunks:
                    if keep:
                        seen.append(data)
                    used = _usage_in(data) or used
                    yield b"data: " + data + b"\n\n"
            except BackendError as exc:
                error = exc.message
                yield _sse({"error": {"message": exc.message, "type": exc.error_type}})
            finally:
                await chunks.aclose()
            yield b"data: [DONE]\n\n"
            ended = True
        finally:
            folded = None
            if keep and not error and ended:
                folded = fold_chunks([loads(c) for c in seen], chat=kind is Kind.CHAT)
            if key is not None:
                if folded is None:
                    await idempotency.drop(ctx, tenant_id, key)
                else:
                    await idempotency.keep(ctx, tenant_id, key, folded)
            if notify and ended:
                await _record(ctx, tenant_id, kind, body, started, folded, error)
            await count_usage(ctx, tenant_id, body, used, failed=error is not None or not ended)

    return _sse_response(events())


async def _admit(ctx: AppState, tenant_id: str) -> None:
    """The tenant's realtime limits (:meth:`~backburner.store.tenants.Tenants.check_realtime`)."""
    tally = ctx.realtime_usage

    def pending() -> int:  # read only when the tenant has a tokens_per_day limit
        return tally.pending(tenant_id) if tally is not None else 0

    await ctx.store.tenants.check_realtime(tenant_id, pending)


def _usage_in(data: bytes) -> dict[str, Any] | None:
    """The usage a streamed chunk reports (the last chunk, when the client or the engine asked
    for it); None for the rest, read without parsing them."""
    if b'"usage":{' not in data and b'"usage": {' not in data:
        return None
    try:
        used = loads(data).get("usage")
    except ValueError:
        return None
    return used if isinstance(used, dict) else None


async def count_usage(
    ctx: AppState,
    tenant_id: str,
    body: dict[str, Any],
    usage: dict[str, Any] | None,
    *,
    failed: bool,
) -> None:
    """One realtime request in the usage table (written within a second) and the metrics."""
    if ctx.realtime_usage is None:
        return
    if ctx.realtime_usage.record(
        tenant_id, str(body["model"]), failed=failed, response={"usage": usage}
    ):
        await ctx.realtime_usage.flush()  # the tally is full: written now


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
        # a replay (Idempotency-Key) runs nothing: it is answered before the tenant's limits
        if body.get("stream") is True:
            key, replayed = await idempotency.hold(ctx, tenant_id, request, raw)
            if replayed is not None:
                return _replay_stream(kind, replayed)
            try:
                await _admit(ctx, tenant_id)
            except BaseException:
                if key is not None:
                    await idempotency.drop(ctx, tenant_id, key)
                raise
            return await _stream(ctx, tenant_id, kind, body, key)

        async def run() -> dict[str, Any]:
            await _admit(ctx, tenant_id)
            answer = await _run_and_notify(ctx, tenant_id, kind, body)
            used = answer.get("usage")
            await count_usage(
                ctx, tenant_id, body, used if isinstance(used, dict) else None, failed=False
            )
            return answer

        answer = await idempotency.once(ctx, tenant_id, request, raw, run)
        if isinstance(answer, Response):
            return answer
        # the engine's answer as it came (only the model renamed): no response-model pass
        return Response(orjson.dumps(answer), media_type="application/json")
    except BackendError:
        status = "error"
        await count_usage(ctx, tenant_id, body, None, failed=True)
        raise
    except (TooManyRequests, TenantDisabled):
        status = "refused"
        raise
    finally:
        elapsed = time.perf_counter() - started
        ctx.metrics.realtime.labels(kind.value, status).inc()
        ctx.metrics.realtime_recent.observe(time.time(), elapsed, ok=status == "ok")
        ctx.metrics.backend_seconds.labels(
            ctx.engines.route(str(body["model"])).backend.name, "realtime"
        ).observe(elapsed)


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
    said = responses(400, 409, 413, 429, 502)
    passes = "; an engine's own 4xx passes through with its status and body"
    said[400] = {**said[400], "description": said[400]["description"] + passes}
    if streams:
        said[200] = {"description": "The answer; with stream: true, server-sent events"}
        said[200]["content"] = SSE_EVENTS
    return {"response_model": answer, "responses": said, "openapi_extra": json_body(REQUESTS[kind])}


def fast_routes() -> list[Route]:
    """The realtime POSTs as plain Starlette routes, matched before the documented ones: the
    same handler without FastAPI's per-request dependency solving (the router of
    :func:`realtime_router` still declares them in the OpenAPI document). Errors raised here go
    through the app's exception handlers like any route's."""

    def endpoint(kind: Kind) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            await lookup_safe(request)
            ctx = await app_state(request)
            return await realtime(kind, request, await tenant(request, ctx), ctx)

        return handle

    return [
        Route(f"/v1/{path}", endpoint(kind), methods=["POST"], include_in_schema=False)
        for path, kind in (
            ("chat/completions", Kind.CHAT),
            ("completions", Kind.COMPLETION),
            ("embeddings", Kind.EMBEDDING),
        )
    ]


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
