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


async def _keys_exist(st: AppState) -> bool:
    if st.keys_exist:
        return True
    now = st.now()
    if now - st.keys_checked_at > NO_KEYS_RECHECK_SECONDS:
        st.keys_exist = await st.store.keys.any_live()
        st.keys_checked_at = now
    return st.keys_exist


async def tenant(request: Request, st: AppState = Depends(app_state)) -> str:
    mode = st.settings.auth
    if mode == "disabled":
        return OPEN_TENANT
    if mode == "auto" and st.settings.loopback_only and not await _keys_exist(st):
        return OPEN_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized()
    cached = st.key_cache.get(key)
    now = st.now()
    if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
        found = cached[0]
    else:
        found = await st.store.keys.tenant_for(key)
        if len(st.key_cache) > 10_000:
            st.key_cache.clear()
        st.key_cache[key] = (found, now)
    if found is None:
        raise Unauthorized("Invalid API key.")
    return found
