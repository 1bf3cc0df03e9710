"""A webhook receiver that is down for a while loses nothing: the in-process app, a real receiver
on 127.0.0.1, and a compressed retry schedule (issue "Nothing lost, nothing poisoned", item 6).

Each test counts what the receiver accepted (2xx) per ``webhook-id``: every event arrives, exactly
once. The outage is bounded by events, not by a clock: the receiver comes up once every event
has failed at least once, or after a fixed number of 503 answers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from backburner.store import Store
from backburner.store.tables import webhook_attempts, webhook_events
from tests.conftest import FAKE_MODEL
from tests.support.receiver import Received, free_port, running_receiver

GROUPS = 2
GROUP_SIZE = 40  # 80 generation.completed events
EVENTS = GROUPS * GROUP_SIZE
# Short delays, so the receiver's return is noticed within about 2 s, but so many of them (about
# 30 s in all) that no event runs out of attempts before the test's own 30 s timeout.
SCHEDULE = [0.05, 0.1, 0.2, 0.4, 0.8, *[1.5] * 20]
FAST = {"webhook_retry_schedule_seconds": SCHEDULE, "webhook_poll_interval_seconds": 0.02}
WAIT = 25.0  # upper bound on any wait in this module


async def create_hook(h: Any, url: str) -> str:
    r = await h.client.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 200, r.text
    hook_id: str = r.json()["id"]
    return hook_id


async def submit_generations(h: Any, hook_id: str) -> None:
    """Groups whose every request names the webhook: one ``generation.completed`` each."""
    for g in range(GROUPS):
        requests = [
            {
                "model": FAKE_MODEL,
                "messages": [{"role": "user", "content": f"q{g}-{i}"}],
                "metadata": {"custom_id": f"c{g}-{i}", "webhook_id": hook_id},
            }
            for i in range(GROUP_SIZE)
        ]
        r = await h.client.post("/v1/slow/group/chat/completions", json={"requests": requests})
        assert r.status_code == 200, r.text


async def event_states(store: Store, hook_id: str) -> dict[str, str]:
    w = webhook_events
    async with store.engine.connect() as conn:
        rows = await conn.execute(sa.select(w.c.id, w.c.state).where(w.c.webhook_id == hook_id))
        return {r.id: r.state for r in rows.all()}


async def events_tried(store: Store, hook_id: str) -> int:
    a = webhook_attempts
    async with store.engine.connect() as conn:
        query = sa.select(sa.func.count(sa.distinct(a.c.event_id))).where(a.c.webhook_id == hook_id)
        return int((await conn.execute(query)).scalar_one())


async def until(check: Any, what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not await check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(what) from None


async def all_delivered(store: Store, hook_id: str, n: int) -> dict[str, str]:
    async def done() -> bool:
        states = await event_states(store, hook_id)
        return len(states) == n and set(states.values()) == {"delivered"}

    await until(done, f"not every one of {n} events was delivered")
    return await event_states(store, hook_id)


def accepted(posts: list[Received], skip: int = 0) -> Counter[str]:
    """Accepted deliveries per message id; ``skip``: the first posts, answered with errors."""
    for p in posts:
        assert p.json()["event"] in ("generation.completed", "webhook.test")
    return Counter(p.headers["webhook-id"] for p in posts[skip:])


@pytest.fixture
async def app(harness_factory: Any, store: Store, db_url: str) -> Any:
    """The app on SQLite and on PostgreSQL (``store`` empties the database first)."""
    return await harness_factory(db=db_url, **FAST)


async def test_receiver_refusing_connections_then_up_gets_every_event_once(app: Any) -> None:
    port = free_port()  # nothing listens: every attempt is "connection refused"
    hook_id = await create_hook(app, f"http://127.0.0.1:{port}/hook")
    await submit_generations(app, hook_id)
    store: Store = app.state.store

    async def every_event_failed() -> bool:
        return await events_tried(store, hook_id) == EVENTS

    await until(every_event_failed, "events were not all tried while the receiver was down")
    assert "delivered" not in (await event_states(store, hook_id)).values()

    async with running_receiver(port=port) as rec:
        states = await all_delivered(store, hook_id, EVENTS)
        per_id = accepted(rec.posts())
    assert set(per_id) == set(states)  # every event, with its own message id
    assert max(per_id.values()) == 1  # none twice


async def test_receiver_answering_503_then_up_gets_every_event_once(app: Any) -> None:
    outage = EVENTS + EVENTS // 2  # every event is refused at least once, some twice or more
    async with running_receiver(*[503] * outage) as rec:
        hook_id = await create_hook(app, rec.url)
        await submit_generations(app, hook_id)
        states = await all_delivered(app.state.store, hook_id, EVENTS)
        posts = rec.posts()
    per_id = accepted(posts, skip=outage)
    assert set(per_id) == set(states)
    assert max(per_id.values()) == 1
    refused = Counter(p.headers["webhook-id"] for p in posts[:outage])
    assert set(refused) <= set(states)


async def test_reenabled_endpoint_catches_up(harness_factory: Any) -> None:
    # One delivery at a time, so the 410 disables the endpoint before anything else is tried.
    h = await harness_factory(webhook_concurrency=1, **FAST)
    store: Store = h.state.store
    async with running_receiver(410) as rec:
        hook_id = await create_hook(h, rec.url)
        sent = [
            (await h.client.post(f"/v1/webhooks/{hook_id}/test")).json()["id"] for _ in range(5)
        ]

        async def disabled() -> bool:
            hook = (await h.client.get(f"/v1/webhooks/{hook_id}")).json()
            return hook["enabled"] is False and await events_tried(store, hook_id) == 1

        await until(disabled, "the 410 did not disable the endpoint")
        states = await event_states(store, hook_id)
        assert sorted(states.values()) == ["failed"] + ["pending"] * 4  # the rest wait
        assert len(rec.posts()) == 1

        r = await h.client.patch(f"/v1/webhooks/{hook_id}", json={"enabled": True})
        assert r.status_code == 200 and r.json()["enabled"] is True
        states = await all_delivered(store, hook_id, len(sent))
        posts = rec.posts()
    assert set(states) == set(sent)
    per_id = accepted(posts, skip=1)  # the first answer was the 410
    assert per_id == Counter(sent)  # the refused one again, and the four that waited: once each
    log = (await h.client.get(f"/v1/webhooks/{hook_id}/deliveries")).json()["data"]
    assert sorted(a["statusCode"] for a in log) == [200] * 5 + [410]
