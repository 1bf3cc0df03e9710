"""Generations on the API side: submit one, read it, cancel it, keep a finished realtime one."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.outcome import Idempotency
from backburner.core.states import State, StateMessage, sources
from backburner.errors import Conflict, NotFound
from backburner.schemas.generation import GenerationRecord, NewGeneration
from backburner.store import codec
from backburner.store.base import Database, one_of
from backburner.store.idempotency import IdempotencyKeys
from backburner.store.queue import new_rows
from backburner.store.tables import generations
from backburner.store.tenants import Tenants
from backburner.store.terminal import Terminal

G = generations


class Generations:
    def __init__(
        self,
        db: Database,
        terminal: Terminal,
        idempotency: IdempotencyKeys,
        tenants: Tenants,
    ) -> None:
        self._db = db
        self._terminal = terminal
        self._idempotency = idempotency
        self._tenants = tenants

    async def submit(
        self,
        tenant: str,
        item: NewGeneration,
        *,
        expiry_seconds: float,
        generation_id: str | None = None,
        idempotency: Idempotency | None = None,
        idempotency_ttl: float = 86400.0,
    ) -> GenerationRecord:
        """Store one slow request durably; returns it Queued. Admitted against the tenant's
        limits first (:class:`~backburner.errors.TooManyRequests`, nothing stored)."""
        now = utcnow()
        gid = generation_id or new_id()
        async with self._db.writer.begin() as conn:
            keys = await self._tenants.admit(conn, tenant, generations=1)
            if idempotency is not None:
                await self._idempotency.save_on(conn, tenant, idempotency, now, idempotency_ttl)
            rows = new_rows(
                tenant, [item], [gid], keys.first_key, now, now + timedelta(seconds=expiry_seconds)
            )
            await conn.execute(G.insert(), rows)
        return codec.generation(rows[0])

    async def record_realtime(
        self,
        tenant: str,
        item: NewGeneration,
        *,
        state: State,
        message: str,
        response: dict[str, Any] | None,
        dispatched_at: datetime,
        expiry_seconds: float,
    ) -> GenerationRecord:
        """Keep a finished realtime request whose metadata names a webhook, and queue its
        ``generation.completed`` event in the same transaction."""
        now = utcnow()
        row = new_rows(tenant, [item], [new_id()], 0, now, now + timedelta(seconds=expiry_seconds))[
            0
        ]
        stored: str | None = None
        if response is not None:
            try:
                stored = codec.answer(response, "the engine's answer")
            except codec.Unstorable as exc:
                # kept and announced as a failure rather than stored unreadable
                state, message = State.FAILED, f"Failed: {exc}"
        row.update(
            state=state.value,
            state_message=codec.printable(message, 2000),
            response=stored,
            attempts=1,
            dispatched_at=dispatched_at,
            finished_at=now,
        )
        async with self._db.writer.begin() as conn:
            await conn.execute(G.insert(), [row])
            await self._terminal.generations_finished(conn, [row], now, counted=False)
        return codec.generation(row)

    async def get(self, tenant: str, generation_id: str) -> GenerationRecord:
        async with self._db.reader.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(G).where(G.c.id == generation_id, G.c.tenant == tenant)
                )
            ).first()
        if row is None:
            raise NotFound(
                f"No generation with id '{codec.printable(generation_id, 100)}'.", param="id"
            )
        return codec.generation(row)

    async def count_by_state(self) -> dict[str, int]:
        async with self._db.reader.connect() as conn:
            rows = (
                await conn.execute(sa.select(G.c.state, sa.func.count()).group_by(G.c.state))
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    async def cancel(self, tenant: str, generation_id: str) -> GenerationRecord:
        """Queued -> Failed "Cancelled"; a Conflict for a generation in any other state."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            row = (
                await conn.execute(
                    G.update()
                    .where(
                        G.c.id == generation_id,
                        G.c.tenant == tenant,
                        # only Queued work is cancelled (running work finishes)
                        one_of(G.c.state, sources(State.FAILED, among=[State.QUEUED])),
                    )
                    .values(
                        state=State.FAILED.value,
                        state_message=StateMessage.CANCELLED,
                        finished_at=now,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                    .returning(G)
                )
            ).first()
            if row is not None:
                await self._terminal.generations_finished(conn, [row], now)
        if row is None:
            current = await self.get(tenant, generation_id)  # 404 if not ours
            raise Conflict(
                f"Generation '{generation_id}' is {current.state.value} and cannot be cancelled;"
                " only Queued generations can.",
                code="generation_not_cancellable",
            )
        return codec.generation(row)
