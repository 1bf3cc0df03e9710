"""Body size limit: a declared Content-Length over the limit is refused (413) before anything is
read; a chunked body is counted as it streams in by :func:`backburner.api.bodies.read_raw`."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from backburner.api.errors import envelope


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/v1/files"):
            for name, value in scope.get("headers", []):
                if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                    body = json.dumps(
                        envelope(
                            f"request body is larger than the limit of {self.max_bytes} bytes",
                            type_="invalid_request_error",
                            code="body_too_large",
                        )
                    ).encode()
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 413,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)
