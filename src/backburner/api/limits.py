"""Body size limit: a declared Content-Length over the limit is refused (413) before anything is
read; a chunked body is counted as it streams in by :func:`backburner.api.bodies.read_json`."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/v1/files"):
            for name, value in scope.get("headers", []):
                if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                    body = json.dumps(
                        {
                            "error": {
                                "message": (
                                    "request body is larger than the limit of"
                                    f" {self.max_bytes} bytes"
                                ),
                                "type": "invalid_request_error",
                                "param": None,
                                "code": "body_too_large",
                            }
                        }
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
