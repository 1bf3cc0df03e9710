"""The Batch API through the OpenAI SDK and raw HTTP (SPEC section 4)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from backburner.core.states import Kind
from backburner.errors import BackendRejected
from tests.conftest import FAKE_MODEL
from tests.support.fake_backend import FakeBackend
from tests.support.receiver import running_receiver
from tests.support.sdk import asgi_http_client


class MarkerBackend(FakeBackend):
    """Rejects (4xx) any request whose user message is REJECT; otherwise echoes."""

    async def run(
        self, kind: Kind, body: dict[str, Any], *, background: bool = False
    ) -> dict[str, Any]:
        if any(m.get("content") == "REJECT" for m in body.get("messages", [])):
            self.calls.append((kind, body))
            raise BackendRejected("upstream HTTP 400: bad request", upstream_status=400)
        return await super().run(kind, body)


def line(i: int, text: str | None = None, **over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": FAKE_MODEL, "messages": [{"role": "user", "content": text or f"q{i}"}]},
    }
    obj.update(over)
    return obj


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def sdk(h: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key="x",
        http_client=asgi_http_client(h.app),
    )


async def wait_status(h: Any, batch_id: str, *statuses: str, timeout: float = 30) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            b = (await h.client.get(f"/v1/batches/{batch_id}")).json()
            if b["status"] in statuses:
                return b
            await asyncio.sleep(0.02)


@pytest.fixture
async def h(harness_factory: Any, tmp_path: Any) -> Any:
    return await harness_factory(
        backend=MarkerBackend("fake"),
        files_dir=str(tmp_path / "files"),
        webhook_retry_schedule_seconds=[0.05, 0.1, 0.2],
        webhook_poll_interval_seconds=0.02,
    )


async def upload(h: Any, data: bytes) -> str:
    r = await h.client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", data, "application/jsonl")},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


async def test_sdk_batch_of_201_with_one_rejected(h: Any) -> None:
    client = sdk(h)
    lines = [line(i) for i in range(200)] + [line(200, "REJECT")]
    f = await client.files.create(
        file=("in.jsonl", jsonl(lines), "application/jsonl"), purpose="batch"
    )
    b = await client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert b.status == "validating"
    done = await wait_status(h, b.id, "completed", "failed")
    assert done["status"] == "completed", done
    got = await client.batches.retrieve(b.id)
    assert got.request_counts is not None
    assert (got.request_counts.total, got.request_counts.completed, got.request_counts.failed) == (
        201,
        200,
        1,
    )
    assert got.metadata == {"job": "nightly"}
    assert got.output_file_id and got.error_file_id
    out = [
        json.loads(x) for x in (await client.files.content(got.output_file_id)).text.splitlines()
    ]
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(200))
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "echo: q0"
    errs = [
        json.loads(x) for x in (await client.files.content(got.error_file_id)).text.splitlines()
    ]
    assert [e["custom_id"] for e in errs] == ["req-200"]
    assert errs[0]["response"] is None and "400" in errs[0]["error"]["message"]
    listed = await client.batches.list(limit=10)
    assert [x.id for x in listed.data] == [b.id]


async def test_bad_line_7_fails_and_runs_nothing(h: Any) -> None:
    lines: list[Any] = [line(i) for i in range(10)]
    lines[6] = {"custom_id": "req-6", "method": "POST", "body": {"model": FAKE_MODEL}}
    fid = await upload(h, jsonl(lines))
    r = await h.client.post(
        "/v1/batches",
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    b = await wait_status(h, r.json()["id"], "failed", "completed")
    assert b["status"] == "failed"
    errors = b["errors"]["data"]
    assert {e["line"] for e in errors} == {7}
    assert all(e["message"].startswith("line 7") for e in errors)
    assert any(e["param"] == "body.messages" for e in errors)
    assert b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert await h.state.store.generations.count_by_state() == {}


async def test_duplicate_custom_id_and_bad_json_are_named(h: Any) -> None:
    data = jsonl([line(1), line(2), line(1)]) + b"{not json\n"
    fid = await upload(h, data)
    r = await h.client.post(
        "/v1/batches",
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    b = await wait_status(h, r.json()["id"], "failed", "completed")
    # every problem in one round: the duplicate (line 3) and the bad JSON (line 4)
    assert [e["line"] for e in b["errors"]["data"]] == [3, 4]
    fid = await upload(h, jsonl([line(1), line(2), line(1)]))
    r = await h.client.post(
        "/v1/batches",
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    b = await wait_status(h, r.json()["id"], "failed", "completed")
    (err,) = b["errors"]["data"]
    assert err["line"] == 3 and "duplicate of line 1" in err["message"]


async def test_url_inferred_or_mismatched(h: Any) -> None:
    ok = line(1)
    del ok["url"]
    wrong = line(2, url="/v1/embeddings")
    fid = await upload(h, jsonl([ok, wrong]))
    r = await h.client.post(
        "/v1/batches",
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    b = await wait_status(h, r.json()["id"], "failed", "completed")
    assert [(e["line"], e["param"]) for e in b["errors"]["data"]] == [(2, "url")]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, "input_file_id"),
        (
            {
                "input_file_id": "nope",
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
            "input_file_id",
        ),
        (
            {"input_file_id": "x", "endpoint": "/v1/responses", "completion_window": "24h"},
            "endpoint",
        ),
        (
            {"input_file_id": "x", "endpoint": "/v1/chat/completions", "completion_window": "48h"},
            "completion_window",
        ),
    ],
)
async def test_create_refusals(h: Any, body: dict[str, Any], param: str) -> None:
    r = await h.client.post("/v1/batches", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if param == "completion_window":
        assert "24h" in r.json()["error"]["message"]


async def test_cancel_then_retry(harness_factory: Any, tmp_path: Any) -> None:
    backend = MarkerBackend("fake", delay=0.05)
    h = await harness_factory(backend=backend, files_dir=str(tmp_path / "f"))
    fid = await upload(h, jsonl([line(i) for i in range(60)]))
    r = await h.client.post(
        "/v1/batches",
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    bid = r.json()["id"]
    await wait_status(h, bid, "in_progress")
    partial = await h.client.get(f"/v1/batches/{bid}/results")
    assert partial.headers["x-backburner-partial"] == "true"
    r = await h.client.post(f"/v1/batches/{bid}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    b = await wait_status(h, bid, "cancelled")
    counts = b["request_counts"]
    assert counts["total"] == 60 and counts["completed"] + counts["failed"] == 60
    assert counts["failed"] > 0
    assert (await h.client.post(f"/v1/batches/{bid}/cancel")).status_code == 409
    errs = (await h.client.get(f"/v1/files/{b['error_file_id']}/content")).text.splitlines()
    assert json.loads(errs[0])["error"]["code"] == "batch_cancelled"
    r = await h.client.post(f"/v1/batches/{bid}/retry")
    assert r.status_code == 200, r.text
    b = await wait_status(h, bid, "completed")
    assert b["request_counts"] == {"total": 60, "completed": 60, "failed": 0}
    assert b["error_file_id"] is None


async def test_webhook_url_gets_batch_completed(h: Any) -> None:
    async with running_receiver() as rec:
        fid = await upload(h, jsonl([line(1)]))
        r = await h.client.post(
            "/v1/batches",
            json={
                "input_file_id": fid,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "webhook_url": rec.url,
            },
        )
        bid = r.json()["id"]
        (post,) = await rec.wait_posts(1)
        payload = post.json()
        assert payload["event"] == "batch.completed"
        assert payload["batch_id"] == payload["batchId"] == bid
        assert payload["data"]["status"] == "completed"
        assert post.headers["x-inference-event"] == "batch.completed"


async def test_other_tenant_sees_404(harness_factory: Any, tmp_path: Any) -> None:
    h = await harness_factory(auth="required", files_dir=str(tmp_path / "f"))
    _, ka = await h.state.store.keys.create("a")
    _, kb = await h.state.store.keys.create("b")
    a = {"Authorization": f"Bearer {ka}"}
    b = {"Authorization": f"Bearer {kb}"}
    r = await h.client.post(
        "/v1/files",
        data={"purpose": "batch"},
        headers=a,
        files={"file": ("in.jsonl", jsonl([line(1)]), "application/jsonl")},
    )
    fid = r.json()["id"]
    r = await h.client.post(
        "/v1/batches",
        headers=b,
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id"
    r = await h.client.post(
        "/v1/batches",
        headers=a,
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    bid = r.json()["id"]
    for method, path in (
        ("GET", f"/v1/batches/{bid}"),
        ("POST", f"/v1/batches/{bid}/cancel"),
        ("POST", f"/v1/batches/{bid}/retry"),
        ("GET", f"/v1/batches/{bid}/results"),
    ):
        assert (await h.client.request(method, path, headers=b)).status_code == 404
    assert (await h.client.get("/v1/batches", headers=b)).json()["data"] == []


async def test_cancel_while_loading_keeps_every_line(harness_factory: Any, tmp_path: Any) -> None:
    """Lines not yet loaded when a batch is cancelled still become (cancelled) requests: they
    appear in the error file and a retry runs them."""
    h = await harness_factory(
        backend=MarkerBackend("fake", delay=0.01), files_dir=str(tmp_path / "f")
    )
    h.app.state.services.batches.chunk_lines = 50  # load in many small chunks
    fid = await upload(h, jsonl([line(i) for i in range(600)]))
    r = await h.client.post(
        "/v1/batches",
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    bid = r.json()["id"]
    await wait_status(h, bid, "in_progress")
    await h.client.post(f"/v1/batches/{bid}/cancel")
    b = await wait_status(h, bid, "cancelled")
    counts = b["request_counts"]
    assert counts["total"] == 600 and counts["completed"] + counts["failed"] == 600
    lines_out = 0
    for key in ("output_file_id", "error_file_id"):
        if b[key]:
            lines_out += len((await h.client.get(f"/v1/files/{b[key]}/content")).text.splitlines())
    assert lines_out == 600
    await h.client.post(f"/v1/batches/{bid}/retry")
    b = await wait_status(h, bid, "completed")
    assert b["request_counts"] == {"total": 600, "completed": 600, "failed": 0}


async def test_sdk_batch_and_cancel_on_both_stores(
    store: Any, harness_factory: Any, tmp_path: Any
) -> None:
    """The same flow on SQLite and PostgreSQL (the ``store`` fixture empties the PG tables)."""
    h = await harness_factory(
        db=store.url, backend=MarkerBackend("fake"), files_dir=str(tmp_path / "f")
    )
    client = sdk(h)
    data = jsonl([line(i) for i in range(20)] + [line(20, "REJECT")])
    f = await client.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch")
    b = await client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await wait_status(h, b.id, "completed")
    assert done["request_counts"] == {"total": 21, "completed": 20, "failed": 1}
    h2 = await harness_factory(
        db=store.url, backend=MarkerBackend("fake", delay=0.2), files_dir=str(tmp_path / "f")
    )
    c2 = sdk(h2)
    f2 = await c2.files.create(
        file=("in2.jsonl", jsonl([line(i) for i in range(40)]), "application/jsonl"),
        purpose="batch",
    )
    b2 = await c2.batches.create(
        input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await wait_status(h2, b2.id, "in_progress")
    cancelled = await c2.batches.cancel(b2.id)
    assert cancelled.status in ("cancelling", "cancelled")
    final = await wait_status(h2, b2.id, "cancelled")
    assert final["request_counts"]["total"] == 40
    ids = [x.id for x in (await c2.batches.list()).data]
    assert ids[:2] == [b2.id, b.id]
