"""OpenAIBackend against an httpx.MockTransport: URLs, auth header, error mapping, streaming;
and Engines's upstream body (metadata stripped, model alias mapped)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from backburner.backends.base import upstream_body
from backburner.backends.engines import Engines
from backburner.backends.openai import OpenAIBackend
from backburner.config import BackendSettings
from backburner.core.states import Kind
from backburner.errors import BackendRejected, BackendRetryable, InvalidRequest

Handler = Callable[[httpx.Request], httpx.Response]
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
OK = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": []}


class Recorder:
    def __init__(self, handler: Handler | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.handler = handler or (lambda req: httpx.Response(200, json=OK))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


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
async def make() -> AsyncIterator[Callable[..., Any]]:
    started: list[OpenAIBackend] = []

    async def factory(handler: Handler | Recorder, **kw: Any) -> OpenAIBackend:
        b = OpenAIBackend(settings(**kw), transport=httpx.MockTransport(handler))
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
    b = OpenAIBackend(settings(), transport=httpx.MockTransport(Recorder()))
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


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (httpx.ReadTimeout, "timeout"),
        (httpx.ConnectTimeout, "timeout"),
        (httpx.ConnectError, "connection"),
        (httpx.RemoteProtocolError, "connection"),
    ],
)
async def test_transport_errors_are_retryable(make: Any, error: type[Exception], says: str) -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise error("failed", request=request)  # type: ignore[call-arg]

    b = await make(boom)
    with pytest.raises(BackendRetryable, match=says):
        await b.run(Kind.CHAT, CHAT_BODY)
    with pytest.raises(BackendRetryable, match=says):
        async for _ in b.stream(Kind.CHAT, {**CHAT_BODY, "stream": True}):
            pass


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
