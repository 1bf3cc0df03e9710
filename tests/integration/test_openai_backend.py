"""OpenAIBackend against a real loopback server whose answers a test scripts as httpx objects:
URLs, auth header, error mapping, streaming, connection reuse, transport faults; and Engines's
upstream body (metadata stripped, model alias mapped)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from backburner.backends.base import upstream_body
from backburner.backends.engines import Engines
from backburner.backends.openai import OpenAIBackend
from backburner.config import BackendSettings
from backburner.core.states import Kind
from backburner.errors import BackendRejected, BackendRetryable, InvalidRequest

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
OK = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": []}
HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


class Drop(Exception):
    """Raised by a handler: the server closes the connection without answering."""


class Recorder:
    def __init__(self, handler: Handler | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.handler = handler or (lambda req: httpx.Response(200, json=OK))

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.handler(request)
        if isinstance(answer, httpx.Response):
            return answer
        return await answer


class Upstream:
    """A loopback aiohttp server standing in for engines at ``http://up.test``: each backend a
    test makes gets its own path prefix and handler. A request reaches its handler as an
    ``httpx.Request`` with the URL the backend meant (``http://up.test/...``), and the handler's
    ``httpx.Response`` is sent back."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.connections: set[Any] = set()  # client (host, port) of every request: one per socket
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{prefix}/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def base_url(self, meant: str, handler: Handler) -> str:
        """Where to send what is meant for ``meant`` (an ``http://up.test...`` URL)."""
        prefix = f"b{len(self.handlers)}"
        self.handlers[prefix] = handler
        return meant.replace("http://up.test", f"http://127.0.0.1:{self.port}/{prefix}", 1)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.connections.add(request.transport.get_extra_info("peername"))
        prefix = request.match_info["prefix"]
        sent = httpx.Request(
            request.method,
            "http://up.test" + request.path_qs.removeprefix("/" + prefix),
            headers=dict(request.headers),
            content=await request.read(),
        )
        try:
            answer = self.handlers[prefix](sent)
            resp = answer if isinstance(answer, httpx.Response) else await answer
        except Drop:
            request.transport.close()
            raise
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
        return web.Response(status=resp.status_code, body=resp.content, headers=headers)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


def settings(**kw: Any) -> BackendSettings:
    base: dict[str, Any] = {
        "name": "up",
        "type": "openai",
        "base_url": "http://up.test/v1",
        "models": ["m"],
    }
    base.update(kw)
    return BackendSettings(**base)


@pytest.fixture
async def make(upstream: Upstream) -> AsyncIterator[Callable[..., Any]]:
    """A started backend whose engine (``base_url``, ``http://up.test/v1`` unless given) is
    played by ``handler`` on ``upstream``."""
    started: list[OpenAIBackend] = []

    async def factory(handler: Handler, **kw: Any) -> OpenAIBackend:
        kw["base_url"] = upstream.base_url(kw.get("base_url", "http://up.test/v1"), handler)
        b = OpenAIBackend(settings(**kw))
        await b.start()
        started.append(b)
        return b

    yield factory
    for b in started:
        await b.close()


# ---------------------------------------------------------------- requests


@pytest.mark.parametrize("base_url", ["http://up.test/v1", "http://up.test/v1/"])
@pytest.mark.parametrize(
    ("kind", "path"),
    [
        (Kind.CHAT, "/v1/chat/completions"),
        (Kind.COMPLETION, "/v1/completions"),
        (Kind.EMBEDDING, "/v1/embeddings"),
    ],
)
async def test_paths_join_base_url(make: Any, base_url: str, kind: Kind, path: str) -> None:
    rec = Recorder()
    b = await make(rec, base_url=base_url)
    body = {"model": "m", "input": "x", "extra_field": [1]}
    assert await b.run(kind, body) == OK
    (req,) = rec.requests
    assert req.method == "POST"
    assert str(req.url) == f"http://up.test{path}"
    assert json.loads(req.content) == body
    assert req.headers["content-type"] == "application/json"


async def test_authorization_from_api_key(make: Any) -> None:
    rec = Recorder()
    b = await make(rec, api_key="sk-secret")
    await b.run(Kind.CHAT, CHAT_BODY)
    assert rec.requests[0].headers["authorization"] == "Bearer sk-secret"
    rec2 = Recorder()
    b2 = await make(rec2)
    await b2.run(Kind.CHAT, CHAT_BODY)
    assert "authorization" not in rec2.requests[0].headers


async def test_base_url_required() -> None:
    with pytest.raises(ValueError, match="base_url"):
        OpenAIBackend(settings(base_url=None))


async def test_not_started_is_an_error() -> None:
    b = OpenAIBackend(settings())
    with pytest.raises(RuntimeError, match="not started"):
        await b.run(Kind.CHAT, CHAT_BODY)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
async def test_retryable_status(make: Any, status: int) -> None:
    b = await make(lambda r: httpx.Response(status, json={"error": {"message": "busy now"}}))
    with pytest.raises(BackendRetryable) as exc:
        await b.run(Kind.CHAT, CHAT_BODY)
    assert exc.value.upstream_status == status
    assert exc.value.retryable
    assert f"upstream HTTP {status}" in exc.value.message and "busy now" in exc.value.message


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_rejected_status_keeps_upstream_message(make: Any, status: int) -> None:
    upstream = {"error": {"message": f"nope {status}", "type": "invalid_request_error"}}
    b = await make(lambda r: httpx.Response(status, json=upstream))
    with pytest.raises(BackendRejected) as exc:
        await b.run(Kind.CHAT, CHAT_BODY)
    assert not exc.value.retryable
    assert exc.value.upstream_status == status
    assert exc.value.message == f"upstream HTTP {status}: nope {status}"
    assert exc.value.body == upstream


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"error": "plain string"}, "plain string"),
        ({"detail": "fastapi style"}, "fastapi style"),
        ({"message": "top-level"}, "top-level"),
    ],
)
async def test_rejected_message_shapes(make: Any, payload: Any, expected: str) -> None:
    b = await make(lambda r: httpx.Response(400, json=payload))
    with pytest.raises(BackendRejected, match=expected):
        await b.run(Kind.COMPLETION, {"model": "m", "prompt": "p"})


async def test_rejected_non_json_body(make: Any) -> None:
    b = await make(lambda r: httpx.Response(404, text="<html>not here</html>"))
    with pytest.raises(BackendRejected) as exc:
        await b.run(Kind.CHAT, CHAT_BODY)
    assert "not here" in exc.value.message and exc.value.body is None


async def _hang(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(5)
    return httpx.Response(200, json=OK)


def _drop(request: httpx.Request) -> httpx.Response:
    raise Drop


@pytest.mark.parametrize(("fault", "says"), [(_hang, "timeout"), (_drop, "connection")])
async def test_transport_faults_are_retryable(make: Any, fault: Handler, says: str) -> None:
    b = await make(fault, timeout_seconds=0.2)
    with pytest.raises(BackendRetryable, match=says):
        await b.run(Kind.CHAT, CHAT_BODY)
    with pytest.raises(BackendRetryable, match=says):
        async for _ in b.stream(Kind.CHAT, {**CHAT_BODY, "stream": True}):
            pass


async def test_unreachable_engine_is_retryable(make: Any) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    b = OpenAIBackend(settings(base_url=f"http://127.0.0.1:{port}/v1"))
    await b.start()
    try:
        with pytest.raises(BackendRetryable, match="connection"):
            await b.run(Kind.CHAT, CHAT_BODY)
        with pytest.raises(BackendRetryable, match="connection"):
            async for _ in b.stream(Kind.CHAT, {**CHAT_BODY, "stream": True}):
                pass
        with pytest.raises(BackendRetryable, match="unreachable"):
            await b.check()
    finally:
        await b.close()


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]"])
async def test_bad_success_body_is_retryable(make: Any, content: bytes) -> None:
    b = await make(lambda r: httpx.Response(200, content=content))
    with pytest.raises(BackendRetryable):
        await b.run(Kind.CHAT, CHAT_BODY)


async def test_check(make: Any) -> None:
    rec = Recorder(lambda r: httpx.Response(200, json={"data": []}))
    b = await make(rec)
    await b.check()
    assert str(rec.requests[0].url) == "http://up.test/v1/models"
    bad = await make(lambda r: httpx.Response(503))
    with pytest.raises(BackendRetryable):
        await bad.check()


# ---------------------------------------------------------------- streaming


def sse(*events: str) -> bytes:
    return "".join(f"{e}\n\n" for e in events).encode()


async def test_stream_parses_sse_until_done(make: Any) -> None:
    c1 = {"choices": [{"delta": {"content": "a"}}]}
    c2 = {"choices": [{"delta": {"content": "b"}}]}
    body = sse(
        ": keep-alive",
        f"data: {json.dumps(c1)}",
        "event: ping",
        f"data:{json.dumps(c2)}",
        "data: [DONE]",
        'data: {"after": "done"}',
    )
    rec = Recorder(
        lambda r: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )
    b = await make(rec)
    chunks = [c async for c in b.stream(Kind.CHAT, {**CHAT_BODY, "stream": True})]
    assert chunks == [c1, c2]
    assert str(rec.requests[0].url) == "http://up.test/v1/chat/completions"
    assert json.loads(rec.requests[0].content)["stream"] is True


async def test_stream_error_status(make: Any) -> None:
    b = await make(lambda r: httpx.Response(400, json={"error": {"message": "bad stream"}}))
    with pytest.raises(BackendRejected, match="bad stream"):
        async for _ in b.stream(Kind.CHAT, CHAT_BODY):
            pass
    b5 = await make(lambda r: httpx.Response(502, text="gateway"))
    with pytest.raises(BackendRetryable, match="gateway"):
        async for _ in b5.stream(Kind.CHAT, CHAT_BODY):
            pass


def _stream_of(*chunks: dict[str, Any], crlf: bool = False) -> Handler:
    end = "\r\n" if crlf else "\n"
    body = "".join(f"data: {json.dumps(c)}{end}{end}" for c in chunks) + f"data: [DONE]{end}{end}"
    return lambda r: httpx.Response(
        200, content=body.encode(), headers={"content-type": "text/event-stream"}
    )


async def test_stream_crlf_and_long_events(make: Any) -> None:
    big = {"choices": [{"delta": {"content": "x" * 300_000}}]}  # above aiohttp's line buffer
    b = await make(_stream_of({"n": 1}, big, crlf=True))
    chunks = [c async for c in b.stream(Kind.CHAT, {**CHAT_BODY, "stream": True})]
    assert chunks == [{"n": 1}, big]


async def test_stream_raw_passes_the_data_as_sent(make: Any) -> None:
    b = await make(_stream_of({"a": 1}, {"b": [2]}))
    got = [d async for d in b.stream_raw(Kind.CHAT, {**CHAT_BODY, "stream": True})]
    assert got == [b'{"a": 1}', b'{"b": [2]}']


@pytest.mark.parametrize("streamed", [False, True])
async def test_connections_are_reused(make: Any, upstream: Upstream, streamed: bool) -> None:
    """Sequential requests share one kept-alive connection, streamed ones included (the
    stream is read to its end after ``[DONE]``, so the connection goes back to the pool)."""
    b = await make(_stream_of({"n": 1}) if streamed else Recorder())
    for _ in range(20):
        if streamed:
            assert [c async for c in b.stream(Kind.CHAT, CHAT_BODY)] == [{"n": 1}]
        else:
            await b.run(Kind.CHAT, CHAT_BODY)
    assert len(upstream.connections) == 1


# ---------------------------------------------------------------- router


def test_upstream_body_strips_metadata_and_maps_model() -> None:
    body = {"model": "public", "metadata": {"custom_id": "c"}, "messages": [], "x": 1}
    out = upstream_body(body, "engine")
    assert out == {"model": "engine", "messages": [], "x": 1}
    assert body["metadata"] == {"custom_id": "c"} and body["model"] == "public"  # untouched


async def test_router_sends_engine_model_answers_public(make: Any) -> None:
    def answer(req: httpx.Request) -> httpx.Response:
        sent = json.loads(req.content)
        return httpx.Response(200, json={**OK, "model": sent["model"]})

    rec = Recorder(answer)
    s = settings(models={"public": "engine"})
    backend = await make(rec, models={"public": "engine"})
    router = Engines([s], {"up": backend})
    assert router.models == ["public"]
    body = {"model": "public", "metadata": {"webhook_id": "w"}, "messages": [], "top_k": 5}
    resp = await router.run_background(Kind.CHAT, body)
    assert resp["model"] == "public"
    sent = json.loads(rec.requests[0].content)
    assert sent == {"model": "engine", "messages": [], "top_k": 5}
    assert body["metadata"] == {"webhook_id": "w"}
    resp = await router.run_realtime(Kind.CHAT, body)
    assert resp["model"] == "public"
    with pytest.raises(InvalidRequest) as exc:
        await router.run_background(Kind.CHAT, {"model": "engine", "messages": []})
    assert exc.value.param == "model" and "public" in exc.value.message


async def test_router_first_backend_listed_serves_a_model(make: Any) -> None:
    first, second = Recorder(), Recorder()
    s1 = settings(name="one", models=["m"])
    s2 = settings(name="two", models=["m", "other"])
    b1 = await make(first)
    b2 = await make(second)
    router = Engines([s1, s2], {"one": b1, "two": b2})
    await router.run_background(Kind.CHAT, CHAT_BODY)
    await router.run_background(Kind.CHAT, {**CHAT_BODY, "model": "other"})
    assert len(first.requests) == 1 and len(second.requests) == 1
    assert router.models_by_backend == {"one": ["m"], "two": ["other"]}


async def test_an_escaped_lone_surrogate_is_parsed_not_called_invalid(make: Any) -> None:
    """JSON allows ``"\\udc80"`` (orjson refuses it): the answer is parsed, so the store can
    refuse it once as unstorable instead of retrying it as invalid JSON."""
    raw = b'{"id": "c", "choices": [{"message": {"content": "bad \\udc80"}}]}'
    b = await make(lambda r: httpx.Response(200, content=raw))
    answer = await b.run(Kind.CHAT, CHAT_BODY)
    assert answer["choices"][0]["message"]["content"] == "bad \udc80"
    streamed = await make(_stream_of({"x": "a"}))
    assert [c async for c in streamed.stream(Kind.CHAT, CHAT_BODY)] == [{"x": "a"}]
