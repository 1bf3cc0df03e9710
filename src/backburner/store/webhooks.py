"""Webhook endpoints: the URLs, secrets and event subscriptions a tenant registers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.states import EventState, sources
from backburner.errors import NotFound
from backburner.schemas.webhook import ALL_EVENTS, WebhookRecord
from backburner.store import codec
from backburner.store.base import Database, one_of
from backburner.store.tables import webhook_events, webhooks

W = webhook_events


def _not_found(webhook_id: str) -> NotFound:
    return NotFound(f"No webhook with id '{webhook_id}'.", param="id")


class Webhooks:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        tenant: str,
        *,
        url: str,
        secret: str,
        name: str | None = None,
        events: Sequence[str] | None = None,
        enabled: bool = True,
    ) -> WebhookRecord:
        now = utcnow()
        rec = WebhookRecord(
            id=new_id(),
            tenant=tenant,
            url=url,
            name=name,
            secret=secret,
            events=list(events) if events else list(ALL_EVENTS),
            enabled=enabled,
            created_at=now,
            updated_at=now,
        )
        async with self._db.writer.begin() as conn:
            await conn.execute(
                webhooks.insert().values(
                    id=rec.id,
                    tenant=tenant,
                    url=url,
                    name=name,
                    secret=secret,
                    events=json.dumps(rec.events),
                    enabled=enabled,
                    created_at=now,
                    updated_at=now,
                )
            )
        return rec

    async def list(self, tenant: str) -> list[WebhookRecord]:
        async with self._db.reader.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(webhooks)
                    .where(webhooks.c.tenant == tenant)
                    .order_by(webhooks.c.created_at, webhooks.c.id)
                )
            ).all()
        return [codec.webhook(r) for r in rows]

    async def find(
        self, conn: AsyncConnection, tenant: str, webhook_id: str
    ) -> WebhookRecord | None:
        """The endpoint ``webhook_id`` of ``tenant`` read on ``conn``, or None."""
        row = (
            await conn.execute(
                sa.select(webhooks).where(webhooks.c.id == webhook_id, webhooks.c.tenant == tenant)
            )
        ).first()
        return None if row is None else codec.webhook(row)

    async def get(self, tenant: str, webhook_id: str) -> WebhookRecord:
        async with self._db.reader.connect() as conn:
            rec = await self.find(conn, tenant, webhook_id)
        if rec is None:
            raise _not_found(webhook_id)
        return rec

    async def exists(self, tenant: str, webhook_id: str) -> bool:
        async with self._db.reader.connect() as conn:
            return await self.find(conn, tenant, webhook_id) is not None

    async def update(self, tenant: str, webhook_id: str, changes: dict[str, Any]) -> WebhookRecord:
        values = dict(changes)
        if "events" in values:
            values["events"] = json.dumps(list(values["events"] or ALL_EVENTS))
        values["updated_at"] = utcnow()
        async with self._db.writer.begin() as conn:
            res = await conn.execute(
                webhooks.update()
                .where(webhooks.c.id == webhook_id, webhooks.c.tenant == tenant)
                .values(**values)
            )
            if res.rowcount == 0:
                raise _not_found(webhook_id)
            rec = await self.find(conn, tenant, webhook_id)
        assert rec is not None
        return rec

    async def delete(self, tenant: str, webhook_id: str) -> None:
        """Delete the endpoint; its events still pending fail ("webhook deleted")."""
        async with self._db.writer.begin() as conn:
            res = await conn.execute(
                webhooks.delete().where(webhooks.c.id == webhook_id, webhooks.c.tenant == tenant)
            )
            if res.rowcount == 0:
                raise _not_found(webhook_id)
            await conn.execute(
                W.update()
                .where(
                    W.c.webhook_id == webhook_id,
                    one_of(W.c.state, sources(EventState.FAILED)),
                )
                .values(state=EventState.FAILED.value, last_error="webhook deleted")
            )
