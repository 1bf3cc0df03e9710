"""``Idempotency-Key``: the same key and body within the TTL replays the first answer; the same
key with another body is 409. For submissions the key is stored in the same transaction as the
work it creates, so a retry after a crash never submits twice."""

from __future__ import annotations

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

HEADER = "idempotency-key"


@dataclass(frozen=True)
class IdemKey:
    key: str
    request_hash: str

    def with_answer(self, response: dict[str, Any], status_code: int = 200) -> Idempotency:
        return Idempotency(self.key, self.request_hash, status_code, response)


async def replay(ctx: AppState, tenant: str, key: IdemKey) -> JSONResponse | None:
    found = await ctx.store.idempotency.answer(
        tenant, key.key, ctx.settings.idempotency_ttl_seconds
    )
    if found is None:
        return None
    request_hash, status_code, answer = found
    if request_hash != key.request_hash:
        raise Conflict(
            "this Idempotency-Key was already used with a different request body",
            param="Idempotency-Key",
            code="idempotency_key_reused",
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
    successful answer. The key is saved right after the handler succeeds; answers that are
    errors are not saved, so a retry after an error runs again."""
    key, replayed = await begin(ctx, tenant, request, raw)
    if replayed is not None:
        return replayed
    result = await run()
    if key is None:
        return result
    if isinstance(result, JSONResponse):
        if result.status_code != 200:
            return result
        answer = json.loads(bytes(result.body))
    else:
        answer = result
    await ctx.store.idempotency.save(
        tenant, key.with_answer(answer), ctx.settings.idempotency_ttl_seconds
    )
    return JSONResponse(answer)


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
