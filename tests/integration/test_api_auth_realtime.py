"""Auth and tenants (SPEC section 1), the realtime lane (section 5), the OpenAI SDK unchanged
against the app, and the operations endpoints (section 7)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from backburner.config import BackendSettings
from backburner.errors import BackendRejected, BackendRetryable
from tests.conftest import FAKE_MODEL
from tests.support.sdk import asgi_http_client

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
PUBLIC, ENGINE = "public-alias", "engine-x"


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "authentication_error"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- auth


async def test_open_mode_ignores_authorization(harness: Any) -> None:
    for headers in ({}, bearer("whatever"), {"Authorization": "Basic Zm9v"}):
        r = await harness.client.post("/v1/slow/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 200, r.text
        g = await harness.client.get(f"/v1/generation/{r.json()['id']}", headers=headers)
        assert g.status_code == 200
    assert (await harness.client.get("/v1/models")).status_code == 200


async def test_once_a_key_exists_it_is_required(harness: Any) -> None:
    _, key = await harness.state.store.keys.create("acme")
    for headers in ({}, bearer("bb-wrong"), {"Authorization": f"Basic {key}"}, bearer("")):
        assert_401(
            await harness.client.post("/v1/slow/chat/completions", json=CHAT, headers=headers)
        )
        assert_401(await harness.client.get("/v1/models", headers=headers))
        assert_401(await harness.client.post("/v1/chat/completions", json=CHAT, headers=headers))
    r = await harness.client.post("/v1/slow/chat/completions", json=CHAT, headers=bearer(key))
    assert r.status_code == 200
    assert (await harness.client.get("/v1/models", headers=bearer(key))).status_code == 200


async def test_key_created_while_open_closes_the_server(harness: Any) -> None:
    assert (await harness.client.get("/v1/models")).status_code == 200  # open: no keys yet
    _, key = await harness.state.store.keys.create("acme")
    async with asyncio.timeout(10):  # the no-keys answer is cached for about a second
        while True:
            if (await harness.client.get("/v1/models")).status_code == 401:
                break
            await asyncio.sleep(0.05)
    assert (await harness.client.get("/v1/models", headers=bearer(key))).status_code == 200


async def test_non_loopback_without_keys_is_closed(harness_factory: Any) -> None:
    h = await harness_factory(host="0.0.0.0")
    assert_401(await h.client.post("/v1/slow/chat/completions", json=CHAT))
    assert_401(await h.client.get("/v1/models", headers=bearer("anything")))
    assert await h.state.store.generations.count_by_state() == {}
    # operations endpoints stay open
    assert (await h.client.get("/healthz")).status_code == 200


async def test_auth_disabled_runs_open_even_with_keys(harness_factory: Any) -> None:
    h = await harness_factory(auth="disabled", host="0.0.0.0")
    await h.state.store.keys.create("acme")
    r = await h.client.post("/v1/slow/chat/completions", json=CHAT)
    assert r.status_code == 200


async def test_tenant_isolation(harness_factory: Any) -> None:
    h = await harness_factory(auth="required", run_worker=False)
    _, ka = await h.state.store.keys.create("tenant-a")
    _, kb = await h.state.store.keys.create("tenant-b")
    gid = (await h.client.post("/v1/slow/chat/completions", json=CHAT, headers=bearer(ka))).json()[
        "id"
    ]
    r = await h.client.get(f"/v1/generation/{gid}", headers=bearer(kb))
    assert r.status_code == 404 and gid in r.json()["error"]["message"]
    assert (
        await h.client.post(f"/v1/generation/{gid}/cancel", headers=bearer(kb))
    ).status_code == (404)
    mine = await h.client.get(f"/v1/generation/{gid}", headers=bearer(ka))
    assert mine.status_code == 200 and mine.json()["state"] == "Queued"  # B's cancel did nothing
    # the same Idempotency-Key in two tenants is two submissions
    idem = {"Idempotency-Key": "shared"}
    a2 = await h.client.post(
        "/v1/slow/completions",
        json={"model": FAKE_MODEL, "prompt": "x"},
        headers={**bearer(ka), **idem},
    )
    b2 = await h.client.post(
        "/v1/slow/completions",
        json={"model": FAKE_MODEL, "prompt": "x"},
        headers={**bearer(kb), **idem},
    )
    assert a2.status_code == b2.status_code == 200
    assert a2.json()["id"] != b2.json()["id"]


# ---------------------------------------------------------------- realtime


@pytest.fixture
async def aliased(harness_factory: Any) -> Any:
    """A harness whose one backend serves public name PUBLIC as engine model ENGINE."""
    backends = [
        BackendSettings(
            name="fake",
            type="openai",
            base_url="http://fake.invalid/v1",
            models={PUBLIC: ENGINE},
            max_concurrency=4,
        )
    ]
    return await harness_factory(backends=backends)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "yo"}]}),
        ("/v1/completions", {"prompt": "yo"}),
        ("/v1/embeddings", {"input": "yo"}),
    ],
)
async def test_realtime_answers_with_public_model(
    aliased: Any, fake_backend: Any, path: str, body: dict[str, Any]
) -> None:
    sent = {"model": PUBLIC, **body, "metadata": {"k": "v"}, "x_extra": 1}
    r = await aliased.client.post(path, json=sent)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["model"] == PUBLIC
    _, upstream = fake_backend.calls[-1]
    assert upstream["model"] == ENGINE and "metadata" not in upstream and upstream["x_extra"] == 1
    if path == "/v1/chat/completions":
        assert resp["choices"][0]["message"]["content"] == "echo: yo"
    elif path == "/v1/completions":
        assert resp["choices"][0]["text"] == "echo: yo"
    else:
        assert resp["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    assert await aliased.state.store.generations.count_by_state() == {}  # realtime stores nothing


async def test_realtime_validation_and_unknown_model(harness: Any) -> None:
    r = await harness.client.post("/v1/chat/completions", json={"model": FAKE_MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = await harness.client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


async def test_realtime_streaming_sse(aliased: Any) -> None:
    body = {"model": PUBLIC, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    r = await aliased.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert len(chunks) == 4
    assert all(c["model"] == PUBLIC and c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello there!"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_upstream_4xx_passes_through(harness: Any, fake_backend: Any) -> None:
    upstream = {
        "error": {
            "message": "maximum context length exceeded",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    fake_backend.enqueue(
        BackendRejected(
            "upstream HTTP 400: maximum context length exceeded", upstream_status=400, body=upstream
        )
    )
    r = await harness.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 400
    assert r.json() == upstream

    fake_backend.enqueue(BackendRejected("upstream HTTP 422: nope", upstream_status=422, body="x"))
    r = await harness.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "upstream HTTP 422: nope"


async def test_upstream_5xx_is_502_envelope(harness: Any, fake_backend: Any) -> None:
    fake_backend.enqueue(BackendRetryable("upstream HTTP 503: down", upstream_status=503))
    r = await harness.client.post("/v1/completions", json={"model": FAKE_MODEL, "prompt": "p"})
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["type"] == "server_error" and "down" in err["message"]


# ---------------------------------------------------------------- the OpenAI SDK, unchanged


def sdk(h: Any, path: str = "/v1") -> openai.AsyncOpenAI:
    http = asgi_http_client(h.app)
    return openai.AsyncOpenAI(
        base_url=f"http://testserver{path}", api_key="x", http_client=http, max_retries=0
    )


async def test_openai_sdk_realtime(harness: Any) -> None:
    async with sdk(harness) as client:
        resp = await client.chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "sdk"}]
        )
        assert resp.choices[0].message.content == "echo: sdk"
        assert resp.model == FAKE_MODEL
        stream = await client.chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "sdk"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream]
        assert "".join(parts) == "Hello there!"
        models = await client.models.list()
        assert [m.id for m in models.data] == [FAKE_MODEL]
        emb = await client.embeddings.create(model=FAKE_MODEL, input=["a", "b"])
        assert len(emb.data) == 2


async def test_openai_sdk_errors(harness: Any, fake_backend: Any) -> None:
    fake_backend.enqueue(
        BackendRejected(
            "bad",
            upstream_status=400,
            body={"error": {"message": "bad thing", "type": "x", "param": None, "code": "c"}},
        )
    )
    async with sdk(harness) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            await client.chat.completions.create(
                model=FAKE_MODEL, messages=[{"role": "user", "content": "x"}]
            )
        assert exc.value.status_code == 400 and "bad thing" in str(exc.value)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="unknown", messages=[])


async def test_openai_sdk_against_slow_route(harness: Any) -> None:
    async with sdk(harness, "/v1/slow") as client:
        resp = await client.chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "later"}],
            metadata={"custom_id": "sdk-1"},
        )
        # the SDK builds its ChatCompletion leniently from {"id", "object", "state"}; its type
        # says object is always "chat.completion", what came is "generation"
        assert resp.id
        assert resp.model_dump()["object"] == "generation"
        raw = await client.chat.completions.with_raw_response.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "raw"}]
        )
        assert json.loads(raw.text) == {
            "id": raw.parse().id,
            "object": "generation",
            "state": "Queued",
        }
    g = await harness.wait_terminal(resp.id)
    assert g["state"] == "Success"
    assert g["request"]["metadata"] == {"custom_id": "sdk-1"}
    assert g["response"]["choices"][0]["message"]["content"] == "echo: later"


# ---------------------------------------------------------------- operations


async def test_health_ready_metrics(harness: Any) -> None:
    r = await harness.client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = await harness.client.get("/readyz")
    assert r.status_code == 200
    ready = r.json()
    assert ready["status"] == "ready"
    assert ready["checks"] == {"store": "ok", "backend:fake": "ok"}
    lane = ready["scheduler"]["fake"]
    assert lane["probe"] == "own in-flight count" and lane["probe_error"] is None
    assert lane["held"] in ("none", "window_full") and lane["regime"] == "quiet"
    gid = (await harness.client.post("/v1/slow/chat/completions", json=CHAT)).json()["id"]
    await harness.wait_terminal(gid)
    text = (await harness.client.get("/metrics")).text
    assert 'backburner_generations_submitted_total{kind="chat"} 1.0' in text
    assert "backburner_generations_finished" in text
    assert 'backburner_background_held{backend="fake",reason="engine_queue"} 0.0' in text
    assert 'backburner_probe_ok{backend="fake"} 1.0' in text
    assert 'backburner_background_window{backend="fake"}' in text


async def test_models_lists_public_names(aliased: Any) -> None:
    r = await aliased.client.get("/v1/models")
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "data": [{"id": PUBLIC, "object": "model", "created": 0, "owned_by": "backburner"}],
    }


def _sse_chunks(r: httpx.Response) -> list[dict[str, Any]]:
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


async def test_streamed_realtime_honours_the_idempotency_key(
    harness: Any, fake_backend: Any
) -> None:
    """A retried stream with the same key is answered from the first one (the engine runs
    once); the same key with another body is 409."""
    body = {**CHAT, "stream": True}
    idem = {"Idempotency-Key": "stream-once"}
    first = await harness.client.post("/v1/chat/completions", json=body, headers=idem)
    assert first.status_code == 200
    calls = len(fake_backend.calls)
    again = await harness.client.post("/v1/chat/completions", json=body, headers=idem)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"].startswith("text/event-stream")
    assert len(fake_backend.calls) == calls  # replayed, not run again
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in _sse_chunks(again))
    assert text == "Hello there!"
    assert _sse_chunks(again)[0]["choices"][0]["finish_reason"] == "stop"
    other = await harness.client.post(
        "/v1/chat/completions", json={**body, "max_tokens": 3}, headers=idem
    )
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"


async def test_a_failed_stream_frees_its_idempotency_key(harness: Any, fake_backend: Any) -> None:
    body = {**CHAT, "stream": True}
    idem = {"Idempotency-Key": "stream-fails"}
    original = fake_backend.stream

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise BackendRetryable("upstream HTTP 503: down", upstream_status=503)
        yield {}  # pragma: no cover - makes this an async generator

    fake_backend.stream = failing
    r = await harness.client.post("/v1/chat/completions", json=body, headers=idem)
    assert r.status_code == 502
    fake_backend.stream = original
    r = await harness.client.post("/v1/chat/completions", json=body, headers=idem)
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers


async def test_concurrent_realtime_requests_with_one_key_run_once(
    harness: Any, fake_backend: Any
) -> None:
    fake_backend.delay = 0.3
    idem = {"Idempotency-Key": "rt-race"}
    before = len(fake_backend.calls)
    answers = await asyncio.gather(
        *(harness.client.post("/v1/chat/completions", json=CHAT, headers=idem) for _ in range(4))
    )
    assert [a.status_code for a in answers] == [200] * 4
    assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1
    assert len(fake_backend.calls) == before + 1
