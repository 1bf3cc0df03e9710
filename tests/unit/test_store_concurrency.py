"""The Store under concurrency: separate Stores (separate pools) racing on one database."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest

from backburner.core.outcome import Outcome
from backburner.core.states import GroupStatus, Kind, State
from backburner.schemas.generation import NewGeneration
from backburner.store import Store
from tests.support.leases import finish_as

M = "m"
HOUR = 3600.0


def new(i: int) -> NewGeneration:
    return NewGeneration(kind=Kind.CHAT, model=M, request={"model": M, "i": i})


@pytest.fixture
async def stores(store: Store, db_url: str) -> AsyncIterator[Callable[[int], list[Store]]]:
    """``stores(n)``: n more Stores on the (already emptied) database of ``store``."""
    made: list[Store] = []

    def make(n: int) -> list[Store]:
        more = [Store(db_url) for _ in range(n)]
        made.extend(more)
        return more

    yield make
    for s in made:
        await s.close()


async def test_concurrent_claimers_take_every_generation_exactly_once(
    store: Store, stores: Callable[[int], list[Store]]
) -> None:
    submitted: set[str] = set()
    for start in range(0, 400, 50):  # 8 tenants' groups and singles, mixed
        g = await store.groups.submit(
            f"t{start % 3}",
            Kind.CHAT,
            [new(i) for i in range(start, start + 45)],
            expiry_seconds=HOUR,
        )
        _, gens = await store.groups.get(f"t{start % 3}", g.id, with_generations=True)
        submitted.update(x.id for x in gens)
        for i in range(5):
            submitted.add((await store.generations.submit(f"s{i}", new(i), expiry_seconds=HOUR)).id)
    assert len(submitted) == 400

    async def worker(s: Store, name: str) -> list[str]:
        taken: list[str] = []
        while True:
            got = await s.work.claim(name, [M], 16, 60)
            if not got:
                return taken
            assert len(got) <= 16
            assert all(g.state is State.IN_PROGRESS and g.attempts == 1 for g in got)
            taken.extend(g.id for g in got)

    results = await asyncio.gather(*(worker(s, f"w{i}") for i, s in enumerate(stores(8))))
    every = [gid for taken in results for gid in taken]
    dupes = [gid for gid, n in Counter(every).items() if n > 1]
    assert dupes == []
    assert set(every) == submitted
    assert await store.generations.count_by_state() == {"In Progress": 400}


async def test_group_completion_is_recorded_once_under_concurrency(
    store: Store, stores: Callable[[int], list[Store]]
) -> None:
    grp = await store.groups.submit(
        "t1", Kind.CHAT, [new(i) for i in range(40)], expiry_seconds=HOUR
    )
    workers = stores(4)
    claimed: list[list[str]] = []
    for i, s in enumerate(workers):
        claimed.append([g.id for g in await s.work.claim(f"w{i}", [M], 10, 60)])
    assert sorted(len(c) for c in claimed) == [10, 10, 10, 10]

    async def finish_all(s: Store, name: str, ids: list[str]) -> list[str]:
        completed: list[str] = []
        for k in range(0, len(ids), 3):  # small batches, interleaving with the others
            outcomes = [
                Outcome(gid, State.SUCCESS if n % 4 else State.FAILED, "done", {"n": n})
                for n, gid in enumerate(ids[k : k + 3])
            ]
            completed.extend(await finish_as(s, name, outcomes))
            await asyncio.sleep(0)
        return completed

    results = await asyncio.gather(
        *(
            finish_all(s, f"w{i}", ids)
            for i, (s, ids) in enumerate(zip(workers, claimed, strict=True))
        )
    )
    assert [gid for r in results for gid in r] == [grp.id]
    g, _ = await store.groups.get("t1", grp.id)
    assert g.status is GroupStatus.COMPLETED
    assert g.completed_at is not None
    assert g.counts.success + g.counts.failed == 40
    assert g.counts.queued == g.counts.in_progress == 0
