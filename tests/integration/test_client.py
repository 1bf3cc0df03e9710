"""The async client against the app in-process (httpx.ASGITransport), on SQLite and PostgreSQL:
slow submits, groups, batches with results in input order, waiting, cancel, webhooks, errors."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pytest

from backburner.client import AsyncClient, BackburnerAPIError, Backoff, WaitTimeout
from backburner.core.states import Kind
from backburner.errors import BackendRejected
from tests.conftest import FAKE_MODEL
from tests.support.fake_backend import FakeBackend

FAST = Backoff(initial=0.01, factor=1.5, maximum=0.05)


class MarkerBackend(FakeBackend):
    """Rejects (4xx) any request whose user message is REJECT; otherwise echoes."""

    async def run(
        self, kind: Kind, body: dict[str, Any], *, background: bool = False
    ) -> dict[str, Any]:
        if any(m.get("content") == "REJECT" for m in body.get("messages", [])):
            raise BackendRejected("upstream HTTP 400: bad request", upstream_status=400)
        return await super().run(kind, body)


def chat(text: str, custom_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": text}]}
    if custom_id is not None:
        body["metadata"] = {"custom_id": custom_id}
    return body


def client_for(h: Any, api_key: str | None = None) -> AsyncClient:
    return AsyncClient(
        "http://testserver/v1", api_key, transport=httpx.ASGITransport(app=h.app), timeout=10.0
    )


@pytest.fixture
async def h(store: Any, harness_factory: Any, tmp_path: Any) -> Any:
    return await harness_factory(
        db=store.url, backend=MarkerBackend("fake"), files_dir=str(tmp_path / "files")
    )


async def test_slow_submit_wait_and_results(h: Any) -> None:
    async with client_for(h) as bb:
        sub = await bb.submit(chat("hello", "c-1"))
        assert sub.state == "Queued"
        assert await bb.resolve(sub.id) == "generation"
        gen = await bb.wait_generation(sub.id, max_wait=10, backoff=FAST)
        assert gen.state == "Success" and gen.response is not None
        assert gen.request["metadata"] == {"custom_id": "c-1"}
        [line] = [json.loads(x) async for x in bb.iter_results(sub.id)]
        assert line["custom_id"] == "c-1" and line["error"] is None
        assert line["response"]["body"] == gen.response

        emb = await bb.submit({"model": FAKE_MODEL, "input": "x"})
        assert (await bb.wait_generation(emb.id, max_wait=10, backoff=FAST)).state == "Success"
        done = await bb.submit({"model": FAKE_MODEL, "prompt": "p"}, kind=Kind.COMPLETION)
        await bb.wait_generation(done.id, max_wait=10, backoff=FAST)
        with pytest.raises(BackburnerAPIError) as caught:
            await bb.cancel_generation(done.id)
        assert caught.value.status == 409


async def test_group_wait_snapshot_and_results_in_order(h: Any) -> None:
    texts = ["a", "b", "REJECT", "d", "e"]
    async with client_for(h) as bb:
        sub = await bb.submit_group([chat(t, f"g-{i}") for i, t in enumerate(texts)])
        assert sub.groupSize == 5
        seen: list[int] = []
        snap = await bb.wait(
            sub.groupId, max_wait=10, backoff=FAST, on_update=lambda s: seen.append(s.finished)
        )
        assert snap.kind == "group" and snap.done and snap.status == "completed"
        assert (snap.total, snap.succeeded, snap.failed) == (5, 4, 1)
        assert not snap.ok and seen[-1] == 5
        lines = [json.loads(x) async for x in bb.iter_results(sub.groupId)]
        assert [x["custom_id"] for x in lines] == [f"g-{i}" for i in range(5)]
        assert lines[2]["response"] is None and lines[2]["error"]["code"] == "failed"
        assert all(x["error"] is None for i, x in enumerate(lines) if i != 2)
        full = await bb.group_generations(sub.groupId)
        assert [g.state for g in full.generations].count("Failed") == 1


async def test_batch_results_merge_output_and_errors_in_input_order(h: Any) -> None:
    rows = [
        {
            "custom_id": f"r-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat("REJECT" if i % 7 == 3 else f"q{i}"),
        }
        for i in range(30)
    ]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    async with client_for(h) as bb:
        f = await bb.upload_file(io.BytesIO(data), filename="in.jsonl")
        assert f.bytes == len(data)
        batch = await bb.create_batch(f.id, Kind.CHAT)
        assert await bb.resolve(batch.id) == "batch"
        done = await bb.wait_batch(batch.id, max_wait=20, backoff=FAST)
        assert done.status.value == "completed"
        assert done.request_counts.failed == 4 and done.output_file_id and done.error_file_id
        lines = [json.loads(x) async for x in bb.iter_results(batch.id)]
        assert [x["custom_id"] for x in lines] == [r["custom_id"] for r in rows]
        failed = [x["custom_id"] for x in lines if x["error"] is not None]
        assert failed == [f"r-{i}" for i in range(30) if i % 7 == 3]
        assert batch.id in [b.id async for b in bb.iter_batches(page_size=1)]
        assert (await bb.list_batches(limit=1)).data[0].id == batch.id
        with pytest.raises(BackburnerAPIError) as caught:
            await bb.cancel(batch.id)
        assert caught.value.status == 409 and caught.value.message


async def test_cancel_a_queued_group_and_time_out_waiting(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    async with client_for(h) as bb:
        sub = await bb.submit_group([chat("x"), chat("y")])
        with pytest.raises(WaitTimeout) as caught:
            await bb.wait(sub.groupId, max_wait=0.05, backoff=FAST)
        assert caught.value.last.queued == 2
        snap = await bb.cancel(sub.groupId)
        assert snap.kind == "group" and snap.status == "cancelled" and snap.failed == 2
        gen = await bb.submit(chat("z"))
        assert (await bb.cancel(gen.id)).status == "Failed"


async def test_errors_carry_the_envelope(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    async with client_for(h) as bb:
        with pytest.raises(BackburnerAPIError) as caught:
            await bb.get_generation("x" * 21)
        assert caught.value.status == 404 and caught.value.type == "invalid_request_error"
        with pytest.raises(BackburnerAPIError) as caught:
            await bb.submit_group([chat("a"), {"model": "", "messages": []}])
        assert caught.value.status == 400
        assert caught.value.param is not None and caught.value.param.startswith("requests[1]")
        with pytest.raises(BackburnerAPIError) as caught:
            await bb.resolve("y" * 21)
        assert caught.value.status == 404 and caught.value.code == "not_found"


async def test_a_bad_key_is_401_and_a_good_one_works(harness_factory: Any) -> None:
    h = await harness_factory(auth="required", run_worker=False)
    _, key = await h.state.store.keys.create("acme")
    async with client_for(h, "bb-wrong") as bad:
        with pytest.raises(BackburnerAPIError) as caught:
            await bad.list_batches()
        assert caught.value.status == 401
    async with client_for(h, key) as good:
        assert (await good.list_batches()).data == []


async def test_webhooks_management(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    async with client_for(h) as bb:
        hook = await bb.create_webhook("http://127.0.0.1:9/h", name="mine")
        assert hook.secret.startswith("whsec_") and hook.enabled
        assert [w.id for w in (await bb.list_webhooks()).data] == [hook.id]
        assert (await bb.enable_webhook(hook.id, enabled=False)).enabled is False
        assert (await bb.get_webhook(hook.id)).enabled is False
        assert (await bb.enable_webhook(hook.id)).enabled is True
        queued = await bb.test_webhook(hook.id)
        assert queued.state == "pending"
        assert (await bb.webhook_deliveries(hook.id)).data == []
        assert (await bb.delete_webhook(hook.id)).deleted is True
        with pytest.raises(BackburnerAPIError) as caught:
            await bb.get_webhook(hook.id)
        assert caught.value.status == 404
