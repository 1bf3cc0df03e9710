"""The one mapping from the error tree to HTTP status and the OpenAI error envelope."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backburner.errors import BackburnerError, BackendError
from backburner.schemas.validation import Problem, join_path

log = logging.getLogger("backburner.api")


def envelope(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BackburnerError) -> JSONResponse:
    if isinstance(exc, BackendError) and exc.upstream_status and 400 <= exc.upstream_status < 500:
        body = exc.body if isinstance(exc.body, dict) and "error" in exc.body else None
        return JSONResponse(
            body or envelope(exc.message, type_="invalid_request_error", code=exc.code),
            status_code=exc.upstream_status,
        )
    return JSONResponse(
        envelope(exc.message, type_=exc.error_type, param=exc.param, code=exc.code),
        status_code=exc.status_code,
    )


def problems_error(problems: list[Problem]) -> JSONResponse:
    msg = "; ".join(str(p) for p in problems)
    return JSONResponse(
        envelope(
            msg,
            type_="invalid_request_error",
            param=problems[0].param or None,
            code="invalid_request",
        ),
        status_code=400,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(BackburnerError)
    async def _bb(_: Request, exc: BackburnerError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("request failed: %s", exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            Problem(
                join_path("", tuple(p for p in e["loc"] if p not in ("body", "query", "path"))),
                e["msg"],
            )
            for e in exc.errors()
        ]
        return problems_error(problems or [Problem("", "invalid request")])

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
        log.exception("unhandled error")
        return JSONResponse(
            envelope("internal server error", type_="server_error"), status_code=500
        )
