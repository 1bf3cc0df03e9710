"""Retention: Idempotency-Key answers are kept for their TTL; finished results, settled webhook
events and deleted or expired files for their retention, and unfinished work always."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from backburner.config import Settings
from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.outcome import Idempotency
from backburner.core.states import BatchStatus, EventState, Kind, State
from backburner.errors import NotFound
from backburner.schemas.generation import NewGeneration
from backburner.store import Store
from backburner.store.blobs import LocalBlobStore
from backburner.store.retention import RetentionPolicy, retention_policy
from backburner.store.tables import (
    batches,
    files,
    generations,
    groups,
    idempotency_keys,
    webhook_attempts,
    webhook_events,
)
from backburner.store.webhooks import HELD_UNTIL

M = "m"
HOUR = 3600.0
MONTH = timedelta(days=30)
POLICY = RetentionPolicy(results=MONTH, events=MONTH, files=MONTH)


async def test_maintenance_purges_answers_older_than_the_ttl(store: Store) -> None:
    old = Idempotency("old", "h", 200, {"id": "a"})
    fresh = Idempotency("fresh", "h", 200, {"id": "b"})
    await store.idempotency.save("t1", old, 3600)
    await store.idempotency.save("t1", fresh, 3600)
    async with store.engine.begin() as conn:  # age "old" by two hours
        await conn.execute(
            idempotency_keys.update()
            .where(idempotency_keys.c.key == "old")
            .values(created_at=utcnow() - timedelta(hours=2))
        )
    await store.work.expire_overdue(idempotency_ttl_seconds=3600)
    async with store.engine.connect() as conn:
        keys = sorted((await conn.execute(sa.select(idempotency_keys.c.key))).scalars())
    assert keys == ["fresh"]


# ---------------------------------------------------------------------------------- helpers
def ago(days: float) -> datetime:
    return utcnow() - timedelta(days=days)


def new(**extra: Any) -> NewGeneration:
    body = {"model": M, "messages": [{"role": "user", "content": "hi"}], **extra}
    return NewGeneration(kind=Kind.CHAT, model=M, request=body)


async def write(store: Store, table: sa.Table, *rows: dict[str, Any]) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(table.insert(), list(rows))


async def change(store: Store, table: sa.Table, where: Any, **values: Any) -> None:
    """Age rows (or put them in a state) by hand, as time and the worker would."""
    async with store.engine.begin() as conn:
        await conn.execute(table.update().where(where).values(**values))


async def ids(store: Store, table: sa.Table) -> set[str]:
    async with store.engine.connect() as conn:
        return set((await conn.execute(sa.select(table.c.id))).scalars())


async def finished(store: Store, days_ago: float) -> str:
    """A standalone generation, Failed (cancelled) ``days_ago`` days ago."""
    gid = (await store.generations.submit("t1", new(), expiry_seconds=HOUR)).id
    await store.generations.cancel("t1", gid)
    await change(store, generations, generations.c.id == gid, finished_at=ago(days_ago))
    return gid


def generation_row(
    state: State, *, batch_id: str | None, index: int, days_ago: float
) -> dict[str, Any]:
    done = state.terminal
    return {
        "id": new_id(),
        "tenant": "t1",
        "kind": Kind.CHAT.value,
        "model": M,
        "request": "{}",
        "response": '{"choices": []}' if state is State.SUCCESS else None,
        "state": state.value,
        "state_message": "x",
        "attempts": 1 if done else 0,
        "fair_key": index,
        "available_at": ago(days_ago + 1),
        "lease_owner": None,
        "lease_expires_at": None,
        "created_at": ago(days_ago + 1),
        "dispatched_at": None,
        "finished_at": ago(days_ago) if done else None,
        "expires_at": ago(days_ago - 1),
        "group_id": None,
        "group_index": index,
        "batch_id": batch_id,
        "custom_id": f"req-{index}",
        "webhook_id": None,
    }


def file_row(
    file_id: str, *, purpose: str = "batch", blob: str | None = None, **extra: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": file_id,
        "tenant": "t1",
        "filename": f"{file_id}.jsonl",
        "purpose": purpose,
        "bytes": 3,
        "lines": 1,
        "sha256": None,
        "blob": blob,
        "batch_id": None,
        "status": "processed",
        "created_at": ago(60),
        "expires_at": None,
        "deleted_at": None,
    }
    return {**row, **extra}


async def stored(blobs: LocalBlobStore, key: str) -> str:
    """Write a small blob under ``key``."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}\n"

    await blobs.write(key, chunks())
    return key


async def add_batch(
    store: Store,
    status: BatchStatus,
    *,
    days_ago: float,
    states: list[State],
    input_file_id: str = "file-in",
    output_file_id: str | None = None,
    error_file_id: str | None = None,
    **extra: Any,
) -> tuple[str, list[str]]:
    """A batch in ``status`` since ``days_ago`` days, with one generation per entry of
    ``states`` (those finished, ``days_ago`` days ago too)."""
    batch_id = new_id()
    stamp = (
        {f"{status.value}_at": ago(days_ago)}
        if status
        in (
            BatchStatus.COMPLETED,
            BatchStatus.EXPIRED,
            BatchStatus.CANCELLED,
            BatchStatus.FAILED,
        )
        else {}
    )
    await write(
        store,
        batches,
        {
            "id": batch_id,
            "tenant": "t1",
            "input_file_id": input_file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "status": status.value,
            "total": len(states),
            "loaded": len(states),
            "completed": sum(s is State.SUCCESS for s in states),
            "failed": sum(s is State.FAILED for s in states),
            "pending": sum(not s.terminal for s in states),
            "output_file_id": output_file_id,
            "error_file_id": error_file_id,
            "created_at": ago(days_ago + 1),
            "expires_at": ago(days_ago),
            **stamp,
            **extra,
        },
    )
    rows = [
        generation_row(s, batch_id=batch_id, index=i, days_ago=days_ago)
        for i, s in enumerate(states)
    ]
    if rows:
        await write(store, generations, *rows)
    return batch_id, [r["id"] for r in rows]


def event_row(state: EventState, *, last_attempt: datetime, created_at: datetime) -> dict[str, Any]:
    return {
        "id": "msg_" + new_id(),
        "tenant": "t1",
        "webhook_id": "hook",
        "url": None,
        "event": "generation.completed",
        "payload": "{}",
        "state": state.value,
        "attempts": 1,
        "next_attempt_at": last_attempt,
        "lease_owner": None,
        "lease_expires_at": None,
        "last_error": None,
        "created_at": created_at,
        "delivered_at": last_attempt if state is EventState.DELIVERED else None,
    }


def attempt_row(event_id: str, attempt: int) -> dict[str, Any]:
    return {
        "id": new_id(),
        "event_id": event_id,
        "webhook_id": "hook",
        "tenant": "t1",
        "attempt": attempt,
        "status_code": 500,
        "duration_ms": 3,
        "error": None,
        "created_at": ago(40),
    }


# ---------------------------------------------------------------------------------- results
async def test_old_finished_generations_go_recent_and_unfinished_ones_stay(
    store: Store, tmp_path: Path
) -> None:
    await finished(store, 40)
    realtime = await store.generations.record_realtime(
        "t1",
        new(),
        state=State.SUCCESS,
        message="Completed",
        response={"choices": []},
        dispatched_at=utcnow(),
        expiry_seconds=HOUR,
    )
    await change(store, generations, generations.c.id == realtime.id, finished_at=ago(31))
    recent = await finished(store, 29)
    queued = (await store.generations.submit("t1", new(), expiry_seconds=HOUR)).id
    running = (await store.generations.submit("t1", new(), expiry_seconds=HOUR)).id
    # unfinished work is kept however old it is (even with a stray finished_at)
    await change(
        store,
        generations,
        generations.c.id == queued,
        created_at=ago(90),
        finished_at=ago(90),
    )
    await change(
        store,
        generations,
        generations.c.id == running,
        state=State.IN_PROGRESS.value,
        created_at=ago(90),
        dispatched_at=ago(90),
    )

    report = await store.retention.purge(POLICY, blobs=LocalBlobStore(tmp_path))

    assert await ids(store, generations) == {recent, queued, running}
    assert (report.generations, report.rows, report.done) == (2, 2, True)
    assert str(report) == "2 generations"


async def test_groups_go_whole_and_only_once_every_generation_finished(
    store: Store, tmp_path: Path
) -> None:
    # one member still running: the group is not complete, whatever its age
    busy = await store.groups.submit("t1", Kind.CHAT, [new(i=0), new(i=1)], expiry_seconds=HOUR)
    busy_ids = await ids(store, generations)
    running = sorted(busy_ids)[0]
    await change(store, generations, generations.c.id == running, state=State.IN_PROGRESS.value)
    await store.groups.cancel("t1", busy.id)  # the other member fails; the group keeps counting
    await change(
        store,
        generations,
        generations.c.group_id == busy.id,
        finished_at=ago(40),
        created_at=ago(40),
    )
    await change(store, groups, groups.c.id == busy.id, created_at=ago(40))

    done = await store.groups.submit(
        "t1", Kind.CHAT, [new(i=i) for i in range(3)], expiry_seconds=HOUR
    )
    await store.groups.cancel("t1", done.id)  # all three fail: the group completes
    await change(store, generations, generations.c.group_id == done.id, finished_at=ago(40))
    await change(store, groups, groups.c.id == done.id, completed_at=ago(40))

    fresh = await store.groups.submit("t1", Kind.CHAT, [new(i=0)], expiry_seconds=HOUR)
    await store.groups.cancel("t1", fresh.id)

    report = await store.retention.purge(POLICY, blobs=LocalBlobStore(tmp_path))

    assert await ids(store, groups) == {busy.id, fresh.id}
    async with store.engine.connect() as conn:
        left = (
            await conn.execute(
                sa.select(generations.c.group_id, sa.func.count()).group_by(generations.c.group_id)
            )
        ).all()
    assert dict(left) == {busy.id: 2, fresh.id: 1}  # no orphans, nothing of a kept group
    assert (report.groups, report.generations) == (1, 3)


async def test_finished_batches_go_with_their_generations_and_files(
    store: Store, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path)
    await stored(blobs, "file-in")
    await stored(blobs, "file-out")
    await stored(blobs, "file-old-out")
    await write(
        store,
        files,
        file_row("file-in", blob="file-in"),  # the upload: the user's until they delete it
        file_row("file-out", purpose="batch_output", blob="file-out"),
        file_row("file-err", purpose="batch_error"),  # rendered from the store: no blob
        file_row("file-old-out", purpose="batch_output", blob="file-old-out"),  # before a retry
    )
    old, _ = await add_batch(
        store,
        BatchStatus.COMPLETED,
        days_ago=40,
        states=[State.SUCCESS, State.SUCCESS, State.FAILED],
        output_file_id="file-out",
        error_file_id="file-err",
    )
    await change(
        store, files, files.c.id.in_(["file-out", "file-err", "file-old-out"]), batch_id=old
    )
    failed, _ = await add_batch(store, BatchStatus.FAILED, days_ago=40, states=[])
    recent, recent_gens = await add_batch(
        store, BatchStatus.COMPLETED, days_ago=29, states=[State.SUCCESS]
    )
    running, running_gens = await add_batch(
        store, BatchStatus.IN_PROGRESS, days_ago=40, states=[State.SUCCESS, State.QUEUED]
    )
    # final, yet a generation is still running (cancelled while it ran): kept
    cancelling, cancelling_gens = await add_batch(
        store, BatchStatus.CANCELLED, days_ago=40, states=[State.FAILED, State.IN_PROGRESS]
    )

    report = await store.retention.purge(POLICY, blobs=blobs)

    assert await ids(store, batches) == {recent, running, cancelling}
    assert await ids(store, generations) == {*recent_gens, *running_gens, *cancelling_gens}
    assert await ids(store, files) == {"file-in"}
    assert await blobs.exists("file-in")
    assert not await blobs.exists("file-out")
    assert not await blobs.exists("file-old-out")
    assert (report.batches, report.generations, report.files, report.blobs) == (2, 3, 3, 2)
    assert failed not in await ids(store, batches)


async def test_a_large_batch_goes_chunk_by_chunk_and_its_row_last(
    store: Store, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path)
    batch_id, _ = await add_batch(
        store, BatchStatus.EXPIRED, days_ago=40, states=[State.SUCCESS] * 5
    )
    for _ in range(2):
        report = await store.retention.purge(POLICY, blobs=blobs, batch=2, max_rows=2)
        assert (report.generations, report.batches, report.done) == (2, 0, False)
        assert batch_id in await ids(store, batches)  # never a batch without its generations
    # the last generation and the batch row go in one transaction
    report = await store.retention.purge(POLICY, blobs=blobs, batch=2, max_rows=2)
    assert (report.generations, report.batches) == (1, 1)
    assert await ids(store, batches) == set()
    assert await ids(store, generations) == set()


async def test_purge_works_in_chunks_and_stops_at_max_rows(store: Store, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    for _ in range(5):
        await finished(store, 40)
    report = await store.retention.purge(POLICY, blobs=blobs, batch=2, max_rows=2)
    assert (report.generations, report.done) == (2, False)
    assert len(await ids(store, generations)) == 3
    report = await store.retention.purge(POLICY, blobs=blobs, batch=2)  # three chunks: 2, 1, 0
    assert (report.generations, report.done) == (3, True)
    assert await ids(store, generations) == set()


async def test_two_purges_at_once_share_the_work(store: Store, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    for _ in range(10):
        await finished(store, 40)
    await add_batch(store, BatchStatus.COMPLETED, days_ago=40, states=[State.SUCCESS] * 3)
    reports = await asyncio.gather(
        store.retention.purge(POLICY, blobs=blobs, batch=2),
        store.retention.purge(POLICY, blobs=blobs, batch=2),
    )
    assert sum(r.generations for r in reports) == 13
    assert sum(r.batches for r in reports) == 1
    assert await ids(store, generations) == set()
    assert await ids(store, batches) == set()


async def test_a_large_batch_goes_in_one_call_when_the_cap_allows(
    store: Store, tmp_path: Path
) -> None:
    await add_batch(store, BatchStatus.CANCELLED, days_ago=40, states=[State.FAILED] * 5)
    report = await store.retention.purge(POLICY, blobs=LocalBlobStore(tmp_path), batch=2)
    assert (report.generations, report.batches, report.done) == (5, 1, True)
    assert await ids(store, batches) == set()


# ---------------------------------------------------------------------------------- events
async def test_webhook_events_go_once_settled_with_their_attempts(
    store: Store, tmp_path: Path
) -> None:
    delivered = event_row(EventState.DELIVERED, last_attempt=ago(31), created_at=ago(32))
    failed = event_row(EventState.FAILED, last_attempt=ago(31), created_at=ago(33))
    # held for a disabled endpoint, then failed when it was deleted: counted from creation
    held = event_row(EventState.FAILED, last_attempt=HELD_UNTIL, created_at=ago(40))
    held_recent = event_row(EventState.FAILED, last_attempt=HELD_UNTIL, created_at=ago(2))
    pending = event_row(EventState.PENDING, last_attempt=ago(40), created_at=ago(41))
    recent = event_row(EventState.DELIVERED, last_attempt=ago(29), created_at=ago(29))
    await write(store, webhook_events, delivered, failed, held, held_recent, pending, recent)
    await write(
        store,
        webhook_attempts,
        attempt_row(delivered["id"], 1),
        attempt_row(delivered["id"], 2),
        attempt_row(failed["id"], 1),
        attempt_row(pending["id"], 1),
        attempt_row(recent["id"], 1),
    )

    report = await store.retention.purge(POLICY, blobs=LocalBlobStore(tmp_path))

    assert await ids(store, webhook_events) == {held_recent["id"], pending["id"], recent["id"]}
    async with store.engine.connect() as conn:
        left = set((await conn.execute(sa.select(webhook_attempts.c.event_id))).scalars())
    assert left == {pending["id"], recent["id"]}
    assert (report.events, report.attempts) == (3, 3)


# ---------------------------------------------------------------------------------- files
async def test_deleted_and_expired_files_go_with_their_blobs(store: Store, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    for key in ("deleted", "live", "recent", "expired", "reading"):
        await stored(blobs, key)
    await write(
        store,
        files,
        file_row("deleted", blob="deleted", deleted_at=ago(31)),  # its blob was left behind
        file_row("gone", blob="gone", deleted_at=ago(31)),  # its blob already removed
        file_row("live", blob="live"),  # 60 days old, never deleted: kept
        file_row("recent", blob="recent", deleted_at=ago(29)),
        file_row("expired", blob="expired", expires_at=ago(31)),
        file_row("reading", blob="reading", expires_at=ago(31)),
    )
    await add_batch(store, BatchStatus.VALIDATING, days_ago=0, states=[], input_file_id="reading")

    report = await store.retention.purge(POLICY, blobs=blobs)

    assert await ids(store, files) == {"live", "recent", "reading"}
    assert [await blobs.exists(k) for k in ("deleted", "expired")] == [False, False]
    assert [await blobs.exists(k) for k in ("live", "recent", "reading")] == [True] * 3
    assert (report.files, report.blobs) == (3, 3)


async def test_a_blob_that_cannot_be_removed_is_left_behind(store: Store, tmp_path: Path) -> None:
    class Stuck:
        async def delete(self, key: str) -> None:
            raise PermissionError(key)

    await write(store, files, file_row("deleted", blob="deleted", deleted_at=ago(31)))
    report = await store.retention.purge(POLICY, blobs=Stuck())
    assert (report.files, report.blobs) == (1, 0)
    assert await ids(store, files) == set()


# ---------------------------------------------------------------------------------- policy
async def test_keep_forever_keeps_everything(store: Store, tmp_path: Path) -> None:
    gen = await finished(store, 400)
    batch_id, _ = await add_batch(
        store, BatchStatus.COMPLETED, days_ago=400, states=[State.SUCCESS]
    )
    event = event_row(EventState.DELIVERED, last_attempt=ago(400), created_at=ago(400))
    await write(store, webhook_events, event)
    await write(store, files, file_row("deleted", deleted_at=ago(400)))
    forever = retention_policy(
        Settings(retention_results_days=0, retention_events_days=0, retention_files_days=0)
    )
    assert forever == RetentionPolicy()
    assert forever.keeps_everything

    report = await store.retention.purge(forever, blobs=LocalBlobStore(tmp_path))

    assert (report.rows, report.done) == (0, True)
    assert gen in await ids(store, generations)
    assert batch_id in await ids(store, batches)
    assert await ids(store, webhook_events) == {event["id"]}
    assert await ids(store, files) == {"deleted"}


def test_settings_map_to_the_policy() -> None:
    assert retention_policy(Settings()) == RetentionPolicy(MONTH, MONTH, MONTH)
    policy = retention_policy(
        Settings(retention_results_days=7, retention_events_days=0, retention_files_days=1)
    )
    assert policy == RetentionPolicy(timedelta(days=7), None, timedelta(days=1))
    assert not policy.keeps_everything
    with pytest.raises(ValidationError, match="retention_results_days"):
        Settings(retention_results_days=-1)
    with pytest.raises(ValueError, match="must not be negative"):
        RetentionPolicy(events=timedelta(days=-1))


async def test_worker_maintenance_purges_by_its_retention_policy(
    sqlite_url: str, tmp_path: Any
) -> None:
    """Wired end to end: maintenance in a worker built from settings deletes an old finished
    generation and keeps a recent one."""
    from tests.support.fake_backend import FakeBackend
    from tests.support.services import burst_services

    async with burst_services(
        sqlite_url, tmp_path / "files", FakeBackend("fake"), retention_results_days=30
    ) as services:
        assert services.worker is not None
        store = services.store
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
        ids: list[str] = []
        for _ in range(2):
            new = NewGeneration(Kind.CHAT, "fake-model", body)
            ids.append((await store.generations.submit("t1", new, expiry_seconds=3600)).id)
        old, recent = ids
        await store.generations.cancel("t1", old)
        await store.generations.cancel("t1", recent)
        async with store.engine.begin() as conn:
            await conn.execute(
                generations.update()
                .where(generations.c.id == old)
                .values(finished_at=utcnow() - timedelta(days=40))
            )
        await services.worker.maintain_once()
        with pytest.raises(NotFound):
            await store.generations.get("t1", old)
        assert (await store.generations.get("t1", recent)).state is State.FAILED
