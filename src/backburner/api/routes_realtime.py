"""The realtime lane (SPEC section 5): straight to the backend, ahead of slow work."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import read_json
from backburner.api.errors import problems_error
from backburner.api.routes_slow import new_generation
from backburner.api.state import AppState, app_state
from backburner.core.clock import utcnow
from backburner.core.states import Kind, State, StateMessage
from backburner.errors import BackendError
from backburner.schemas.validation import validate_request


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


async def _stream(st: AppState, kind: Kind, body: dict[str, Any]) -> Any:
    chunks = st.router.stream_realtime(kind, body)
    try:
        first = await anext(chunks)  # errors before the first chunk get a proper status
    except StopAsyncIteration:
        first = None

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _sse(first)
            async for chunk in chunks:
                yield _sse(chunk)
        except BackendError as exc:
            yield _sse({"error": {"message": exc.message, "type": exc.error_type}})
        finally:
            await chunks.aclose()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _run_and_notify(
    st: AppState, tenant_id: str, kind: Kind, body: dict[str, Any]
) -> dict[str, Any]:
    """Run now; when ``metadata.webhook_id`` is set, keep the generation and fire
    ``generation.completed`` for it, success or failure (SPEC section 5)."""
    md = body.get("metadata")
    hook = md.get("webhook_id") if isinstance(md, dict) else None
    if not isinstance(hook, str):
        return await st.router.run_realtime(kind, body)
    started = utcnow()
    try:
        resp = await st.router.run_realtime(kind, body)
    except BackendError as exc:
        await st.store.record_realtime(
            tenant_id,
            new_generation(kind, body),
            state=State.FAILED,
            message=exc.message,
            response=None,
            dispatched_at=started,
            expiry_seconds=st.settings.expiry_seconds,
        )
        st.wake_dispatcher()
        raise
    await st.store.record_realtime(
        tenant_id,
        new_generation(kind, body),
        state=State.SUCCESS,
        message=StateMessage.COMPLETED,
        response=resp,
        dispatched_at=started,
        expiry_seconds=st.settings.expiry_seconds,
    )
    st.wake_dispatcher()
    return resp


async def realtime(kind: Kind, request: Request, tenant_id: str, st: AppState) -> Any:
    body, raw = await read_json(request, st.settings.max_body_bytes)
    problems = validate_request(kind, body, st.router.models, slow=False)
    if problems:
        return problems_error(problems)
    started = time.perf_counter()
    status = "ok"
    try:
        if body.get("stream") is True:
            return await _stream(st, kind, body)
        key, replayed = await idempotency.begin(st, tenant_id, request, raw)
        if replayed is not None:
            return replayed
        resp = await _run_and_notify(st, tenant_id, kind, body)
        if key is not None:
            await st.store.save_idempotent(
                tenant_id, key.with_answer(resp), st.settings.idempotency_ttl_seconds
            )
        return JSONResponse(resp)
    except BackendError:
        status = "error"
        raise
    finally:
        st.metrics.realtime.labels(kind.value, status).inc()
        st.metrics.backend_seconds.labels(
            st.router.route(str(body["model"])).backend.name, "realtime"
        ).observe(time.perf_counter() - started)


def realtime_router() -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["realtime"])

    @r.post("/chat/completions", summary="Chat completion, now (streaming with stream: true)")
    async def chat(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return await realtime(Kind.CHAT, request, t, st)

    @r.post("/completions", summary="Text completion, now")
    async def completions(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return await realtime(Kind.COMPLETION, request, t, st)

    @r.post("/embeddings", summary="Embeddings, now")
    async def embeddings(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return await realtime(Kind.EMBEDDING, request, t, st)

    @r.get("/models", summary="Models served here")
    async def models(t: str = Depends(tenant), st: AppState = Depends(app_state)) -> Any:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "backburner"}
                for m in st.router.models
            ],
        }

    return r
