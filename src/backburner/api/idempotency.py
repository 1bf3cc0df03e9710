"""``Idempotency-Key``: the same key and body within the TTL replays the first answer; the same
key with another body is 409. For submissions the key is stored in the same transaction as the
work it creates, so a retry after a crash never submits twice. Other POSTs (:func:`once`) reserve
the key before they run, so two requests with one key never both run: the second is answered 409
"in progress" until the first has answered, then gets its answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from backburner.api.bodies import body_hash
from backburner.api.state import AppState
from backburner.core.outcome import Idempotency
from backburner.errors import Conflict, InvalidRequest
from backburner.store.idempotency import IN_PROGRESS

HEADER = "idempotency-key"
IN_PROGRESS_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class IdemKey:
    key: str
    request_hash: str

    def with_answer(self, response: dict[str, Any], status_code: int = 200) -> Idempotency:
        return Idempotency(self.key, self.request_hash, status_code, response)


async def replay(ctx: AppState, tenant: str, key: IdemKey) -> JSONResponse | None:
    """The answer saved for ``key``, or None. While another request holds the key, wait a
    little for its answer (a client that retried quickly gets the first answer), then say it is
    still running (409)."""
    deadline = ctx.now() + IN_PROGRESS_WAIT_SECONDS
    while True:
        found = await ctx.store.idempotency.answer(
            tenant, key.key, ctx.settings.idempotency_ttl_seconds
        )
        if found is None or found[0] != key.request_hash or found[1] != IN_PROGRESS:
            break
        if ctx.now() > deadline:
            break
        await asyncio.sleep(0.05)
    if found is None:
        return None
    request_hash, status_code, answer = found
    if request_hash != key.request_hash:
        raise Conflict(
            "this Idempotency-Key was already used with a different request body",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    if status_code == IN_PROGRESS:
        raise Conflict(
            "a request with this Idempotency-Key is still running; retry in a moment to get its"
            " answer",
            param="Idempotency-Key",
            code="idempotency_key_in_progress",
        )
    return JSONResponse(answer, status_code=status_code, headers={"Idempotent-Replayed": "true"})


async def once(
    ctx: AppState,
    tenant: str,
    request: Request,
    raw: bytes,
    run: Callable[[], Awaitable[Any]],
) -> Any:
    """Run a POST handler at most once per Idempotency-Key (and body): a repeat gets the first
    successful answer. The key is reserved before the handler runs and holds its answer after;
    answers that are errors are not saved, so a retry after an error runs again."""
    key, replayed = await begin(ctx, tenant, request, raw)
    if replayed is not None:
        return replayed
    if key is None:
        return await run()
    idem = ctx.store.idempotency
    if not await idem.reserve(
        tenant, key.key, key.request_hash, ctx.settings.idempotency_ttl_seconds
    ):
        return await replay(ctx, tenant, key)  # the other request's answer, or 409 in progress
    try:
        result = await run()
        if isinstance(result, JSONResponse):
            if result.status_code != 200:
                await idem.release(tenant, key.key)
                return result
            answer = json.loads(bytes(result.body))
        else:
            answer = result
    except BaseException:
        await idem.release(tenant, key.key)
        raise
    await idem.complete(tenant, key.with_answer(answer))
    return JSONResponse(answer)


async def hold(
    ctx: AppState, tenant: str, request: Request, raw: bytes
) -> tuple[IdemKey | None, JSONResponse | None]:
    """For a handler that answers as it goes (a stream): reserve the key, or get the answer
    saved for it (or 409 while the request holding it still runs). The caller then
    :func:`keep` s the answer it gave, or :func:`drop` s the key when it could not."""
    key, replayed = await begin(ctx, tenant, request, raw)
    if key is None or replayed is not None:
        return key, replayed
    if await ctx.store.idempotency.reserve(
        tenant, key.key, key.request_hash, ctx.settings.idempotency_ttl_seconds
    ):
        return key, None
    return key, await replay(ctx, tenant, key)


async def keep(ctx: AppState, tenant: str, key: IdemKey, answer: dict[str, Any]) -> None:
    await ctx.store.idempotency.complete(tenant, key.with_answer(answer))


async def drop(ctx: AppState, tenant: str, key: IdemKey) -> None:
    await ctx.store.idempotency.release(tenant, key.key)


async def begin(
    ctx: AppState, tenant: str, request: Request, raw: bytes
) -> tuple[IdemKey | None, JSONResponse | None]:
    """Returns (key to store with the work, or None) and a replayed answer, if any."""
    value = request.headers.get(HEADER)
    if value is None:
        return None, None
    if not value or len(value) > 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
    key = IdemKey(value, body_hash(request.url.path, raw))
    return key, await replay(ctx, tenant, key)
