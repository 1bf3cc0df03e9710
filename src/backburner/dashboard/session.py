"""Who is looking: the dashboard's sign-in and its CSRF guard.

Sign-in takes an API key and keeps it in an HttpOnly, ``SameSite=Strict`` cookie scoped to
``/ui`` (the API never reads cookies, so no API route can be driven from another site). Every
request looks the key up again (cached for a few seconds, as the API does): a revoked key signs
its holder out at once. The viewer is scoped to the key's tenant exactly as the API is; an
admin key (``backburner keys create --admin``) sees every tenant and the keys page.

With no key ever created, a loopback-only server runs open, as the API does: the viewer is the
``default`` tenant with admin rights, and only requests addressed to a loopback name are answered.

CSRF: a random token lives in its own ``SameSite=Strict`` cookie and is repeated in every form
(double submit); a POST whose form token differs, or whose ``Origin`` names another host, is
refused before it does anything.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from backburner.api.auth import OPEN_TENANT, check_host, host_name, keys_exist
from backburner.api.state import AppState
from backburner.errors import Forbidden

KEY_COOKIE = "bb_key"
CSRF_COOKIE = "bb_csrf"
CSRF_FIELD = "csrf"
CACHE_SECONDS = 5.0
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Viewer:
    tenant: str
    admin: bool
    open: bool  # no keys: a loopback server's only user

    @property
    def scope(self) -> str | None:
        """The tenant a query is limited to; None for an admin (every tenant)."""
        return None if self.admin else self.tenant


class SignedOut(Exception):
    """No valid key in the cookie: the page sends the browser to sign in."""


class Sessions:
    """Key lookups cached per process (the key itself is the cache key, as in the API)."""

    def __init__(self, ctx: AppState) -> None:
        self._ctx = ctx
        self._cache: dict[str, tuple[tuple[str, bool] | None, float]] = {}

    async def open_mode(self, request: Request) -> bool:
        """True when the server runs without keys (its Host is checked then)."""
        s = self._ctx.settings
        if s.auth == "disabled":
            return True
        if s.auth == "auto" and s.loopback_only and not await keys_exist(self._ctx):
            check_host(request.headers.get("host", ""), s.allowed_hosts)
            return True
        return False

    async def identify(self, key: str) -> tuple[str, bool] | None:
        now = self._ctx.now()
        cached = self._cache.get(key)
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            return cached[0]
        found = await self._ctx.store.keys.identify(key)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (found, now)
        return found

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    def forget_all(self) -> None:
        self._cache.clear()

    async def viewer(self, request: Request) -> Viewer:
        if await self.open_mode(request):
            return Viewer(OPEN_TENANT, admin=True, open=True)
        key = request.cookies.get(KEY_COOKIE, "")
        found = await self.identify(key) if key else None
        if found is None:
            raise SignedOut()
        return Viewer(found[0], admin=found[1], open=False)


def csrf_token(request: Request) -> str:
    """The request's CSRF token: the cookie's, or a new one (set by :func:`finish`)."""
    token = request.cookies.get(CSRF_COOKIE)
    if not token or len(token) > 128:
        token = request.state.__dict__.setdefault("new_csrf", secrets.token_urlsafe(32))
    return token


def check_csrf(request: Request, form_token: object) -> None:
    """Refuse a state-changing request that another site could have sent."""
    origin = request.headers.get("origin")
    host = host_name(request.headers.get("host", ""))
    if origin and origin != "null" and host_name(urlsplit(origin).netloc) != host:
        raise Forbidden("this form was sent from another site", code="csrf_failed")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if (
        not cookie
        or not isinstance(form_token, str)
        or not hmac.compare_digest(cookie.encode(), form_token.encode())
    ):
        raise Forbidden(
            "the form's security token is missing or stale: reload the page and try again",
            code="csrf_failed",
        )


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def finish(request: Request, response: Response) -> Response:
    """Set the CSRF cookie on a response when the request had none."""
    new = request.state.__dict__.get("new_csrf")
    if new:
        response.set_cookie(
            CSRF_COOKIE,
            new,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
            path="/ui",
        )
    return response


def sign_in(request: Request, response: Response, key: str) -> None:
    response.set_cookie(
        KEY_COOKIE,
        key,
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/ui",
    )


def sign_out(response: Response) -> None:
    response.delete_cookie(KEY_COOKIE, path="/ui", httponly=True, samesite="strict")
