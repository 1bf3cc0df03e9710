"""Idempotency-Key answers: saved with the work a request creates, in its transaction."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.outcome import Idempotency
from backburner.store import codec
from backburner.store.base import Database
from backburner.store.tables import idempotency_keys

K = idempotency_keys


class IdempotencyRace(Exception):
    """Another request with the same Idempotency-Key committed first."""


class IdempotencyKeys:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def answer(
        self, tenant: str, key: str, ttl_seconds: float
    ) -> tuple[str, int, Any] | None:
        """``(request_hash, status_code, response)`` saved for ``key`` within the TTL, or None."""
        cutoff = utcnow() - timedelta(seconds=ttl_seconds)
        async with self._db.reader.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(K.c.request_hash, K.c.status_code, K.c.response).where(
                        K.c.tenant == tenant, K.c.key == key, K.c.created_at >= cutoff
                    )
                )
            ).first()
        if row is None:
            return None
        return row[0], int(row[1]), codec.loads(row[2])

    async def save(self, tenant: str, idem: Idempotency, ttl_seconds: float) -> None:
        """Save an answer on its own (for requests that create nothing in the store)."""
        async with self._db.writer.begin() as conn:
            await self.save_on(conn, tenant, idem, utcnow(), ttl_seconds)

    async def save_on(
        self, conn: AsyncConnection, tenant: str, idem: Idempotency, now: datetime, ttl: float
    ) -> None:
        """Save an answer in the caller's transaction; an expired answer for the same key is
        replaced. Raises :class:`IdempotencyRace` when another request saved the key first."""
        await conn.execute(
            K.delete().where(
                K.c.tenant == tenant,
                K.c.key == idem.key,
                K.c.created_at < now - timedelta(seconds=ttl),
            )
        )
        try:
            async with conn.begin_nested():
                await conn.execute(
                    K.insert().values(
                        tenant=tenant,
                        key=idem.key,
                        request_hash=idem.request_hash,
                        status_code=idem.status_code,
                        response=codec.dumps(idem.response),
                        created_at=now,
                    )
                )
        except IntegrityError as exc:
            raise IdempotencyRace from exc

    async def purge(self, conn: AsyncConnection, before: datetime) -> None:
        """Drop answers saved before ``before`` (maintenance, in the caller's transaction)."""
        await conn.execute(K.delete().where(K.c.created_at < before))
