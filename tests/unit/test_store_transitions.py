"""The store refuses what the transition tables forbid (core.states), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from backburner.core.outcome import Outcome
from backburner.core.states import BatchStatus, EventState, GroupStatus, Kind, State
from backburner.errors import Conflict
from backburner.schemas.batch import BatchCreate, BatchLine, BatchRecord
from backburner.schemas.generation import NewGeneration
from backburner.store import Store
from backburner.store.tables import generations, webhook_events
from tests.support.leases import finish_as, held

M = "m"
HOUR = 3600.0


def new(**extra: Any) -> NewGeneration:
    body = {"model": M, "messages": [{"role": "user", "content": "hi"}], **extra}
    return NewGeneration(kind=Kind.CHAT, model=M, request=body)


def ok(gid: str) -> Outcome:
    return Outcome(gid, State.SUCCESS, "Completed", response={"choices": []})


async def state_of(store: Store, gid: str) -> tuple[str, str, int]:
    g = generations
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(g.c.state, g.c.state_message, g.c.attempts).where(g.c.id == gid)
            )
        ).one()
    return row[0], row[1], row[2]


async def test_finishing_a_generation_twice_changes_nothing(store: Store) -> None:
    gid = (await store.generations.submit("t1", new(), expiry_seconds=HOUR)).id
    await store.work.claim("w1", [M], 1, 60)
    assert await finish_as(store, "w1", [ok(gid)]) == []
    before = await store.generations.get("t1", gid)
    for outcome in (
        Outcome(gid, State.FAILED, "late failure"),
        Outcome(gid, State.QUEUED, "late retry"),
        ok(gid),
    ):
        await finish_as(store, "w1", [outcome])
        assert await store.generations.get("t1", gid) == before
    assert before.state is State.SUCCESS


async def test_finish_refuses_an_outcome_the_table_does_not_allow(store: Store) -> None:
    gid = (await store.generations.submit("t1", new(), expiry_seconds=HOUR)).id
    await store.work.claim("w1", [M], 1, 60)
    # In Progress -> In Progress is no transition: nothing is written, the lease stays
    await finish_as(store, "w1", [Outcome(gid, State.IN_PROGRESS, "what?")])
    assert await state_of(store, gid) == ("In Progress", "Running", 1)
    assert await store.work.heartbeat(held("w1", [gid]), 60) == 1


async def test_released_or_expired_work_only_leaves_the_states_it_may(store: Store) -> None:
    gid = (await store.generations.submit("t1", new(), expiry_seconds=HOUR)).id
    # release and heartbeat touch In Progress work only; this one is Queued
    assert await store.work.release(held("w1", [gid])) == 0
    assert await store.work.heartbeat(held("w1", [gid]), 60) == 0
    await store.generations.cancel("t1", gid)
    assert await state_of(store, gid) == ("Failed", "Cancelled", 0)
    with pytest.raises(Conflict):
        await store.generations.cancel("t1", gid)
    assert await store.work.claim("w1", [M], 10, 60) == []  # Failed is never claimed


async def test_a_finished_group_cannot_be_cancelled(store: Store) -> None:
    group = await store.groups.submit("t1", Kind.CHAT, [new()], expiry_seconds=HOUR)
    (g,) = await store.work.claim("w1", [M], 1, 60)
    assert await finish_as(store, "w1", [ok(g.id)]) == [group.id]
    with pytest.raises(Conflict) as err:
        await store.groups.cancel("t1", group.id)
    assert err.value.code == "group_not_cancellable"
    got, _ = await store.groups.get("t1", group.id)
    assert got.status is GroupStatus.COMPLETED


async def _completed_batch(store: Store) -> BatchRecord:
    """A one-line batch driven through the batch runner's steps to ``completed``."""
    body = BatchCreate(
        input_file_id="file_x", endpoint="/v1/chat/completions", completion_window="24h"
    )
    created = await store.batches.create("t1", body)
    b = await store.batch_runs.claim("r1", 60)
    assert b is not None and b.id == created.id and b.status == BatchStatus.VALIDATING
    assert await store.batch_runs.start("r1", b.id, 1)
    b = await store.batches.get("t1", b.id)
    line = BatchLine(custom_id="c0", body={"model": M, "messages": []})
    assert await store.batch_runs.load_chunk("r1", b, 0, [line], Kind.CHAT)
    await store.batch_runs.release("r1", b.id)
    (g,) = await store.work.claim("w1", [M], 1, 60)
    await finish_as(store, "w1", [ok(g.id)])
    b = await store.batches.get("t1", b.id)
    assert b.status == BatchStatus.FINALIZING
    claimed = await store.batch_runs.claim("r1", 60)
    assert claimed is not None and claimed.id == b.id
    await store.batch_runs.finalize("r1", claimed, None, None)
    done = await store.batches.get("t1", b.id)
    assert done.status == BatchStatus.COMPLETED
    return done


async def test_a_completed_batch_refuses_cancel_retry_fail_and_start(store: Store) -> None:
    b = await _completed_batch(store)
    with pytest.raises(Conflict) as err:
        await store.batches.cancel("t1", b.id)
    assert err.value.code == "batch_not_cancellable"
    with pytest.raises(Conflict) as err:
        await store.batches.retry("t1", b.id)  # nothing failed
    assert err.value.code == "batch_not_retryable"
    # the runner's transitions are refused by their compare-and-set, even under a lease
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE batches SET lease_owner = 'r1' WHERE id = :id"), {"id": b.id}
        )
    await store.batch_runs.fail("r1", b.id, [{"line": 1, "message": "late"}])
    assert not await store.batch_runs.start("r1", b.id, 5)
    with pytest.raises(Conflict):
        await store.batch_runs.finalize("r1", b, None, None)
    after = await store.batches.get("t1", b.id)
    assert (after.status, after.total, after.errors) == (BatchStatus.COMPLETED, 1, None)
    assert after.completed_at == b.completed_at


async def test_an_event_failed_by_deleting_its_webhook_stays_failed(store: Store) -> None:
    hook = await store.webhooks.create("t1", url="http://x.invalid/h", secret="whsec_x")
    event_id = await store.outbox.enqueue_test("t1", hook.id)
    (due,) = await store.outbox.claim("d1", 10, 60)
    assert due.id == event_id
    await store.webhooks.delete("t1", hook.id)  # pending -> failed while the attempt runs
    await store.outbox.record_attempt(
        "d1", due, status_code=200, duration_ms=5, error=None, delivered=True, retry_at=None
    )
    w = webhook_events
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(sa.select(w.c.state, w.c.last_error).where(w.c.id == event_id))
        ).one()
    assert (row[0], row[1]) == (EventState.FAILED.value, "webhook deleted")
    assert await store.outbox.count_by_state("t1") == {"failed": 1}
