"""Tenancy in the store, on SQLite and PostgreSQL: limits (queued generations, batch lines in
flight, requests per minute, tokens per day), per-tenant overrides, races between API processes
for a tenant's last unit, disabling, weights, and usage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import date, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.outcome import Outcome
from backburner.core.states import Kind, State
from backburner.errors import Conflict, NotFound, TenantDisabled, TooManyRequests
from backburner.schemas.batch import BatchCreate, BatchLine, BatchRecord
from backburner.schemas.generation import GenerationRecord, NewGeneration
from backburner.schemas.tenants import Limits, UsageRow
from backburner.store import Store
from backburner.store.queue import FAIR_STEP, HELD
from backburner.store.tables import batches, generations, groups
from backburner.store.tenants import QUEUE_RETRY_AFTER
from backburner.store.usage import RealtimeUsage, Tally
from tests.support.leases import finish_as
from tests.support.tenancy import race

M = "m"
HOUR = 3600.0
G = generations


def new(i: int = 0, model: str = M) -> NewGeneration:
    body = {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}]}
    return NewGeneration(kind=Kind.CHAT, model=model, request=body)


async def submit(store: Store, tenant: str = "t1", *, expiry: float = HOUR, model: str = M) -> str:
    return (await store.generations.submit(tenant, new(model=model), expiry_seconds=expiry)).id


async def group(
    store: Store, n: int, tenant: str = "t1", *, expiry: float = HOUR, model: str = M
) -> str:
    items = [new(i, model) for i in range(n)]
    return (await store.groups.submit(tenant, Kind.CHAT, items, expiry_seconds=expiry)).id


async def claim(
    store: Store, limit: int = 100, lease: str = "w1", models: tuple[str, ...] = (M,)
) -> list[GenerationRecord]:
    return await store.work.claim(lease, list(models), limit, 60.0)


def ok(gid: str, prompt: int = 0, completion: int = 0) -> Outcome:
    return Outcome(
        gid,
        State.SUCCESS,
        "Completed",
        response={
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        },
    )


def failed(gid: str) -> Outcome:
    return Outcome(gid, State.FAILED, "HTTP 400: bad")


async def count(store: Store, table: sa.Table = G, tenant: str | None = None) -> int:
    q = sa.select(sa.func.count()).select_from(table)
    if tenant is not None:
        q = q.where(table.c.tenant == tenant)
    async with store.engine.connect() as conn:
        return int((await conn.execute(q)).scalar_one())


async def real_open(store: Store, tenant: str) -> int:
    """Slow and group generations of ``tenant`` Queued or In Progress, counted from the rows."""
    q = sa.select(sa.func.count()).where(
        G.c.tenant == tenant,
        G.c.state.in_([State.QUEUED.value, State.IN_PROGRESS.value]),
        G.c.batch_id.is_(None),
    )
    async with store.engine.connect() as conn:
        return int((await conn.execute(q)).scalar_one())


async def assert_open_in_step(store: Store, tenant: str = "t1") -> int:
    """The kept count equals the real one, and a recount has nothing to fix."""
    kept = (await store.tenants.get(tenant)).open_generations
    assert kept == await real_open(store, tenant)
    assert await store.tenants.recount() == 0
    return kept


async def fair_keys_of(store: Store, ids: list[str]) -> list[Any]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(G.c.id, G.c.fair_key).where(G.c.id.in_(ids)))).all()
    by = {r[0]: r[1] for r in rows}
    return [by[i] for i in ids]


async def states(store: Store, tenant: str, ids: list[str]) -> list[State]:
    return [(await store.generations.get(tenant, i)).state for i in ids]


async def add_file(store: Store, tenant: str, file_id: str, lines: int | None) -> None:
    await store.files.create(
        tenant,
        file_id=file_id,
        filename=f"{file_id}.jsonl",
        purpose="batch",
        bytes=1,
        lines=lines,
        sha256=None,
        blob=None,
    )


async def create_batch(store: Store, tenant: str, file_id: str) -> BatchRecord:
    body = BatchCreate(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return await store.batches.create(tenant, body)


async def load_batch(store: Store, tenant: str, file_id: str, n: int, model: str = M) -> str:
    """A batch of ``n`` lines, validated and loaded by a batch runner: its lines are Queued."""
    await add_file(store, tenant, file_id, n)
    created = await create_batch(store, tenant, file_id)
    b = await store.batch_runs.claim("runner", 60)
    assert b is not None and b.id == created.id
    assert await store.batch_runs.start("runner", b.id, n)
    b = await store.batches.get(tenant, b.id)
    lines = [BatchLine(custom_id=f"c{i}", body={"model": model, "messages": []}) for i in range(n)]
    assert await store.batch_runs.load_chunk("runner", b, 0, lines, Kind.CHAT)
    await store.batch_runs.release("runner", b.id)
    return b.id


@pytest.fixture
async def stores(store: Store, db_url: str) -> AsyncIterator[Callable[..., list[Store]]]:
    """``stores(n, limits=None)``: ``store`` and n more Stores on its (emptied) database, as
    n + 1 API processes would have."""
    made: list[Store] = []

    def make(n: int, limits: Limits | None = None) -> list[Store]:
        more = [Store(db_url, limits=limits) for _ in range(n)]
        made.extend(more)
        return [store, *more]

    yield make
    for s in made:
        await s.close()


# -- max_queued_generations -------------------------------------------------------------------


async def test_a_full_queue_says_when_to_retry_at_the_tenant_s_pace(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retry-After of a full queue: how long the tenant's own finishing pace (its finished
    count, sampled as this process admits it) needs to make room; no query per refusal."""
    clock = [1000.0]
    monkeypatch.setattr("backburner.store.tenants._monotonic", lambda: clock[0])
    store.tenants.defaults = Limits(max_queued_generations=4)
    ids = [await submit(store) for _ in range(4)]  # sampled at t=0: 0 finished
    got = await claim(store, 2)
    await finish_as(store, "w1", [ok(g.id) for g in got])  # 2 finished
    clock[0] += 20.0
    await submit(store)  # sampled at t=20: 2 finished; open 3
    await submit(store)  # open 4
    with pytest.raises(TooManyRequests) as err:
        await group(store, 3)  # needs 3 places: at 2 per 20 s, 30 s
    assert err.value.retry_after == pytest.approx(30.0)
    assert len(ids) == 4


async def test_queue_limit_refuses_the_next_submit_and_stores_nothing(store: Store) -> None:
    store.tenants.defaults = Limits(max_queued_generations=3)
    for _ in range(3):
        await submit(store)
    with pytest.raises(TooManyRequests) as err:
        await submit(store)
    assert err.value.limit == "max_queued_generations"
    assert err.value.retry_after == QUEUE_RETRY_AFTER
    assert err.value.status_code == 429
    assert err.value.code == "max_queued_generations_exceeded"
    assert await count(store) == 3
    assert (await store.tenants.get("t1")).open_generations == 3
    # a group that would overflow is refused whole; one larger than the limit never fits
    with pytest.raises(TooManyRequests) as err:
        await group(store, 2)
    assert err.value.retry_after == QUEUE_RETRY_AFTER
    with pytest.raises(TooManyRequests) as err:
        await group(store, 4)
    assert err.value.limit == "max_queued_generations"
    assert err.value.retry_after is None
    assert await count(store) == 3
    assert await count(store, groups) == 0
    # another tenant has its own room
    await submit(store, "t2")
    await group(store, 2, "t2")
    assert await assert_open_in_step(store) == 3


async def test_room_comes_back_when_work_finishes_or_is_cancelled(store: Store) -> None:
    store.tenants.defaults = Limits(max_queued_generations=2)
    first, second = await submit(store), await submit(store)
    (running,) = await claim(store, 1)  # In Progress still counts
    assert running.id == first
    with pytest.raises(TooManyRequests):
        await submit(store)
    await finish_as(store, "w1", [ok(first)])
    third = await submit(store)
    with pytest.raises(TooManyRequests):
        await submit(store)
    await store.generations.cancel("t1", second)
    await submit(store)
    with pytest.raises(TooManyRequests):
        await submit(store)
    # a failed outcome frees its place too; a retry (back to Queued) does not
    got = await claim(store, 2)
    assert third in [g.id for g in got]
    await finish_as(store, "w1", [failed(got[0].id), Outcome(got[1].id, State.QUEUED, "retry")])
    await submit(store)
    with pytest.raises(TooManyRequests):
        await submit(store)
    assert await assert_open_in_step(store) == 2


async def test_open_generations_stay_in_step_on_every_path(store: Store) -> None:
    singles = [await submit(store) for _ in range(4)]
    g_done = await group(store, 3)
    g_cancel = await group(store, 3, model="m2")
    assert await assert_open_in_step(store) == 10
    # finish: a success and a failure close, a retry stays open
    got = await claim(store, 3)
    assert [g.id for g in got] == singles[:3]
    await finish_as(
        store,
        "w1",
        [ok(got[0].id), failed(got[1].id), Outcome(got[2].id, State.QUEUED, "retry")],
    )
    assert await assert_open_in_step(store) == 8
    # a single cancelled; a group cancelled with one of its generations running
    await store.generations.cancel("t1", singles[3])
    assert await assert_open_in_step(store) == 7
    (running,) = await claim(store, 1, "w2", ("m2",))
    await store.groups.cancel("t1", g_cancel)
    assert await assert_open_in_step(store) == 5
    await finish_as(store, "w2", [ok(running.id)])
    assert await assert_open_in_step(store) == 4
    # lost leases: the twice-tried one is given up on (Failed), the others go back to Queued
    got = await store.work.claim("dead", [M], 100, 0.01)
    assert len(got) == 4
    await asyncio.sleep(0.05)
    assert await store.work.recover_lost(give_up_after=2) == 4
    assert (await store.generations.get("t1", singles[2])).state is State.FAILED
    assert await assert_open_in_step(store) == 3
    # work given back by a stopping worker stays open
    got = await claim(store, 1)
    assert await store.work.release({got[0].id: "w1"}) == 1
    assert await assert_open_in_step(store) == 3
    # expired work, single and grouped
    await submit(store, expiry=0.01)
    await group(store, 2, expiry=0.01)
    assert await assert_open_in_step(store) == 6
    await asyncio.sleep(0.05)
    n, _ = await store.work.expire_overdue()
    assert n == 3
    assert await assert_open_in_step(store) == 3
    # the last group finishes
    got = await claim(store, 100)
    assert await finish_as(store, "w1", [ok(g.id) for g in got]) == [g_done]
    assert await assert_open_in_step(store) == 0
    # a realtime request kept for its webhook never was open
    await store.generations.record_realtime(
        "t1",
        new(),
        state=State.SUCCESS,
        message="Completed",
        response={"choices": []},
        dispatched_at=utcnow(),
        expiry_seconds=HOUR,
    )
    assert await assert_open_in_step(store) == 0


async def test_recount_repairs_a_drifted_count(store: Store) -> None:
    await submit(store)
    await group(store, 2)
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE tenants SET accepted_generations = 7"))
    assert await store.tenants.recount("t2") == 0  # no such tenant: nothing to fix
    assert await store.tenants.recount("t1") == 1
    assert await assert_open_in_step(store) == 3


async def test_batch_lines_do_not_count_as_queued_generations(store: Store) -> None:
    store.tenants.defaults = Limits(max_queued_generations=1)
    await load_batch(store, "t1", "file_a", 4)
    assert await count(store) == 4
    assert (await store.tenants.get("t1")).open_generations == 0
    got = await claim(store, 2)
    await finish_as(store, "w1", [ok(got[0].id), failed(got[1].id)])
    await submit(store)  # the batch's lines take no room
    assert await assert_open_in_step(store) == 1


# -- races between API processes --------------------------------------------------------------


async def test_race_for_the_last_queued_units(
    store: Store, stores: Callable[..., list[Store]]
) -> None:
    limits = Limits(max_queued_generations=10)
    store.tenants.defaults = limits
    for _ in range(5):
        await submit(store)
    racers = stores(3, limits)

    async def one(s: Store, i: int) -> None:
        await s.generations.submit("t1", new(i), expiry_seconds=HOUR)

    r = await race(racers, 40, one)
    assert r.accepted == 5
    assert len(r.refused) == 35
    assert {e.limit for e in r.refused} == {"max_queued_generations"}
    assert await count(store) == 10
    assert await assert_open_in_step(store) == 10
    if not store.sqlite:
        assert r.peak_connections > 1  # the racers' transactions really overlapped


async def test_race_for_the_last_requests_of_the_minute(
    store: Store, stores: Callable[..., list[Store]]
) -> None:
    await store.tenants.create("t1", limits={"requests_per_minute": 10})
    racers = stores(3)  # the tenant's own limit: every process sees it

    async def one(s: Store, i: int) -> None:
        await s.generations.submit("t1", new(i), expiry_seconds=HOUR)

    r = await race(racers, 30, one)
    # 10 at once, then one every 6 s: more only if the race itself took that long
    assert 10 <= r.accepted <= 10 + r.elapsed * 10 / 60
    assert len(r.refused) == 30 - r.accepted
    assert {e.limit for e in r.refused} == {"requests_per_minute"}
    assert all(e.retry_after is not None and 0 < e.retry_after <= 6.001 for e in r.refused)
    assert await count(store) == r.accepted
    if not store.sqlite:
        assert r.peak_connections > 1


async def test_race_of_groups_for_the_last_room(
    store: Store, stores: Callable[..., list[Store]]
) -> None:
    await store.tenants.create("t1", limits={"max_queued_generations": 7})
    await submit(store)  # room for two groups of 3
    racers = stores(3)

    async def one(s: Store, i: int) -> None:
        await s.groups.submit("t1", Kind.CHAT, [new(i)] * 3, expiry_seconds=HOUR)

    r = await race(racers, 12, one)
    assert r.accepted == 2
    assert {e.limit for e in r.refused} == {"max_queued_generations"}
    assert await count(store) == 7
    assert await count(store, groups) == 2
    assert await assert_open_in_step(store) == 7
    if not store.sqlite:
        assert r.peak_connections > 1


# -- requests_per_minute ----------------------------------------------------------------------


async def test_requests_per_minute_burst_then_retry_after(store: Store) -> None:
    store.tenants.defaults = Limits(requests_per_minute=6)  # one every 10 s after the burst
    start = time.monotonic()
    for _ in range(6):
        await submit(store)
    with pytest.raises(TooManyRequests) as err:
        await submit(store)
    elapsed = time.monotonic() - start
    assert err.value.limit == "requests_per_minute"
    assert err.value.retry_after is not None
    assert 10 - elapsed - 0.5 <= err.value.retry_after <= 10.001
    assert await count(store) == 6
    await submit(store, "t2")  # each tenant its own count


async def test_groups_and_batches_are_one_request_each(store: Store) -> None:
    store.tenants.defaults = Limits(requests_per_minute=2)
    await group(store, 5)
    await add_file(store, "t1", "file_a", 3)
    await create_batch(store, "t1", "file_a")
    with pytest.raises(TooManyRequests) as err:
        await create_batch(store, "t1", "file_a")
    assert err.value.limit == "requests_per_minute"
    with pytest.raises(TooManyRequests):
        await submit(store)
    assert (await count(store), await count(store, batches)) == (5, 1)


async def test_a_refused_request_takes_no_unit_of_the_minute(store: Store) -> None:
    store.tenants.defaults = Limits(requests_per_minute=3, max_queued_generations=1)
    gid = await submit(store)
    for _ in range(5):  # refused by the queue limit: rolled back, the rate cell too
        with pytest.raises(TooManyRequests) as err:
            await submit(store)
        assert err.value.limit == "max_queued_generations"
    await store.generations.cancel("t1", gid)
    gid = await submit(store)
    await store.generations.cancel("t1", gid)
    await submit(store)
    with pytest.raises(TooManyRequests) as err:
        await submit(store)
    assert err.value.limit == "requests_per_minute"


async def test_a_limit_of_zero_refuses_without_retry_after(store: Store) -> None:
    store.tenants.defaults = Limits(requests_per_minute=0, realtime_requests_per_minute=0)
    with pytest.raises(TooManyRequests) as err:
        await submit(store)
    assert (err.value.limit, err.value.retry_after) == ("requests_per_minute", None)
    with pytest.raises(TooManyRequests) as err:
        await group(store, 1)
    assert err.value.retry_after is None
    with pytest.raises(TooManyRequests) as err:
        await store.tenants.check_realtime("t1")
    assert (err.value.limit, err.value.retry_after) == ("realtime_requests_per_minute", None)
    assert await count(store) == 0


async def test_realtime_requests_have_their_own_bucket(store: Store) -> None:
    store.tenants.defaults = Limits(requests_per_minute=1, realtime_requests_per_minute=2)
    await submit(store)
    with pytest.raises(TooManyRequests):
        await submit(store)
    # the submit bucket is empty; the realtime one is not
    await store.tenants.check_realtime("t1")
    await store.tenants.check_realtime("t1")
    with pytest.raises(TooManyRequests) as err:
        await store.tenants.check_realtime("t1")
    assert err.value.limit == "realtime_requests_per_minute"
    assert err.value.retry_after is not None and 25 <= err.value.retry_after <= 30.001
    # a tenant never seen before is checked against the defaults
    await store.tenants.check_realtime("new")
    await store.tenants.check_realtime("new")
    with pytest.raises(TooManyRequests):
        await store.tenants.check_realtime("new")
    # and realtime requests took nothing from the submissions of another tenant
    await submit(store, "new")


async def test_realtime_without_a_per_minute_limit_is_never_refused(store: Store) -> None:
    store.tenants.defaults = Limits(requests_per_minute=1)
    for _ in range(20):
        await store.tenants.check_realtime("t1")
    await submit(store)


# -- tokens_per_day ---------------------------------------------------------------------------


async def test_tokens_per_day_counts_finished_work(store: Store) -> None:
    store.tenants.defaults = Limits(tokens_per_day=100)
    a, b = await submit(store), await submit(store)
    await claim(store, 2)
    await finish_as(store, "w1", [ok(a, prompt=30, completion=20)])
    today = utcnow().date().isoformat()
    assert await store.usage.tokens_on(None, "t1", today) == 50
    c = await submit(store)  # 50 of 100 used: still admitted
    await store.tenants.check_realtime("t1", pending_tokens=49)
    with pytest.raises(TooManyRequests) as err:
        await store.tenants.check_realtime("t1", pending_tokens=50)
    assert err.value.limit == "tokens_per_day"
    await finish_as(store, "w1", [ok(b, prompt=40, completion=10)])
    assert await store.usage.tokens_on(None, "t1", today) == 100
    with pytest.raises(TooManyRequests) as err:
        await submit(store)
    assert err.value.limit == "tokens_per_day"
    assert err.value.retry_after is not None and 0 < err.value.retry_after <= 86400
    with pytest.raises(TooManyRequests) as err:
        await group(store, 1)
    assert err.value.limit == "tokens_per_day"
    await add_file(store, "t1", "file_a", 1)
    with pytest.raises(TooManyRequests) as err:
        await create_batch(store, "t1", "file_a")
    assert err.value.limit == "tokens_per_day"
    with pytest.raises(TooManyRequests) as err:
        await store.tenants.check_realtime("t1")
    assert err.value.limit == "tokens_per_day"
    assert (await count(store), await count(store, batches)) == (3, 0)
    # work already queued still runs, and another tenant has its own tokens
    (g,) = await claim(store, 1)
    assert g.id == c
    await submit(store, "t2")


async def test_tokens_of_answers_without_usage_count_nothing(store: Store) -> None:
    store.tenants.defaults = Limits(tokens_per_day=1)
    a, b = await submit(store), await submit(store)
    await claim(store, 2)
    await finish_as(
        store,
        "w1",
        [Outcome(a, State.SUCCESS, "Completed", response={"choices": []}), failed(b)],
    )
    await submit(store)
    rows = await store.usage.report("t1", utcnow().date(), utcnow().date(), [])
    assert [(r.requests, r.failed, r.total_tokens) for r in rows] == [(2, 1, 0)]


# -- max_batch_lines_in_flight ----------------------------------------------------------------


async def test_batch_lines_in_flight(store: Store) -> None:
    store.tenants.defaults = Limits(max_batch_lines_in_flight=4)
    await add_file(store, "t1", "f5", 5)
    await add_file(store, "t1", "f3", 3)
    await add_file(store, "t1", "f2", 2)
    with pytest.raises(TooManyRequests) as err:
        await create_batch(store, "t1", "f5")  # never fits
    assert (err.value.limit, err.value.retry_after) == ("max_batch_lines_in_flight", None)
    created = await create_batch(store, "t1", "f3")
    with pytest.raises(TooManyRequests) as err:
        await create_batch(store, "t1", "f2")  # 3 + 2 > 4
    assert (err.value.limit, err.value.retry_after) == (
        "max_batch_lines_in_flight",
        QUEUE_RETRY_AFTER,
    )
    assert await count(store, batches) == 1
    # load the batch and finish 2 of its 3 lines: 1 line in flight
    b = await store.batch_runs.claim("runner", 60)
    assert b is not None and b.id == created.id
    assert await store.batch_runs.start("runner", b.id, 3)
    b = await store.batches.get("t1", b.id)
    lines = [BatchLine(custom_id=f"c{i}", body={"model": M, "messages": []}) for i in range(3)]
    assert await store.batch_runs.load_chunk("runner", b, 0, lines, Kind.CHAT)
    await store.batch_runs.release("runner", b.id)
    got = await claim(store, 2)
    await finish_as(store, "w1", [ok(got[0].id), failed(got[1].id)])
    await create_batch(store, "t1", "f2")  # 1 + 2 <= 4
    with pytest.raises(TooManyRequests):
        await create_batch(store, "t1", "f2")  # 3 + 2 > 4
    await add_file(store, "t1", "f1", 1)
    await create_batch(store, "t1", "f1")  # 3 + 1 = 4
    assert await count(store, batches) == 3
    # another tenant's batches are its own
    await add_file(store, "t2", "g3", 3)
    await create_batch(store, "t2", "g3")


async def test_a_batch_of_unknown_or_no_lines_counts_as_one_line(store: Store) -> None:
    """Admission counts such a batch as one line (``max(1, lines)``); so must the count of
    lines in flight that the next batch is checked against."""
    store.tenants.defaults = Limits(max_batch_lines_in_flight=1)
    for tenant, lines in (("t1", None), ("t2", 0)):
        await add_file(store, tenant, f"f-{tenant}", lines)
        await create_batch(store, tenant, f"f-{tenant}")
        with pytest.raises(TooManyRequests):
            await create_batch(store, tenant, f"f-{tenant}")
        assert await count(store, batches, tenant) == 1


# -- per-tenant overrides ---------------------------------------------------------------------


async def test_per_tenant_limits_override_the_defaults(store: Store) -> None:
    store.tenants.defaults = Limits(max_queued_generations=1)
    await store.tenants.create("t1")
    t = await store.tenants.update("t1", limits={"max_queued_generations": 2})
    assert t.limits == {"max_queued_generations": 2}
    assert t.effective_limits.max_queued_generations == 2
    await submit(store, "t1")
    await submit(store, "t1")
    with pytest.raises(TooManyRequests):
        await submit(store, "t1")
    await submit(store, "t2")  # the default for everyone else
    with pytest.raises(TooManyRequests):
        await submit(store, "t2")
    # "default" drops the override
    t = await store.tenants.update("t1", limits={"max_queued_generations": "default"})
    assert t.limits == {}
    assert t.effective_limits.max_queued_generations == 1
    # None: no limit for that tenant, whatever the default
    t = await store.tenants.update("t2", limits={"max_queued_generations": None})
    assert t.limits == {"max_queued_generations": None}
    assert t.effective_limits.max_queued_generations is None
    for _ in range(5):
        await submit(store, "t2")
    with pytest.raises(TooManyRequests):
        await submit(store, "t1")
    # other limits keep their default; overrides of different names sit side by side
    t = await store.tenants.update("t2", limits={"requests_per_minute": 100})
    assert t.limits == {"max_queued_generations": None, "requests_per_minute": 100}
    assert (await store.tenants.get("t2")).open_generations == 6


async def test_overrides_are_shared_by_every_process(
    store: Store, stores: Callable[..., list[Store]]
) -> None:
    _, other = stores(1, Limits(max_queued_generations=1))
    await store.tenants.create("t1", limits={"max_queued_generations": 3})
    for _ in range(3):
        await submit(other)
    with pytest.raises(TooManyRequests):
        await submit(other)
    await submit(other, "t2")
    with pytest.raises(TooManyRequests):
        await submit(other, "t2")
    await submit(store, "t2")  # this process has no default limit


async def test_tenant_admin(store: Store) -> None:
    t = await store.tenants.create("a", weight=2.5, limits={"tokens_per_day": 5})
    assert (t.id, t.weight, t.disabled, t.disabled_at) == ("a", 2.5, False, None)
    assert t.created_at is not None and t.open_generations == 0
    with pytest.raises(Conflict):
        await store.tenants.create("a")
    await submit(store, "b")  # a tenant that only submitted exists, with the defaults
    with pytest.raises(Conflict):
        await store.tenants.create("b")
    assert [x.id for x in await store.tenants.list()] == ["a", "b"]
    assert [x.id for x in await store.tenants.list(after="a")] == ["b"]
    assert [x.id for x in await store.tenants.list(limit=1)] == ["a"]
    assert await store.tenants.find("nobody") is None
    with pytest.raises(NotFound):
        await store.tenants.get("nobody")
    with pytest.raises(NotFound):
        await store.tenants.update("nobody", weight=2)
    b = await store.tenants.get("b")
    assert (b.weight, b.limits, b.open_generations) == (1.0, {}, 1)
    t = await store.tenants.update("a", disabled=True)
    assert t.disabled and t.disabled_at is not None
    t = await store.tenants.update("a", disabled=False, weight=0.5)
    assert (t.disabled, t.disabled_at, t.weight) == (False, None, 0.5)
    assert t.limits == {"tokens_per_day": 5}


# -- disabling --------------------------------------------------------------------------------


async def test_a_disabled_tenant_is_refused_and_its_work_held(store: Store) -> None:
    a = [await submit(store, "a") for _ in range(3)]
    b = [await submit(store, "b") for _ in range(2)]
    await store.tenants.update("a", disabled=True)
    with pytest.raises(TenantDisabled) as err:
        await submit(store, "a")
    assert err.value.status_code == 403 and err.value.code == "tenant_disabled"
    with pytest.raises(TenantDisabled):
        await group(store, 2, "a")
    await add_file(store, "a", "file_a", 1)
    with pytest.raises(TenantDisabled):
        await create_batch(store, "a", "file_a")
    with pytest.raises(TenantDisabled):
        await store.tenants.check_realtime("a")
    assert (await count(store, G, "a"), await count(store, batches)) == (3, 0)
    # only the other tenant's work is claimed; nothing of the disabled one is lost
    assert [g.id for g in await claim(store)] == b
    assert await claim(store) == []
    assert await states(store, "a", a) == [State.QUEUED] * 3
    assert await store.tenants.hold("a") == 0  # held already
    b += [await submit(store, "b") for _ in range(2)]
    # enabled: its work runs again, in its old order, from the front of the queue
    await store.tenants.update("a", disabled=False)
    await store.tenants.check_realtime("a")
    order = [g.id for g in await claim(store, 100)]
    assert sorted(order) == sorted(a + b[2:])
    assert [i for i in order if i in a] == a
    assert order.index(a[0]) <= 1  # not behind the work that arrived while it was disabled
    assert await assert_open_in_step(store, "a") == 3


async def test_enabled_work_takes_turns_with_work_already_queued(store: Store) -> None:
    a = [await submit(store, "a") for _ in range(4)]
    await store.tenants.update("a", disabled=True)
    b = [await submit(store, "b") for _ in range(4)]
    await store.tenants.update("a", disabled=False)
    order = [g.id for g in await claim(store, 100)]
    assert [i for i in order if i in a] == a
    assert [i for i in order if i in b] == b
    # round-robin from the front: neither tenant has two turns ahead of the other's first
    firsts = sorted([order.index(a[0]), order.index(b[0])])
    assert firsts == [0, 1]
    assert {order[2], order[3]} == {a[1], b[1]}


async def test_work_requeued_after_disabling_goes_back_held(store: Store) -> None:
    """A retry, work given back and a lost lease of a tenant disabled meanwhile come back to
    the queue held (their UPDATE moves the key), not runnable until a later sweep."""
    gid, kept, lost = [await submit(store, "a") for _ in range(3)]
    (g,) = await claim(store, 1)
    (k,) = await store.work.claim("w2", [M], 1, 60)
    (lo,) = await store.work.claim("w3", [M], 1, 0.01)
    await store.tenants.update("a", disabled=True)
    # the run ends in a retry after the tenant was disabled
    await finish_as(store, "w1", [Outcome(gid, State.QUEUED, "retry later")])
    assert await store.work.release({kept: "w2"}) == 1
    await asyncio.sleep(0.05)
    assert await store.work.recover_lost() == 1
    assert all(key >= HELD for key in await fair_keys_of(store, [gid, kept, lost]))
    assert (k.id, lo.id) == (kept, lost)
    other = await submit(store, "b")
    assert [x.id for x in await claim(store)] == [other]
    assert (await store.generations.get("a", gid)).state is State.QUEUED
    await store.tenants.update("a", disabled=False)
    assert sorted(x.id for x in await claim(store)) == sorted([gid, kept, lost])
    assert g.attempts == 1


async def test_a_disabled_tenant_running_work_still_finishes(store: Store) -> None:
    gid = await submit(store, "a")
    await claim(store, 1)
    await store.tenants.update("a", disabled=True)
    await finish_as(store, "w1", [ok(gid, 1, 2)])
    assert (await store.generations.get("a", gid)).state is State.SUCCESS
    assert await assert_open_in_step(store, "a") == 0


async def test_a_disabled_tenant_batch_lines_load_held(store: Store) -> None:
    await add_file(store, "a", "file_a", 2)
    created = await create_batch(store, "a", "file_a")
    await store.tenants.update("a", disabled=True)
    b = await store.batch_runs.claim("runner", 60)
    assert b is not None and b.id == created.id
    assert await store.batch_runs.start("runner", b.id, 2)
    b = await store.batches.get("a", b.id)
    lines = [BatchLine(custom_id=f"c{i}", body={"model": M, "messages": []}) for i in range(2)]
    assert await store.batch_runs.load_chunk("runner", b, 0, lines, Kind.CHAT)
    assert await count(store, G, "a") == 2
    assert await claim(store) == []
    await store.tenants.update("a", disabled=False)
    assert [g.custom_id for g in await claim(store)] == ["c0", "c1"]


async def test_a_disabled_tenant_batch_retry_is_held_or_refused(store: Store) -> None:
    batch_id = await load_batch(store, "a", "file_a", 2)
    got = await claim(store)
    await finish_as(store, "w1", [failed(g.id) for g in got])
    b = await store.batch_runs.claim("runner", 60)
    assert b is not None and b.id == batch_id
    await store.batch_runs.finalize("runner", b, None, None)
    await store.tenants.update("a", disabled=True)
    with contextlib.suppress(TenantDisabled):
        await store.batches.retry("a", batch_id)
    # either way nothing of a disabled tenant runs
    assert await claim(store) == []


async def test_disabling_is_seen_by_another_process(
    store: Store, stores: Callable[..., list[Store]]
) -> None:
    _, other = stores(1)
    gid = await submit(other, "a")
    await store.tenants.update("a", disabled=True)
    with pytest.raises(TenantDisabled):
        await submit(other, "a")
    assert await other.work.claim("w9", [M], 10, 60) == []
    await store.tenants.update("a", disabled=False)
    assert [g.id for g in await other.work.claim("w9", [M], 10, 60)] == [gid]


# -- weights ----------------------------------------------------------------------------------


async def test_weights_share_the_claims(store: Store) -> None:
    await store.tenants.create("a", weight=2)
    await store.tenants.create("b", weight=1)
    for i in range(30):
        await store.generations.submit("a", new(i), expiry_seconds=HOUR)
    for i in range(30):
        await store.generations.submit("b", new(i), expiry_seconds=HOUR)
    order: list[str] = []
    for _ in range(30):
        (g,) = await claim(store, 1)
        order.append(g.tenant)
    for k in range(1, 31):
        assert abs(order[:k].count("a") - 2 * k / 3) <= 1.5, order
    assert 19 <= order.count("a") <= 21


async def test_a_new_weight_respaces_queued_work_at_once(store: Store) -> None:
    for i in range(30):
        await store.generations.submit("a", new(i), expiry_seconds=HOUR)
    for i in range(30):
        await store.generations.submit("b", new(i), expiry_seconds=HOUR)
    t = await store.tenants.update("b", weight=3)
    assert t.weight == 3
    order = [g.tenant for g in await claim(store, 20)]
    assert 14 <= order.count("b") <= 16, order
    # and back down: a has three turns for each of b's
    await store.tenants.update("b", weight=1)
    await store.tenants.update("a", weight=3)
    order = [g.tenant for g in await claim(store, 20)]
    assert 14 <= order.count("a") <= 16, order


async def test_respaced_fair_keys_stay_integers(store: Store) -> None:
    """A new weight re-spaces keys measured from the floor, which may be another tenant's key
    off this tenant's grid: the keys stay whole numbers (the column is BIGINT; a REAL key
    would lose its low bits once held at HELD = 2**62), and holding and releasing keeps them
    in order."""
    await store.tenants.create("b", weight=3)
    a = [await submit(store, "a") for _ in range(3)]
    b = [await submit(store, "b") for _ in range(3)]
    (first,) = await claim(store, 1)
    assert first.id == a[0]
    await store.tenants.update("a", weight=3)
    keys = await fair_keys_of(store, a[1:] + b)
    assert all(type(k) is int for k in keys), keys
    await store.tenants.update("a", disabled=True)
    await store.tenants.update("a", disabled=False)
    keys = await fair_keys_of(store, a[1:])
    assert all(type(k) is int for k in keys), keys
    assert keys[0] < keys[1]


async def test_fair_keys_are_a_weight_step_apart(store: Store) -> None:
    await store.tenants.create("a", weight=4)
    gid = await group(store, 3, "a")
    _, gens = await store.groups.get("a", gid, with_generations=True)
    keys = await fair_keys_of(store, [g.id for g in gens])
    assert [k - keys[0] for k in keys] == [0, FAIR_STEP // 4, 2 * FAIR_STEP // 4]
    await store.tenants.update("a", disabled=True)
    held = await fair_keys_of(store, [g.id for g in gens])
    assert all(k >= HELD for k in held)
    assert [k - held[0] for k in held] == [0, FAIR_STEP // 4, 2 * FAIR_STEP // 4]
    # a new weight while disabled re-spaces the held work too: enabled, it takes its new share
    await store.tenants.update("a", weight=1)
    held = await fair_keys_of(store, [g.id for g in gens])
    assert all(k >= HELD for k in held)
    assert [k - held[0] for k in held] == [0, FAIR_STEP, 2 * FAIR_STEP]
    await store.tenants.update("a", disabled=False)
    keys = await fair_keys_of(store, [g.id for g in gens])
    assert [k - keys[0] for k in keys] == [0, FAIR_STEP, 2 * FAIR_STEP] and keys[0] < HELD


# -- usage ------------------------------------------------------------------------------------


async def test_usage_report_by_day_model_and_lane(store: Store) -> None:
    today = utcnow().date()
    s1 = await submit(store, "a", model="m1")
    await group(store, 2, "a", model="m2")
    await load_batch(store, "a", "file_a", 3, model="m1")
    await submit(store, "b", model="m1")
    got = await claim(store, 100, models=("m1", "m2"))
    assert len(got) == 7
    outcomes: list[Outcome] = []
    for g in got:
        if g.id == s1:
            outcomes.append(failed(g.id))
        else:
            outcomes.append(ok(g.id, prompt=10, completion=1))
    await finish_as(store, "w1", outcomes)
    rt = RealtimeUsage(store.usage)
    rt.record("a", "m2", failed=False, response={"usage": {"prompt_tokens": 5}})
    assert rt.pending("a") == 5
    await rt.flush()
    # an older day, written directly
    old = Tally()
    old.add("a", "2020-01-01", "m1", "slow", failed=False, prompt_tokens=7, completion_tokens=0)
    await store.usage.add(old)

    rows = await store.usage.report("a", today, today, ["day", "model", "lane"])

    def row(m: str, lane: Any, n: int, bad: int, p: int, c: int) -> UsageRow:
        return UsageRow(
            day=today,
            model=m,
            lane=lane,
            requests=n,
            failed=bad,
            prompt_tokens=p,
            completion_tokens=c,
            total_tokens=p + c,
        )

    assert rows == [
        row("m1", "batch", 3, 0, 30, 3),
        row("m1", "slow", 1, 1, 0, 0),
        row("m2", "group", 2, 0, 20, 2),
        row("m2", "realtime", 1, 0, 5, 0),
    ]
    by_lane = await store.usage.report("a", today, today, ["lane"])
    assert [(r.lane, r.requests, r.day, r.model) for r in by_lane] == [
        ("batch", 3, None, None),
        ("group", 2, None, None),
        ("realtime", 1, None, None),
        ("slow", 1, None, None),
    ]
    (total,) = await store.usage.report("a", today, today, [])
    assert (total.requests, total.failed, total.total_tokens) == (7, 1, 60)
    # the date range, and the filters
    (older,) = await store.usage.report("a", date(2020, 1, 1), today - timedelta(days=1), ["day"])
    assert (older.day, older.requests, older.prompt_tokens) == (date(2020, 1, 1), 1, 7)
    assert len(await store.usage.report("a", date(2020, 1, 1), today, ["day"])) == 2
    assert (
        await store.usage.report("a", today + timedelta(days=1), today + timedelta(days=9), [])
        == []
    )
    assert [r.requests for r in await store.usage.report("a", today, today, [], lane="batch")] == [
        3
    ]
    assert [r.requests for r in await store.usage.report("a", today, today, [], model="m2")] == [3]
    # tenant scoping
    (b_total,) = await store.usage.report("b", today, today, [])
    assert (b_total.requests, b_total.total_tokens) == (1, 11)
    per_tenant = await store.usage.report(None, today, today, ["tenant"])
    assert [(r.tenant, r.requests) for r in per_tenant] == [("a", 7), ("b", 1)]
    assert await store.usage.report("nobody", today, today, []) == []
