"""API keys (stored hashed) and Idempotency-Key answers."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.ids import new_api_key, new_id
from backburner.core.outcome import Idempotency
from backburner.store import codec
from backburner.store.base import StoreBase
from backburner.store.tables import api_keys, idempotency_keys


class IdempotencyRace(Exception):
    """Another request with the same Idempotency-Key committed first."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeysMixin(StoreBase):
    async def _save_idempotency(
        self, conn: AsyncConnection, tenant: str, idem: Idempotency, now: datetime, ttl: float
    ) -> None:
        await conn.execute(
            idempotency_keys.delete().where(
                idempotency_keys.c.tenant == tenant,
                idempotency_keys.c.key == idem.key,
                idempotency_keys.c.created_at < now - timedelta(seconds=ttl),
            )
        )
        try:
            async with conn.begin_nested():
                await conn.execute(
                    idempotency_keys.insert().values(
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

    # ------------------------------------------------------------------ idempotency
    async def idempotent_answer(
        self, tenant: str, key: str, ttl_seconds: float
    ) -> tuple[str, int, Any] | None:
        cutoff = utcnow() - timedelta(seconds=ttl_seconds)
        async with self._reader.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        idempotency_keys.c.request_hash,
                        idempotency_keys.c.status_code,
                        idempotency_keys.c.response,
                    ).where(
                        idempotency_keys.c.tenant == tenant,
                        idempotency_keys.c.key == key,
                        idempotency_keys.c.created_at >= cutoff,
                    )
                )
            ).first()
        if row is None:
            return None
        return row[0], int(row[1]), codec.loads(row[2])

    async def save_idempotent(self, tenant: str, idem: Idempotency, ttl_seconds: float) -> None:
        async with self._writer.begin() as conn:
            await self._save_idempotency(conn, tenant, idem, utcnow(), ttl_seconds)

    # ------------------------------------------------------------------ API keys
    async def create_key(self, tenant: str, name: str | None = None) -> tuple[str, str]:
        key = new_api_key()
        kid = new_id()
        async with self._writer.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    id=kid,
                    tenant=tenant,
                    key_hash=hash_key(key),
                    prefix=key[:10],
                    name=name,
                    created_at=utcnow(),
                    revoked_at=None,
                )
            )
        return kid, key

    async def tenant_for_key(self, key: str) -> str | None:
        async with self._reader.connect() as conn:
            return (
                await conn.execute(
                    sa.select(api_keys.c.tenant).where(
                        api_keys.c.key_hash == hash_key(key), api_keys.c.revoked_at.is_(None)
                    )
                )
            ).scalar_one_or_none()

    async def has_keys(self) -> bool:
        async with self._reader.connect() as conn:
            n = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(api_keys)
                    .where(api_keys.c.revoked_at.is_(None))
                )
            ).scalar_one()
        return int(n) > 0

    async def list_keys(self) -> list[dict[str, Any]]:
        async with self._reader.connect() as conn:
            rows = (await conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at))).all()
        return [
            {
                "id": r.id,
                "tenant": r.tenant,
                "prefix": r.prefix,
                "name": r.name,
                "created_at": r.created_at,
                "revoked_at": r.revoked_at,
            }
            for r in rows
        ]

    async def revoke_key(self, key_id: str) -> bool:
        async with self._writer.begin() as conn:
            res = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        return bool(res.rowcount)
