"""What the dashboard reads: every query indexed, paginated by key, never a count of a table.

A ``scope`` is a tenant, or None for an admin who sees every tenant. Lists are keyset-paginated
(newest first, ``before`` the last row shown); a group's or batch's lines are read by position
range (``group_index``), so page 20,000 of a million-line batch costs what page 1 does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa

from backburner.core.states import State
from backburner.schemas.batch import BatchRecord
from backburner.schemas.generation import GroupCounts, GroupRecord
from backburner.schemas.webhook import WebhookRecord
from backburner.store import codec
from backburner.store.base import Database
from backburner.store.queue import group_counts
from backburner.store.tables import (
    api_keys,
    batches,
    files,
    groups,
    webhook_attempts,
    webhook_events,
    webhooks,
)
from backburner.store.tables import generations as G

OPEN_STATES = (State.QUEUED.value, State.IN_PROGRESS.value)
ALL_STATES = tuple(s.value for s in State)
Owned = Literal["generation", "group", "batch", "webhook", "file", "event"]


@dataclass(frozen=True)
class Line:
    """One generation of a group or batch, as a table row shows it (no request or response)."""

    id: str
    index: int
    custom_id: str | None
    model: str
    state: str
    state_message: str
    attempts: int
    created_at: datetime
    dispatched_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Delivery:
    """One webhook event about a subject, with its attempts (newest last)."""

    id: str
    event: str
    state: str
    webhook_id: str | None
    url: str | None
    attempts: list[dict[str, Any]]
    created_at: datetime
    delivered_at: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class TenantRow:
    tenant: str
    keys: int
    live_keys: int


def _scoped(q: Any, column: Any, scope: str | None) -> Any:
    return q if scope is None else q.where(column == scope)


def _newest_first(
    table: sa.Table,
    scope: str | None,
    status: str | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> Any:
    """A page of ``table`` newest first, after the row ``before`` (keyset: (created_at, id))."""
    q = _scoped(sa.select(table), table.c.tenant, scope)
    if status:
        q = q.where(table.c.status == status)
    if before is not None:
        q = q.where(
            sa.or_(
                table.c.created_at < before[0],
                sa.and_(table.c.created_at == before[0], table.c.id < before[1]),
            )
        )
    return q.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit)


def minute_bucket(column: Any, dialect: str) -> Any:
    """``column`` truncated to its minute, as text ``YYYY-MM-DD HH:MM`` on both databases."""
    if dialect == "sqlite":
        return sa.func.substr(column, 1, 16)
    return sa.func.to_char(sa.func.date_trunc("minute", column), "YYYY-MM-DD HH24:MI")


class Views:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def queue_depth(self, scope: str | None) -> list[tuple[str, str, int]]:
        """``(model, state, count)`` of open work (Queued, In Progress): an index range over the
        open rows only, never the finished ones."""
        q = sa.select(G.c.model, G.c.state, sa.func.count()).where(G.c.state.in_(OPEN_STATES))
        q = _scoped(q, G.c.tenant, scope).group_by(G.c.model, G.c.state)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        return sorted((str(m), str(s), int(n)) for m, s, n in rows)

    async def finished_by_minute(
        self, scope: str | None, since: datetime
    ) -> list[tuple[str, str, int]]:
        """``(minute, state, count)`` of what finished since ``since`` (the index on
        ``finished_at``; callers ask for the last minute or two and keep the older ones)."""
        bucket = minute_bucket(G.c.finished_at, "sqlite" if self._db.sqlite else "postgresql")
        q = sa.select(bucket, G.c.state, sa.func.count()).where(G.c.finished_at >= since)
        # the tenant as an expression: SQLite must take the index on finished_at (a minute of
        # rows), not the tenant's (every row the tenant ever had)
        q = _scoped(q, G.c.tenant + "", scope).group_by(bucket, G.c.state)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [(str(b), str(s), int(n)) for b, s, n in rows]

    async def groups(
        self,
        scope: str | None,
        *,
        status: str | None = None,
        before: tuple[datetime, str] | None = None,
        limit: int = 25,
    ) -> list[GroupRecord]:
        """Newest first; counts come from the group's own row (size and pending)."""
        q = _newest_first(groups, scope, status, before, limit)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        out = []
        for r in rows:
            done = int(r.size) - int(r.pending)
            out.append(codec.group(r, GroupCounts(queued=int(r.pending), success=done)))
        return out

    async def group(self, scope: str | None, group_id: str) -> GroupRecord | None:
        """The group with counts by state (at most 50 generations: counted exactly)."""
        q = _scoped(sa.select(groups).where(groups.c.id == group_id), groups.c.tenant, scope)
        async with self._db.reader.connect() as conn, conn.begin():
            row = (await conn.execute(q)).first()
            if row is None:
                return None
            return codec.group(row, await group_counts(conn, group_id))

    async def batches(
        self,
        scope: str | None,
        *,
        status: str | None = None,
        before: tuple[datetime, str] | None = None,
        limit: int = 25,
    ) -> list[BatchRecord]:
        q = _newest_first(batches, scope, status, before, limit)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [codec.batch(r) for r in rows]

    async def batch(self, scope: str | None, batch_id: str) -> BatchRecord | None:
        q = _scoped(sa.select(batches).where(batches.c.id == batch_id), batches.c.tenant, scope)
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(q)).first()
        return None if row is None else codec.batch(row)

    async def lines(
        self,
        *,
        group_id: str | None = None,
        batch_id: str | None = None,
        start: int = 0,
        limit: int = 50,
        state: str | None = None,
    ) -> list[Line]:
        """Lines ``start`` .. ``start + limit`` of a group or batch, by position. With a
        ``state``, the next ``limit`` lines in that state from ``start`` on."""
        cols = (
            G.c.id,
            G.c.group_index,
            G.c.custom_id,
            G.c.model,
            G.c.state,
            G.c.state_message,
            G.c.attempts,
            G.c.created_at,
            G.c.dispatched_at,
            G.c.finished_at,
        )
        if batch_id is not None:
            # (batch_id, state, group_index): every state's range is one seek
            q = sa.select(*cols).where(
                G.c.batch_id == batch_id,
                G.c.state.in_([state] if state else ALL_STATES),
                G.c.group_index >= start,
            )
            if not state:
                q = q.where(G.c.group_index < start + limit)
        else:
            q = sa.select(*cols).where(G.c.group_id == group_id, G.c.group_index >= start)
            if state:
                q = q.where(G.c.state == state)
        q = q.order_by(G.c.group_index).limit(limit)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [
            Line(
                id=r.id,
                index=int(r.group_index or 0),
                custom_id=r.custom_id,
                model=r.model,
                state=r.state,
                state_message=r.state_message,
                attempts=int(r.attempts),
                created_at=r.created_at,
                dispatched_at=r.dispatched_at,
                finished_at=r.finished_at,
            )
            for r in rows
        ]

    async def owner(self, kind: Owned, object_id: str) -> str | None:
        """The tenant that owns an object (an admin's view acts in the owner's name)."""
        table = {
            "generation": G,
            "group": groups,
            "batch": batches,
            "event": webhook_events,
            "file": files,
            "webhook": webhooks,
        }[kind]
        async with self._db.reader.connect() as conn:
            found = (
                await conn.execute(sa.select(table.c.tenant).where(table.c.id == object_id))
            ).scalar_one_or_none()
        return None if found is None else str(found)

    async def deliveries(self, scope: str | None, subject_id: str) -> list[Delivery]:
        """The webhook events about a generation, group or batch, with every attempt."""
        W, A = webhook_events, webhook_attempts
        q = _scoped(sa.select(W).where(W.c.subject_id == subject_id), W.c.tenant, scope)
        async with self._db.reader.connect() as conn:
            events = (await conn.execute(q.order_by(W.c.created_at).limit(50))).all()
            ids = [e.id for e in events]
            tries = (
                (
                    await conn.execute(
                        sa.select(A).where(A.c.event_id.in_(ids)).order_by(A.c.created_at)
                    )
                ).all()
                if ids
                else []
            )
        by_event: dict[str, list[dict[str, Any]]] = {}
        for t in tries:
            by_event.setdefault(t.event_id, []).append(
                {
                    "id": t.id,
                    "attempt": t.attempt,
                    "status_code": t.status_code,
                    "duration_ms": t.duration_ms,
                    "error": t.error,
                    "created_at": t.created_at,
                }
            )
        return [
            Delivery(
                id=e.id,
                event=e.event,
                state=e.state,
                webhook_id=e.webhook_id,
                url=e.url,
                attempts=by_event.get(e.id, []),
                created_at=e.created_at,
                delivered_at=e.delivered_at,
                last_error=e.last_error,
            )
            for e in events
        ]

    async def webhooks(self, scope: str | None) -> list[WebhookRecord]:
        q = _scoped(sa.select(webhooks), webhooks.c.tenant, scope)
        q = q.order_by(webhooks.c.created_at.desc()).limit(500)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [codec.webhook(r) for r in rows]

    async def tenants(self) -> list[TenantRow]:
        """Every tenant that has a key, with its key counts (an admin's keys page)."""
        K = api_keys
        live = sa.func.sum(sa.case((K.c.revoked_at.is_(None), 1), else_=0))
        q = sa.select(K.c.tenant, sa.func.count(), live).group_by(K.c.tenant).order_by(K.c.tenant)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [TenantRow(str(t), int(n), int(v or 0)) for t, n, v in rows]
