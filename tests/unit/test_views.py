"""The dashboard's reads (store.views), on SQLite and PostgreSQL: scoped, paginated, by minute."""

from __future__ import annotations

from datetime import timedelta

from backburner.core.clock import utcnow
from backburner.core.states import Kind, State
from backburner.schemas.generation import NewGeneration
from backburner.store import Store
from tests.support.leases import finish_as
from tests.unit.test_store_transitions import HOUR, M, new, ok


async def test_queue_depth_by_model_state_and_tenant(store: Store) -> None:
    for _ in range(3):
        await store.generations.submit("a", new(), expiry_seconds=HOUR)
    other = NewGeneration(kind=Kind.CHAT, model="m2", request={"model": "m2", "messages": []})
    await store.generations.submit("b", other, expiry_seconds=HOUR)
    await store.work.claim("w1", [M], 1, 60)
    assert await store.views.queue_depth(None) == [
        (M, "In Progress", 1),
        (M, "Queued", 2),
        ("m2", "Queued", 1),
    ]
    assert await store.views.queue_depth("b") == [("m2", "Queued", 1)]
    assert await store.views.queue_depth("nobody") == []


async def test_finished_by_minute(store: Store) -> None:
    gids = [(await store.generations.submit("a", new(), expiry_seconds=HOUR)).id for _ in range(3)]
    await store.generations.submit("b", new(), expiry_seconds=HOUR)
    await store.work.claim("w1", [M], 10, 60)
    await finish_as(store, "w1", [ok(gids[0]), ok(gids[1])])
    since = utcnow() - timedelta(minutes=2)
    rows = await store.views.finished_by_minute("a", since)
    assert sum(n for _, s, n in rows if s == State.SUCCESS.value) == 2
    minute = rows[0][0]
    assert len(minute) == 16 and minute[4] == "-" and minute[13] == ":"  # YYYY-MM-DD HH:MM
    assert await store.views.finished_by_minute("b", since) == []
    assert await store.views.finished_by_minute("a", utcnow() + timedelta(minutes=1)) == []


async def test_group_list_pages_by_key_and_lines_by_position(store: Store) -> None:
    made = []
    for _ in range(5):
        rec = await store.groups.submit(
            "a", Kind.CHAT, [new() for _ in range(3)], expiry_seconds=HOUR
        )
        made.append(rec.id)
    await store.groups.submit("b", Kind.CHAT, [new()], expiry_seconds=HOUR)
    first = await store.views.groups("a", limit=2)
    assert [g.id for g in first] == made[::-1][:2]
    nxt = await store.views.groups("a", limit=10, before=(first[-1].created_at, first[-1].id))
    assert [g.id for g in nxt] == made[::-1][2:]
    assert len(await store.views.groups(None, limit=10)) == 6
    assert await store.views.groups("a", status="completed") == []
    lines = await store.views.lines(group_id=made[0], start=1, limit=10)
    assert [x.index for x in lines] == [1, 2]
    assert await store.views.group("b", made[0]) is None
    assert await store.views.owner("group", made[0]) == "a"
    assert await store.views.owner("batch", made[0]) is None
