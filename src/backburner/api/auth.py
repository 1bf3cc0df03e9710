"""Tenants from API keys.

With ``auth = "auto"`` (the default) and no key in the store, a server listening on loopback only
runs open as tenant ``default`` and ignores the Authorization header. Once a key exists, or when
the server listens on any other address, every /v1 call needs a valid key.
"""

from __future__ import annotations

from fastapi import Depends, Request

from backburner.api.state import AppState, app_state
from backburner.errors import Unauthorized

OPEN_TENANT = "default"
KEY_CACHE_SECONDS = 5.0
NO_KEYS_RECHECK_SECONDS = 1.0


async def _keys_exist(ctx: AppState) -> bool:
    if ctx.keys_exist:
        return True
    now = ctx.now()
    if now - ctx.keys_checked_at > NO_KEYS_RECHECK_SECONDS:
        ctx.keys_exist = await ctx.store.keys.any_live()
        ctx.keys_checked_at = now
    return ctx.keys_exist


async def tenant(request: Request, ctx: AppState = Depends(app_state)) -> str:
    mode = ctx.settings.auth
    if mode == "disabled":
        return OPEN_TENANT
    if mode == "auto" and ctx.settings.loopback_only and not await _keys_exist(ctx):
        return OPEN_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized()
    cached = ctx.key_cache.get(key)
    now = ctx.now()
    if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
        found = cached[0]
    else:
        found = await ctx.store.keys.tenant_for(key)
        if len(ctx.key_cache) > 10_000:
            ctx.key_cache.clear()
        ctx.key_cache[key] = (found, now)
    if found is None:
        raise Unauthorized("Invalid API key.")
    return found
