"""The Store on SQLite and PostgreSQL: enqueue, claim, leases, outcomes, groups, keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.outcome import Idempotency, Outcome
from backburner.core.prefix import Candidate
from backburner.core.states import GroupStatus, Kind, State
from backburner.errors import Conflict, NotFound
from backburner.schemas.generation import GenerationRecord, NewGeneration
from backburner.store import IdempotencyRace, Store
from backburner.store.tables import generations
from tests.support.leases import finish_as, held

M = "m"
HOUR = 3600.0


def new(model: str = M, **extra: Any) -> NewGeneration:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return NewGeneration(kind=Kind.CHAT, model=model, request=body)


async def submit(store: Store, tenant: str = "t1", model: str = M, expiry: float = HOUR) -> str:
    return (await store.generations.submit(tenant, new(model), expiry_seconds=expiry)).id


async def group(
    store: Store, n: int, tenant: str = "t1", expiry: float = HOUR, model: str = M
) -> str:
    items = [new(model, custom=i) for i in range(n)]
    return (await store.groups.submit(tenant, Kind.CHAT, items, expiry_seconds=expiry)).id


async def claim(
    store: Store, worker: str = "w1", limit: int = 100, lease: float = 60.0
) -> list[str]:
    return [g.id for g in await store.work.claim(worker, [M], limit, lease)]


def ok(gid: str) -> Outcome:
    return Outcome(gid, State.SUCCESS, "Completed", response={"choices": []})


async def lease_of(store: Store, gid: str) -> tuple[str | None, datetime | None]:
    g = generations
    q = sa.select(g.c.lease_owner, g.c.lease_expires_at).where(g.c.id == gid)
    async with store.engine.connect() as conn:
        row = (await conn.execute(q)).one()
    return row[0], row[1]


async def test_submit_and_get(store: Store) -> None:
    before = utcnow()
    rec = await store.generations.submit("t1", new(), expiry_seconds=HOUR)
    got = await store.generations.get("t1", rec.id)
    assert got == rec
    assert len(rec.id) == 21
    assert (got.state, got.state_message, got.attempts) == (State.QUEUED, "Queued", 0)
    assert got.dispatched_at is None and got.finished_at is None and got.response is None
    assert before - timedelta(seconds=1) <= got.created_at <= utcnow() + timedelta(seconds=1)
    assert got.created_at.utcoffset() == timedelta(0)
    assert got.expires_at - got.created_at == timedelta(hours=1)


async def test_other_tenant_gets_not_found(store: Store) -> None:
    gid = await submit(store, "t1")
    with pytest.raises(NotFound):
        await store.generations.get("t2", gid)
    with pytest.raises(NotFound):
        await store.generations.get("t1", "x" * 21)


async def test_request_stored_exactly_as_sent(store: Store) -> None:
    body = {
        "zeta": 1,
        "model": M,
        "messages": [{"role": "user", "content": 'héllo ✓ 日本語 🙂 "q" \\ \n \u0000 \x1f'}],
        "alpha": {"z": [1, 2.5, None, True, {"deep": {"er": []}}], "a": "", "big": 2**62},
        "metadata": {"custom_id": "req-001", "b": 2, "a": 1},
    }
    rec = await store.generations.submit(
        "t1", NewGeneration(Kind.CHAT, M, body), expiry_seconds=HOUR
    )
    got = (await store.generations.get("t1", rec.id)).request
    assert got == body
    assert json.dumps(got, ensure_ascii=False) == json.dumps(body, ensure_ascii=False)
    assert list(got["alpha"]) == ["z", "a", "big"]


async def test_lone_surrogate_escape_is_stored_exactly(store: Store) -> None:
    body = json.loads('{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}')
    rec = await store.generations.submit(
        "t1", NewGeneration(Kind.CHAT, M, body), expiry_seconds=HOUR
    )
    assert (await store.generations.get("t1", rec.id)).request == body


async def test_claim_marks_in_progress_with_a_lease(store: Store) -> None:
    gid = await submit(store)
    (g,) = await store.work.claim("w1", [M], 10, 60.0)
    assert g.id == gid
    assert (g.state, g.state_message, g.attempts) == (State.IN_PROGRESS, "Running", 1)
    assert g.dispatched_at is not None and g.dispatched_at >= g.created_at
    owner, expires = await lease_of(store, gid)
    assert owner == "w1"
    assert expires is not None and expires > utcnow() + timedelta(seconds=30)
    assert await store.generations.get("t1", gid) == g
    assert await claim(store, "w2") == []


async def test_claim_filters_by_model_and_respects_limit(store: Store) -> None:
    a = {await submit(store, model="a") for _ in range(3)}
    b = {await submit(store, model="b") for _ in range(2)}
    assert {g.id for g in await store.work.claim("w", ["b", "zzz"], 10, 60)} == b
    first = {g.id for g in await store.work.claim("w", ["a"], 2, 60)}
    assert len(first) == 2 and first < a
    assert await store.work.claim("w", ["a"], 0, 60) == []
    assert await store.work.claim("w", [], 10, 60) == []
    assert {g.id for g in await store.work.claim("w", ["a", "b"], 10, 60)} == a - first


async def test_one_tenant_cannot_starve_another(store: Store) -> None:
    await group(store, 50, tenant="A")
    assert len(await claim(store, limit=1)) == 1
    b = await submit(store, tenant="B")
    order: list[str] = []
    while b not in order:
        (gid,) = await claim(store, limit=1)
        order.append(gid)
    assert len(order) < 10, f"B's request waited behind {len(order) - 1} of A's"


async def test_two_big_tenants_interleave(store: Store) -> None:
    await group(store, 50, tenant="A")
    await group(store, 50, tenant="B")
    tenants = [g.tenant for g in await store.work.claim("w", [M], 20, 60)]
    assert tenants.count("A") >= 8 and tenants.count("B") >= 8


async def test_heartbeat_extends_only_own_leases(store: Store) -> None:
    g1, g2 = await submit(store), await submit(store)
    (c1,) = await claim(store, "w1", limit=1, lease=5)
    (c2,) = await claim(store, "w2", limit=1, lease=5)
    assert {c1, c2} == {g1, g2}
    before = (await lease_of(store, c2))[1]
    assert await store.work.heartbeat(held("w1", [c1, c2, "nope"]), 600) == 1
    exp1 = (await lease_of(store, c1))[1]
    assert exp1 is not None and exp1 > utcnow() + timedelta(seconds=300)
    assert (await lease_of(store, c2))[1] == before
    assert await store.work.heartbeat(held("w1", []), 600) == 0


async def test_release_requeues_without_counting_the_attempt(store: Store) -> None:
    gid = await submit(store)
    await claim(store, "w1")
    assert await store.work.release(held("w2", [gid])) == 0
    assert await store.work.release(held("w1", [gid])) == 1
    g = await store.generations.get("t1", gid)
    assert (g.state, g.state_message, g.attempts) == (State.QUEUED, "Queued", 0)
    assert await lease_of(store, gid) == (None, None)
    (again,) = await store.work.claim("w3", [M], 1, 60)
    assert again.attempts == 1


async def test_recover_lost_requeues_expired_leases(store: Store) -> None:
    lost, alive = await submit(store), await submit(store)
    assert await claim(store, "dead", limit=1, lease=0.01) == [lost]
    assert await claim(store, "live", limit=1, lease=600) == [alive]
    await asyncio.sleep(0.1)
    assert await store.work.recover_lost() == 1
    g = await store.generations.get("t1", lost)
    assert (g.state, g.attempts) == (State.QUEUED, 1)
    assert (await store.generations.get("t1", alive)).state is State.IN_PROGRESS
    assert await finish_as(store, "dead", [ok(lost)]) == []  # the lease is gone: nothing recorded
    assert (await store.generations.get("t1", lost)).state is State.QUEUED
    (g2,) = await store.work.claim("w2", [M], 10, 60)
    assert (g2.id, g2.attempts) == (lost, 2)


async def test_finish_success_and_failure(store: Store) -> None:
    s, f = await submit(store), await submit(store)
    await claim(store)
    assert await finish_as(store, "w1", [ok(s), Outcome(f, State.FAILED, "HTTP 400: bad")]) == []
    gs, gf = await store.generations.get("t1", s), await store.generations.get("t1", f)
    assert (gs.state, gs.state_message) == (State.SUCCESS, "Completed")
    assert gs.response == {"choices": []}
    assert gs.finished_at is not None and gs.dispatched_at is not None
    assert gs.finished_at >= gs.dispatched_at
    assert (gf.state, gf.state_message, gf.response) == (State.FAILED, "HTTP 400: bad", None)
    assert await lease_of(store, s) == (None, None)


async def test_finish_retry_is_not_claimable_before_retry_at(store: Store) -> None:
    gid = await submit(store)
    (first,) = await store.work.claim("w1", [M], 1, 60)
    retry_at = utcnow() + timedelta(seconds=0.3)
    await finish_as(
        store, "w1", [Outcome(gid, State.QUEUED, "HTTP 503, retrying", retry_at=retry_at)]
    )
    g = await store.generations.get("t1", gid)
    assert (g.state, g.state_message, g.finished_at) == (State.QUEUED, "HTTP 503, retrying", None)
    assert await claim(store, "w2") == []
    await asyncio.sleep(0.4)
    (again,) = await store.work.claim("w2", [M], 1, 60)
    assert (again.id, again.attempts) == (gid, 2)
    assert again.dispatched_at == first.dispatched_at  # first dispatch is kept


async def test_finish_by_a_worker_without_the_lease_changes_nothing(store: Store) -> None:
    gid = await submit(store)
    await claim(store, "w1")
    assert await finish_as(store, "w2", [ok(gid)]) == []
    g = await store.generations.get("t1", gid)
    assert g.state is State.IN_PROGRESS and g.response is None
    await finish_as(store, "w1", [Outcome(gid, State.FAILED, "boom")])
    assert await finish_as(store, "w1", [ok(gid)]) == []  # finished stays finished
    assert (await store.generations.get("t1", gid)).state is State.FAILED


async def test_expire_overdue(store: Store) -> None:
    old, fresh = await submit(store, expiry=0.01), await submit(store, expiry=HOUR)
    all_queued = await group(store, 2, expiry=0.01)
    running = await group(store, 2, expiry=0.01, model="r")
    (r1,) = await store.work.claim("w1", ["r"], 1, 60)  # one of `running` is In Progress
    await asyncio.sleep(0.05)
    n, completed = await store.work.expire_overdue()
    assert (n, completed) == (4, [all_queued])
    e = await store.generations.get("t1", old)
    assert (e.state, e.state_message) == (State.FAILED, "Expired") and e.finished_at is not None
    assert (await store.generations.get("t1", fresh)).state is State.QUEUED
    gq, _ = await store.groups.get("t1", all_queued)
    assert gq.status is GroupStatus.EXPIRED and gq.completed_at is not None
    gr, _ = await store.groups.get("t1", running)
    assert gr.status is GroupStatus.EXPIRED and gr.completed_at is None
    assert (gr.counts.failed, gr.counts.in_progress) == (1, 1)
    assert await finish_as(store, "w1", [ok(r1.id)]) == [running]
    assert (await store.groups.get("t1", running))[0].status is GroupStatus.EXPIRED
    assert await store.work.expire_overdue() == (0, [])


async def test_cancel_generation(store: Store) -> None:
    q, running = await submit(store), await submit(store)
    c = await store.generations.cancel("t1", q)
    assert (c.state, c.state_message) == (State.FAILED, "Cancelled") and c.finished_at is not None
    assert await claim(store) == [running]
    with pytest.raises(Conflict):
        await store.generations.cancel("t1", running)
    with pytest.raises(Conflict):
        await store.generations.cancel("t1", q)  # finished
    with pytest.raises(NotFound):
        await store.generations.cancel("t2", running)
    assert (await store.generations.get("t1", running)).state is State.IN_PROGRESS


async def test_group_counts_and_submission_order(store: Store) -> None:
    items = [new(metadata={"custom_id": f"r-{i}"}) for i in range(5)]
    rec = await store.groups.submit(
        "t1", Kind.CHAT, items, expiry_seconds=HOUR, metadata={"job": "ü"}, webhook_id="wh1"
    )
    assert (rec.size, rec.status, rec.counts.queued) == (5, GroupStatus.IN_PROGRESS, 5)
    grp, gens = await store.groups.get("t1", rec.id, with_generations=True)
    assert (grp.metadata, grp.webhook_id) == ({"job": "ü"}, "wh1")
    assert [g.request["metadata"]["custom_id"] for g in gens] == [f"r-{i}" for i in range(5)]
    assert [g.group_index for g in gens] == list(range(5))
    assert {g.group_id for g in gens} == {rec.id}
    ids = await claim(store, limit=3)
    await finish_as(store, "w1", [ok(ids[0]), Outcome(ids[1], State.FAILED, "x")])
    grp, none = await store.groups.get("t1", rec.id)
    assert none == []
    c = grp.counts
    assert (c.queued, c.in_progress, c.success, c.failed) == (2, 1, 1, 1)
    with pytest.raises(NotFound):
        await store.groups.get("t2", rec.id)


async def test_group_completion_is_recorded_exactly_once(store: Store) -> None:
    gid = await group(store, 3)
    a, b, c = await claim(store)
    assert await finish_as(store, "w1", [ok(a)]) == []
    assert await finish_as(store, "w1", [Outcome(b, State.QUEUED, "retry")]) == []
    assert await finish_as(store, "w1", [Outcome(c, State.FAILED, "bad")]) == []
    assert await claim(store) == [b]
    assert await finish_as(store, "w1", [ok(b)]) == [gid]
    assert await finish_as(store, "w1", [ok(a), ok(b), ok(c)]) == []
    grp, _ = await store.groups.get("t1", gid)
    assert grp.status is GroupStatus.COMPLETED and grp.completed_at is not None
    assert (grp.counts.success, grp.counts.failed) == (2, 1)


async def test_cancel_group(store: Store) -> None:
    gid = await group(store, 3)
    (running,) = await claim(store, limit=1)
    grp = await store.groups.cancel("t1", gid)
    assert grp.status is GroupStatus.CANCELLED and grp.completed_at is None
    assert (grp.counts.failed, grp.counts.in_progress) == (2, 1)
    _, gens = await store.groups.get("t1", gid, with_generations=True)
    assert [g.state_message for g in gens if g.id != running] == ["Cancelled", "Cancelled"]
    with pytest.raises(Conflict):
        await store.groups.cancel("t1", gid)
    with pytest.raises(NotFound):
        await store.groups.cancel("t2", gid)
    assert await finish_as(store, "w1", [ok(running)]) == [gid]
    grp, _ = await store.groups.get("t1", gid)
    assert grp.status is GroupStatus.CANCELLED and grp.completed_at is not None


async def test_cancelling_the_last_member_completes_the_group(store: Store) -> None:
    gid = await group(store, 2)
    _, gens = await store.groups.get("t1", gid, with_generations=True)
    await store.generations.cancel("t1", gens[0].id)
    assert (await store.groups.get("t1", gid))[0].completed_at is None
    await store.generations.cancel("t1", gens[1].id)
    grp, _ = await store.groups.get("t1", gid)
    assert grp.status is GroupStatus.COMPLETED and grp.counts.failed == 2


def idem(key: str = "k1", h: str = "h1") -> Idempotency:
    return Idempotency(key=key, request_hash=h, status_code=200, response={"id": "x", "ü": [1]})


async def test_idempotency_save_and_answer(store: Store) -> None:
    assert await store.idempotency.answer("t1", "k1", HOUR) is None
    await store.idempotency.save("t1", idem(), HOUR)
    assert await store.idempotency.answer("t1", "k1", HOUR) == ("h1", 200, {"id": "x", "ü": [1]})
    assert await store.idempotency.answer("t2", "k1", HOUR) is None
    with pytest.raises(IdempotencyRace):
        await store.idempotency.save("t1", idem(h="h2"), HOUR)
    await store.idempotency.save("t2", idem(), HOUR)  # keys are per tenant


async def test_idempotency_key_expires(store: Store) -> None:
    await store.idempotency.save("t1", idem(), HOUR)
    await asyncio.sleep(0.05)
    assert await store.idempotency.answer("t1", "k1", 0.01) is None
    await store.idempotency.save("t1", idem(h="h2"), 0.01)  # the stale one is replaced
    assert (await store.idempotency.answer("t1", "k1", HOUR) or ("",))[0] == "h2"


async def test_idempotency_race_stores_nothing(store: Store) -> None:
    await store.generations.submit("t1", new(), expiry_seconds=HOUR, idempotency=idem())
    with pytest.raises(IdempotencyRace):
        await store.generations.submit("t1", new(), expiry_seconds=HOUR, idempotency=idem())
    with pytest.raises(IdempotencyRace):
        await store.groups.submit("t1", Kind.CHAT, [new()], expiry_seconds=HOUR, idempotency=idem())
    assert await store.generations.count_by_state() == {"Queued": 1}


async def test_api_keys(store: Store) -> None:
    assert not await store.keys.any_created()
    kid, key = await store.keys.create("acme", name="ci")
    assert await store.keys.any_created()
    assert await store.keys.tenant_for(key) == "acme"
    assert await store.keys.tenant_for(key + "x") is None
    (listed,) = await store.keys.list()
    assert (listed["id"], listed["tenant"], listed["name"]) == (kid, "acme", "ci")
    assert key.startswith(listed["prefix"]) and key not in json.dumps(listed, default=str)
    assert await store.keys.revoke(kid)
    assert not await store.keys.revoke(kid)
    assert await store.keys.tenant_for(key) is None
    assert await store.keys.any_created()  # revoked, but auth stays on


async def test_dispatched_at_is_utc_on_a_non_utc_postgres_server(pg_database: str) -> None:
    name = sa.make_url(pg_database).database
    admin = Store(pg_database)
    try:
        async with admin.engine.begin() as conn:
            await conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Tokyo'"))
        s = Store(pg_database)  # new connections: TimeZone is Asia/Tokyo
        try:
            rec: GenerationRecord = await s.generations.submit(
                "tz", new("tz-model"), expiry_seconds=HOUR
            )
            (g,) = await s.work.claim("w", ["tz-model"], 1, 60)
            assert g.id == rec.id
            assert g.dispatched_at is not None
            assert abs(g.dispatched_at - rec.created_at) < timedelta(minutes=5)
        finally:
            await s.close()
    finally:
        async with admin.engine.begin() as conn:
            await conn.execute(sa.text(f'ALTER DATABASE "{name}" RESET timezone'))
            await conn.execute(generations.delete().where(generations.c.tenant == "tz"))
        await admin.close()


async def test_a_tenant_with_nothing_queued_does_not_carry_its_clock(store: Store) -> None:
    """Yesterday tenant a ran 30 requests (its virtual clock moved to 30). Today tenant b queues
    20; tenant a's new request lands beside the head of b's queue, not after b's 20."""
    for _ in range(30):
        await submit(store, tenant="a")
    done = await claim(store, limit=100)
    await finish_as(store, "w1", [ok(gid) for gid in done])
    for _ in range(20):
        await submit(store, tenant="b")
    late = await submit(store, tenant="a")
    first_round = await claim(store, limit=3)  # keys 1, 2 (b) and 2 (a)
    assert late in first_round


async def test_leases_are_fenced_per_claim_not_per_worker(store: Store) -> None:
    """The same worker claims a generation again after its first lease ran out: only the
    second claim's token may extend, record or give back."""
    gid = await submit(store)
    (first,) = await store.work.claim("w1#a", [M], 1, 0.01)
    await asyncio.sleep(0.05)
    assert await store.work.recover_lost() == 1
    (again,) = await store.work.claim("w1#b", [M], 1, 60)
    assert first.id == again.id == gid and again.attempts == 2
    assert await store.work.heartbeat(held("w1#a", [gid]), 60) == 0
    assert await store.work.release(held("w1#a", [gid])) == 0
    assert await finish_as(store, "w1#a", [ok(gid)]) == []
    assert (await store.generations.get("t1", gid)).state is State.IN_PROGRESS
    assert await store.work.heartbeat(held("w1#b", [gid]), 60) == 1
    await finish_as(store, "w1#b", [Outcome(gid, State.FAILED, "second run")])
    g = await store.generations.get("t1", gid)
    assert (g.state, g.state_message) == (State.FAILED, "second run")


async def test_lease_times_come_from_the_database_clock(store: Store) -> None:
    gid = await submit(store)
    before = utcnow()
    await claim(store, "w1", limit=1, lease=30)
    _, expires = await lease_of(store, gid)
    assert expires is not None
    assert before + timedelta(seconds=29) <= expires <= utcnow() + timedelta(seconds=31)


async def test_a_claim_with_a_chooser_takes_what_it_picks_in_its_order(store: Store) -> None:
    ids = [await submit(store) for _ in range(6)]
    seen: list[list[str]] = []

    def every_other_reversed(window: Sequence[Candidate], n: int) -> list[Candidate]:
        seen.append([c.id for c in window])
        return list(reversed(window[::2]))[:n]

    got = await store.work.claim("w1", [M], 2, 60, choose=every_other_reversed, window=5)
    assert seen == [ids[:5]]  # the window, in fair order
    assert [g.id for g in got] == [ids[4], ids[2]]
    assert all(g.state is State.IN_PROGRESS for g in got)
    rest = await store.work.claim("w2", [M], 10, 60, choose=lambda w, n: w[:n], window=1)
    assert [g.id for g in rest] == [i for i in ids if i not in (ids[4], ids[2])]


async def test_work_due_sooner_goes_first_inside_its_tenants_turns(store: Store) -> None:
    """t1 queues 4 requests due in a day, then a group of 2 due in an hour; t2 queues 3. The
    claims still follow the fair keys (each tenant's turns), but t1's turns go to its group
    first."""
    late = [await submit(store, "t1", expiry=24 * HOUR) for _ in range(4)]
    others = [await submit(store, "t2", expiry=24 * HOUR) for _ in range(3)]
    gid = await group(store, 2, "t1", expiry=HOUR)
    soon = {g.id for g in (await store.groups.get("t1", gid, with_generations=True))[1]}
    order: list[tuple[str, str]] = []
    keys: list[int] = []
    while got := await store.work.claim("w", [M], 1, 60):
        order.append((got[0].tenant, got[0].id))
        async with store.engine.connect() as conn:
            keys.append(
                (
                    await conn.execute(
                        sa.select(generations.c.fair_key).where(generations.c.id == got[0].id)
                    )
                ).scalar_one()
            )
    assert keys == sorted(keys) and len(order) == 9  # every claim in fair-key order
    t1_order = [gid_ for t, gid_ in order if t == "t1"]
    assert set(t1_order[:2]) == soon  # the group first, in t1's first two turns
    # then the rest; the two it displaced took the group's later turns
    assert sorted(t1_order[2:]) == sorted(late)
    assert [gid_ for t, gid_ in order if t == "t2"] == others


async def test_equal_deadlines_keep_the_fair_order(store: Store) -> None:
    ids = [await submit(store, "t1") for _ in range(5)]
    got = await store.work.claim("w", [M], 5, 60)
    assert [g.id for g in got] == ids


async def test_deadlines_beyond_the_horizon_leave_the_fair_order(store: Store) -> None:
    """A 24 h group behind 72 h requests: nothing is due within the hour, no reordering."""
    first = [await submit(store, "t1", expiry=72 * HOUR) for _ in range(3)]
    await group(store, 2, "t1", expiry=24 * HOUR)
    got = await store.work.claim("w", [M], 3, 60, horizon=HOUR)
    assert [g.id for g in got] == first
