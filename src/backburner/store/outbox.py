"""The durable outbox of webhook events, and the log of their delivery attempts.

Events are written by :meth:`Outbox.enqueue` inside the transaction of the state change that
causes them, so a crash between completing and notifying loses nothing. Delivery workers claim due
events with a lease, like generations, and record each attempt. Events of a disabled endpoint are
never claimed: they stay pending until it is enabled again (``Webhooks.update`` makes them due).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.states import EventState, sources
from backburner.errors import NotFound
from backburner.schemas import events as ev
from backburner.schemas.batch import BatchRecord
from backburner.schemas.events import EventName
from backburner.schemas.generation import GenerationRecord, GroupRecord
from backburner.schemas.webhook import AttemptRecord, DueEvent
from backburner.store import codec
from backburner.store.base import Database, one_of
from backburner.store.tables import webhook_attempts, webhook_events, webhooks
from backburner.store.webhooks import Webhooks, hold_events

W = webhook_events
A = webhook_attempts


class Outbox:
    def __init__(self, db: Database, webhooks: Webhooks) -> None:
        self._db = db
        self._webhooks = webhooks

    # ------------------------------------------------------------------ writing (in a transaction)
    async def enqueue(
        self,
        conn: AsyncConnection,
        *,
        tenant: str,
        event: EventName,
        payload: dict[str, Any],
        now: datetime,
        webhook_id: str | None = None,
        url: str | None = None,
        subject_id: str | None = None,
    ) -> str:
        """Insert one pending event on ``conn``; returns its id (the Standard Webhooks msg id).
        ``subject_id`` is the generation, group or batch it tells of."""
        event_id = "msg_" + new_id()
        await conn.execute(
            W.insert().values(
                id=event_id,
                tenant=tenant,
                webhook_id=webhook_id,
                url=url,
                subject_id=subject_id,
                event=event.value,
                payload=codec.dumps(payload),
                state=EventState.PENDING.value,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        return event_id

    async def generation_completed(
        self, conn: AsyncConnection, g: GenerationRecord, now: datetime
    ) -> None:
        """``generation.completed`` to the generation's webhook, if it subscribes."""
        if not g.webhook_id:
            return
        hook = await self._webhooks.find(conn, g.tenant, g.webhook_id)
        event = ev.generation_event(g)
        if hook is None or not hook.subscribed(event):
            return
        payload = ev.generation_completed(g.webhook_id, g, now)
        await self.enqueue(
            conn,
            tenant=g.tenant,
            event=event,
            payload=payload,
            now=now,
            webhook_id=hook.id,
            subject_id=g.id,
        )

    async def group_completed(
        self,
        conn: AsyncConnection,
        group: GroupRecord,
        gens: list[GenerationRecord],
        now: datetime,
    ) -> None:
        """``slow-group.completed`` to the group's webhook, if it subscribes."""
        if not group.webhook_id:
            return
        hook = await self._webhooks.find(conn, group.tenant, group.webhook_id)
        if hook is None or not hook.subscribed(EventName.GROUP_COMPLETED):
            return
        await self.enqueue(
            conn,
            tenant=group.tenant,
            event=EventName.GROUP_COMPLETED,
            payload=ev.group_completed(hook.id, group, gens, now),
            now=now,
            webhook_id=hook.id,
            subject_id=group.id,
        )

    async def batch_completed(
        self, conn: AsyncConnection, batch: BatchRecord, now: datetime
    ) -> None:
        """``batch.completed`` to the batch's webhook_url and to the tenant's subscribed hooks."""
        wire = batch.to_wire()
        if batch.webhook_url:
            await self.enqueue(
                conn,
                tenant=batch.tenant,
                event=EventName.BATCH_COMPLETED,
                payload=ev.batch_completed(None, wire, now),
                now=now,
                url=batch.webhook_url,
                subject_id=batch.id,
            )
        hooks = (
            await conn.execute(
                sa.select(webhooks.c.id, webhooks.c.events).where(
                    webhooks.c.tenant == batch.tenant, webhooks.c.enabled.is_(True)
                )
            )
        ).all()
        for hook_id, events_json in hooks:
            if EventName.BATCH_COMPLETED in json.loads(events_json):
                await self.enqueue(
                    conn,
                    tenant=batch.tenant,
                    event=EventName.BATCH_COMPLETED,
                    payload=ev.batch_completed(hook_id, wire, now),
                    now=now,
                    webhook_id=hook_id,
                    subject_id=batch.id,
                )

    async def enqueue_test(self, tenant: str, webhook_id: str) -> str:
        """Queue ``webhook.test`` for the endpoint; returns the event id."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            hook = await self._webhooks.find(conn, tenant, webhook_id)
            if hook is None:
                raise NotFound(f"No webhook with id '{webhook_id}'.", param="id")
            return await self.enqueue(
                conn,
                tenant=tenant,
                event=EventName.WEBHOOK_TEST,
                payload=ev.webhook_test(hook.id, now),
                now=now,
                webhook_id=hook.id,
            )

    # ------------------------------------------------------------------ delivering
    async def claim(self, worker_id: str, limit: int, lease_seconds: float) -> list[DueEvent]:
        """Take up to ``limit`` due pending events under a lease, oldest first; events of a
        disabled endpoint wait (an event whose endpoint was deleted is claimed, to fail)."""
        now = utcnow()
        endpoint_disabled = (
            sa.exists()
            .where(webhooks.c.id == W.c.webhook_id, webhooks.c.enabled.is_(False))
            .correlate(W)
        )
        pick = (
            sa.select(W.c.id)
            .where(
                W.c.state == EventState.PENDING.value,
                W.c.next_attempt_at <= now,
                sa.or_(W.c.lease_expires_at.is_(None), W.c.lease_expires_at < self._db.clock()),
                ~endpoint_disabled,
            )
            .order_by(W.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        # most polls find nothing due: look first on the reader, so that an idle dispatcher
        # never takes SQLite's one writer from the API and the worker (index on state, due)
        async with self._db.reader.connect() as conn:
            due = (
                await conn.execute(
                    sa.select(W.c.id)
                    .where(
                        W.c.state == EventState.PENDING.value,
                        W.c.next_attempt_at <= now,
                        ~endpoint_disabled,
                    )
                    .limit(1)
                )
            ).first()
        if due is None:
            return []
        async with self._db.writer.begin() as conn:
            ids = [
                r[0]
                for r in (
                    await conn.execute(
                        W.update()
                        .where(W.c.id.in_(pick.scalar_subquery()))
                        .values(
                            lease_owner=worker_id,
                            lease_expires_at=self._db.clock(lease_seconds),
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
        return [_due(r._mapping) for r in rows]

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
        if delivered:
            state = EventState.DELIVERED
        else:
            state = EventState.PENDING if retry_at is not None else EventState.FAILED
        async with self._db.writer.begin() as conn:
            await conn.execute(
                A.insert().values(
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
                .where(
                    W.c.id == event.id,
                    W.c.lease_owner == worker_id,
                    # an event failed meanwhile (its endpoint was deleted) stays failed
                    one_of(W.c.state, sources(state, among=[EventState.PENDING])),
                )
                .values(
                    state=state.value,
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
                await hold_events(conn, event.webhook_id, now)

    async def release(self, worker_id: str, event: DueEvent) -> None:
        """Give a claimed event back untried (its endpoint was disabled meanwhile): it stays
        pending, its attempts uncounted, and waits for the endpoint to be enabled. It is not
        parked (the endpoint may be enabled again already)."""
        async with self._db.writer.begin() as conn:
            await conn.execute(
                W.update()
                .where(W.c.id == event.id, W.c.lease_owner == worker_id)
                .values(lease_owner=None, lease_expires_at=None)
            )

    # ------------------------------------------------------------------ reading, redelivering
    async def attempts(self, tenant: str, webhook_id: str, limit: int = 100) -> list[AttemptRecord]:
        """The endpoint's delivery log, newest first."""
        async with self._db.reader.connect() as conn:
            if await self._webhooks.find(conn, tenant, webhook_id) is None:
                raise NotFound(f"No webhook with id '{webhook_id}'.", param="id")
            rows = (
                await conn.execute(
                    sa.select(A, W.c.event, W.c.state)
                    .select_from(A.join(W, W.c.id == A.c.event_id))
                    .where(A.c.webhook_id == webhook_id, A.c.tenant == tenant)
                    .order_by(A.c.created_at.desc(), A.c.attempt.desc())
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

    async def event_of(self, delivery_id: str) -> str | None:
        """The event an attempt id or an event id names, of any tenant (callers check the
        owner of the event before they act on it)."""
        async with self._db.reader.connect() as conn:
            found = (
                await conn.execute(sa.select(A.c.event_id).where(A.c.id == delivery_id))
            ).scalar_one_or_none()
            if found is None:
                found = (
                    await conn.execute(sa.select(W.c.id).where(W.c.id == delivery_id))
                ).scalar_one_or_none()
        return None if found is None else str(found)

    async def redeliver(self, tenant: str, delivery_id: str) -> str:
        """Send an event again (same message id); accepts an event id or an attempt id."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            event_id = (
                await conn.execute(
                    sa.select(A.c.event_id).where(A.c.id == delivery_id, A.c.tenant == tenant)
                )
            ).scalar_one_or_none() or delivery_id
            res = await conn.execute(
                W.update()
                .where(
                    W.c.id == event_id,
                    W.c.tenant == tenant,
                    one_of(W.c.state, sources(EventState.PENDING)),
                )
                .values(
                    state=EventState.PENDING.value,
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

    async def count_by_state(self, tenant: str) -> dict[str, int]:
        async with self._db.reader.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(W.c.state, sa.func.count())
                    .where(W.c.tenant == tenant)
                    .group_by(W.c.state)
                )
            ).all()
        return {r[0]: int(r[1]) for r in rows}


def _due(m: Any) -> DueEvent:
    return DueEvent(
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
