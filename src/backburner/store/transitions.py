"""State transitions run by workers: claim, heartbeat, finish, release, recover, expire; and
the bookkeeping every terminal transition does in its own transaction (webhook events, group and
batch counters)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.outcome import Outcome
from backburner.core.states import GroupStatus, State, StateMessage
from backburner.schemas.generation import GenerationRecord
from backburner.store import codec
from backburner.store.batch_runs import BatchRunsMixin
from backburner.store.groups import GroupsMixin
from backburner.store.tables import generations, groups, idempotency_keys

G = generations
TERMINAL_COLS = (G.c.id, G.c.group_id, G.c.webhook_id, G.c.batch_id, G.c.state)


class TransitionsMixin(GroupsMixin, BatchRunsMixin):
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
                        {
                            "b_id": o.generation_id,
                            "b_msg": o.message,
                            "b_at": o.retry_at or now,
                            "b_uncount": 0 if o.count_attempt else 1,
                        }
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
                        # a claim counted this try; work given back unfinished uncounts it
                        attempts=G.c.attempts - sa.bindparam("b_uncount", type_=sa.Integer),
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
