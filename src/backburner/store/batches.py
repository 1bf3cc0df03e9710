"""Batches on the API side: OpenAI's Batch object over generations, with counters kept in the
batch row; create, read, list, cancel, retry, and the output and error lines.

Lifecycle (:class:`backburner.core.states.BatchStatus`): ``validating`` (a worker holds a lease,
validates the whole file, then loads it in resumable chunks) -> ``in_progress`` -> ``finalizing``
(when the last generation is terminal; a worker writes the output and error files) ->
``completed`` | ``expired`` | ``cancelled``. A file with any bad line makes the batch ``failed``
with line-numbered errors before anything runs. The worker's side is
:mod:`backburner.store.batch_runs`.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.states import (
    BATCH_FINISHED,
    BatchStatus,
    State,
    StateMessage,
    sources,
)
from backburner.errors import Conflict, NotFound
from backburner.schemas.batch import WINDOWS, BatchCreate, BatchRecord, BatchRequestOutput
from backburner.schemas.files import FileRecord
from backburner.store import codec
from backburner.store.base import Database, one_of
from backburner.store.codec import printable
from backburner.store.tables import batches, files, generations
from backburner.store.tenants import Tenants
from backburner.store.terminal import Terminal

B = batches
G = generations


def error_code(state_message: str) -> str:
    if state_message == StateMessage.CANCELLED:
        return "batch_cancelled"
    if state_message == StateMessage.EXPIRED:
        return "batch_expired"
    return "request_failed"


def result_line(kind: str, row: Any) -> bytes:
    """One line of a batch's output (``kind == "output"``) or error file."""
    m = row._mapping
    if kind == "output":
        line = BatchRequestOutput.success(m["id"], m["custom_id"], codec.loads(m["response"]))
    else:
        message = m["state_message"]
        line = BatchRequestOutput.failure(m["id"], m["custom_id"], error_code(message), message)
    return line.to_line()


def _not_found(batch_id: str, param: str = "batch_id") -> NotFound:
    return NotFound(f"No batch with id '{printable(batch_id, 100)}'.", param=param)


class Batches:
    def __init__(self, db: Database, terminal: Terminal, tenants: Tenants) -> None:
        self._db = db
        self._terminal = terminal
        self._tenants = tenants

    async def create(self, tenant: str, body: BatchCreate) -> BatchRecord:
        """A new batch, ``validating`` until a batch runner reads its input file."""
        now = utcnow()
        bid = new_id()
        values = {
            "id": bid,
            "tenant": tenant,
            "input_file_id": body.input_file_id,
            "endpoint": body.endpoint,
            "completion_window": body.completion_window,
            "status": BatchStatus.VALIDATING.value,
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
        async with self._db.writer.begin() as conn:
            lines = (
                await conn.execute(
                    sa.select(files.c.lines).where(
                        files.c.id == body.input_file_id, files.c.tenant == tenant
                    )
                )
            ).scalar_one_or_none()
            # the tenant's limits first (its row locked): refused, nothing is written
            await self._tenants.admit(conn, tenant, batch_lines=max(1, int(lines or 0)))
            await conn.execute(B.insert().values(**values))
            row = (await conn.execute(sa.select(B).where(B.c.id == bid))).one()
        return codec.batch(row)

    async def get(self, tenant: str, batch_id: str) -> BatchRecord:
        async with self._db.reader.connect() as conn:
            row = (
                await conn.execute(sa.select(B).where(B.c.id == batch_id, B.c.tenant == tenant))
            ).first()
        if row is None:
            raise _not_found(batch_id)
        return codec.batch(row)

    async def list(
        self, tenant: str, *, after: str | None = None, limit: int = 20
    ) -> builtins.list[BatchRecord]:
        """Newest first, starting after batch ``after``."""
        q = sa.select(B).where(B.c.tenant == tenant)
        async with self._db.reader.connect() as conn:
            if after:
                cur = (
                    await conn.execute(
                        sa.select(B.c.created_at, B.c.id).where(
                            B.c.id == after, B.c.tenant == tenant
                        )
                    )
                ).first()
                if cur is None:
                    raise _not_found(after, param="after")
                q = q.where(
                    sa.or_(
                        B.c.created_at < cur[0],
                        sa.and_(B.c.created_at == cur[0], B.c.id < cur[1]),
                    )
                )
            rows = (
                await conn.execute(q.order_by(B.c.created_at.desc(), B.c.id.desc()).limit(limit))
            ).all()
        return [codec.batch(r) for r in rows]

    async def _lock(self, conn: AsyncConnection, tenant: str, batch_id: str) -> BatchRecord:
        row = (
            await conn.execute(
                sa.select(B).where(B.c.id == batch_id, B.c.tenant == tenant).with_for_update()
            )
        ).first()
        if row is None:
            raise _not_found(batch_id)
        return codec.batch(row)

    async def cancel(self, tenant: str, batch_id: str) -> BatchRecord:
        """``cancelling``; its Queued requests become Failed "Cancelled" (running ones finish)."""
        now = utcnow()
        allowed = sources(BatchStatus.CANCELLING)
        async with self._db.writer.begin() as conn:
            b = await self._lock(conn, tenant, batch_id)
            if b.status not in allowed:
                raise Conflict(
                    f"Batch '{batch_id}' is {b.status} and cannot be cancelled.",
                    code="batch_not_cancellable",
                )
            await conn.execute(
                B.update()
                .where(B.c.id == batch_id, one_of(B.c.status, allowed))
                .values(status=BatchStatus.CANCELLING.value, cancelling_at=now)
            )
            if b.status == BatchStatus.IN_PROGRESS:
                res = await conn.execute(
                    G.update()
                    .where(
                        G.c.batch_id == batch_id,
                        one_of(G.c.state, sources(State.FAILED, among=[State.QUEUED])),
                    )
                    .values(
                        state=State.FAILED.value,
                        state_message=StateMessage.CANCELLED,
                        finished_at=now,
                    )
                )
                await self._terminal.batch_generations_finished(
                    conn, {batch_id: (0, int(res.rowcount))}, now
                )
        return await self.get(tenant, batch_id)

    async def retry(self, tenant: str, batch_id: str) -> BatchRecord:
        """Queue the failed requests of a finished batch again (backburner's extension)."""
        now = utcnow()
        allowed = sources(BatchStatus.IN_PROGRESS, among=BATCH_FINISHED)
        async with self._db.writer.begin() as conn:
            b = await self._lock(conn, tenant, batch_id)
            if b.status not in allowed or b.failed == 0:
                raise Conflict(
                    f"Batch '{batch_id}' is {b.status} with {b.failed} failed requests; only a"
                    " completed, expired or cancelled batch with failed requests can be retried.",
                    code="batch_not_retryable",
                )
            expires = now + timedelta(seconds=WINDOWS[b.completion_window])
            retried = (
                G.c.batch_id == batch_id,
                one_of(G.c.state, sources(State.QUEUED, among=[State.FAILED])),
            )
            low, high = (
                await conn.execute(
                    sa.select(sa.func.min(G.c.group_index), sa.func.max(G.c.group_index)).where(
                        *retried
                    )
                )
            ).one()
            # new fair keys, in input order: retried lines queue behind what other tenants
            # submitted since, not ahead of it with the keys they had at the first run
            # a retry is a submission of the failed lines: the tenant's limits apply (and a
            # disabled tenant's retry is refused, as its keys are)
            await self._tenants.admit(conn, tenant, batch_lines=b.failed)
            keys = await self._tenants.keys(conn, tenant, int(high or 0) - int(low or 0) + 1)
            res = await conn.execute(
                G.update()
                .where(*retried)
                .values(
                    fair_key=keys.first_key + (G.c.group_index - int(low or 0)) * keys.step,
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
                .where(B.c.id == batch_id, one_of(B.c.status, allowed))
                .values(
                    status=BatchStatus.IN_PROGRESS.value,
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
        return await self.get(tenant, batch_id)

    async def results(self, batch_id: str, kind: str) -> AsyncIterator[bytes]:
        """Output (``kind="output"``) or error lines, in input order, read in pages."""
        state = State.SUCCESS.value if kind == "output" else State.FAILED.value
        last = -1
        while True:
            async with self._db.reader.connect() as conn:
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

    async def render_file(self, tenant: str, record: FileRecord) -> AsyncIterator[bytes]:
        """The content of an output/error file that has no blob: rendered from the store."""
        if record.batch_id is None or record.tenant != tenant:
            raise NotFound(f"No content for file '{record.id}'.", param="file_id")
        kind = "output" if record.purpose == "batch_output" else "error"
        async for chunk in self.results(record.batch_id, kind):
            yield chunk
