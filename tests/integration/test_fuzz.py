"""Fuzzing every route that takes a body (issue #10), on SQLite and PostgreSQL.

The rule: bad input gets a clear error and changes nothing; anything accepted can always be read
back, listed and announced. Each POST, PUT and PATCH route of the app is in :data:`ROUTES` (a
test fails when a new one is not) with the bodies it accepts; hypothesis sends those, the same
with one place changed (a wrong type, ``1e400``, a lone surrogate, NUL, deep nesting, a huge
string, an unknown or missing field), random JSON and bytes that are not JSON, as raw bytes. Every
answer is checked: never a 5xx; a refusal is the OpenAI envelope naming the field that was changed
and leaves every table and the file store as they were; what was accepted is read back by id,
found in its listing, run (the echo engine runs anything accepted), and its webhook events can
be sent. :func:`test_every_field` adds a sweep that is sure to reach every field of each route:
each one tainted with NUL and with a lone surrogate, made a list, nested too deep, removed.
Uploads and batch files with poison lines are in ``test_fuzz_files.py``.

Examples are derandomized and bounded (see :data:`~tests.support.fuzz.FUZZ`), so CI runs the same
inputs each time.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from backburner.api.app import create_app
from backburner.schemas.batch import TERMINAL, Batch, BatchList, BatchRequestOutput
from backburner.schemas.events import EventName
from backburner.schemas.generation import (
    Generation,
    Group,
    GroupSubmitted,
    GroupWithGenerations,
)
from backburner.schemas.openai import (
    ChatCompletion,
    Completion,
    EmbeddingList,
    GenerationSubmitted,
)
from backburner.schemas.tenants import Tenant, TenantList
from backburner.schemas.webhook import (
    ALL_EVENTS,
    DeliveryQueued,
    Webhook,
    WebhookCreated,
    WebhookList,
)
from tests.conftest import make_settings
from tests.support.fuzz import (
    FUZZ,
    Fuzzed,
    bodies,
    dump,
    examples,
    idempotency_keys,
    junk,
    path_ids,
    sweep,
)
from tests.support.fuzz_bodies import (
    batch_create,
    chat,
    completion,
    embedding,
    full,
    full_batch,
    full_group,
    full_tenant,
    full_tenant_update,
    full_webhook,
    group,
    tenant_create,
    tenant_update,
    webhook_create,
    webhook_update,
)
from tests.support.fuzz_world import (
    TENANT,
    World,
    check_answer,
    check_wire,
)

ROUTE = tuple[str, str]  # (method, path as the app declares it)

# ---------------------------------------------------------------------------- accepted: read back


@dataclass
class Sent:
    """One request of an example: what was sent, and what the database held before it."""

    fuzzed: Fuzzed
    path: str
    known: bool  # the path names an object that exists
    before: dict[str, Any]

    @property
    def body(self) -> Any:
        return json.loads(self.fuzzed.raw)


async def read(world: World, url: str, model: Any) -> dict[str, Any]:
    r = await world.client.get(url)
    assert r.status_code == 200, (url, r.text[:500])
    out: dict[str, Any] = r.json()
    model.model_validate(out)
    return out


async def generation_done(world: World, gid: str, sent: dict[str, Any]) -> dict[str, Any]:
    """The generation reads back as sent; run on the echo engine (which runs anything), it
    succeeds, and it is announced to its webhook."""
    gen = await read(world, f"/v1/generation/{gid}", Generation)
    assert gen["request"] == sent
    await world.drain()
    gen = await read(world, f"/v1/generation/{gid}", Generation)
    assert gen["state"] == "Success", f"accepted, but the echo engine could not run it: {gen}"
    record = await world.store.generations.get(TENANT, gid)
    check_wire(record.to_wire())
    metadata = sent.get("metadata") or {}
    if metadata.get("webhook_id") == world.ids["hook"]:
        found = await world.events(generation_id=gid)
        names = {EventName.GENERATION_COMPLETED, EventName.EMBEDDING_COMPLETED}
        assert [e for _, e, _, _ in found if e in names], f"no event for generation {gid}"
    return gen


async def slow_accepted(world: World, sent: Sent, r: httpx.Response) -> None:
    answer = GenerationSubmitted.model_validate(r.json())
    await generation_done(world, answer.id, sent.body)


async def group_accepted(world: World, sent: Sent, r: httpx.Response) -> None:
    answer = GroupSubmitted.model_validate(r.json())
    body = sent.body
    assert answer.groupSize == len(body["requests"])
    for prefix in ("/v1/slow", "/v1/async"):
        summary = await read(world, f"{prefix}/group/{answer.groupId}", Group)
        assert summary.get("metadata") == body.get("metadata")
    url = f"/v1/slow/group/{answer.groupId}/generations"
    full = await read(world, url, GroupWithGenerations)
    assert [g["request"] for g in full["generations"]] == body["requests"]
    await world.drain()
    full = await read(world, url, GroupWithGenerations)
    assert full["status"] == "completed", full
    for g, request in zip(full["generations"], body["requests"], strict=True):
        await generation_done(world, g["id"], request)
    group, generations = await world.store.groups.get(TENANT, answer.groupId, with_generations=True)
    check_wire(group.to_wire(generations))
    if body.get("webhook_id") is not None:
        found = await world.events(group_id=answer.groupId)
        assert [e for _, e, _, _ in found if e == EventName.GROUP_COMPLETED], "no group event"


REALTIME_ANSWERS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletion,
    "/v1/completions": Completion,
    "/v1/embeddings": EmbeddingList,
}


async def realtime_accepted(world: World, sent: Sent, r: httpx.Response) -> None:
    body = sent.body
    if body.get("stream") is True:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-3:]
        for e in events[:-1]:
            json.loads(e.removeprefix("data: "))
    else:
        REALTIME_ANSWERS[sent.path].model_validate(r.json())
    after = await world.snapshot()
    new = set(after["generations"]) - set(sent.before["generations"])
    metadata = body.get("metadata") or {}
    if metadata.get("webhook_id") is None:
        assert not new, "a realtime request without a webhook is not kept"
        return
    (row,) = new
    await generation_done(world, row[0], body)


async def webhook_created(world: World, sent: Sent, r: httpx.Response) -> None:
    hook = WebhookCreated.model_validate(r.json()).model_dump()
    body = sent.body
    del hook["secret"]
    assert await read(world, f"/v1/webhooks/{hook['id']}", Webhook) == hook
    listed = await read(world, "/v1/webhooks", WebhookList)
    assert hook in listed["data"]
    assert hook["url"] == body["url"] and hook["name"] == body.get("name")
    assert hook["events"] == (body.get("events") or list(ALL_EVENTS))
    assert hook["enabled"] == body.get("enabled", True)


async def webhook_updated(world: World, sent: Sent, r: httpx.Response) -> None:
    hook = Webhook.model_validate(r.json()).model_dump()
    assert await read(world, sent.path, Webhook) == hook
    assert hook in (await read(world, "/v1/webhooks", WebhookList))["data"]
    for key, value in sent.body.items():
        assert hook[key] == ((value or list(ALL_EVENTS)) if key == "events" else value), key


async def tenant_created(world: World, sent: Sent, r: httpx.Response) -> None:
    made = Tenant.model_validate(r.json()).model_dump(mode="json")
    body = sent.body
    assert await read(world, f"/v1/admin/tenants/{made['id']}", Tenant) == made
    listed = await read(world, "/v1/admin/tenants?limit=1000", TenantList)
    assert made in listed["data"]
    assert made["id"] == body["id"] and made["weight"] == body.get("weight", 1.0)
    assert made["limits"] == body.get("limits", {})
    assert made["disabled"] == body.get("disabled", False)


async def tenant_updated(world: World, sent: Sent, r: httpx.Response) -> None:
    changed = Tenant.model_validate(r.json()).model_dump(mode="json")
    assert await read(world, sent.path, Tenant) == changed
    body = sent.body
    if body.get("weight") is not None:
        assert changed["weight"] == body["weight"]
    if body.get("disabled") is not None:
        assert changed["disabled"] == body["disabled"]
    for name, value in (body.get("limits") or {}).items():
        if value == "default":
            assert name not in changed["limits"], name
        else:
            assert changed["limits"][name] == value, name


async def listed_batch(world: World, batch_id: str) -> dict[str, Any]:
    after: str | None = None
    while True:
        query = "?limit=100" + (f"&after={after}" if after else "")
        page = await read(world, "/v1/batches" + query, BatchList)
        for b in page["data"]:
            if b["id"] == batch_id:
                found: dict[str, Any] = b
                return found
        assert page["has_more"], f"batch {batch_id} is not listed"
        after = page["last_id"]


async def batch_accepted(world: World, sent: Sent, r: httpx.Response) -> None:
    batch = Batch.model_validate(r.json())
    body = sent.body
    assert await read(world, f"/v1/batches/{batch.id}", Batch) == r.json()
    assert (await listed_batch(world, batch.id))["metadata"] == body.get("metadata")
    await world.drain()
    done = await read(world, f"/v1/batches/{batch.id}", Batch)
    assert done["status"] in TERMINAL, done
    for kind in ("output", "error"):
        results = await world.client.get(f"/v1/batches/{batch.id}/results", params={"type": kind})
        assert results.status_code == 200
        for line in results.text.splitlines():
            BatchRequestOutput.model_validate_json(line)
    found = await world.events(batch_id=batch.id)
    if body.get("webhook_url"):
        assert [u for _, _, u, _ in found if u == body["webhook_url"]], "no event for webhook_url"
    assert [p for _, _, _, p in found if p.get("webhook_id") == world.ids["hook"]], "no hook event"


def read_back(url: str, model: Any) -> Callable[[World, Sent, httpx.Response], Awaitable[None]]:
    """For routes that act on an object: the answer, and the object read again by ``url``
    (``{id}`` is the object's id), are what they say."""

    async def check(world: World, sent: Sent, r: httpx.Response) -> None:
        assert sent.known, f"{sent.path} answered 200 for an object that does not exist"
        model.model_validate(r.json())
        object_id = urllib.parse.unquote(sent.path.split("/")[-2])
        await read(world, url.format(id=object_id), model)

    return check


async def event_queued(world: World, sent: Sent, r: httpx.Response) -> None:
    """The event queued by a test or a redelivery is in the outbox, ready to send."""
    assert sent.known, f"{sent.path} answered 200 for an object that does not exist"
    queued = DeliveryQueued.model_validate(r.json())
    assert queued.id in {event_id for event_id, *_ in await world.events()}


# ---------------------------------------------------------------------------- the routes


@dataclass(frozen=True)
class Route:
    valid: Callable[[World], st.SearchStrategy[Any]] | None  # None: the route reads no body
    accepted: Callable[[World, Sent, httpx.Response], Awaitable[None]]
    ids: dict[str, str] = field(default_factory=dict)  # path parameter: the object it names
    examples: int = 25
    full: Callable[[World], dict[str, Any]] | None = None  # every field, for test_every_field


def alias(route: Route) -> Route:
    """The same handler under ``/v1/async``: fewer examples, no sweep."""
    return Route(route.valid, route.accepted, route.ids, examples=8)


def realtime(kind: str, valid: Callable[..., st.SearchStrategy[Any]]) -> Route:
    return Route(lambda w: valid(w, realtime=True), realtime_accepted, full=full(kind))


SLOW_CHAT = Route(chat, slow_accepted, examples=30, full=full("chat"))
SLOW_COMPLETION = Route(completion, slow_accepted, full=full("completion"))
SLOW_EMBEDDING = Route(embedding, slow_accepted, full=full("embedding"))
GROUP_CHAT = Route(group(chat), group_accepted, full=full_group)
GROUP_COMPLETION = Route(group(completion), group_accepted, examples=20)
GROUP_CANCEL = Route(
    None, read_back("/v1/slow/group/{id}", Group), ids={"group_id": "group"}, examples=12
)

ROUTES: dict[ROUTE, Route] = {
    ("POST", "/v1/slow/chat/completions"): SLOW_CHAT,
    ("POST", "/v1/slow/completions"): SLOW_COMPLETION,
    ("POST", "/v1/slow/embeddings"): SLOW_EMBEDDING,
    ("POST", "/v1/async/chat/completions"): alias(SLOW_CHAT),
    ("POST", "/v1/async/completions"): alias(SLOW_COMPLETION),
    ("POST", "/v1/async/embeddings"): alias(SLOW_EMBEDDING),
    ("POST", "/v1/slow/group/chat/completions"): GROUP_CHAT,
    ("POST", "/v1/slow/group/completions"): GROUP_COMPLETION,
    ("POST", "/v1/async/group/chat/completions"): alias(GROUP_CHAT),
    ("POST", "/v1/async/group/completions"): alias(GROUP_COMPLETION),
    ("POST", "/v1/slow/group/{group_id}/cancel"): GROUP_CANCEL,
    ("POST", "/v1/async/group/{group_id}/cancel"): alias(GROUP_CANCEL),
    ("POST", "/v1/chat/completions"): realtime("chat", chat),
    ("POST", "/v1/completions"): realtime("completion", completion),
    ("POST", "/v1/embeddings"): realtime("embedding", embedding),
    ("POST", "/v1/generation/{generation_id}/cancel"): Route(
        None,
        read_back("/v1/generation/{id}", Generation),
        ids={"generation_id": "generation"},
        examples=12,
    ),
    ("POST", "/v1/webhooks"): Route(
        webhook_create, webhook_created, examples=50, full=full_webhook
    ),
    ("PATCH", "/v1/webhooks/{webhook_id}"): Route(
        webhook_update,
        webhook_updated,
        ids={"webhook_id": "other_hook"},
        examples=50,
        full=full_webhook,
    ),
    ("POST", "/v1/webhooks/{webhook_id}/test"): Route(
        None, event_queued, ids={"webhook_id": "hook"}, examples=12
    ),
    ("POST", "/v1/webhooks/deliveries/{delivery_id}/redeliver"): Route(
        None, event_queued, ids={"delivery_id": "delivery"}, examples=12
    ),
    ("POST", "/v1/batches"): Route(batch_create, batch_accepted, examples=20, full=full_batch),
    ("POST", "/v1/admin/tenants"): Route(
        tenant_create, tenant_created, examples=20, full=full_tenant
    ),
    ("PATCH", "/v1/admin/tenants/{tenant_id}"): Route(
        tenant_update,
        tenant_updated,
        ids={"tenant_id": "other_tenant"},
        examples=20,
        full=full_tenant_update,
    ),
    ("POST", "/v1/batches/{batch_id}/cancel"): Route(
        None, read_back("/v1/batches/{id}", Batch), ids={"batch_id": "new_batch"}, examples=12
    ),
    ("POST", "/v1/batches/{batch_id}/retry"): Route(
        None, read_back("/v1/batches/{id}", Batch), ids={"batch_id": "batch"}, examples=12
    ),
}
UPLOAD: ROUTE = ("POST", "/v1/files")  # multipart: test_uploads


def test_every_route_that_takes_a_body_is_fuzzed(tmp_path: Path) -> None:
    """The routes the OpenAPI document declares with POST, PUT or PATCH are those fuzzed: a
    new one fails here until it is in ROUTES."""
    app = create_app(make_settings(f"sqlite:///{tmp_path}/unused.db"), migrate=False)
    declared = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method in ("post", "put", "patch")
    }
    assert declared == {*ROUTES, UPLOAD}


# ---------------------------------------------------------------------------- one example


def check_refusal(err: dict[str, Any], status: int, fuzzed: Fuzzed, key: str | None) -> None:
    """A 400 names what is wrong: ``param`` is set, and for a changed field the message or
    ``param`` names it (a change the JSON reader refuses may be named ``body``)."""
    if status != 400:
        return
    param, message = err["param"], err["message"]
    assert isinstance(param, str) and param, f"{fuzzed}: no param in {err}"
    if param.lower() == "idempotency-key":
        assert key is not None, err
        return
    if fuzzed.valid:
        raise AssertionError(f"a valid body was refused: {fuzzed}: {err}")
    if fuzzed.fields and not (fuzzed.whole and param == "body"):
        said = f"{param} {message}"
        assert any(name in said for name in fuzzed.fields), (
            f"{fuzzed}: the refusal names none of {fuzzed.fields}: {err}"
        )


def route_path(world: World, template: str, route: Route, chosen: dict[str, str | None]) -> str:
    """The path of ``route`` naming ``chosen`` ids (None: the world's object)."""
    path = template
    for param, name in route.ids.items():
        object_id = chosen.get(param) or world.ids[name]
        path = path.replace("{" + param + "}", urllib.parse.quote(object_id, safe=""))
    return path


async def example(world: World, at: ROUTE, route: Route, data: st.DataObject) -> None:
    chosen: dict[str, str | None] = {}
    for param in route.ids:
        # a route with a body is mostly sent to an object that exists, to reach the body
        ids = st.one_of(st.none(), st.none(), st.none(), path_ids()) if route.valid else path_ids()
        chosen[param] = data.draw(ids, label=param)
    path = route_path(world, at[1], route, chosen)
    known = all(v is None for v in chosen.values())
    fuzzed = data.draw(junk() if route.valid is None else bodies(route.valid(world)), label="body")
    key = data.draw(idempotency_keys(), label="Idempotency-Key")
    await send(world, at, route, path, known, fuzzed, key)


async def send(
    world: World, at: ROUTE, route: Route, path: str, known: bool, fuzzed: Fuzzed, key: str | None
) -> None:
    """Send ``fuzzed`` and check the answer: the rule of this module."""
    method = at[0]
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["idempotency-key"] = key
    before = await world.snapshot()
    r = await world.client.request(method, path, content=fuzzed.raw, headers=headers)
    said = f"{method} {path[:100]} {fuzzed}"
    err = check_answer(r, said)
    if err is not None:
        check_refusal(err, r.status_code, fuzzed, key)
        assert await world.snapshot() == before, f"{said}: refused ({err}) but changed the store"
        return
    assert r.status_code == 200, said
    await route.accepted(world, Sent(fuzzed, path, known, before), r)


@pytest.mark.parametrize("at", list(ROUTES), ids=" ".join)
def test_route(at: ROUTE, db_url: str, tmp_path: Path) -> None:
    route = ROUTES[at]
    with asyncio.Runner() as runner:
        world = runner.run(World.start(db_url, tmp_path))
        try:

            @settings(FUZZ, max_examples=examples(route.examples, db_url))
            @given(data=st.data())
            def fuzz(data: st.DataObject) -> None:
                runner.run(example(world, at, route, data))

            fuzz()
        finally:
            runner.run(world.close())


@pytest.mark.parametrize("at", [at for at, r in ROUTES.items() if r.full], ids=" ".join)
def test_every_field(at: ROUTE, db_url: str, tmp_path: Path) -> None:
    """Each field of a full valid body is tainted (NUL, lone surrogate), made a list, nested too
    deep and removed in turn: the same rule, for every field, every run."""
    route = ROUTES[at]
    assert route.full is not None
    with asyncio.Runner() as runner:
        world = runner.run(World.start(db_url, tmp_path))
        try:
            base = route.full(world)
            path = route_path(world, at[1], route, {})
            runner.run(
                send(world, at, route, path, True, Fuzzed(dump(base).encode(), "valid"), None)
            )
            for fuzzed in sweep(base):
                runner.run(send(world, at, route, path, True, fuzzed, None))
        finally:
            runner.run(world.close())


def test_nul_in_any_path_or_query_parameter(db_url: str, tmp_path: Path) -> None:
    """Every operation of the OpenAPI document, with a NUL in each of its path parameters (404)
    and each of its query parameters (400): PostgreSQL refuses NUL in a query, so the store is
    never asked."""
    with asyncio.Runner() as runner:
        world = runner.run(World.start(db_url, tmp_path))
        try:
            runner.run(nul_everywhere(world))
        finally:
            runner.run(world.close())


async def nul_everywhere(world: World) -> None:
    doc = (await world.client.get("/openapi.json")).json()
    for template, operations in doc["paths"].items():
        for method, operation in operations.items():
            params = operation.get("parameters", [])
            for where, status in (("path", 404), ("query", 400)):
                named = [p["name"] for p in params if p["in"] == where]
                if not named:
                    continue
                path = template
                for p in params:
                    if p["in"] == "path":
                        path = path.replace(
                            "{" + p["name"] + "}", "a%00b" if where == "path" else "x"
                        )
                query = {name: "a\x00b" for name in named} if where == "query" else {}
                r = await world.client.request(method, path, params=query)
                said = f"{method.upper()} {path} {query}"
                err = check_answer(r, said)
                assert r.status_code == status and err is not None, (said, r.text)
                assert err["param"] in named, (said, err)
