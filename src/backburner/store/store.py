"""The Store: every query backburner runs. Callers get schema records, never rows.

Fair ordering: each generation gets a ``fair_key`` when it is enqueued. A tenant's requests get
consecutive keys starting at ``max(tenant's virtual clock, smallest key still queued)``, and workers
claim in ``fair_key`` order. A tenant who submits 50 (or a million) requests therefore cannot push
another tenant's single request behind all of them: the newcomer's key lands just after the work
that is running now, and the tenants' queues interleave round-robin from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.outcome import Idempotency
from backburner.core.states import GroupStatus, Kind, State, StateMessage
from backburner.errors import Conflict, NotFound
from backburner.schemas.generation import (
    GenerationRecord,
    GroupCounts,
    GroupRecord,
    NewGeneration,
)
from backburner.store import codec
from backburner.store.base import StoreBase
from backburner.store.files import FilesMixin
from backburner.store.keys import KeysMixin
from backburner.store.tables import (
    generations,
    groups,
)
from backburner.store.transitions import TERMINAL_COLS, TransitionsMixin

G = generations
UNFINISHED = (State.QUEUED.value, State.IN_PROGRESS.value)


class Store(TransitionsMixin, FilesMixin, KeysMixin, StoreBase):
    """Generations and groups; keys, idempotency and webhooks come from the mixins."""

    # ------------------------------------------------------------------ enqueue
    def _gen_rows(
        self,
        tenant: str,
        items: Sequence[NewGeneration],
        ids: Sequence[str],
        first_key: int,
        now: datetime,
        expires_at: datetime,
        group_id: str | None = None,
        batch_id: str | None = None,
    ) -> list[dict[str, Any]]:
        return [
            {
                "id": gid,
                "tenant": tenant,
                "kind": item.kind.value,
                "model": item.model,
                "request": codec.dumps(item.request),
                "response": None,
                "state": State.QUEUED.value,
                "state_message": StateMessage.QUEUED,
                "attempts": 0,
                "fair_key": first_key + i,
                "available_at": now,
                "lease_owner": None,
                "lease_expires_at": None,
                "created_at": now,
                "dispatched_at": None,
                "finished_at": None,
                "expires_at": expires_at,
                "group_id": group_id,
                "group_index": i if group_id else None,
                "batch_id": batch_id,
                "custom_id": item.custom_id,
                "webhook_id": item.webhook_id,
            }
            for i, (gid, item) in enumerate(zip(ids, items, strict=True))
        ]

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
        """Store one slow request durably; returns it Queued."""
        now = utcnow()
        gid = generation_id or new_id()
        async with self._writer.begin() as conn:
            if idempotency is not None:
                await self._save_idempotency(conn, tenant, idempotency, now, idempotency_ttl)
            first = await self._fair_keys(conn, tenant, 1)
            rows = self._gen_rows(
                tenant, [item], [gid], first, now, now + timedelta(seconds=expiry_seconds)
            )
            await conn.execute(G.insert(), rows)
        return codec.generation(rows[0])

    async def submit_group(
        self,
        tenant: str,
        kind: Kind,
        items: Sequence[NewGeneration],
        *,
        expiry_seconds: float,
        metadata: dict[str, Any] | None = None,
        webhook_id: str | None = None,
        group_id: str | None = None,
        idempotency: Idempotency | None = None,
        idempotency_ttl: float = 86400.0,
    ) -> GroupRecord:
        """Store a whole group and its generations in one transaction."""
        now = utcnow()
        gid = group_id or new_id()
        expires = now + timedelta(seconds=expiry_seconds)
        async with self._writer.begin() as conn:
            if idempotency is not None:
                await self._save_idempotency(conn, tenant, idempotency, now, idempotency_ttl)
            await conn.execute(
                groups.insert().values(
                    id=gid,
                    tenant=tenant,
                    kind=kind.value,
                    size=len(items),
                    pending=len(items),
                    status=GroupStatus.IN_PROGRESS.value,
                    metadata=None if metadata is None else codec.dumps(metadata),
                    webhook_id=webhook_id,
                    created_at=now,
                    expires_at=expires,
                    completed_at=None,
                )
            )
            first = await self._fair_keys(conn, tenant, len(items))
            ids = [new_id() for _ in items]
            rows = self._gen_rows(tenant, items, ids, first, now, expires, group_id=gid)
            await conn.execute(G.insert(), rows)
        return GroupRecord(
            id=gid,
            tenant=tenant,
            kind=kind,
            size=len(items),
            status=GroupStatus.IN_PROGRESS,
            metadata=metadata,
            webhook_id=webhook_id,
            created_at=now,
            expires_at=expires,
            counts=GroupCounts(queued=len(items)),
        )

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
        row = self._gen_rows(
            tenant, [item], [new_id()], 0, now, now + timedelta(seconds=expiry_seconds)
        )[0]
        row.update(
            state=state.value,
            state_message=message,
            response=codec.dumps(response) if response is not None else None,
            attempts=1,
            dispatched_at=dispatched_at,
            finished_at=now,
        )
        async with self._writer.begin() as conn:
            await conn.execute(G.insert(), [row])
            rec = codec.generation(row)
            await self._enqueue_generation_event(conn, rec, now)
        return rec

    # ------------------------------------------------------------------ read
    async def get_generation(self, tenant: str, generation_id: str) -> GenerationRecord:
        async with self._reader.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(G).where(G.c.id == generation_id, G.c.tenant == tenant)
                )
            ).first()
        if row is None:
            raise NotFound(f"No generation with id '{generation_id}'.", param="id")
        return codec.generation(row)

    async def count_by_state(self) -> dict[str, int]:
        async with self._reader.connect() as conn:
            rows = (
                await conn.execute(sa.select(G.c.state, sa.func.count()).group_by(G.c.state))
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    async def cancel_generation(self, tenant: str, generation_id: str) -> GenerationRecord:
        now = utcnow()
        async with self._writer.begin() as conn:
            row = (
                await conn.execute(
                    G.update()
                    .where(
                        G.c.id == generation_id,
                        G.c.tenant == tenant,
                        G.c.state == State.QUEUED.value,
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
                await self._after_terminal(conn, [row], now)
        if row is None:
            current = await self.get_generation(tenant, generation_id)  # 404 if not ours
            raise Conflict(
                f"Generation '{generation_id}' is {current.state.value} and cannot be cancelled;"
                " only Queued generations can.",
                code="generation_not_cancellable",
            )
        return codec.generation(row)

    async def cancel_group(self, tenant: str, group_id: str) -> GroupRecord:
        now = utcnow()
        async with self._writer.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(groups.c.status).where(
                        groups.c.id == group_id, groups.c.tenant == tenant
                    )
                )
            ).first()
            if row is None:
                raise NotFound(f"No group with id '{group_id}'.", param="groupId")
            if row[0] != GroupStatus.IN_PROGRESS.value:
                raise Conflict(
                    f"Group '{group_id}' is {row[0]} and cannot be cancelled.",
                    code="group_not_cancellable",
                )
            await conn.execute(
                groups.update()
                .where(groups.c.id == group_id)
                .values(status=GroupStatus.CANCELLED.value)
            )
            rows = (
                await conn.execute(
                    G.update()
                    .where(G.c.group_id == group_id, G.c.state == State.QUEUED.value)
                    .values(
                        state=State.FAILED.value,
                        state_message=StateMessage.CANCELLED,
                        finished_at=now,
                    )
                    .returning(*TERMINAL_COLS)
                )
            ).all()
            await self._after_terminal(conn, rows, now)
        group, _ = await self.get_group(tenant, group_id)
        return group
