"""Tenants from API keys.

With ``auth = "auto"`` (the default) and no key ever created, a server listening on loopback only
runs open as tenant ``default`` and ignores the Authorization header. Once a key was created (even
if it was revoked since), or when the server listens on any other address, every /v1 call needs a
valid key. An open server answers only requests addressed to a loopback name (the Host header), so
a web page that rebinds a DNS name to 127.0.0.1 cannot reach it; ``allowed_hosts`` adds names.
"""

from __future__ import annotations

from fastapi import Depends, Request

from backburner.api.state import AppState, app_state
from backburner.errors import Forbidden, Unauthorized

OPEN_TENANT = "default"
KEY_CACHE_SECONDS = 5.0
NO_KEYS_RECHECK_SECONDS = 1.0


async def keys_exist(ctx: AppState) -> bool:
    if ctx.keys_exist:
        return True
    now = ctx.now()
    if now - ctx.keys_checked_at > NO_KEYS_RECHECK_SECONDS:
        ctx.keys_exist = await ctx.store.keys.any_created()
        ctx.keys_checked_at = now
    return ctx.keys_exist


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(header: str) -> str:
    """The name in a Host header, without its port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def check_host(header: str, allowed: list[str]) -> None:
    """Refuse a request whose Host header names neither a loopback name nor ``allowed``."""
    name = host_name(header)
    if name in LOOPBACK_NAMES or name.startswith("127.") or name in {a.lower() for a in allowed}:
        return
    raise Forbidden(
        f"this server runs without API keys and answers only requests addressed to a loopback"
        f" host; got Host '{name}'. Create an API key, or add the name to allowed_hosts",
        code="host_not_allowed",
    )


async def tenant(request: Request, ctx: AppState = Depends(app_state)) -> str:
    mode = ctx.settings.auth
    if mode == "disabled":
        return OPEN_TENANT
    if mode == "auto" and ctx.settings.loopback_only and not await keys_exist(ctx):
        check_host(request.headers.get("host", ""), ctx.settings.allowed_hosts)
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
