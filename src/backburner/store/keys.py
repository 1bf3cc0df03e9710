"""API keys, stored hashed."""

from __future__ import annotations

import hashlib
from typing import Any

import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.ids import new_api_key, new_id
from backburner.store.base import Database
from backburner.store.tables import api_keys, tenants


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self, tenant: str, name: str | None = None, *, admin: bool = False
    ) -> tuple[str, str]:
        """A new key for ``tenant``: ``(key id, the key itself)``; only its hash is stored. An
        ``admin`` key sees every tenant in the dashboard and manages keys there."""
        key = new_api_key()
        kid = new_id()
        async with self._db.writer.begin() as conn:
            # a tenant exists once it has a key (or submitted): the admin API and CLI see it
            await self._db.insert_ignore(
                conn,
                tenants,
                {"tenant": tenant, "vclock": 0, "weight": 1.0, "created_at": utcnow()},
            )
            await conn.execute(
                api_keys.insert().values(
                    id=kid,
                    tenant=tenant,
                    key_hash=hash_key(key),
                    prefix=key[:10],
                    name=name,
                    created_at=utcnow(),
                    revoked_at=None,
                    admin=admin,
                )
            )
        return kid, key

    async def tenant_for(self, key: str) -> str | None:
        """The tenant of a live (unrevoked) key, or None."""
        async with self._db.reader.connect() as conn:
            return (
                await conn.execute(
                    sa.select(api_keys.c.tenant).where(
                        api_keys.c.key_hash == hash_key(key), api_keys.c.revoked_at.is_(None)
                    )
                )
            ).scalar_one_or_none()

    async def identify(self, key: str) -> tuple[str, bool] | None:
        """``(tenant, admin)`` of a live (unrevoked) key of an enabled tenant, or None."""
        found = await self.lookup(key)
        return None if found is None or found[2] else found[:2]

    async def lookup(self, key: str) -> tuple[str, bool, bool] | None:
        """``(tenant, admin, tenant disabled)`` of a live (unrevoked) key, or None."""
        async with self._db.reader.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(api_keys.c.tenant, api_keys.c.admin, tenants.c.disabled_at)
                    .select_from(api_keys.outerjoin(tenants, tenants.c.tenant == api_keys.c.tenant))
                    .where(api_keys.c.key_hash == hash_key(key), api_keys.c.revoked_at.is_(None))
                )
            ).first()
        return None if row is None else (str(row[0]), bool(row[1]), row[2] is not None)

    async def any_created(self) -> bool:
        """Whether a key was ever created, revoked or not: once one was, the server never runs
        open again (revoking the last key must not reopen it)."""
        async with self._db.reader.connect() as conn:
            found = (await conn.execute(sa.select(api_keys.c.id).limit(1))).scalar_one_or_none()
        return found is not None

    async def revoke(self, key_id: str) -> bool:
        async with self._db.writer.begin() as conn:
            res = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        return bool(res.rowcount)

    async def list(self) -> list[dict[str, Any]]:
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at))).all()
        return [
            {
                "id": r.id,
                "tenant": r.tenant,
                "prefix": r.prefix,
                "name": r.name,
                "created_at": r.created_at,
                "revoked_at": r.revoked_at,
                "admin": bool(r.admin),
            }
            for r in rows
        ]
