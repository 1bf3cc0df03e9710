"""Webhook endpoints: the URLs, secrets and event subscriptions a tenant registers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
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
from backburner.store.codec import printable
from backburner.store.tables import webhook_attempts, webhook_events, webhooks

W = webhook_events
A = webhook_attempts
GONE = 410
# The events of a disabled endpoint wait with this next_attempt_at, behind every due event in the
# claim's index: a large backlog held for one endpoint costs the others' claims nothing. (The
# claim also skips disabled endpoints outright; this only keeps it from scanning them.)
HELD_UNTIL = datetime(9999, 1, 1, tzinfo=UTC)


def _not_found(webhook_id: str) -> NotFound:
    return NotFound(f"No webhook with id '{printable(webhook_id, 100)}'.", param="id")


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
        """Apply ``changes``. Disabling an endpoint holds its events (:func:`hold_events`);
        enabling it again catches it up (:func:`_catch_up`), in the same transaction."""
        values = dict(changes)
        if "events" in values:
            values["events"] = json.dumps(list(values["events"] or ALL_EVENTS))
        now = values["updated_at"] = utcnow()
        async with self._db.writer.begin() as conn:
            # locked, so that a 410 disabling it meanwhile is seen (and its events caught up)
            was_enabled = (
                await conn.execute(
                    sa.select(webhooks.c.enabled)
                    .where(webhooks.c.id == webhook_id, webhooks.c.tenant == tenant)
                    .with_for_update()
                )
            ).scalar_one_or_none()
            res = await conn.execute(
                webhooks.update()
                .where(webhooks.c.id == webhook_id, webhooks.c.tenant == tenant)
                .values(**values)
            )
            if res.rowcount == 0:
                raise _not_found(webhook_id)
            if "enabled" in values and bool(values["enabled"]) != bool(was_enabled):
                if was_enabled:
                    await hold_events(conn, webhook_id, now)
                else:
                    await _catch_up(conn, webhook_id, now)
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


def _not_in_flight(now: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(W.c.lease_expires_at.is_(None), W.c.lease_expires_at < now)


async def hold_events(conn: AsyncConnection, webhook_id: str, now: datetime) -> None:
    """An endpoint disabled: its pending events not in flight wait until :data:`HELD_UNTIL`."""
    await conn.execute(
        W.update()
        .where(
            W.c.webhook_id == webhook_id,
            one_of(W.c.state, sources(EventState.PENDING, among=[EventState.PENDING])),
            _not_in_flight(now),
        )
        .values(next_attempt_at=HELD_UNTIL)
    )


async def _catch_up(conn: AsyncConnection, webhook_id: str, now: datetime) -> None:
    """An endpoint enabled again: what waited for it is due now, with a fresh retry schedule.

    That is its pending events (held while it was disabled; one being delivered is left alone)
    and its failed events whose last attempt was answered 410 Gone, the answer that disabled it.
    Each keeps its message id. Events failed for any other reason (refused, retries spent) stay
    failed: redeliver them one by one.
    """
    await conn.execute(
        W.update()
        .where(
            W.c.webhook_id == webhook_id,
            one_of(W.c.state, sources(EventState.PENDING, among=[EventState.PENDING])),
            _not_in_flight(now),
        )
        .values(attempts=0, next_attempt_at=now, lease_owner=None, lease_expires_at=None)
    )
    last_status = (
        sa.select(A.c.status_code)
        .where(A.c.event_id == W.c.id)
        .order_by(A.c.created_at.desc(), A.c.attempt.desc())
        .limit(1)
        .correlate(W)
        .scalar_subquery()
    )
    await conn.execute(
        W.update()
        .where(
            W.c.webhook_id == webhook_id,
            one_of(W.c.state, sources(EventState.PENDING, among=[EventState.FAILED])),
            last_status == GONE,
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
