"""api.idempotency: its functions over a real AppState (SQLite), then ``Idempotency-Key`` through
the in-process app on every route that creates an object: slow submit, group submit,
``POST /v1/webhooks`` and ``POST /v1/batches``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Request
from fastapi.responses import JSONResponse

from backburner.api import idempotency
from backburner.api.bodies import body_hash
from backburner.api.idempotency import IdemKey
from backburner.api.state import AppState
from backburner.core.clock import utcnow
from backburner.core.outcome import Idempotency
from backburner.errors import Conflict, InvalidRequest
from backburner.store.tables import batches, generations, groups, webhooks
from tests.conftest import FAKE_MODEL, AppHarness

HarnessFactory = Callable[..., Awaitable[AppHarness]]
WAIT = 10.0  # upper bound on any wait in this module
TENANT = "default"  # the open server's tenant
PATH = "/v1/things"


def post_request(path: str = PATH, key: str | None = "k-1") -> Request:
    """A bare POST as the routes see it, with an Idempotency-Key header unless ``key`` is None."""
    headers = [] if key is None else [(b"idempotency-key", key.encode())]
    return Request(
        {
            "type": "http",
            "method": "POST",
            "scheme": "http",
            "server": ("testserver", 80),
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
        }
    )


def answer_of(response: JSONResponse) -> Any:
    return json.loads(bytes(response.body))


@pytest.fixture
async def st(harness_factory: HarnessFactory) -> AppState:
    h = await harness_factory(run_worker=False)
    state: AppState = h.state
    return state


class Counter:
    """A route handler for :func:`idempotency.once` that counts its runs."""

    def __init__(self, result: Any = None, error: Exception | None = None) -> None:
        self.runs = 0
        self.result = result
        self.error = error

    async def __call__(self) -> Any:
        self.runs += 1
        if self.error is not None:
            raise self.error
        return self.result if self.result is not None else {"id": f"obj-{self.runs}"}


# --------------------------------------------------------------------------- the functions


def test_with_answer_keeps_key_and_hash() -> None:
    key = IdemKey("k", "h")
    assert key.with_answer({"id": "x"}) == Idempotency("k", "h", 200, {"id": "x"})
    assert key.with_answer({"id": "x"}, status_code=201).status_code == 201


async def test_begin_without_header_is_no_key(st: AppState) -> None:
    assert await idempotency.begin(st, TENANT, post_request(key=None), b"{}") == (None, None)


@pytest.mark.parametrize("value", ["", "k" * 256])
async def test_begin_refuses_empty_and_long_keys(st: AppState, value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await idempotency.begin(st, TENANT, post_request(key=value), b"{}")
    assert info.value.param == "Idempotency-Key"


async def test_begin_hashes_path_and_body(st: AppState) -> None:
    longest = "k" * 255
    key, replayed = await idempotency.begin(st, TENANT, post_request(key=longest), b'{"a":1}')
    assert replayed is None
    assert key == IdemKey(longest, body_hash(PATH, b'{"a":1}'))
    other_path, _ = await idempotency.begin(st, TENANT, post_request("/v1/other"), b'{"a":1}')
    other_body, _ = await idempotency.begin(st, TENANT, post_request(), b'{"a":2}')
    assert other_path is not None and other_body is not None
    assert len({key.request_hash, other_path.request_hash, other_body.request_hash}) == 3


async def test_replay_returns_the_saved_answer(st: AppState) -> None:
    key = IdemKey("k-1", body_hash(PATH, b"{}"))
    assert await idempotency.replay(st, TENANT, key) is None
    ttl = st.settings.idempotency_ttl_seconds
    await st.store.idempotency.save(TENANT, key.with_answer({"id": "x", "ü": [1]}, 202), ttl)
    replayed = await idempotency.replay(st, TENANT, key)
    assert replayed is not None
    assert replayed.status_code == 202
    assert replayed.headers["idempotent-replayed"] == "true"
    assert answer_of(replayed) == {"id": "x", "ü": [1]}
    assert await idempotency.replay(st, "another-tenant", key) is None


async def test_replay_with_another_body_or_path_is_conflict(st: AppState) -> None:
    key = IdemKey("k-1", body_hash(PATH, b"{}"))
    await st.store.idempotency.save(
        TENANT, key.with_answer({"id": "x"}), st.settings.idempotency_ttl_seconds
    )
    for other in (body_hash(PATH, b'{"a":1}'), body_hash("/v1/other", b"{}")):
        with pytest.raises(Conflict) as info:
            await idempotency.replay(st, TENANT, IdemKey("k-1", other))
        assert info.value.param == "Idempotency-Key"
        assert info.value.code == "idempotency_key_reused"


async def test_replay_ignores_an_expired_answer(st: AppState) -> None:
    key = IdemKey("k-old", body_hash(PATH, b"{}"))
    ttl = st.settings.idempotency_ttl_seconds
    long_ago = utcnow() - timedelta(seconds=ttl + 60)
    async with st.store.engine.begin() as conn:
        await st.store.idempotency.save_on(
            conn, TENANT, key.with_answer({"id": "x"}), long_ago, ttl
        )
    assert await idempotency.replay(st, TENANT, key) is None
    # nor does an expired answer to another body make a conflict
    assert await idempotency.replay(st, TENANT, IdemKey("k-old", "another hash")) is None


async def test_once_runs_once_per_key_and_body(st: AppState) -> None:
    run = Counter()
    first = await idempotency.once(st, TENANT, post_request(), b"{}", run)
    again = await idempotency.once(st, TENANT, post_request(), b"{}", run)
    assert run.runs == 1
    assert isinstance(first, JSONResponse) and isinstance(again, JSONResponse)
    assert answer_of(first) == answer_of(again) == {"id": "obj-1"}
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    with pytest.raises(Conflict):
        await idempotency.once(st, TENANT, post_request(), b'{"other":1}', run)
    assert run.runs == 1
    # another key runs again
    third = await idempotency.once(st, TENANT, post_request(key="k-2"), b"{}", run)
    assert run.runs == 2 and answer_of(third) == {"id": "obj-2"}


async def test_once_without_key_returns_the_result_as_is(st: AppState) -> None:
    run = Counter(result={"id": "same"})
    for _ in range(2):
        assert await idempotency.once(st, TENANT, post_request(key=None), b"{}", run) is run.result
    assert run.runs == 2


async def test_once_saves_no_error(st: AppState) -> None:
    failing = Counter(error=Conflict("not now"))
    with pytest.raises(Conflict):
        await idempotency.once(st, TENANT, post_request(), b"{}", failing)
    refused = Counter(result=JSONResponse({"error": "later"}, status_code=503))
    assert await idempotency.once(st, TENANT, post_request(), b"{}", refused) is refused.result
    # neither was saved: the same key and body run the handler again
    run = Counter()
    done = await idempotency.once(st, TENANT, post_request(), b"{}", run)
    assert run.runs == 1 and answer_of(done) == {"id": "obj-1"}


async def test_once_saves_a_json_response_answer(st: AppState) -> None:
    run = Counter(result=JSONResponse({"id": "from-response"}))
    await idempotency.once(st, TENANT, post_request(), b"{}", run)
    again = await idempotency.once(st, TENANT, post_request(), b"{}", run)
    assert run.runs == 1 and answer_of(again) == {"id": "from-response"}


# --------------------------------------------------------------------------- through the app


@dataclass(frozen=True)
class Route:
    """A route that creates an object: where to post, two different bodies, where rows land."""

    path: str
    table: sa.Table
    id_field: str
    bodies: Callable[[AppHarness, dict[str, str]], Awaitable[tuple[Any, Any]]]

    def __str__(self) -> str:
        return self.path


async def slow_bodies(h: AppHarness, headers: dict[str, str]) -> tuple[Any, Any]:
    def chat(text: str) -> dict[str, Any]:
        return {"model": FAKE_MODEL, "messages": [{"role": "user", "content": text}]}

    return chat("a"), chat("b")


async def group_bodies(h: AppHarness, headers: dict[str, str]) -> tuple[Any, Any]:
    def group(text: str) -> dict[str, Any]:
        return {"requests": [{"model": FAKE_MODEL, "prompt": f"{text}{i}"} for i in range(2)]}

    return group("a"), group("b")


async def webhook_bodies(h: AppHarness, headers: dict[str, str]) -> tuple[Any, Any]:
    # private URLs are allowed on a loopback server; creating a webhook contacts nothing
    return {"url": "http://127.0.0.1:9/a"}, {"url": "http://127.0.0.1:9/b"}


async def batch_bodies(h: AppHarness, headers: dict[str, str]) -> tuple[Any, Any]:
    line = {
        "custom_id": "req-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "q"}]},
    }
    r = await h.client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n", "application/jsonl")},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]

    def batch(tag: str) -> dict[str, Any]:
        return {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"tag": tag},
        }

    return batch("a"), batch("b")


SLOW = Route("/v1/slow/chat/completions", generations, "id", slow_bodies)
GROUP = Route("/v1/slow/group/completions", groups, "groupId", group_bodies)
WEBHOOKS = Route("/v1/webhooks", webhooks, "id", webhook_bodies)
BATCHES = Route("/v1/batches", batches, "id", batch_bodies)
ROUTES = [SLOW, GROUP, WEBHOOKS, BATCHES]


async def rows(h: AppHarness, table: sa.Table, tenant: str = TENANT) -> int:
    async with h.state.store.engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(table).where(table.c.tenant == tenant)
        return int((await conn.execute(query)).scalar_one())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def created_id(r: httpx.Response, route: Route) -> str:
    assert r.status_code == 200, r.text
    value = r.json()[route.id_field]
    assert isinstance(value, str) and value
    return value


@pytest.fixture
async def h(harness_factory: HarnessFactory, tmp_path: Any) -> AppHarness:
    # keys get created in some tests, after which loopback receivers need the allow-list
    return await harness_factory(
        run_worker=False,
        files_dir=str(tmp_path / "files"),
        webhook_allow_private=["127.0.0.0/8"],
    )


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_same_key_and_body_replays_the_first_answer(h: AppHarness, route: Route) -> None:
    body, _ = await route.bodies(h, {})
    key = {"Idempotency-Key": "same-1"}
    first = await h.client.post(route.path, json=body, headers=key)
    again = await h.client.post(route.path, json=body, headers=key)
    assert created_id(again, route) == created_id(first, route)
    assert again.json() == first.json()
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert await rows(h, route.table) == 1


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_same_key_with_another_body_is_409(h: AppHarness, route: Route) -> None:
    body, other = await route.bodies(h, {})
    key = {"Idempotency-Key": "same-2"}
    first_id = created_id(await h.client.post(route.path, json=body, headers=key), route)
    r = await h.client.post(route.path, json=other, headers=key)
    assert r.status_code == 409, r.text
    assert r.json() == {
        "error": {
            "message": "this Idempotency-Key was already used with a different request body",
            "type": "invalid_request_error",
            "param": "Idempotency-Key",
            "code": "idempotency_key_reused",
        }
    }
    assert await rows(h, route.table) == 1
    # the refusal changed nothing: the first body still replays the first answer
    again = await h.client.post(route.path, json=body, headers=key)
    assert created_id(again, route) == first_id


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_without_key_each_post_creates(h: AppHarness, route: Route) -> None:
    body, _ = await route.bodies(h, {})
    first = created_id(await h.client.post(route.path, json=body), route)
    second = created_id(await h.client.post(route.path, json=body), route)
    assert first != second
    assert await rows(h, route.table) == 2


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_keys_are_scoped_per_tenant(
    harness_factory: HarnessFactory, tmp_path: Any, route: Route
) -> None:
    h = await harness_factory(
        auth="required",
        run_worker=False,
        files_dir=str(tmp_path / "f"),
        webhook_allow_private=["127.0.0.0/8"],  # keys exist: loopback receivers need listing
    )
    _, key_a = await h.state.store.keys.create("tenant-a")
    _, key_b = await h.state.store.keys.create("tenant-b")
    idem = {"Idempotency-Key": "shared"}
    body_a, _ = await route.bodies(h, bearer(key_a))
    _, body_b = await route.bodies(h, bearer(key_b))  # another body: no 409 across tenants
    a = created_id(
        await h.client.post(route.path, json=body_a, headers=bearer(key_a) | idem), route
    )
    b = created_id(
        await h.client.post(route.path, json=body_b, headers=bearer(key_b) | idem), route
    )
    assert a != b
    replay_b = await h.client.post(route.path, json=body_b, headers=bearer(key_b) | idem)
    assert created_id(replay_b, route) == b
    assert replay_b.headers["idempotent-replayed"] == "true"
    assert await rows(h, route.table, "tenant-a") == await rows(h, route.table, "tenant-b") == 1


@pytest.mark.parametrize(
    "route",
    [SLOW, GROUP, WEBHOOKS, BATCHES],
    ids=str,
)
async def test_concurrent_same_key_creates_one(
    h: AppHarness, route: Route, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, _ = await route.bodies(h, {})
    # Both requests look the key up before either saves it: the race, made certain.
    store = h.state.store.idempotency
    lookup = store.answer
    both_looked = asyncio.Barrier(2)
    lookups = 0

    async def answer_after_both(tenant: str, key: str, ttl_seconds: float) -> Any:
        nonlocal lookups
        found = await lookup(tenant, key, ttl_seconds)
        lookups += 1
        if lookups <= 2:
            async with asyncio.timeout(WAIT):
                await both_looked.wait()
        return found

    monkeypatch.setattr(store, "answer", answer_after_both)
    key = {"Idempotency-Key": "racing"}
    async with asyncio.timeout(WAIT):
        answers = await asyncio.gather(
            h.client.post(route.path, json=body, headers=key),
            h.client.post(route.path, json=body, headers=key),
            return_exceptions=True,
        )
    statuses = [a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers]
    assert statuses == [200, 200]
    first, second = (a for a in answers if isinstance(a, httpx.Response))
    assert created_id(first, route) == created_id(second, route)
    assert await rows(h, route.table) == 1
