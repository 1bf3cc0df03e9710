"""Batches on the worker side: claiming batch work under a lease, failing or starting a batch
after validation, loading lines in resumable chunks, and finalizing it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.prefix import prefix_key
from backburner.core.states import (
    BATCH_RUNNING,
    BatchStatus,
    Kind,
    State,
    StateMessage,
    sources,
)
from backburner.errors import Conflict
from backburner.schemas.batch import BatchLine, BatchRecord
from backburner.store import codec
from backburner.store.base import Database, one_of
from backburner.store.queue import FAIR_STEP, HELD
from backburner.store.tables import batches, files, generations
from backburner.store.tenants import Tenants
from backburner.store.terminal import Terminal

B = batches
G = generations
CLEARED = {"lease_owner": None, "lease_expires_at": None}
# the batch's column that records when it reached each final status
STAMPS = {
    BatchStatus.CANCELLED: "cancelled_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.COMPLETED: "completed_at",
}


class BatchRuns:
    def __init__(self, db: Database, terminal: Terminal, tenants: Tenants) -> None:
        self._db = db
        self._terminal = terminal
        self._tenants = tenants

    async def claim(self, worker_id: str, lease_seconds: float) -> BatchRecord | None:
        """A batch that needs a worker: to validate and load, or to finalize. One whose lease
        has not run out is skipped: held by a worker, or put back with a later next try
        (:meth:`release` with ``retry_in``), so a batch that fails is not claimed first again."""
        pick = (
            sa.select(B.c.id)
            .where(
                sa.or_(
                    one_of(B.c.status, [BatchStatus.VALIDATING, BatchStatus.FINALIZING]),
                    sa.and_(one_of(B.c.status, BATCH_RUNNING), B.c.loaded < B.c.total),
                    sa.and_(
                        B.c.status == BatchStatus.CANCELLING.value,
                        B.c.pending <= 0,
                        B.c.loaded >= B.c.total,
                    ),
                ),
                sa.or_(B.c.lease_expires_at.is_(None), B.c.lease_expires_at < self._db.clock()),
            )
            .order_by(B.c.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        async with self._db.writer.begin() as conn:
            row = (
                await conn.execute(
                    B.update()
                    .where(B.c.id == pick.scalar_subquery())
                    .values(
                        lease_owner=worker_id,
                        lease_expires_at=self._db.clock(lease_seconds),
                    )
                    .returning(B)
                )
            ).first()
        return None if row is None else codec.batch(row)

    async def renew(self, worker_id: str, batch_id: str, lease_seconds: float) -> bool:
        async with self._db.writer.begin() as conn:
            res = await conn.execute(
                B.update()
                .where(B.c.id == batch_id, B.c.lease_owner == worker_id)
                .values(lease_expires_at=self._db.clock(lease_seconds))
            )
        return bool(res.rowcount)

    async def release(
        self, worker_id: str, batch_id: str, *, retry_in: float | None = None
    ) -> None:
        """Give the batch back; with ``retry_in`` (seconds) no worker claims it before then."""
        values: dict[str, Any] = dict(CLEARED)
        if retry_in is not None:
            values["lease_expires_at"] = self._db.clock(max(0.0, retry_in))
        async with self._db.writer.begin() as conn:
            await conn.execute(
                B.update().where(B.c.id == batch_id, B.c.lease_owner == worker_id).values(**values)
            )

    async def fail(
        self, worker_id: str, batch_id: str, errors: Sequence[Mapping[str, Any]]
    ) -> bool:
        """Validation failed, or the batch could not be handled however often it was tried:
        it is ``failed`` with ``errors``. False when its status allows no failing (it is then
        unchanged) or this worker lost its lease."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            res = await conn.execute(
                B.update()
                .where(
                    B.c.id == batch_id,
                    B.c.lease_owner == worker_id,
                    one_of(B.c.status, sources(BatchStatus.FAILED)),
                )
                .values(
                    status=BatchStatus.FAILED.value,
                    failed_at=now,
                    errors=codec.dumps(list(errors)),
                    **CLEARED,
                )
            )
            if res.rowcount:
                await self._terminal.batch_finished(conn, batch_id, now)
        return bool(res.rowcount)

    async def start(self, worker_id: str, batch_id: str, total: int) -> bool:
        """Validation passed: the batch is in progress with ``total`` requests to load.
        False when it was cancelled meanwhile (it is then marked cancelled)."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            row = (await conn.execute(sa.select(B).where(B.c.id == batch_id))).one()
            b = codec.batch(row)
            if b.status == BatchStatus.CANCELLING:
                res = await conn.execute(
                    B.update()
                    .where(B.c.id == batch_id, one_of(B.c.status, sources(BatchStatus.CANCELLED)))
                    .values(status=BatchStatus.CANCELLED.value, cancelled_at=now, **CLEARED)
                )
                if res.rowcount:
                    await self._terminal.batch_finished(conn, batch_id, now)
                return False
            keys = await self._tenants.keys(conn, b.tenant, total)
            res = await conn.execute(
                B.update()
                .where(
                    B.c.id == batch_id,
                    B.c.lease_owner == worker_id,
                    # not a retry: that reopens a finished batch
                    one_of(
                        B.c.status,
                        sources(BatchStatus.IN_PROGRESS, among=[BatchStatus.VALIDATING]),
                    ),
                )
                .values(
                    status=BatchStatus.IN_PROGRESS.value,
                    in_progress_at=now,
                    total=total,
                    pending=total,
                    loaded=0,
                    fair_start=keys.first_key,
                    fair_step=keys.step,
                )
            )
        return bool(res.rowcount)

    async def load_chunk(
        self,
        worker_id: str,
        batch: BatchRecord,
        first_index: int,
        lines: Sequence[BatchLine],
        kind: Kind,
    ) -> bool:
        """Insert lines ``first_index..`` as generations; the check on ``loaded`` makes a
        resumed load never insert a line twice. In a batch being cancelled the lines go in as
        Failed "Cancelled" (so they appear in the error file and a retry runs them).
        False when this worker may not load (lease lost, or the batch moved on)."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(B.c.status, B.c.loaded, B.c.fair_start, B.c.fair_step)
                    .where(B.c.id == batch.id, B.c.lease_owner == worker_id)
                    .with_for_update()
                )
            ).first()
            if row is None or row[1] != first_index or row[0] not in BATCH_RUNNING:
                return False
            # read here, not from ``batch``: a new weight re-spaces a loading batch's keys
            fair_start, step = int(row[2]), int(row[3] or FAIR_STEP)
            if await self._tenants.disabled(conn, batch.tenant):
                fair_start += HELD  # a disabled tenant's lines go in held
            cancelled = row[0] == BatchStatus.CANCELLING
            state = State.FAILED.value if cancelled else State.QUEUED.value
            message = StateMessage.CANCELLED if cancelled else StateMessage.QUEUED
            rows = [
                {
                    "id": new_id(),
                    "tenant": batch.tenant,
                    "kind": kind.value,
                    "model": str(line.body["model"]),
                    "request": codec.dumps(line.body),
                    "response": None,
                    "state": state,
                    "state_message": message,
                    "attempts": 0,
                    "fair_key": fair_start + (first_index + i) * step,
                    "available_at": now,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "created_at": now,
                    "dispatched_at": None,
                    "finished_at": now if cancelled else None,
                    "expires_at": batch.expires_at,
                    "group_id": None,
                    "group_index": first_index + i,
                    "batch_id": batch.id,
                    "prefix_key": prefix_key(str(line.body["model"]), line.body),
                    "custom_id": line.custom_id,
                    "webhook_id": None,
                }
                for i, line in enumerate(lines)
            ]
            await conn.execute(
                B.update()
                .where(B.c.id == batch.id)
                .values(loaded=first_index + len(lines), lease_expires_at=self._db.clock(120))
            )
            await conn.execute(G.insert(), rows)
            if cancelled:
                await self._terminal.batch_generations_finished(
                    conn, {batch.id: (0, len(rows))}, now
                )
        return True

    async def finalize(
        self,
        worker_id: str,
        batch: BatchRecord,
        output: dict[str, Any] | None,
        error: dict[str, Any] | None,
    ) -> None:
        """Record the written output/error files and the batch's final status, and queue
        ``batch.completed``, in one transaction."""
        now = utcnow()
        if batch.cancelling_at is not None:
            status = BatchStatus.CANCELLED
        else:
            status = BatchStatus.EXPIRED if now >= batch.expires_at else BatchStatus.COMPLETED
        async with self._db.writer.begin() as conn:
            for f in (output, error):
                if f is not None:
                    await conn.execute(files.insert().values(**f))
            res = await conn.execute(
                B.update()
                .where(
                    B.c.id == batch.id,
                    B.c.lease_owner == worker_id,
                    one_of(B.c.status, sources(status)),
                    B.c.pending <= 0,
                )
                .values(
                    status=status.value,
                    output_file_id=output["id"] if output else None,
                    error_file_id=error["id"] if error else None,
                    **CLEARED,
                    **{STAMPS[status]: now},
                )
            )
            if res.rowcount != 1:
                raise Conflict(f"batch {batch.id} is no longer finalizing under this worker")
            await self._terminal.batch_finished(conn, batch.id, now)
