"""The one mapping from the error tree to HTTP status and the OpenAI error envelope, and the
error responses every route declares in the OpenAPI document."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backburner.errors import BackburnerError, BackendError, InvalidRequest, TooManyRequests
from backburner.schemas.error import ErrorEnvelope
from backburner.schemas.validation import Problem, problems_from
from backburner.store.base import unreachable

log = logging.getLogger("backburner.api")
DATABASE_RETRY_AFTER = 5  # seconds, on a 503 while the database cannot be reached

_SAID = {
    400: "Invalid request: every problem at once, each naming its field by path"
    " (`requests[3].messages`); `param` is the first one's",
    401: "Missing or invalid API key (`Authorization: Bearer <key>`)",
    403: "This server runs without API keys and answers only requests addressed to a loopback"
    " host (or a name in `allowed_hosts`); or the key's tenant is disabled; or the route needs"
    " an admin key",
    404: "No such object (another tenant's objects are not found either)",
    409: "Conflict: the Idempotency-Key was used with another body, or the object's state"
    " does not allow this",
    413: "The request body is larger than the limit",
    415: "The body is not JSON: send it with `Content-Type: application/json`",
    429: "A limit of the tenant was reached (the message names it and its value); nothing was"
    " stored. `Retry-After` says when to try again where waiting helps",
    502: "The inference backend failed",
    503: "Not ready",
}


def describe(code: int) -> str:
    """What an error status means here, as the OpenAPI document says it."""
    return _SAID[code]


def declared(code: int) -> dict[str, Any]:
    """One error answer for the OpenAPI document: the envelope, and what the status means."""
    return {"model": ErrorEnvelope, "description": describe(code)}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route or router for its OpenAPI document: each is the envelope.

    401 stands for the tenant dependency (:func:`backburner.api.auth.tenant`), so it brings its
    other refusal with it: 403, an open server addressed by a host that is not loopback.
    """
    wanted = (*codes, 403) if 401 in codes and 403 not in codes else codes
    return {code: declared(code) for code in wanted}


DEFAULT_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {
        "model": ErrorEnvelope,
        "description": "Any other error (5xx: a server or backend failure), as the same envelope",
    }
}
"""Every router's. Declaring it also keeps FastAPI from documenting a 422, which this API never
answers (bad input is a 400)."""


def envelope(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorEnvelope.of(message, type_=type_, param=param, code=code).model_dump()


def error_response(exc: BackburnerError) -> JSONResponse:
    if isinstance(exc, BackendError) and exc.upstream_status and 400 <= exc.upstream_status < 500:
        body = exc.body if isinstance(exc.body, dict) and "error" in exc.body else None
        return JSONResponse(
            body or envelope(exc.message, type_="invalid_request_error", code=exc.code),
            status_code=exc.upstream_status,
        )
    headers = None
    if isinstance(exc, TooManyRequests) and exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return JSONResponse(
        envelope(exc.message, type_=exc.error_type, param=exc.param, code=exc.code),
        status_code=exc.status_code,
        headers=headers,
    )


def invalid(problems: Sequence[Problem]) -> InvalidRequest:
    """One 400 for every problem found: the message lists them all, ``param`` names the first."""
    return InvalidRequest(
        "; ".join(str(p) for p in problems) or "invalid request",
        param=(problems[0].param or None) if problems else None,
        code="invalid_request",
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(BackburnerError)
    async def _bb(_: Request, exc: BackburnerError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("request failed: %s", exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's locations start with where the value came from: "query", "path", "body"...
        errors = [{**e, "loc": tuple(e["loc"])[1:]} for e in exc.errors()]
        return error_response(invalid(problems_from(errors)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            envelope(str(exc.detail), type_=type_),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        if unreachable(exc):
            # the database is down or restarting: nothing was changed, the same call may
            # succeed in a moment (503 with Retry-After, not a 500 that reads as a bug)
            log.warning("the database could not be reached: %s", type(exc).__name__)
            return JSONResponse(
                envelope(
                    "the database could not be reached; nothing was changed, try again shortly",
                    type_="server_error",
                    code="database_unavailable",
                ),
                status_code=503,
                headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
            )
        log.exception("unhandled error")
        return JSONResponse(
            envelope("internal server error", type_="server_error"), status_code=500
        )
