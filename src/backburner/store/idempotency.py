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


IN_PROGRESS = 0  # the status_code of a reservation: the request holding it is still running
STALE_RESERVATION_SECONDS = 120.0


class IdempotencyRace(Exception):
    """Another request with the same Idempotency-Key committed first."""


class IdempotencyKeys:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def answer(
        self, tenant: str, key: str, ttl_seconds: float
    ) -> tuple[str, int, Any] | None:
        """``(request_hash, status_code, response)`` saved for ``key`` within the TTL, or None.
        A reservation (``status_code`` :data:`IN_PROGRESS`) is returned while it is fresh; one
        older than :data:`STALE_RESERVATION_SECONDS` was left by a request that died, and counts
        as absent."""
        now = utcnow()
        cutoff = now - timedelta(seconds=ttl_seconds)
        async with self._db.reader.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        K.c.request_hash, K.c.status_code, K.c.response, K.c.created_at
                    ).where(K.c.tenant == tenant, K.c.key == key, K.c.created_at >= cutoff)
                )
            ).first()
        if row is None:
            return None
        status = int(row[1])
        if status == IN_PROGRESS and row[3] < now - timedelta(seconds=STALE_RESERVATION_SECONDS):
            return None
        return row[0], status, codec.loads(row[2])

    async def reserve(self, tenant: str, key: str, request_hash: str, ttl_seconds: float) -> bool:
        """Claim ``key`` for a request that is about to run (for routes whose work is not
        created in one transaction with the key). False when another request holds or saved it
        first: at most one request runs per key, even when two arrive at once."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            await conn.execute(
                K.delete().where(
                    K.c.tenant == tenant,
                    K.c.key == key,
                    sa.or_(
                        K.c.created_at < now - timedelta(seconds=ttl_seconds),
                        sa.and_(
                            K.c.status_code == IN_PROGRESS,
                            K.c.created_at < now - timedelta(seconds=STALE_RESERVATION_SECONDS),
                        ),
                    ),
                )
            )
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        K.insert().values(
                            tenant=tenant,
                            key=key,
                            request_hash=request_hash,
                            status_code=IN_PROGRESS,
                            response=codec.dumps(None),
                            created_at=now,
                        )
                    )
            except IntegrityError:
                return False
        return True

    async def complete(self, tenant: str, idem: Idempotency) -> None:
        """Turn this request's reservation into its saved answer."""
        async with self._db.writer.begin() as conn:
            await conn.execute(
                K.update()
                .where(K.c.tenant == tenant, K.c.key == idem.key, K.c.status_code == IN_PROGRESS)
                .values(status_code=idem.status_code, response=codec.dumps(idem.response))
            )

    async def release(self, tenant: str, key: str) -> None:
        """Drop this request's reservation (it failed: a retry may run again)."""
        async with self._db.writer.begin() as conn:
            await conn.execute(
                K.delete().where(
                    K.c.tenant == tenant, K.c.key == key, K.c.status_code == IN_PROGRESS
                )
            )

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
