"""Webhook endpoints and the durable outbox of their events.

Events are written by :meth:`WebhooksMixin._enqueue` inside the transaction of the state change
that causes them, so a crash between completing and notifying loses nothing. Delivery workers
claim due events with a lease, like generations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.errors import NotFound
from backburner.schemas.generation import GenerationRecord, GroupRecord
from backburner.schemas.webhook import ALL_EVENTS, AttemptRecord, DueEvent, WebhookRecord
from backburner.store.base import StoreBase
from backburner.store.tables import webhook_attempts, webhook_events, webhooks
from backburner.webhooks import events as ev

W = webhook_events
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def _webhook(row: Any) -> WebhookRecord:
    m = row._mapping
    return WebhookRecord(
        id=m["id"],
        tenant=m["tenant"],
        url=m["url"],
        name=m["name"],
        secret=m["secret"],
        events=json.loads(m["events"]),
        enabled=bool(m["enabled"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )


class WebhooksMixin(StoreBase):
    # ------------------------------------------------------------------ endpoints
    async def create_webhook(
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
        async with self._writer.begin() as conn:
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

    async def list_webhooks(self, tenant: str) -> list[WebhookRecord]:
        async with self._reader.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(webhooks)
                    .where(webhooks.c.tenant == tenant)
                    .order_by(webhooks.c.created_at, webhooks.c.id)
                )
            ).all()
        return [_webhook(r) for r in rows]

    async def _get_webhook(
        self, conn: AsyncConnection, tenant: str, webhook_id: str
    ) -> WebhookRecord | None:
        row = (
            await conn.execute(
                sa.select(webhooks).where(webhooks.c.id == webhook_id, webhooks.c.tenant == tenant)
            )
        ).first()
        return None if row is None else _webhook(row)

    async def get_webhook(self, tenant: str, webhook_id: str) -> WebhookRecord:
        async with self._reader.connect() as conn:
            rec = await self._get_webhook(conn, tenant, webhook_id)
        if rec is None:
            raise NotFound(f"No webhook with id '{webhook_id}'.", param="id")
        return rec

    async def webhook_exists(self, tenant: str, webhook_id: str) -> bool:
        async with self._reader.connect() as conn:
            return await self._get_webhook(conn, tenant, webhook_id) is not None

    async def update_webhook(
        self, tenant: str, webhook_id: str, changes: dict[str, Any]
    ) -> WebhookRecord:
        values = dict(changes)
        if "events" in values:
            values["events"] = json.dumps(list(values["events"] or ALL_EVENTS))
        values["updated_at"] = utcnow()
        async with self._writer.begin() as conn:
            res = await conn.execute(
                webhooks.update()
                .where(webhooks.c.id == webhook_id, webhooks.c.tenant == tenant)
                .values(**values)
            )
            if res.rowcount == 0:
                raise NotFound(f"No webhook with id '{webhook_id}'.", param="id")
            rec = await self._get_webhook(conn, tenant, webhook_id)
        assert rec is not None
        return rec

    async def delete_webhook(self, tenant: str, webhook_id: str) -> None:
        async with self._writer.begin() as conn:
            res = await conn.execute(
                webhooks.delete().where(webhooks.c.id == webhook_id, webhooks.c.tenant == tenant)
            )
            if res.rowcount == 0:
                raise NotFound(f"No webhook with id '{webhook_id}'.", param="id")
            await conn.execute(
                W.update()
                .where(W.c.webhook_id == webhook_id, W.c.state == PENDING)
                .values(state=FAILED, last_error="webhook deleted")
            )

    # ------------------------------------------------------------------ outbox: writing
    async def _enqueue_generation_event(
        self, conn: AsyncConnection, g: GenerationRecord, now: datetime
    ) -> None:
        if not g.webhook_id:
            return
        hook = await self._get_webhook(conn, g.tenant, g.webhook_id)
        payload = ev.generation_completed(g.webhook_id, g, now)
        if hook is None or not hook.subscribed(str(payload["event"])):
            return
        await self._enqueue(
            conn,
            tenant=g.tenant,
            event=payload["event"],
            payload=payload,
            now=now,
            webhook_id=hook.id,
        )

    async def _enqueue_group_event(
        self,
        conn: AsyncConnection,
        group: GroupRecord,
        gens: list[GenerationRecord],
        now: datetime,
    ) -> None:
        if not group.webhook_id:
            return
        hook = await self._get_webhook(conn, group.tenant, group.webhook_id)
        if hook is None or not hook.subscribed(ev.GROUP_COMPLETED):
            return
        payload = ev.group_completed(hook.id, group, gens, now)
        await self._enqueue(
            conn,
            tenant=group.tenant,
            event=ev.GROUP_COMPLETED,
            payload=payload,
            now=now,
            webhook_id=hook.id,
        )

    async def enqueue_test_event(self, tenant: str, webhook_id: str) -> str:
        now = utcnow()
        async with self._writer.begin() as conn:
            hook = await self._get_webhook(conn, tenant, webhook_id)
            if hook is None:
                raise NotFound(f"No webhook with id '{webhook_id}'.", param="id")
            return await self._enqueue(
                conn,
                tenant=tenant,
                event=ev.WEBHOOK_TEST,
                payload=ev.webhook_test(hook.id, now),
                now=now,
                webhook_id=hook.id,
            )

    # ------------------------------------------------------------------ outbox: delivering
    async def claim_events(
        self, worker_id: str, limit: int, lease_seconds: float
    ) -> list[DueEvent]:
        now = utcnow()
        pick = (
            sa.select(W.c.id)
            .where(
                W.c.state == PENDING,
                W.c.next_attempt_at <= now,
                sa.or_(W.c.lease_expires_at.is_(None), W.c.lease_expires_at < now),
            )
            .order_by(W.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with self._writer.begin() as conn:
            ids = [
                r[0]
                for r in (
                    await conn.execute(
                        W.update()
                        .where(W.c.id.in_(pick.scalar_subquery()))
                        .values(
                            lease_owner=worker_id,
                            lease_expires_at=now + timedelta(seconds=lease_seconds),
                        )
                        .returning(W.c.id)
                    )
                ).all()
            ]
            if not ids:
                return []
            rows = (
                await conn.execute(
                    sa.select(
                        W, webhooks.c.url.label("hook_url"), webhooks.c.secret, webhooks.c.enabled
                    )
                    .select_from(W.outerjoin(webhooks, webhooks.c.id == W.c.webhook_id))
                    .where(W.c.id.in_(ids))
                    .order_by(W.c.created_at)
                )
            ).all()
        out = []
        for r in rows:
            m = r._mapping
            out.append(
                DueEvent(
                    id=m["id"],
                    tenant=m["tenant"],
                    webhook_id=m["webhook_id"],
                    url=m["hook_url"] if m["webhook_id"] else m["url"],
                    secret=m["secret"],
                    endpoint_enabled=bool(m["enabled"]) if m["webhook_id"] else True,
                    event=m["event"],
                    payload=json.loads(m["payload"]),
                    attempts=m["attempts"],
                    created_at=m["created_at"],
                )
            )
        return out

    async def record_attempt(
        self,
        worker_id: str,
        event: DueEvent,
        *,
        status_code: int | None,
        duration_ms: int,
        error: str | None,
        delivered: bool,
        retry_at: datetime | None,
        disable_endpoint: bool = False,
    ) -> None:
        """Log one attempt and move the event on: delivered, retry at ``retry_at``, or failed."""
        now = utcnow()
        state = DELIVERED if delivered else (PENDING if retry_at is not None else FAILED)
        async with self._writer.begin() as conn:
            await conn.execute(
                webhook_attempts.insert().values(
                    id=new_id(),
                    event_id=event.id,
                    webhook_id=event.webhook_id,
                    tenant=event.tenant,
                    attempt=event.attempts + 1,
                    status_code=status_code,
                    duration_ms=duration_ms,
                    error=error,
                    created_at=now,
                )
            )
            await conn.execute(
                W.update()
                .where(W.c.id == event.id, W.c.lease_owner == worker_id)
                .values(
                    state=state,
                    attempts=W.c.attempts + 1,
                    next_attempt_at=retry_at or now,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=error,
                    delivered_at=now if delivered else None,
                )
            )
            if disable_endpoint and event.webhook_id:
                await conn.execute(
                    webhooks.update()
                    .where(webhooks.c.id == event.webhook_id)
                    .values(enabled=False, updated_at=now)
                )

    async def list_attempts(
        self, tenant: str, webhook_id: str, limit: int = 100
    ) -> list[AttemptRecord]:
        async with self._reader.connect() as conn:
            if await self._get_webhook(conn, tenant, webhook_id) is None:
                raise NotFound(f"No webhook with id '{webhook_id}'.", param="id")
            rows = (
                await conn.execute(
                    sa.select(webhook_attempts, W.c.event, W.c.state)
                    .select_from(webhook_attempts.join(W, W.c.id == webhook_attempts.c.event_id))
                    .where(
                        webhook_attempts.c.webhook_id == webhook_id,
                        webhook_attempts.c.tenant == tenant,
                    )
                    .order_by(
                        webhook_attempts.c.created_at.desc(), webhook_attempts.c.attempt.desc()
                    )
                    .limit(limit)
                )
            ).all()
        return [
            AttemptRecord(
                id=r.id,
                event_id=r.event_id,
                webhook_id=r.webhook_id,
                event=r.event,
                attempt=r.attempt,
                status_code=r.status_code,
                duration_ms=r.duration_ms,
                error=r.error,
                created_at=r.created_at,
                delivery_state=r.state,
            )
            for r in rows
        ]

    async def redeliver(self, tenant: str, delivery_id: str) -> str:
        """Send an event again (same message id); accepts an event id or an attempt id."""
        now = utcnow()
        async with self._writer.begin() as conn:
            event_id = (
                await conn.execute(
                    sa.select(webhook_attempts.c.event_id).where(
                        webhook_attempts.c.id == delivery_id, webhook_attempts.c.tenant == tenant
                    )
                )
            ).scalar_one_or_none() or delivery_id
            res = await conn.execute(
                W.update()
                .where(W.c.id == event_id, W.c.tenant == tenant)
                .values(
                    state=PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    delivered_at=None,
                )
            )
            if res.rowcount == 0:
                raise NotFound(f"No webhook delivery with id '{delivery_id}'.", param="deliveryId")
        return str(event_id)

    async def event_states(self, tenant: str) -> dict[str, int]:
        async with self._reader.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(W.c.state, sa.func.count())
                    .where(W.c.tenant == tenant)
                    .group_by(W.c.state)
                )
            ).all()
        return {r[0]: int(r[1]) for r in rows}
