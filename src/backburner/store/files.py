"""File rows. The bytes live in a blob store; a row says which files exist.

A deleted file keeps its row with ``deleted_at`` set (batches may still name it) and is gone for
every reader: like another tenant's file, it is :class:`~backburner.errors.NotFound`.
"""

from __future__ import annotations

import builtins
import dataclasses
from datetime import datetime
from typing import Literal

import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.outcome import Idempotency
from backburner.core.states import BATCH_RUNNING, BatchStatus, FileStatus
from backburner.errors import Conflict, InvalidRequest, NotFound
from backburner.schemas.files import FileRecord
from backburner.store import codec
from backburner.store.base import Database, one_of
from backburner.store.codec import printable
from backburner.store.idempotency import IdempotencyKeys
from backburner.store.tables import batches, files

F = files


def _not_found(file_id: str) -> NotFound:
    return NotFound(
        f"No file with id '{printable(file_id, 100)}'.", param="file_id", code="file_not_found"
    )


class Files:
    def __init__(self, db: Database, idempotency: IdempotencyKeys) -> None:
        self._db = db
        self._idempotency = idempotency

    async def create(
        self,
        tenant: str,
        *,
        file_id: str,
        filename: str,
        purpose: str,
        bytes: int,
        lines: int | None,
        sha256: str | None,
        blob: str | None,
        batch_id: str | None = None,
        status: FileStatus = FileStatus.PROCESSED,
        created_at: datetime | None = None,
        idempotency: Idempotency | None = None,
        idempotency_ttl: float = 86400.0,
    ) -> FileRecord:
        """Record a file whose blob (if any) is already written.

        With ``idempotency`` the key is saved in the same transaction; a concurrent request that
        saved it first raises :class:`~backburner.store.IdempotencyRace` and no row is kept.
        """
        now = created_at or utcnow()
        rec = FileRecord(
            id=file_id,
            tenant=tenant,
            filename=filename,
            purpose=purpose,
            bytes=bytes,
            lines=lines,
            sha256=sha256,
            blob=blob,
            batch_id=batch_id,
            status=status,
            created_at=now,
            expires_at=None,
            deleted_at=None,
        )
        async with self._db.writer.begin() as conn:
            await conn.execute(
                F.insert().values(**{**dataclasses.asdict(rec), "status": status.value})
            )
            if idempotency is not None:
                await self._idempotency.save_on(conn, tenant, idempotency, now, idempotency_ttl)
        return rec

    async def get(self, tenant: str, file_id: str) -> FileRecord:
        """The live file ``file_id`` of ``tenant``; NotFound if missing, deleted or not theirs."""
        async with self._db.reader.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(F).where(
                        F.c.id == file_id, F.c.tenant == tenant, F.c.deleted_at.is_(None)
                    )
                )
            ).first()
        if row is None:
            raise _not_found(file_id)
        return codec.file(row)

    async def list(
        self,
        tenant: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: Literal["asc", "desc"] = "desc",
    ) -> builtins.list[FileRecord]:
        """Up to ``limit`` live files by creation time (then id), starting after file ``after``.

        The cursor may be a file deleted since the previous page; an unknown one is a 400.
        """
        desc = order == "desc"
        q = sa.select(F).where(F.c.tenant == tenant, F.c.deleted_at.is_(None))
        if purpose is not None:
            q = q.where(F.c.purpose == purpose)
        async with self._db.reader.connect() as conn:
            if after is not None:
                cur = (
                    await conn.execute(
                        sa.select(F.c.created_at, F.c.id).where(
                            F.c.id == after, F.c.tenant == tenant
                        )
                    )
                ).first()
                if cur is None:
                    raise InvalidRequest(
                        f"after: no file with id '{after}'; pass the id of the last file of"
                        " the previous page",
                        param="after",
                    )
                ts, cid = cur
                if desc:
                    q = q.where(
                        sa.or_(F.c.created_at < ts, sa.and_(F.c.created_at == ts, F.c.id < cid))
                    )
                else:
                    q = q.where(
                        sa.or_(F.c.created_at > ts, sa.and_(F.c.created_at == ts, F.c.id > cid))
                    )
            if desc:
                q = q.order_by(F.c.created_at.desc(), F.c.id.desc())
            else:
                q = q.order_by(F.c.created_at.asc(), F.c.id.asc())
            rows = (await conn.execute(q.limit(limit))).all()
        return [codec.file(r) for r in rows]

    async def delete(self, tenant: str, file_id: str) -> FileRecord:
        """Mark the file deleted (the caller then removes its blob); NotFound like get.
        Refused while a batch is still reading it (validating, or loading its lines)."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            busy = (
                await conn.execute(
                    sa.select(batches.c.id)
                    .where(
                        batches.c.input_file_id == file_id,
                        batches.c.tenant == tenant,
                        sa.or_(
                            batches.c.status == BatchStatus.VALIDATING.value,
                            sa.and_(
                                one_of(batches.c.status, BATCH_RUNNING),
                                batches.c.loaded < batches.c.total,
                            ),
                        ),
                    )
                    .limit(1)
                )
            ).scalar_one_or_none()
            if busy is not None:
                raise Conflict(
                    f"file '{file_id}' is the input of batch '{busy}', which is still reading"
                    " it; delete it once the batch is in progress or cancel the batch",
                    code="file_in_use",
                )
            row = (
                await conn.execute(
                    F.update()
                    .where(F.c.id == file_id, F.c.tenant == tenant, F.c.deleted_at.is_(None))
                    .values(deleted_at=now)
                    .returning(F)
                )
            ).first()
        if row is None:
            raise _not_found(file_id)
        return codec.file(row)
