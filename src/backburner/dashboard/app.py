"""The dashboard's plumbing: mounting under ``/ui``, the page wrapper (who is looking, CSRF on
every POST, errors as pages), rendering, sign-in and the overview."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from backburner import __version__
from backburner.api.state import AppState
from backburner.dashboard import charts
from backburner.dashboard.overview import OverviewData
from backburner.dashboard.render import STATIC, environment
from backburner.dashboard.session import (
    CSRF_FIELD,
    Sessions,
    SignedOut,
    Viewer,
    check_csrf,
    csrf_token,
    finish,
    sign_in,
    sign_out,
)
from backburner.errors import BackburnerError, NotFound

PREFIX = "/ui"


class UI:
    """What every page shares, built on the first request (the app state exists only then)."""

    def __init__(self, ctx: AppState) -> None:
        self.ctx = ctx
        self.sessions = Sessions(ctx)
        self.env: Environment = environment()
        self.overview = OverviewData(ctx)

    def render(
        self,
        request: Request,
        viewer: Viewer | None,
        template: str,
        context: dict[str, Any],
        *,
        status: int = 200,
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(
            request=request,
            viewer=viewer,
            csrf=csrf_token(request),
            csrf_field=CSRF_FIELD,
            path=request.url.path,
            notice=request.query_params.get("notice", "")[:300],
            version=__version__,
            now=datetime.now(UTC),
            **context,
        )
        response = HTMLResponse(html, status_code=status)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"
        )
        return response


def ui(request: Request) -> UI:
    state = request.app.state
    found: UI | None = getattr(state, "ui", None)
    if found is None:
        found = state.ui = UI(state.bb)
    return found


Handler = Callable[[Request, UI, Viewer], Awaitable[Response]]


def form(request: Request) -> FormData:
    data: FormData = request.state.form
    return data


def back(to: str, notice: str = "") -> RedirectResponse:
    """After a POST: back to a page (303), with a one-line notice to show there."""
    if notice:
        to += ("&" if "?" in to else "?") + urlencode({"notice": notice})
    return RedirectResponse(to, status_code=303)


def page(handler: Handler, *, admin: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a page: sign-in, the admin check, CSRF on POST, errors rendered as pages."""

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        u = ui(request)
        viewer: Viewer | None = None
        try:
            viewer = await u.sessions.viewer(request)
            if admin and not viewer.admin:
                raise NotFound("No such page.")
            if request.method == "POST":
                data = await request.form()
                check_csrf(request, data.get(CSRF_FIELD))
                request.state.form = data
            response = await handler(request, u, viewer)
        except SignedOut:
            target = f"{PREFIX}/login?next={quote(request.url.path)}"
            if request.headers.get("hx-request"):
                response = Response(status_code=204, headers={"HX-Redirect": target})
            else:
                response = RedirectResponse(target, status_code=303)
        except BackburnerError as exc:
            response = u.render(
                request,
                viewer,
                "error.html",
                {"status": exc.status_code, "message": exc.message},
                status=exc.status_code,
            )
        # what the server spent on the page (queries and rendering), for the browser's devtools
        took = (time.perf_counter() - started) * 1e3
        response.headers["Server-Timing"] = f"page;dur={took:.1f}"
        return finish(request, response)

    return endpoint


def scope_of(request: Request, viewer: Viewer) -> str | None:
    """An admin may narrow a list to one tenant with ``?tenant=``; anyone else sees their own."""
    if viewer.admin:
        return request.query_params.get("tenant") or None
    return viewer.tenant


# ---------------------------------------------------------------------- sign-in
async def login(request: Request) -> Response:
    u = ui(request)
    nxt = request.query_params.get("next", PREFIX + "/")
    if not nxt.startswith(PREFIX + "/") or nxt.startswith("//"):
        nxt = PREFIX + "/"
    try:
        if await u.sessions.open_mode(request):
            return finish(request, RedirectResponse(nxt, status_code=303))
        error = ""
        status = 200
        if request.method == "POST":
            data = await request.form()
            check_csrf(request, data.get(CSRF_FIELD))
            key = str(data.get("key", "")).strip()
            if key and await u.sessions.identify(key) is not None:
                response = RedirectResponse(nxt, status_code=303)
                sign_in(request, response, key)
                return finish(request, response)
            error, status = "That key is not valid (or was revoked).", 401
        return finish(
            request,
            u.render(request, None, "login.html", {"error": error, "next": nxt}, status=status),
        )
    except BackburnerError as exc:
        ctx = {"status": exc.status_code, "message": exc.message}
        return finish(request, u.render(request, None, "error.html", ctx, status=exc.status_code))


async def _logout(request: Request, u: UI, viewer: Viewer) -> Response:
    key = request.cookies.get("bb_key")
    if key:
        u.sessions.forget(key)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    sign_out(response)
    return response


# ---------------------------------------------------------------------- overview
async def _overview_context(request: Request, u: UI, viewer: Viewer) -> dict[str, Any]:
    scope = scope_of(request, viewer)
    counted = await u.overview.depth(scope)
    depth = counted or []
    by_model: dict[str, dict[str, int]] = {}
    for model, state, n in depth:
        by_model.setdefault(model, {})[state] = n
    for model in u.ctx.engines.models:
        by_model.setdefault(model, {})
    finished = await u.overview.finished(scope)
    rt = u.overview.realtime()
    throughput = charts.line_chart(
        [
            charts.Line("succeeded", [float(s) for _, s, _ in finished], "s-ok"),
            charts.Line("failed", [float(f) for _, _, f in finished], "s-bad"),
        ],
        unit="/min",
        left="60 min ago",
        right="now",
        title="generations finished per minute",
    )
    latency = charts.line_chart(
        [
            charts.Line("p50", [p.p50 for p in rt], "s-ok"),
            charts.Line("p95", [p.p95 for p in rt], "s-warn"),
        ],
        unit="s",
        left="60 min ago",
        right="now",
        title="realtime latency",
    )
    return {
        "scope": scope,
        "counting": counted is None,
        "by_model": sorted(by_model.items()),
        "queued": sum(n for _, s, n in depth if s == "Queued"),
        "running": sum(n for _, s, n in depth if s == "In Progress"),
        "last_hour": (sum(s for _, s, _ in finished), sum(f for _, _, f in finished)),
        "last_minute": finished[-1][1] + finished[-2][1] if len(finished) > 1 else 0,
        "lanes": u.overview.lanes(),
        "at_risk": await u.overview.at_risk(scope),
        "rt_count": sum(p.count for p in rt),
        "rt_errors": sum(p.errors for p in rt),
        "rt_last": next((p for p in reversed(rt) if p.count), None),
        "throughput_chart": throughput,
        "latency_chart": latency,
    }


async def _overview(request: Request, u: UI, viewer: Viewer) -> Response:
    ctx = await _overview_context(request, u, viewer)
    return u.render(request, viewer, "overview.html", ctx)


async def _overview_live(request: Request, u: UI, viewer: Viewer) -> Response:
    ctx = await _overview_context(request, u, viewer)
    return u.render(request, viewer, "_overview_live.html", ctx)


async def _find(request: Request, u: UI, viewer: Viewer) -> Response:
    """Jump to an object by its id (a generation, group, batch or webhook)."""
    q = request.query_params.get("q", "").strip()
    for kind, path in (
        ("generation", "generations"),
        ("group", "groups"),
        ("batch", "batches"),
        ("webhook", "webhooks"),
    ):
        owner = await u.ctx.store.views.owner(kind, q) if q else None  # type: ignore[arg-type]
        if owner is not None and (viewer.admin or owner == viewer.tenant):
            return RedirectResponse(f"{PREFIX}/{path}/{quote(q)}", status_code=303)
    raise NotFound(f"Nothing with id '{q}' is visible to you.")


def routes() -> list[BaseRoute]:
    from backburner.dashboard import admin, pages

    return [
        Route("/", page(_overview), methods=["GET"]),
        Route("/live", page(_overview_live), methods=["GET"]),
        Route("/find", page(_find), methods=["GET"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", page(_logout), methods=["POST"]),
        *pages.routes(),
        *admin.routes(),
        Mount("/static", app=StaticFiles(directory=STATIC), name="ui-static"),
    ]


def mount(app: Starlette) -> None:
    """Serve the dashboard under ``/ui`` on ``app`` (the API app; its lifespan builds the state
    the pages read)."""

    async def to_ui(request: Request) -> Response:
        return RedirectResponse(PREFIX + "/", status_code=307)

    # first in the table: a page never walks the API's routes (FastAPI builds each route's state
    # on its first match, ~190 ms for all of them), and /ui matches nothing of the API's
    app.router.routes[0:0] = [Route(PREFIX, to_ui, methods=["GET"]), Mount(PREFIX, routes=routes())]
