"""Tenants from API keys.

With ``auth = "auto"`` (the default) and no key ever created, a server listening on loopback only
runs open as tenant ``default`` and ignores the Authorization header. Once a key was created (even
if it was revoked since), or when the server listens on any other address, every /v1 call needs a
valid key. An open server answers only requests addressed to a loopback name (the Host header), so
a web page that rebinds a DNS name to 127.0.0.1 cannot reach it; ``allowed_hosts`` adds names.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from backburner.api.state import AppState, app_state
from backburner.errors import Forbidden, TenantDisabled, Unauthorized

OPEN_TENANT = "default"
# a key is looked up at most this often per process: revoking a key or disabling its tenant
# takes effect at once in the process that did it, within this in the others (and at once for
# submissions, which read the tenant in their own transaction)
KEY_CACHE_SECONDS = 1.0
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


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the key's tenant, and whether it is an admin key (every tenant's usage,
    the admin API). An open server's caller is the admin of tenant ``default``."""

    tenant: str
    admin: bool


OPEN = Identity(OPEN_TENANT, admin=True)


async def identity(request: Request, ctx: AppState = Depends(app_state)) -> Identity:
    mode = ctx.settings.auth
    if mode == "disabled":
        return OPEN
    if mode == "auto" and ctx.settings.loopback_only and not await keys_exist(ctx):
        check_host(request.headers.get("host", ""), ctx.settings.allowed_hosts)
        return OPEN
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
        found = await ctx.store.keys.lookup(key)
        if len(ctx.key_cache) > 10_000:
            ctx.key_cache.clear()
        ctx.key_cache[key] = (found, now)
    if found is None:
        raise Unauthorized("Invalid API key.")
    name, admin, disabled = found
    if disabled:
        raise TenantDisabled(name)
    return Identity(name, admin)


async def tenant(request: Request, ctx: AppState = Depends(app_state)) -> str:
    return (await identity(request, ctx)).tenant


async def admin(who: Identity = Depends(identity)) -> Identity:
    """An admin key (or an open server): refused with 403 otherwise."""
    if not who.admin:
        raise Forbidden("this route needs an admin key", code="admin_key_required")
    return who
