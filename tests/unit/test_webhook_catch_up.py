"""A disabled endpoint's events wait in the outbox, and enabling it again delivers them: the store's
side (``Outbox.claim`` skips them, ``Webhooks.update`` catches up) and the dispatcher's, on SQLite
and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.schemas.webhook import DueEvent
from backburner.store import Store
from backburner.store.tables import webhook_events
from backburner.store.webhooks import HELD_UNTIL
from backburner.webhooks.delivery import Deliverer, UrlGuard
from backburner.webhooks.dispatcher import Dispatcher, DispatcherOptions
from backburner.webhooks.signing import new_secret

TENANT = "t1"
W = webhook_events


async def new_hook(store: Store) -> str:
    hook = await store.webhooks.create(TENANT, url="http://127.0.0.1:9/hook", secret=new_secret())
    return hook.id


async def enable(store: Store, hook_id: str, *, enabled: bool) -> None:
    await store.webhooks.update(TENANT, hook_id, {"enabled": enabled})


async def claim_all(store: Store, worker: str = "d1") -> list[DueEvent]:
    return await store.outbox.claim(worker, 100, 60)


async def fail(store: Store, ev: DueEvent, status: int | None, *, retry_in: float | None) -> None:
    """Record one failed attempt of a claimed event: retried after ``retry_in`` s, or final."""
    await store.outbox.record_attempt(
        "d1",
        ev,
        status_code=status,
        duration_ms=1,
        error=f"HTTP {status}",
        delivered=False,
        retry_at=None if retry_in is None else utcnow() + timedelta(seconds=retry_in),
        disable_endpoint=status == 410,
    )


async def states(store: Store) -> dict[str, tuple[str, int]]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(W.c.id, W.c.state, W.c.attempts))).all()
    return {r.id: (r.state, r.attempts) for r in rows}


async def test_events_of_a_disabled_endpoint_wait_then_go(store: Store) -> None:
    hook_id = await new_hook(store)
    await enable(store, hook_id, enabled=False)
    ids = {await store.outbox.enqueue_test(TENANT, hook_id) for _ in range(3)}
    assert await claim_all(store) == []
    assert await store.outbox.count_by_state(TENANT) == {"pending": 3}
    await enable(store, hook_id, enabled=True)
    assert {ev.id for ev in await claim_all(store)} == ids


async def next_attempts(store: Store) -> dict[str, datetime]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(W.c.id, W.c.next_attempt_at))).all()
    return {r.id: r.next_attempt_at for r in rows}


async def test_held_events_are_parked_out_of_the_claims_way(store: Store) -> None:
    hook_id = await new_hook(store)
    ids = {await store.outbox.enqueue_test(TENANT, hook_id) for _ in range(2)}
    await enable(store, hook_id, enabled=False)
    assert await next_attempts(store) == dict.fromkeys(ids, HELD_UNTIL)
    await enable(store, hook_id, enabled=True)
    assert all(t <= utcnow() for t in (await next_attempts(store)).values())


async def test_a_410_parks_the_endpoints_other_events(store: Store) -> None:
    hook_id = await new_hook(store)
    first = await store.outbox.enqueue_test(TENANT, hook_id)
    (ev,) = await store.outbox.claim("d1", 1, 60)
    second = await store.outbox.enqueue_test(TENANT, hook_id)
    await fail(store, ev, 410, retry_in=None)
    assert (await next_attempts(store))[second] == HELD_UNTIL
    assert await states(store) == {first: ("failed", 1), second: ("pending", 0)}


async def test_enabling_restarts_the_schedule_of_waiting_events(store: Store) -> None:
    hook_id = await new_hook(store)
    event_id = await store.outbox.enqueue_test(TENANT, hook_id)
    (ev,) = await claim_all(store)
    await fail(store, ev, 503, retry_in=3600)  # in backoff for an hour
    await enable(store, hook_id, enabled=False)
    await enable(store, hook_id, enabled=True)
    (again,) = await claim_all(store)  # due now, with a fresh schedule
    assert (again.id, again.attempts) == (event_id, 0)


async def test_enabling_an_enabled_endpoint_changes_nothing(store: Store) -> None:
    hook_id = await new_hook(store)
    await store.outbox.enqueue_test(TENANT, hook_id)
    (ev,) = await claim_all(store)
    await fail(store, ev, 503, retry_in=3600)
    await enable(store, hook_id, enabled=True)
    await store.webhooks.update(TENANT, hook_id, {"name": "renamed"})
    assert await claim_all(store) == []  # still waiting its hour
    assert list((await states(store)).values()) == [("pending", 1)]


async def test_gone_event_comes_back_other_failures_stay(store: Store) -> None:
    hook_id = await new_hook(store)
    refused, spent, delivered, gone = [
        await store.outbox.enqueue_test(TENANT, hook_id) for _ in range(4)
    ]
    by_id = {ev.id: ev for ev in await claim_all(store)}
    await fail(store, by_id[refused], 400, retry_in=None)
    await fail(store, by_id[spent], 503, retry_in=None)  # its schedule was spent
    await store.outbox.record_attempt(
        "d1",
        by_id[delivered],
        status_code=200,
        duration_ms=1,
        error=None,
        delivered=True,
        retry_at=None,
    )
    await fail(store, by_id[gone], 410, retry_in=None)  # disables the endpoint
    assert (await store.webhooks.get(TENANT, hook_id)).enabled is False
    held = await store.outbox.enqueue_test(TENANT, hook_id)  # queued while disabled
    assert await claim_all(store) == []

    await enable(store, hook_id, enabled=True)
    assert {ev.id for ev in await claim_all(store)} == {gone, held}
    now = await states(store)
    assert now[refused] == ("failed", 1)
    assert now[spent] == ("failed", 1)
    assert now[delivered] == ("delivered", 1)
    assert now[gone] == ("pending", 0)


async def test_a_gone_event_redelivered_and_refused_stays_failed(store: Store) -> None:
    # Only the last answer counts: 410 once, then (redelivered) a 400.
    hook_id = await new_hook(store)
    event_id = await store.outbox.enqueue_test(TENANT, hook_id)
    (ev,) = await claim_all(store)
    await fail(store, ev, 410, retry_in=None)
    await enable(store, hook_id, enabled=True)
    (ev,) = await claim_all(store)
    await fail(store, ev, 400, retry_in=None)
    await enable(store, hook_id, enabled=False)
    await enable(store, hook_id, enabled=True)
    assert await claim_all(store) == []
    assert (await states(store))[event_id] == ("failed", 1)


async def test_an_event_in_flight_is_left_to_its_worker(store: Store) -> None:
    hook_id = await new_hook(store)
    await store.outbox.enqueue_test(TENANT, hook_id)
    (ev,) = await claim_all(store)  # leased by d1
    await enable(store, hook_id, enabled=False)
    await enable(store, hook_id, enabled=True)
    assert await claim_all(store, "d2") == []  # the lease holds
    await fail(store, ev, 503, retry_in=0)
    assert [e.id for e in await claim_all(store, "d2")] == [ev.id]


async def test_redelivery_to_a_disabled_endpoint_waits(store: Store) -> None:
    hook_id = await new_hook(store)
    event_id = await store.outbox.enqueue_test(TENANT, hook_id)
    (ev,) = await claim_all(store)
    await fail(store, ev, 400, retry_in=None)
    await enable(store, hook_id, enabled=False)
    assert await store.outbox.redeliver(TENANT, event_id) == event_id
    assert await claim_all(store) == []
    await enable(store, hook_id, enabled=True)
    assert [e.id for e in await claim_all(store)] == [event_id]


# --------------------------------------------------------------------------- the dispatcher


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(204 if request.method == "OPTIONS" else 200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as c:
        yield c


def dispatcher(store: Store, client: httpx.AsyncClient) -> Dispatcher:
    deliverer = Deliverer(client, UrlGuard(deny_private=False), timeout=5.0)
    return Dispatcher(
        store, deliverer, DispatcherOptions(retry_schedule=(0.0,), poll_interval=0.01)
    )


async def test_event_claimed_as_its_endpoint_is_disabled_is_given_back(
    store: Store, client: httpx.AsyncClient
) -> None:
    hook_id = await new_hook(store)
    event_id = await store.outbox.enqueue_test(TENANT, hook_id)
    d = dispatcher(store, client)
    (ev,) = await store.outbox.claim(d.id, 10, 60)
    await enable(store, hook_id, enabled=False)
    # what the claim read a moment before the endpoint was disabled
    await d.deliver_once(replace(ev, endpoint_enabled=False))
    assert await store.outbox.attempts(TENANT, hook_id) == []  # no attempt made or counted
    assert (await states(store))[event_id] == ("pending", 0)
    await enable(store, hook_id, enabled=True)
    await d.run(burst=True)
    assert (await states(store))[event_id] == ("delivered", 1)


async def test_event_of_a_deleted_endpoint_fails(store: Store, client: httpx.AsyncClient) -> None:
    hook_id = await new_hook(store)
    event_id = await store.outbox.enqueue_test(TENANT, hook_id)
    d = dispatcher(store, client)
    (ev,) = await store.outbox.claim(d.id, 10, 60)
    await d.deliver_once(replace(ev, url=None))
    assert (await states(store))[event_id] == ("failed", 1)
