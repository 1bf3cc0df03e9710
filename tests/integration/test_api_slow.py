"""Single slow requests (SPEC sections 1 and 2): submission, the Generation object, validation,
cancellation, retries, idempotency and the body limit, through the in-process app."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from backburner.errors import BackendRejected, BackendRetryable
from tests.conftest import FAKE_MODEL
from tests.support.fake_backend import FakeBackend

PREFIXES = ["/v1/slow", "/v1/async"]
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{21}$")
CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
BODIES: dict[str, dict[str, Any]] = {
    "chat/completions": CHAT,
    "completions": {"model": FAKE_MODEL, "prompt": "once upon"},
    "embeddings": {"model": FAKE_MODEL, "input": ["a", "b"]},
}
BASE_KEYS = {"id", "object", "state", "stateMessage", "request", "createdAt", "model", "attempts"}


def assert_envelope(r: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err  # type: ignore[no-any-return]


async def submit(h: Any, body: Any, route: str = "/v1/slow/chat/completions", **kw: Any) -> str:
    r = await h.client.post(route, json=body, **kw)
    assert r.status_code == 200, r.text
    gid: str = r.json()["id"]
    return gid


@pytest.fixture
async def idle(harness_factory: Any) -> Any:
    """A harness without a worker, for requests that must be refused before anything runs."""
    return await harness_factory(run_worker=False)


# ---------------------------------------------------------------- submission and the object


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("route", list(BODIES))
async def test_submit_answers_queued_then_succeeds(harness: Any, prefix: str, route: str) -> None:
    body = BODIES[route]
    r = await harness.client.post(f"{prefix}/{route}", json=body)
    assert r.status_code == 200, r.text
    gid = r.json()["id"]
    assert r.json() == {"id": gid, "object": "generation", "state": "Queued"}
    assert ID_RE.match(gid)
    g = await harness.wait_terminal(gid)
    assert g["state"] == "Success", g
    assert g["stateMessage"] == "Completed"
    assert g["request"] == body
    assert g["model"] == FAKE_MODEL
    assert g["attempts"] == 1
    assert set(g) == BASE_KEYS | {"response", "dispatchedAt", "finishedAt"}
    for ts in ("createdAt", "dispatchedAt", "finishedAt"):
        assert ISO_Z.match(g[ts]), g[ts]
    assert g["createdAt"] <= g["dispatchedAt"] <= g["finishedAt"]
    if route == "embeddings":
        assert len(g["response"]["data"]) == 2
    else:
        assert g["response"]["choices"][0]


async def test_queued_generation_has_no_response_nor_unset_timestamps(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    gid = await submit(h, CHAT)
    r = await h.client.get(f"/v1/generation/{gid}")
    assert r.status_code == 200
    g = r.json()
    assert set(g) == BASE_KEYS  # response, dispatchedAt, finishedAt absent (not null)
    assert g["id"] == gid and g["object"] == "generation"
    assert g["state"] == "Queued" and g["stateMessage"] == "Queued"
    assert g["attempts"] == 0
    assert ISO_Z.match(g["createdAt"])


async def test_metadata_and_extra_fields_echoed_exactly(harness: Any, fake_backend: Any) -> None:
    body = {
        "x_extra": {"nested": [1, 2.5, None, True]},
        "messages": [{"role": "user", "content": "héllo ✓", "name": "u"}],
        "model": FAKE_MODEL,
        "metadata": {"custom_id": "c-1", "deep": {"a": [1, {"b": "é"}]}, "n": 0},
        "temperature": 0.5,
    }
    gid = await submit(harness, body)
    g = await harness.wait_terminal(gid)
    assert g["request"] == body
    assert list(g["request"]) == list(body)  # key order kept
    assert g["response"]["choices"][0]["message"]["content"] == "echo: héllo ✓"
    sent = fake_backend.calls[-1][1]
    assert "metadata" not in sent  # backburner's own, not an engine parameter
    assert sent["x_extra"] == body["x_extra"] and sent["temperature"] == 0.5


async def test_unknown_generation_is_404(idle: Any) -> None:
    r = await idle.client.get("/v1/generation/doesnotexist_12345678")
    assert_envelope(r, 404)
    r = await idle.client.post("/v1/generation/doesnotexist_12345678/cancel")
    assert_envelope(r, 404)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("route", "body", "param", "says"),
    [
        ("chat/completions", {"model": FAKE_MODEL}, "messages", "required"),
        ("chat/completions", {"model": FAKE_MODEL, "messages": []}, "messages", ""),
        (
            "chat/completions",
            {"model": FAKE_MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            "user",
        ),
        ("chat/completions", {"messages": CHAT["messages"]}, "model", "required"),
        ("chat/completions", {**CHAT, "model": ""}, "model", ""),
        ("chat/completions", {**CHAT, "model": "no-such-model"}, "model", "no-such-model"),
        ("chat/completions", {**CHAT, "stream": True}, "stream", "stream"),
        ("chat/completions", {**CHAT, "temperature": 7}, "temperature", ""),
        ("chat/completions", {**CHAT, "metadata": "x"}, "metadata", ""),
        (
            "chat/completions",
            {**CHAT, "metadata": {"webhook_id": 5}},
            "metadata.webhook_id",
            "webhook_id",
        ),
        ("chat/completions", {"model": FAKE_MODEL, "prompt": "p"}, "body", "messages"),
        ("chat/completions", [CHAT], "body", "JSON object"),
        ("completions", {"model": FAKE_MODEL}, "prompt", "required"),
        ("completions", {**CHAT}, "body", "prompt"),
        ("completions", {"model": FAKE_MODEL, "prompt": "p", "stream": True}, "stream", ""),
        ("embeddings", {"model": FAKE_MODEL, "input": []}, "input", "empty"),
        ("embeddings", {"model": FAKE_MODEL}, "input", "required"),
    ],
)
async def test_invalid_body_is_400_and_nothing_stored(
    idle: Any, route: str, body: Any, param: str, says: str
) -> None:
    for prefix in PREFIXES:
        r = await idle.client.post(f"{prefix}/{route}", json=body)
        err = assert_envelope(r, 400, param)
        assert err["type"] == "invalid_request_error"
        assert param in err["message"] and says in err["message"]
    assert await idle.state.store.generations.count_by_state() == {}


async def test_unknown_model_names_the_served_ones(idle: Any) -> None:
    r = await idle.client.post("/v1/slow/chat/completions", json={**CHAT, "model": "gpt-9"})
    err = assert_envelope(r, 400, "model")
    assert "gpt-9" in err["message"] and FAKE_MODEL in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"   \n", b"\xff\xfe"])
async def test_invalid_or_empty_json_is_400(idle: Any, raw: bytes) -> None:
    r = await idle.client.post(
        "/v1/slow/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    err = assert_envelope(r, 400, "body")
    assert "JSON" in err["message"]
    assert await idle.state.store.generations.count_by_state() == {}


@pytest.mark.parametrize(
    "route",
    ["/v1/slow/chat/completions", "/v1/slow/group/chat/completions", "/v1/chat/completions"],
)
async def test_nan_and_infinity_are_not_json(harness_factory: Any, route: str) -> None:
    h = await harness_factory(run_worker=False)
    req = (
        '{"model": "fake-model", "messages": [{"role": "user", "content": "x"}],'
        ' "x": [NaN, Infinity, -Infinity]}'
    )
    raw = req if "group" not in route else f'{{"requests": [{req}]}}'
    r = await h.client.post(
        route, content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert_envelope(r, 400, "body")
    assert await h.state.store.generations.count_by_state() == {}


async def test_body_over_limit_is_413(harness_factory: Any) -> None:
    h = await harness_factory(max_body_bytes=2048)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4000}]}
    r = await h.client.post("/v1/slow/chat/completions", json=big)
    err = assert_envelope(r, 413)
    assert err["code"] == "body_too_large" and "2048" in err["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 400
        yield b'"}]}'

    r = await h.client.post(
        "/v1/slow/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    err = assert_envelope(r, 413)
    assert err["code"] == "body_too_large"
    assert await h.state.store.generations.count_by_state() == {}
    small = await h.client.post("/v1/slow/chat/completions", json=CHAT)
    assert small.status_code == 200


# ---------------------------------------------------------------- in progress and cancel


class BlockingBackend(FakeBackend):
    """Holds every call until ``go`` is set."""

    def __init__(self) -> None:
        super().__init__("fake")
        self.go = asyncio.Event()
        self.entered = asyncio.Event()

    async def run(
        self, kind: Any, body: dict[str, Any], *, background: bool = False
    ) -> dict[str, Any]:
        self.entered.set()
        await self.go.wait()
        return await super().run(kind, body)


async def test_in_progress_shape_and_cancel_is_409(harness_factory: Any) -> None:
    backend = BlockingBackend()
    h = await harness_factory(backend=backend)
    try:
        gid = await submit(h, CHAT)
        async with asyncio.timeout(10):
            await backend.entered.wait()
            while True:
                g = (await h.client.get(f"/v1/generation/{gid}")).json()
                if g["state"] != "Queued":
                    break
                await asyncio.sleep(0.02)
        assert g["state"] == "In Progress" and g["stateMessage"] == "Running"
        assert g["attempts"] == 1 and ISO_Z.match(g["dispatchedAt"])
        assert "response" not in g and "finishedAt" not in g
        assert_envelope(await h.client.post(f"/v1/generation/{gid}/cancel"), 409)
    finally:
        backend.go.set()
    done = await h.wait_terminal(gid)
    assert done["state"] == "Success" and done["dispatchedAt"] == g["dispatchedAt"]


# ---------------------------------------------------------------- cancel


async def test_cancel_queued_then_again_is_409(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    gid = await submit(h, CHAT)
    r = await h.client.post(f"/v1/generation/{gid}/cancel")
    assert r.status_code == 200, r.text
    g = r.json()
    assert g["id"] == gid and g["state"] == "Failed" and g["stateMessage"] == "Cancelled"
    assert "response" not in g and "dispatchedAt" not in g
    assert ISO_Z.match(g["finishedAt"])
    assert (await h.client.get(f"/v1/generation/{gid}")).json() == g
    again = await h.client.post(f"/v1/generation/{gid}/cancel")
    err = assert_envelope(again, 409)
    assert "Failed" in err["message"]


async def test_cancel_finished_is_409(harness: Any) -> None:
    gid = await submit(harness, CHAT)
    assert (await harness.wait_terminal(gid))["state"] == "Success"
    r = await harness.client.post(f"/v1/generation/{gid}/cancel")
    assert_envelope(r, 409)
    assert (await harness.client.get(f"/v1/generation/{gid}")).json()["state"] == "Success"


# ---------------------------------------------------------------- retries


async def test_retryable_errors_are_retried_then_succeed(harness: Any, fake_backend: Any) -> None:
    fake_backend.enqueue(
        BackendRetryable("upstream HTTP 503: busy", upstream_status=503),
        BackendRetryable("upstream timeout: ReadTimeout"),
    )
    gid = await submit(harness, CHAT)
    g = await harness.wait_terminal(gid)
    assert g["state"] == "Success", g
    assert g["attempts"] == 3
    assert g["stateMessage"] == "Completed"
    assert len(fake_backend.calls) == 3


async def test_retryable_errors_exhaust_attempts(harness_factory: Any, fake_backend: Any) -> None:
    h = await harness_factory(max_attempts=2)
    fake_backend.enqueue(
        BackendRetryable("upstream HTTP 502: bad gateway", upstream_status=502),
        BackendRetryable("upstream HTTP 503: overloaded", upstream_status=503),
    )
    gid = await submit(h, CHAT)
    g = await h.wait_terminal(gid)
    assert g["state"] == "Failed", g
    assert g["attempts"] == 2
    assert "upstream HTTP 503: overloaded" in g["stateMessage"]
    assert "2 attempts" in g["stateMessage"]
    assert "response" not in g
    assert len(fake_backend.calls) == 2


async def test_rejected_fails_at_once(harness: Any, fake_backend: Any) -> None:
    fake_backend.enqueue(
        BackendRejected("upstream HTTP 400: context too long", upstream_status=400)
    )
    gid = await submit(harness, CHAT)
    g = await harness.wait_terminal(gid)
    assert g["state"] == "Failed"
    assert g["attempts"] == 1
    assert g["stateMessage"] == "upstream HTTP 400: context too long"
    assert "response" not in g
    assert ISO_Z.match(g["finishedAt"])
    assert len(fake_backend.calls) == 1


# ---------------------------------------------------------------- idempotency


async def test_idempotency_key_replays_the_first_answer(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    hdr = {"Idempotency-Key": "k-1"}
    r1 = await h.client.post("/v1/slow/chat/completions", json=CHAT, headers=hdr)
    r2 = await h.client.post("/v1/slow/chat/completions", json=CHAT, headers=hdr)
    assert r1.status_code == r2.status_code == 200
    assert r1.json() == r2.json()
    assert r2.headers.get("idempotent-replayed") == "true"
    assert await h.state.store.generations.count_by_state() == {"Queued": 1}

    other = {**CHAT, "temperature": 0.1}
    r3 = await h.client.post("/v1/slow/chat/completions", json=other, headers=hdr)
    err = assert_envelope(r3, 409, "Idempotency-Key")
    assert err["code"] == "idempotency_key_reused"
    assert await h.state.store.generations.count_by_state() == {"Queued": 1}

    # another key is another submission
    r4 = await h.client.post(
        "/v1/slow/chat/completions", json=CHAT, headers={"Idempotency-Key": "k-2"}
    )
    assert r4.json()["id"] != r1.json()["id"]
    assert await h.state.store.generations.count_by_state() == {"Queued": 2}


async def test_idempotency_key_not_stored_for_invalid_request(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    hdr = {"Idempotency-Key": "k-bad"}
    r = await h.client.post("/v1/slow/chat/completions", json={"model": FAKE_MODEL}, headers=hdr)
    assert_envelope(r, 400, "messages")
    ok = await h.client.post("/v1/slow/chat/completions", json=CHAT, headers=hdr)
    assert ok.status_code == 200
    assert await h.state.store.generations.count_by_state() == {"Queued": 1}


async def test_idempotency_key_too_long_is_400(idle: Any) -> None:
    r = await idle.client.post(
        "/v1/slow/chat/completions", json=CHAT, headers={"Idempotency-Key": "k" * 256}
    )
    assert_envelope(r, 400, "Idempotency-Key")
    assert await idle.state.store.generations.count_by_state() == {}


async def test_idempotency_key_on_cancel_and_webhook_create(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}]}
    gid = (await h.client.post("/v1/slow/chat/completions", json=body)).json()["id"]
    key = {"Idempotency-Key": "cancel-1"}
    first = await h.client.post(f"/v1/generation/{gid}/cancel", headers=key)
    again = await h.client.post(f"/v1/generation/{gid}/cancel", headers=key)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert (await h.client.post(f"/v1/generation/{gid}/cancel")).status_code == 409
    hk = {"Idempotency-Key": "hook-1"}
    a = await h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x"}, headers=hk)
    b = await h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x"}, headers=hk)
    assert a.json()["id"] == b.json()["id"]
    assert len((await h.client.get("/v1/webhooks")).json()["data"]) == 1
    c = await h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/y"}, headers=hk)
    assert c.status_code == 409


async def test_database_unreachable_is_503_not_500(harness: Any, monkeypatch: Any) -> None:
    """A database that is down (connection refused, restarting) answers 503 with Retry-After
    and the envelope; anything else unexpected is still a 500."""
    import sqlalchemy as sa

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))

    monkeypatch.setattr(harness.state.store.generations, "get", down)
    transport = httpx.ASGITransport(app=harness.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        r = await c.get("/v1/generation/abc")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "database_unavailable"

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(harness.state.store.generations, "get", broken)
        r = await c.get("/v1/generation/abc")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
