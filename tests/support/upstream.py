"""A small, fast OpenAI-compatible upstream for acceptance tests and benchmarks.

Run it standalone::

    python tests/support/upstream.py --port 9100 [--latency-ms 20] [--fail-first 5]

It is a raw ASGI callable served by uvicorn (no framework, no access log) so that it costs as
little CPU as possible next to the service under test. Routes:

- ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``: valid OpenAI response
  objects that echo the last user message (``"echo: <text>"``), after ``--latency-ms``;
- ``GET /v1/models``: the model list;
- ``GET /stats``: ``{"requests": n, "failed": k}`` (POSTs seen, POSTs answered 500).

``--fail-first K`` answers the first K POSTs with 500 (an OpenAI error envelope) for retry tests.
Once the socket listens it prints ``READY <port>`` to stdout (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODELS = ["upstream-model"]
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # content parts
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[-1])
    return prompt if isinstance(prompt, str) else ""


def chat_response(body: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-up{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", MODELS[0]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"echo: {last_user_text(body)}"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def completion_response(body: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "id": f"cmpl-up{n}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model", MODELS[0]),
        "choices": [
            {
                "index": 0,
                "text": f"echo: {last_user_text(body)}",
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def embeddings_response(body: dict[str, Any], n: int) -> dict[str, Any]:
    raw = body.get("input", "")
    inputs = raw if isinstance(raw, list) else [raw]
    return {
        "object": "list",
        "model": body.get("model", MODELS[0]),
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, float(len(str(x)))]}
            for i, x in enumerate(inputs)
        ],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }


HANDLERS = {
    "/v1/chat/completions": chat_response,
    "/v1/completions": completion_response,
    "/v1/embeddings": embeddings_response,
}


class Upstream:
    """The ASGI application."""

    def __init__(self, latency_ms: float = 0.0, fail_first: int = 0) -> None:
        self.latency = max(0.0, latency_ms) / 1000.0
        self.fail_first = max(0, fail_first)
        self.requests = 0
        self.failed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "GET" and path in ("/v1/models", "/models"):
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "upstream"} for m in MODELS
            ]
            await self._json(send, 200, {"object": "list", "data": data})
            return
        if method == "GET" and path == "/stats":
            await self._json(send, 200, {"requests": self.requests, "failed": self.failed})
            return
        handler = HANDLERS.get(path)
        if handler is None or method != "POST":
            await self._error(send, 404, f"no route {method} {path}")
            return
        raw = await self._body(receive)
        self.requests += 1
        n = self.requests
        if self.latency:
            await asyncio.sleep(self.latency)
        if n <= self.fail_first:
            self.failed += 1
            await self._error(send, 500, f"injected failure {n} of {self.fail_first}")
            return
        try:
            body = json.loads(raw)
        except ValueError:
            await self._error(send, 400, "body is not JSON")
            return
        if not isinstance(body, dict):
            await self._error(send, 400, "body is not a JSON object")
            return
        await self._json(send, 200, handler(body, n))

    @staticmethod
    async def _body(receive: Receive) -> bytes:
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    async def _json(send: Send, status: int, obj: Any) -> None:
        payload = json.dumps(obj, separators=(",", ":")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _error(self, send: Send, status: int, message: str) -> None:
        await self._json(
            send,
            status,
            {"error": {"message": message, "type": "server_error", "param": None, "code": None}},
        )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")
    p.add_argument("--fail-first", type=int, default=0, help="answer the first K POSTs with 500")
    args = p.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    app = Upstream(args.latency_ms, args.fail_first)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=1024,
        timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    # The socket already listens, so connections made from now on wait in its backlog.
    print(f"READY {port}", flush=True)
    sys.stdout.flush()
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
