"""HTTP helpers for the tenancy API tests: keys as headers, request bodies, the 429 envelope,
rows counted in the store, metrics samples and bounded polling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from backburner.store.tables import batches, generations, groups
from tests.conftest import FAKE_MODEL, AppHarness

T = TypeVar("T")
Headers = dict[str, str]
SLOW = "/v1/slow/chat/completions"
GROUP = "/v1/slow/group/chat/completions"
REALTIME = "/v1/chat/completions"
TABLES = {"generations": generations, "groups": groups, "batches": batches}


def bearer(key: str) -> Headers:
    return {"Authorization": f"Bearer {key}"}


async def key_for(h: AppHarness, tenant: str, *, admin: bool = False) -> Headers:
    """A new key of ``tenant`` (made through the store), as request headers."""
    _, key = await h.state.store.keys.create(tenant, admin=admin)
    return bearer(key)


def chat(i: int = 0) -> dict[str, Any]:
    return {"model": FAKE_MODEL, "messages": [{"role": "user", "content": f"q{i}"}]}


def group(n: int) -> dict[str, Any]:
    return {"requests": [chat(i) for i in range(n)]}


def batch_file(n: int) -> bytes:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat(i)}
        for i in range(n)
    ]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


async def upload(h: AppHarness, headers: Headers, lines: int) -> str:
    r = await h.client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", batch_file(lines), "application/jsonl")},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def batch_body(file_id: str) -> dict[str, Any]:
    return {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }


async def rows(h: AppHarness, table: str, tenant: str | None = None) -> int:
    """Rows of ``table`` (all tenants', or ``tenant``'s) in the harness's database."""
    t = TABLES[table]
    q = sa.select(sa.func.count()).select_from(t)
    if tenant is not None:
        q = q.where(t.c.tenant == tenant)
    async with h.state.store.engine.connect() as conn:
        return int((await conn.execute(q)).scalar_one())


async def stored(h: AppHarness, tenant: str | None = None) -> tuple[int, int, int]:
    """(generations, groups, batches) stored."""
    return (
        await rows(h, "generations", tenant),
        await rows(h, "groups", tenant),
        await rows(h, "batches", tenant),
    )


def envelope(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope of ``r``, checked: its status, its four keys, its code."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def bad_request(r: httpx.Response, param: str) -> dict[str, Any]:
    """A 400 naming ``param`` (in ``param`` and in the message)."""
    err = envelope(r, 400)
    assert err["param"] == param, err
    assert param in err["message"], err
    return err


def too_many(r: httpx.Response, limit: str, value: int, *, retry: bool) -> dict[str, Any]:
    """A 429 for ``limit`` at ``value``: the envelope, the limit and its value named in the
    message, ``Retry-After`` in whole seconds when ``retry`` (waiting helps), none otherwise."""
    err = envelope(r, 429, code=f"{limit}_exceeded")
    assert err["type"] == "rate_limit_error", err
    assert f"{limit} = {value}" in err["message"], err
    after = r.headers.get("retry-after")
    if retry:
        assert after is not None and after.isdigit() and int(after) >= 1, r.headers
    else:
        assert after is None, r.headers
    return err


def retry_after(r: httpx.Response) -> int:
    return int(r.headers["retry-after"])


async def patch(h: AppHarness, admin: Headers, tenant: str, **body: Any) -> dict[str, Any]:
    r = await h.client.patch(f"/v1/admin/tenants/{tenant}", json=body, headers=admin)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def create_tenant(h: AppHarness, admin: Headers, tenant: str, **body: Any) -> dict[str, Any]:
    r = await h.client.post("/v1/admin/tenants", json={"id": tenant, **body}, headers=admin)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def poll(
    probe: Callable[[], Awaitable[T | None]], timeout: float = 10.0, every: float = 0.05
) -> T:
    """``probe()`` until it answers something other than None, at most ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            found = await probe()
            if found is not None:
                return found
            await asyncio.sleep(every)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric family ``name`` in a Prometheus exposition: labels -> value."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = float(s.value)
    return out
