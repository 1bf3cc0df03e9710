"""A small, fast OpenAI-compatible upstream for acceptance tests and benchmarks.

Run it standalone::

    python tests/support/upstream.py --port 9100 [--latency-ms 20] [--fail-first 5]
        [--fail-rate 0.3 --fail-modes 500,502,reset,timeout --hang-seconds 5 --seed 1] [--poison]

It is a raw ASGI callable served by uvicorn (no framework, no access log) so that it costs as
little CPU as possible next to the service under test. Routes:

- ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``: valid OpenAI response
  objects that echo the last user message (``"echo: <text>"``), after ``--latency-ms``;
- ``GET /v1/models``: the model list;
- ``GET /stats``: ``{"requests": n, "failed": k}`` (POSTs seen, POSTs answered with an injected
  500 or 502);
- ``GET /seen``: ``{"requests": n, "aborted": a, "prompts": {text: [fate, ...]}}``: every
  completion POST by its last user message, in arrival order, with what it got (``ok``, ``500``,
  ``502``, ``reset``, ``timeout``, ``poison``), so a test that makes each prompt unique counts
  the runs of each generation; ``aborted``: POSTs whose client went away before the whole body
  arrived (not counted as requests).

``--fail-first K`` answers the first K POSTs with 500 (an OpenAI error envelope) for retry tests.
``--fail-rate F`` fails that fraction of the completion POSTs after the first K, each in one of
``--fail-modes`` drawn at random (``--seed``): ``500`` / ``502`` (an error envelope), ``reset``
(the connection is reset once the body is read: TCP RST, no answer), ``timeout`` (no answer for
``--hang-seconds``, then the normal one, long after a client with a shorter timeout gave up).
``--poison`` answers prompts naming a marker with what no database can store as it is (the
HTTP twin of ``tests/support/poison_engine.py``): ``answer-surrogate`` (a lone surrogate in the
text), ``answer-nul`` (a NUL in the text: storable, JSON escapes it), ``error-nul`` and
``error-surrogate`` (a 400 whose message holds one).
Once the socket listens it prints ``READY <port>`` to stdout (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
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
FAIL_MODES = ("500", "502", "reset", "timeout")
# marker in the prompt -> (HTTP status, the text it answers with): 200 puts the text in the
# answer's content, 400 in the error envelope's message
POISON = {
    "answer-surrogate": (200, "half a pair: \ud800 here"),
    "answer-nul": (200, "a\x00b"),
    "error-nul": (400, "bad \x00 byte"),
    "error-surrogate": (400, "bad \udc80 text"),
}


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


def _reset(send: Send) -> bool:
    """Reset the connection ``send`` answers on (TCP RST, nothing sent): uvicorn's ``send`` is a
    bound method of its request cycle, which holds the transport. False when it is not."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return True


class Upstream:
    """The ASGI application."""

    def __init__(
        self,
        latency_ms: float = 0.0,
        fail_first: int = 0,
        *,
        fail_rate: float = 0.0,
        fail_modes: tuple[str, ...] = FAIL_MODES,
        hang_seconds: float = 5.0,
        seed: int | None = None,
        poison: bool = False,
    ) -> None:
        self.latency = max(0.0, latency_ms) / 1000.0
        self.fail_first = max(0, fail_first)
        self.fail_rate = min(1.0, max(0.0, fail_rate))
        unknown = sorted(set(fail_modes) - set(FAIL_MODES))
        if unknown or not fail_modes:
            raise ValueError(f"fail modes are some of {', '.join(FAIL_MODES)}; got {fail_modes}")
        self.fail_modes = fail_modes
        self.hang = max(0.0, hang_seconds)
        self.random = random.Random(seed)
        self.poison = poison
        self.requests = 0
        self.failed = 0
        self.seen: dict[str, list[str]] = {}
        self.aborted = 0  # requests whose client went away before the body was complete

    def _fate(self, n: int, asked: str) -> str:
        """What the ``n``-th POST, asking ``asked``, gets."""
        if n <= self.fail_first:
            return "500"
        if self.poison and any(marker in asked for marker in POISON):
            return "poison"
        if self.fail_rate and self.random.random() < self.fail_rate:
            return self.random.choice(self.fail_modes)
        return "ok"

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
        if method == "GET" and path == "/seen":
            seen = {"requests": self.requests, "aborted": self.aborted, "prompts": self.seen}
            await self._json(send, 200, seen)
            return
        handler = HANDLERS.get(path)
        if handler is None or method != "POST":
            await self._error(send, 404, f"no route {method} {path}")
            return
        raw = await self._body(receive)
        if raw is None:  # the client went away mid-body (it was killed, say): not a request
            self.aborted += 1
            return
        await self._complete(handler, raw, send)

    async def _complete(self, handler: Any, raw: bytes, send: Send) -> None:
        """One completion POST: its fate drawn, recorded by prompt, and acted out."""
        self.requests += 1
        n = self.requests
        body: Any = None
        problem = "body is not JSON"
        try:
            body = json.loads(raw)
            problem = "body is not a JSON object"
        except ValueError:
            pass
        asked = last_user_text(body) if isinstance(body, dict) else ""
        fate = self._fate(n, asked)
        self.seen.setdefault(asked, []).append(fate)
        if self.latency:
            await asyncio.sleep(self.latency)
        if fate in ("500", "502"):
            self.failed += 1
            status = int(fate)
            failure = f"injected failure {n} of {self.fail_first}" if n <= self.fail_first else ""
            await self._error(send, status, failure or f"injected {status}")
            return
        if fate == "reset" and _reset(send):
            await asyncio.sleep(0)  # uvicorn notes the lost connection: it answers nothing
            return
        if fate == "timeout":
            await asyncio.sleep(self.hang)  # the client gave up long ago
        if not isinstance(body, dict):
            await self._error(send, 400, problem)
            return
        answer = handler(body, n)
        if fate == "poison":
            status, text = next(v for marker, v in POISON.items() if marker in asked)
            if status != 200:
                await self._error(send, status, text)
                return
            for choice in answer.get("choices", []):  # embeddings have none: answered as usual
                if "message" in choice:
                    choice["message"]["content"] = text
                else:
                    choice["text"] = text
        await self._json(send, 200, answer)

    @staticmethod
    async def _body(receive: Receive) -> bytes | None:
        """The request body, or None when the client disconnected before sending all of it."""
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
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
    p.add_argument("--fail-rate", type=float, default=0.0, help="fail this fraction of POSTs")
    p.add_argument(
        "--fail-modes", default=",".join(FAIL_MODES), help="how they fail (comma-separated)"
    )
    p.add_argument("--hang-seconds", type=float, default=5.0, help="a 'timeout' answers this late")
    p.add_argument("--seed", type=int, default=None, help="seed of the failure draws")
    p.add_argument("--poison", action="store_true", help="answer poison markers with poison")
    args = p.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    app = Upstream(
        args.latency_ms,
        args.fail_first,
        fail_rate=args.fail_rate,
        fail_modes=tuple(m.strip() for m in args.fail_modes.split(",") if m.strip()),
        hang_seconds=args.hang_seconds,
        seed=args.seed,
        poison=args.poison,
    )
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
