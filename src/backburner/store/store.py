"""The Store: every query backburner runs. Callers get schema records, never rows.

Fair ordering: each generation gets a ``fair_key`` when it is enqueued. A tenant's requests get
consecutive keys starting at ``max(tenant's virtual clock, smallest key still queued)``, and workers
claim in ``fair_key`` order. A tenant who submits 50 (or a million) requests therefore cannot push
another tenant's single request behind all of them: the newcomer's key lands just after the work
that is running now, and the tenants' queues interleave round-robin from there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.outcome import Idempotency, Outcome
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
from backburner.store.batches import BatchesMixin
from backburner.store.files import FilesMixin
from backburner.store.groups import GroupsMixin
from backburner.store.keys import KeysMixin
from backburner.store.tables import (
    generations,
    groups,
    idempotency_keys,
)
from backburner.store.webhooks import WebhooksMixin

G = generations
TERMINAL_COLS = (G.c.id, G.c.group_id, G.c.webhook_id, G.c.batch_id, G.c.state)
UNFINISHED = (State.QUEUED.value, State.IN_PROGRESS.value)


class Store(GroupsMixin, BatchesMixin, FilesMixin, WebhooksMixin, KeysMixin, StoreBase):
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

    # ------------------------------------------------------------------ terminal bookkeeping
    async def _after_terminal(
        self, conn: AsyncConnection, finished: Sequence[Any], now: datetime
    ) -> list[str]:
        # rows (with ._mapping) or plain mappings
        """In the transaction that made generations terminal: queue their webhook events and
        count them against their groups. ``finished`` rows carry id, group_id and webhook_id."""
        per_group: Counter[str] = Counter()
        per_batch: dict[str, tuple[int, int]] = {}
        for r in finished:
            m = r._mapping if hasattr(r, "_mapping") else r
            if m["webhook_id"]:
                full = (await conn.execute(sa.select(G).where(G.c.id == m["id"]))).one()
                await self._enqueue_generation_event(conn, codec.generation(full), now)
            if m["group_id"]:
                per_group[m["group_id"]] += 1
            if m["batch_id"]:
                ok, bad = per_batch.get(m["batch_id"], (0, 0))
                success = m["state"] == State.SUCCESS.value
                per_batch[m["batch_id"]] = (ok + success, bad + (not success))
        if per_batch:
            await self._batches_finished(conn, per_batch, now)
        return await self._groups_finished(conn, per_group, now)

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

    # ------------------------------------------------------------------ scheduling
    async def claim(
        self, worker_id: str, models: Iterable[str], limit: int, lease_seconds: float
    ) -> list[GenerationRecord]:
        """Atomically take up to ``limit`` runnable generations for ``models``, fair order."""
        models = list(models)
        if limit <= 0 or not models:
            return []
        now = utcnow()
        pick = (
            sa.select(G.c.id)
            .where(
                G.c.state == State.QUEUED.value,
                G.c.available_at <= now,
                G.c.model.in_(models),
            )
            .order_by(G.c.fair_key)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            G.update()
            .where(G.c.id.in_(pick.scalar_subquery()))
            .values(
                state=State.IN_PROGRESS.value,
                state_message=StateMessage.RUNNING,
                lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=G.c.attempts + 1,
                dispatched_at=sa.func.coalesce(
                    G.c.dispatched_at, sa.bindparam("now", now, type_=G.c.dispatched_at.type)
                ),
            )
            .returning(G)
        )
        async with self._writer.begin() as conn:
            rows = (await conn.execute(stmt)).all()
        recs = [codec.generation(r) for r in rows]
        recs.sort(key=lambda r: (r.created_at, r.group_index or 0))
        return recs

    async def heartbeat(self, worker_id: str, ids: Sequence[str], lease_seconds: float) -> int:
        if not ids:
            return 0
        now = utcnow()
        async with self._writer.begin() as conn:
            res = await conn.execute(
                G.update()
                .where(
                    G.c.id.in_(list(ids)),
                    G.c.lease_owner == worker_id,
                    G.c.state == State.IN_PROGRESS.value,
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            )
        return int(res.rowcount)

    async def finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[str]:
        """Record outcomes of generations this worker holds, in one transaction.

        Only generations still In Progress under this worker's lease are written (they are
        locked first), so a worker whose lease was taken away records nothing. Three statements
        whatever the batch size: lock-and-read, then one executemany per kind of outcome.
        Returns the ids of groups that completed.
        """
        if not outcomes:
            return []
        now = utcnow()
        async with self._writer.begin() as conn:
            owned = {
                r._mapping["id"]: dict(r._mapping)
                for r in (
                    await conn.execute(
                        sa.select(G.c.id, G.c.group_id, G.c.webhook_id, G.c.batch_id)
                        .where(
                            G.c.id.in_([o.generation_id for o in outcomes]),
                            G.c.state == State.IN_PROGRESS.value,
                            G.c.lease_owner == worker_id,
                        )
                        .with_for_update()
                    )
                ).all()
            }
            done: list[dict[str, Any]] = []
            retry: list[dict[str, Any]] = []
            finished: list[dict[str, Any]] = []
            for o in outcomes:
                row = owned.pop(o.generation_id, None)
                if row is None:
                    continue
                if o.state is State.QUEUED:
                    retry.append(
                        {"b_id": o.generation_id, "b_msg": o.message, "b_at": o.retry_at or now}
                    )
                    continue
                done.append(
                    {
                        "b_id": o.generation_id,
                        "b_state": o.state.value,
                        "b_msg": o.message,
                        "b_resp": codec.dumps(o.response) if o.response is not None else None,
                    }
                )
                finished.append({**row, "state": o.state.value})
            cleared = {"lease_owner": None, "lease_expires_at": None}
            if done:
                await conn.execute(
                    G.update()
                    .where(G.c.id == sa.bindparam("b_id"))
                    .values(
                        state=sa.bindparam("b_state"),
                        state_message=sa.bindparam("b_msg"),
                        response=sa.bindparam("b_resp"),
                        finished_at=now,
                        **cleared,
                    ),
                    done,
                )
            if retry:
                await conn.execute(
                    G.update()
                    .where(G.c.id == sa.bindparam("b_id"))
                    .values(
                        state=State.QUEUED.value,
                        state_message=sa.bindparam("b_msg"),
                        available_at=sa.bindparam("b_at", type_=G.c.available_at.type),
                        **cleared,
                    ),
                    retry,
                )
            return await self._after_terminal(conn, finished, now)

    async def release(self, worker_id: str, ids: Sequence[str]) -> int:
        """Give back generations a stopping worker did not finish (the try is not counted)."""
        if not ids:
            return 0
        async with self._writer.begin() as conn:
            res = await conn.execute(
                G.update()
                .where(
                    G.c.id.in_(list(ids)),
                    G.c.lease_owner == worker_id,
                    G.c.state == State.IN_PROGRESS.value,
                )
                .values(
                    state=State.QUEUED.value,
                    state_message=StateMessage.QUEUED,
                    lease_owner=None,
                    lease_expires_at=None,
                    attempts=sa.case((G.c.attempts > 0, G.c.attempts - 1), else_=0),
                )
            )
        return int(res.rowcount)

    async def recover_lost(self, batch: int = 500, give_up_after: int = 10) -> int:
        """In Progress generations whose lease ran out go back to Queued; one that has been
        tried ``give_up_after`` times (it may be what kills its workers) fails instead."""
        now = utcnow()
        pick = (
            sa.select(G.c.id)
            .where(G.c.state == State.IN_PROGRESS.value, G.c.lease_expires_at < now)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        cleared = {"lease_owner": None, "lease_expires_at": None}
        async with self._writer.begin() as conn:
            ids = [r[0] for r in (await conn.execute(pick)).all()]
            if not ids:
                return 0
            doomed = (
                await conn.execute(
                    G.update()
                    .where(G.c.id.in_(ids), G.c.attempts >= give_up_after)
                    .values(
                        state=State.FAILED.value,
                        state_message=f"Failed: its worker was lost on each of {give_up_after}"
                        " or more attempts",
                        finished_at=now,
                        **cleared,
                    )
                    .returning(*TERMINAL_COLS)
                )
            ).all()
            if doomed:
                await self._after_terminal(conn, doomed, now)
            res = await conn.execute(
                G.update()
                .where(G.c.id.in_(ids), G.c.state == State.IN_PROGRESS.value)
                .values(
                    state=State.QUEUED.value,
                    state_message=StateMessage.QUEUED,
                    available_at=now,
                    **cleared,
                )
            )
        return int(res.rowcount) + len(doomed)

    async def expire_overdue(self, batch: int = 500) -> tuple[int, list[str]]:
        """Queued work past its expiry becomes Failed "Expired"; so do its groups."""
        now = utcnow()
        pick = (
            sa.select(G.c.id)
            .where(G.c.state == State.QUEUED.value, G.c.expires_at < now)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        async with self._writer.begin() as conn:
            rows = (
                await conn.execute(
                    G.update()
                    .where(G.c.id.in_(pick.scalar_subquery()))
                    .values(
                        state=State.FAILED.value,
                        state_message=StateMessage.EXPIRED,
                        finished_at=now,
                    )
                    .returning(*TERMINAL_COLS)
                )
            ).all()
            await conn.execute(
                groups.update()
                .where(
                    groups.c.status == GroupStatus.IN_PROGRESS.value,
                    groups.c.expires_at < now,
                    groups.c.pending > 0,
                )
                .values(status=GroupStatus.EXPIRED.value)
            )
            completed = await self._after_terminal(conn, rows, now)
            await conn.execute(
                idempotency_keys.delete().where(
                    idempotency_keys.c.created_at < now - timedelta(days=2)
                )
            )
        return len(rows), completed
