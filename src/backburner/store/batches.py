"""Batches: OpenAI's Batch object over generations, with counters kept in the batch row.

Lifecycle: ``validating`` (a worker holds a lease, validates the whole file, then loads it in
resumable chunks) -> ``in_progress`` -> ``finalizing`` (when the last generation is terminal; a
worker writes the output and error files) -> ``completed`` | ``expired`` | ``cancelled``.
A file with any bad line makes the batch ``failed`` with line-numbered errors before anything runs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.states import State, StateMessage
from backburner.errors import Conflict, NotFound
from backburner.schemas.batch import WINDOWS, BatchCreate, BatchRecord
from backburner.store import codec
from backburner.store.base import StoreBase
from backburner.store.tables import batches, generations, webhooks
from backburner.webhooks import events as ev

B = batches
G = generations
ACTIVE = ("in_progress", "cancelling")


def _batch(row: Any) -> BatchRecord:
    m = row._mapping
    return BatchRecord(
        id=m["id"],
        tenant=m["tenant"],
        input_file_id=m["input_file_id"],
        endpoint=m["endpoint"],
        completion_window=m["completion_window"],
        status=m["status"],
        metadata=codec.loads(m["metadata"]),
        webhook_url=m["webhook_url"],
        errors=codec.loads(m["errors"]),
        total=m["total"],
        completed=m["completed"],
        failed=m["failed"],
        pending=m["pending"],
        loaded=m["loaded"],
        output_file_id=m["output_file_id"],
        error_file_id=m["error_file_id"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        in_progress_at=m["in_progress_at"],
        finalizing_at=m["finalizing_at"],
        completed_at=m["completed_at"],
        failed_at=m["failed_at"],
        expired_at=m["expired_at"],
        cancelling_at=m["cancelling_at"],
        cancelled_at=m["cancelled_at"],
        fair_start=m["fair_start"],
    )


def error_code(state_message: str) -> str:
    if state_message == StateMessage.CANCELLED:
        return "batch_cancelled"
    if state_message == StateMessage.EXPIRED:
        return "batch_expired"
    return "request_failed"


def result_line(kind: str, row: Any) -> bytes:
    m = row._mapping
    if kind == "output":
        obj: dict[str, Any] = {
            "id": f"batch_req_{m['id']}",
            "custom_id": m["custom_id"],
            "response": {
                "status_code": 200,
                "request_id": m["id"],
                "body": codec.loads(m["response"]),
            },
            "error": None,
        }
    else:
        obj = {
            "id": f"batch_req_{m['id']}",
            "custom_id": m["custom_id"],
            "response": None,
            "error": {"code": error_code(m["state_message"]), "message": m["state_message"]},
        }
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class BatchesMixin(StoreBase):
    # ------------------------------------------------------------------ API side
    async def create_batch(self, tenant: str, body: BatchCreate) -> BatchRecord:
        now = utcnow()
        bid = new_id()
        values = {
            "id": bid,
            "tenant": tenant,
            "input_file_id": body.input_file_id,
            "endpoint": body.endpoint,
            "completion_window": body.completion_window,
            "status": "validating",
            "metadata": None if body.metadata is None else codec.dumps(body.metadata),
            "webhook_url": body.webhook_url,
            "errors": None,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "pending": 0,
            "loaded": 0,
            "created_at": now,
            "expires_at": now + timedelta(seconds=WINDOWS[body.completion_window]),
        }
        async with self._writer.begin() as conn:
            await conn.execute(B.insert().values(**values))
            row = (await conn.execute(sa.select(B).where(B.c.id == bid))).one()
        return _batch(row)

    async def get_batch(self, tenant: str, batch_id: str) -> BatchRecord:
        async with self._reader.connect() as conn:
            row = (
                await conn.execute(sa.select(B).where(B.c.id == batch_id, B.c.tenant == tenant))
            ).first()
        if row is None:
            raise NotFound(f"No batch with id '{batch_id}'.", param="batch_id")
        return _batch(row)

    async def list_batches(
        self, tenant: str, *, after: str | None = None, limit: int = 20
    ) -> list[BatchRecord]:
        q = sa.select(B).where(B.c.tenant == tenant)
        async with self._reader.connect() as conn:
            if after:
                cur = (
                    await conn.execute(
                        sa.select(B.c.created_at, B.c.id).where(
                            B.c.id == after, B.c.tenant == tenant
                        )
                    )
                ).first()
                if cur is None:
                    raise NotFound(f"No batch with id '{after}'.", param="after")
                q = q.where(
                    sa.or_(
                        B.c.created_at < cur[0],
                        sa.and_(B.c.created_at == cur[0], B.c.id < cur[1]),
                    )
                )
            rows = (
                await conn.execute(q.order_by(B.c.created_at.desc(), B.c.id.desc()).limit(limit))
            ).all()
        return [_batch(r) for r in rows]

    async def _lock_batch(self, conn: AsyncConnection, tenant: str, batch_id: str) -> BatchRecord:
        row = (
            await conn.execute(
                sa.select(B).where(B.c.id == batch_id, B.c.tenant == tenant).with_for_update()
            )
        ).first()
        if row is None:
            raise NotFound(f"No batch with id '{batch_id}'.", param="batch_id")
        return _batch(row)

    async def cancel_batch(self, tenant: str, batch_id: str) -> BatchRecord:
        now = utcnow()
        async with self._writer.begin() as conn:
            b = await self._lock_batch(conn, tenant, batch_id)
            if b.status not in ("validating", "in_progress"):
                raise Conflict(
                    f"Batch '{batch_id}' is {b.status} and cannot be cancelled.",
                    code="batch_not_cancellable",
                )
            await conn.execute(
                B.update().where(B.c.id == batch_id).values(status="cancelling", cancelling_at=now)
            )
            if b.status == "in_progress":
                res = await conn.execute(
                    G.update()
                    .where(G.c.batch_id == batch_id, G.c.state == State.QUEUED.value)
                    .values(
                        state=State.FAILED.value,
                        state_message=StateMessage.CANCELLED,
                        finished_at=now,
                    )
                )
                await self._batches_finished(conn, {batch_id: (0, int(res.rowcount))}, now)
        return await self.get_batch(tenant, batch_id)

    async def retry_batch(self, tenant: str, batch_id: str) -> BatchRecord:
        """Queue the failed requests of a finished batch again (backburner's extension)."""
        now = utcnow()
        async with self._writer.begin() as conn:
            b = await self._lock_batch(conn, tenant, batch_id)
            if b.status not in ("completed", "expired", "cancelled") or b.failed == 0:
                raise Conflict(
                    f"Batch '{batch_id}' is {b.status} with {b.failed} failed requests; only a"
                    " completed, expired or cancelled batch with failed requests can be retried.",
                    code="batch_not_retryable",
                )
            expires = now + timedelta(seconds=WINDOWS[b.completion_window])
            res = await conn.execute(
                G.update()
                .where(G.c.batch_id == batch_id, G.c.state == State.FAILED.value)
                .values(
                    state=State.QUEUED.value,
                    state_message=StateMessage.QUEUED,
                    attempts=0,
                    finished_at=None,
                    available_at=now,
                    expires_at=expires,
                    response=None,
                )
            )
            n = int(res.rowcount)
            await conn.execute(
                B.update()
                .where(B.c.id == batch_id)
                .values(
                    status="in_progress",
                    failed=B.c.failed - n,
                    pending=B.c.pending + n,
                    expires_at=expires,
                    in_progress_at=now,
                    finalizing_at=None,
                    completed_at=None,
                    expired_at=None,
                    cancelling_at=None,
                    cancelled_at=None,
                    output_file_id=None,
                    error_file_id=None,
                )
            )
        return await self.get_batch(tenant, batch_id)

    async def stream_batch_results(self, batch_id: str, kind: str) -> AsyncIterator[bytes]:
        """Output (``kind="output"``) or error lines, in input order, read in pages."""
        state = State.SUCCESS.value if kind == "output" else State.FAILED.value
        last = -1
        while True:
            async with self._reader.connect() as conn:
                rows = (
                    await conn.execute(
                        sa.select(
                            G.c.id, G.c.custom_id, G.c.response, G.c.state_message, G.c.group_index
                        )
                        .where(G.c.batch_id == batch_id, G.c.state == state, G.c.group_index > last)
                        .order_by(G.c.group_index)
                        .limit(1000)
                    )
                ).all()
            if not rows:
                return
            yield b"".join(result_line(kind, r) for r in rows)
            last = rows[-1]._mapping["group_index"]

    async def render_batch_file(self, tenant: str, record: Any) -> AsyncIterator[bytes]:
        """The content of an output/error file that has no blob: rendered from the store."""
        if record.batch_id is None or record.tenant != tenant:
            raise NotFound(f"No content for file '{record.id}'.", param="file_id")
        kind = "output" if record.purpose == "batch_output" else "error"
        async for chunk in self.stream_batch_results(record.batch_id, kind):
            yield chunk

    # ------------------------------------------------------------------ accounting
    async def _batches_finished(
        self, conn: AsyncConnection, per_batch: Mapping[str, tuple[int, int]], now: datetime
    ) -> None:
        """Count terminal generations against their batches (row-locked, like groups); the
        one that brings ``pending`` to zero moves the batch to ``finalizing``."""
        for batch_id, (ok, bad) in sorted(per_batch.items()):
            row = (
                await conn.execute(
                    B.update()
                    .where(B.c.id == batch_id)
                    .values(
                        completed=B.c.completed + ok,
                        failed=B.c.failed + bad,
                        pending=B.c.pending - ok - bad,
                    )
                    .returning(B.c.pending, B.c.status)
                )
            ).first()
            if row is not None and row[0] <= 0 and row[1] in ACTIVE:
                # a cancelled batch stays "cancelling" until its files are written (as OpenAI's)
                await conn.execute(
                    B.update()
                    .where(B.c.id == batch_id, B.c.status.in_(ACTIVE))
                    .values(
                        status=sa.case(
                            (B.c.status == "cancelling", "cancelling"), else_="finalizing"
                        ),
                        finalizing_at=now,
                    )
                )

    async def _batch_event(self, conn: AsyncConnection, batch_id: str, now: datetime) -> None:
        """``batch.completed`` to the batch's webhook_url and to the tenant's subscribed hooks."""
        b = _batch((await conn.execute(sa.select(B).where(B.c.id == batch_id))).one())
        wire = b.to_wire()
        if b.webhook_url:
            await self._enqueue(
                conn,
                tenant=b.tenant,
                event=ev.BATCH_COMPLETED,
                payload=ev.batch_completed(None, wire, now),
                now=now,
                url=b.webhook_url,
            )
        hooks = (
            await conn.execute(
                sa.select(webhooks.c.id, webhooks.c.events).where(
                    webhooks.c.tenant == b.tenant, webhooks.c.enabled.is_(True)
                )
            )
        ).all()
        for hook_id, events_json in hooks:
            if ev.BATCH_COMPLETED in json.loads(events_json):
                await self._enqueue(
                    conn,
                    tenant=b.tenant,
                    event=ev.BATCH_COMPLETED,
                    payload=ev.batch_completed(hook_id, wire, now),
                    now=now,
                    webhook_id=hook_id,
                )
