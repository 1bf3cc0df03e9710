"""The worker, the batch runner and the webhook dispatcher, driven in burst mode on real SQLite.

After arq's ``worker`` fixture: each test queues work, runs a loop with ``burst=True`` (drain what
is there, then return) and reads the store. No polling of HTTP endpoints, no sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from backburner.core.states import Kind, State
from backburner.errors import BackendRejected, BackendRetryable, Preempted, ServiceUnavailable
from backburner.schemas.batch import BatchCreate
from backburner.schemas.generation import NewGeneration
from backburner.services import Services
from backburner.store.tables import generations
from backburner.webhooks.delivery import Deliverer, UrlGuard
from backburner.webhooks.dispatcher import Dispatcher, DispatcherOptions
from tests.support.fake_backend import FakeBackend, echo_response
from tests.support.services import burst_services

MODEL = "fake-model"
TENANT = "default"


@pytest.fixture
def engine() -> FakeBackend:
    return FakeBackend("fake")


@pytest.fixture
async def services(sqlite_url: str, engine: FakeBackend, tmp_path: Any) -> AsyncIterator[Services]:
    async with burst_services(sqlite_url, tmp_path / "files", engine) as built:
        yield built


def chat(i: int) -> NewGeneration:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"question {i}"}],
        "metadata": {"custom_id": f"c{i}"},
    }
    return NewGeneration(kind=Kind.CHAT, model=MODEL, request=body, custom_id=f"c{i}")


async def submit(services: Services, n: int) -> list[str]:
    store = services.store
    return [
        (await store.generations.submit(TENANT, chat(i), expiry_seconds=3600)).id for i in range(n)
    ]


async def drain(services: Services) -> None:
    assert services.worker is not None
    await services.worker.run(burst=True)


async def test_burst_drains_the_queue(services: Services, engine: FakeBackend) -> None:
    ids = await submit(services, 10)
    await drain(services)
    for i, gid in enumerate(ids):
        g = await services.store.generations.get(TENANT, gid)
        assert g.state is State.SUCCESS and g.attempts == 1
        assert g.response is not None
        assert g.response["choices"][0]["message"]["content"] == f"echo: question {i}"
    assert len(engine.calls) == 10
    assert engine.max_concurrent <= 4  # max_concurrency bounds the background window


async def test_retryable_failures_are_retried_then_fail_after_max_attempts(
    services: Services, engine: FakeBackend
) -> None:
    engine.enqueue(BackendRetryable("upstream HTTP 503"))
    (ok,) = await submit(services, 1)
    await drain(services)
    g = await services.store.generations.get(TENANT, ok)
    assert g.state is State.SUCCESS and g.attempts == 2

    for _ in range(3):
        engine.enqueue(BackendRetryable("upstream HTTP 502"))
    (bad,) = await submit(services, 1)
    await drain(services)
    g = await services.store.generations.get(TENANT, bad)
    assert g.state is State.FAILED and g.attempts == 3
    assert g.state_message.startswith("Failed after 3 attempts")


async def test_rejected_request_fails_at_once(services: Services, engine: FakeBackend) -> None:
    engine.enqueue(BackendRejected("upstream HTTP 400: bad"))
    (gid,) = await submit(services, 1)
    await drain(services)
    g = await services.store.generations.get(TENANT, gid)
    assert g.state is State.FAILED and g.attempts == 1
    assert "bad" in g.state_message


async def test_preempted_work_is_queued_again_without_counting_the_try(
    services: Services, engine: FakeBackend
) -> None:
    engine.enqueue(Preempted("Queued again: preempted by realtime traffic"))
    engine.enqueue(Preempted("Queued again: preempted by realtime traffic"))
    (gid,) = await submit(services, 1)
    await drain(services)
    g = await services.store.generations.get(TENANT, gid)
    assert g.state is State.SUCCESS
    assert g.attempts == 1  # two preemptions, one counted try
    assert len(engine.calls) == 3


async def test_group_completion_is_reported_once(services: Services) -> None:
    items = [chat(i) for i in range(5)]
    group = await services.store.groups.submit(TENANT, Kind.CHAT, items, expiry_seconds=3600)
    await drain(services)
    g, _ = await services.store.groups.get(TENANT, group.id)
    assert g.status == "completed"
    assert services.metrics.groups_completed._value.get() == 1


async def queue_batch(services: Services, n: int) -> str:
    lines = "".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"l{i}"}]},
            }
        )
        + "\n"
        for i in range(n)
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield lines.encode()

    await services.blobs.write("blob-in", chunks())
    await services.store.files.create(
        TENANT,
        file_id="file-in",
        filename="in.jsonl",
        purpose="batch",
        bytes=len(lines),
        lines=n,
        sha256=None,
        blob="blob-in",
    )
    batch = await services.store.batches.create(
        TENANT,
        BatchCreate(
            input_file_id="file-in", endpoint="/v1/chat/completions", completion_window="24h"
        ),
    )
    return batch.id


async def test_batch_runner_validates_loads_and_finalizes(services: Services) -> None:
    batch_id = await queue_batch(services, 7)
    await services.run_burst()
    done = await services.store.batches.get(TENANT, batch_id)
    assert done.status == "completed"
    assert done.total == 7 and done.completed == 7 and done.failed == 0
    assert done.output_file_id is not None


async def test_dispatcher_delivers_events_through_a_mock_transport(
    services: Services, engine: FakeBackend
) -> None:
    seen: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204 if request.method == "OPTIONS" else 200)

    hook = await services.store.webhooks.create(
        TENANT, url="http://127.0.0.1:9/hook", secret="whsec_" + "A" * 32
    )
    body = {**chat(1).request, "metadata": {"custom_id": "c1", "webhook_id": hook.id}}
    item = NewGeneration(kind=Kind.CHAT, model=MODEL, request=body, webhook_id=hook.id)
    gid = (await services.store.generations.submit(TENANT, item, expiry_seconds=3600)).id
    await drain(services)

    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as client:
        dispatcher = Dispatcher(
            services.store,
            Deliverer(client, UrlGuard(deny_private=False), timeout=5.0),
            DispatcherOptions(poll_interval=0.01),
        )
        await dispatcher.run(burst=True)
    posts = [r for r in seen if r.method == "POST"]
    assert [r.method for r in seen] == ["OPTIONS", "POST"]
    payload = json.loads(posts[0].content)
    assert payload["event"] == "generation.completed"
    assert payload["generationId"] == gid
    assert payload["data"]["state"] == "Success"
    assert posts[0].headers["webhook-id"].startswith("msg_")


async def test_retried_batch_lines_queue_behind_later_work(
    services: Services, engine: FakeBackend
) -> None:
    """A retry gives the failed lines new fair keys: they take their turn among the work queued
    now instead of jumping ahead of it with the keys they had at the first run."""
    engine.enqueue(*(BackendRejected("upstream HTTP 400: bad") for _ in range(3)))
    batch_id = await queue_batch(services, 5)
    await services.run_burst()
    assert (await services.store.batches.get(TENANT, batch_id)).failed == 3
    for i in range(20):
        await services.store.generations.submit("other", chat(i), expiry_seconds=3600)
    await services.store.work.claim("w-x", [MODEL], 10, 60)  # the head of the queue moves on
    await services.store.batches.retry(TENANT, batch_id)
    async with services.store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(generations.c.tenant, generations.c.fair_key).where(
                    generations.c.state == "Queued"
                )
            )
        ).all()
    retried = sorted(key for tenant, key in rows if tenant == TENANT)
    others = sorted(key for tenant, key in rows if tenant == "other")
    assert len(retried) == 3 and len(others) == 10
    assert retried[0] >= others[0]  # not ahead of what was already waiting
    assert len(set(retried)) == 3  # distinct keys: input order kept


class _SlowFirstRun(FakeBackend):
    """The first run hangs (its worker is cut off from the database meanwhile); later runs
    answer at once."""

    def __init__(self) -> None:
        super().__init__("fake")
        self.runs = 0
        self.first_finished = False

    async def run(self, kind: Kind, body: dict[str, Any], *, background: bool = False) -> Any:
        self.runs += 1
        if self.runs == 1:
            await asyncio.sleep(3.0)
            self.first_finished = True
            return {**echo_response(kind, body), "id": "first-run"}
        return {**echo_response(kind, body), "id": "second-run"}


async def test_a_run_whose_lease_was_lost_records_nothing_even_on_the_same_worker(
    sqlite_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases are fenced per claim, not per worker: the heartbeat cannot reach the database,
    the lease runs out, maintenance puts the generation back, and this very worker claims it
    again. The first run is stopped and could record nothing; the second run's answer is the
    one kept, once."""
    engine = _SlowFirstRun()
    async with burst_services(sqlite_url, tmp_path / "files", engine) as services:
        assert services.worker is not None
        services.worker.opts.lease_seconds = 0.3
        # plain fair order: with prefix runs the second claim would wait for the first run
        # (its prefix is warming up) instead of stopping it
        services.worker.opts.prefix_runs = False

        async def unreachable(leases: Mapping[str, str], lease_seconds: float) -> int:
            raise ServiceUnavailable("the database could not be reached")

        monkeypatch.setattr(services.store.work, "heartbeat", unreachable)
        (gid,) = await submit(services, 1)

        async def recover_when_lost() -> None:
            while not await services.store.work.recover_lost():
                await asyncio.sleep(0.1)

        recovering = asyncio.create_task(recover_when_lost())
        await asyncio.wait_for(drain(services), 10)
        await recovering
        g = await services.store.generations.get(TENANT, gid)
        assert g.state is State.SUCCESS and g.attempts == 2
        assert g.response is not None and g.response["id"] == "second-run"
        assert engine.runs == 2 and not engine.first_finished
        async with services.store.engine.connect() as conn:
            lease = (
                await conn.execute(
                    sa.select(generations.c.lease_owner).where(generations.c.id == gid)
                )
            ).scalar_one()
        assert lease is None
