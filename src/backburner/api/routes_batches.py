"""OpenAI's Batches API (SPEC section 4), plus retry and partial results."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import read_json
from backburner.api.errors import problems_error
from backburner.api.state import AppState, app_state
from backburner.errors import InvalidRequest, NotFound
from backburner.schemas.batch import BatchCreate
from backburner.schemas.validation import Problem, join_path
from backburner.webhooks.delivery import UrlGuard


def batches_router() -> APIRouter:
    r = APIRouter(prefix="/v1/batches", tags=["batches"])

    @r.post("", summary="Create a batch from an uploaded JSONL file")
    async def create(
        request: Request, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        payload, raw_bytes = await read_json(request, st.settings.max_body_bytes)
        return await idempotency.once(st, t, request, raw_bytes, lambda: _create(payload, t, st))

    async def _create(raw: Any, t: str, st: AppState) -> Any:
        try:
            body = BatchCreate.model_validate(raw)
        except ValidationError as exc:
            problems = []
            for e in exc.errors(include_url=False):
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "missing":
                    msg = "is required"
                elif e["type"] == "extra_forbidden":
                    msg = "is not a batch field"
                problems.append(Problem(join_path("", tuple(e["loc"][:1])), msg))
            return problems_error(problems)
        try:
            f = await st.store.get_file(t, body.input_file_id)
        except NotFound:
            raise InvalidRequest(
                f"input_file_id '{body.input_file_id}' is not a file of yours; upload one with"
                " POST /v1/files (purpose=batch)",
                param="input_file_id",
            ) from None
        if f.purpose != "batch":
            raise InvalidRequest(
                f"input file '{f.id}' has purpose '{f.purpose}'; a batch needs purpose 'batch'",
                param="input_file_id",
            )
        if body.webhook_url:
            await UrlGuard(deny_private=st.settings.deny_private_webhooks).check(body.webhook_url)
        batch = await st.store.create_batch(t, body)
        st.wake_batches()
        return JSONResponse(batch.to_wire())

    @r.get("", summary="List batches, newest first")
    async def list_(
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        rows = await st.store.list_batches(t, after=after, limit=limit + 1)
        page = rows[:limit]
        return {
            "object": "list",
            "data": [b.to_wire() for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(rows) > limit,
        }

    @r.get("/{batch_id}", summary="Retrieve a batch")
    async def get(
        batch_id: str, t: str = Depends(tenant), st: AppState = Depends(app_state)
    ) -> Any:
        return (await st.store.get_batch(t, batch_id)).to_wire()

    @r.post("/{batch_id}/cancel", summary="Cancel a batch: queued requests stop")
    async def cancel(
        batch_id: str,
        request: Request,
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        async def run() -> Any:
            b = await st.store.cancel_batch(t, batch_id)
            st.wake_batches()
            return b.to_wire()

        return await idempotency.once(st, t, request, b"", run)

    @r.post("/{batch_id}/retry", summary="Queue a finished batch's failed requests again")
    async def retry(
        batch_id: str,
        request: Request,
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        async def run() -> Any:
            b = await st.store.retry_batch(t, batch_id)
            st.wake_worker()
            return b.to_wire()

        return await idempotency.once(st, t, request, b"", run)

    @r.get("/{batch_id}/results", summary="Results so far (partial while the batch runs)")
    async def results(
        batch_id: str,
        type: Literal["output", "error"] = "output",
        t: str = Depends(tenant),
        st: AppState = Depends(app_state),
    ) -> Any:
        b = await st.store.get_batch(t, batch_id)
        return StreamingResponse(
            st.store.stream_batch_results(b.id, type),
            media_type="application/jsonl",
            headers={
                "X-Backburner-Partial": "false" if b.terminal else "true",
                "X-Backburner-Batch-Status": b.status,
            },
        )

    return r
