"""Terminal bookkeeping: what else changes, in the same transaction, when generations become
Success or Failed (and when a batch reaches its final status).

Every path that makes generations terminal calls :meth:`Terminal.generations_finished` (or, for
batch lines it counts without reading them back, :meth:`Terminal.batch_generations_finished`):
the worker's finish, cancels, expiry, a lost generation given up on, a batch cancel, a realtime
request kept for its webhook. That is where

- each generation with a webhook gets its ``generation.completed`` event in the outbox;
- each group counts its finished generations; the one transaction that brings ``pending`` to 0
  completes the group (and queues ``slow-group.completed``);
- each batch counts completed and failed requests; the one that brings ``pending`` to 0 moves the
  batch to ``finalizing`` (a batch being cancelled stays ``cancelling`` until its files exist);
- each tenant's count of finished slow and group generations goes up (``max_queued_generations``
  counts what is open: accepted minus finished).

The counters are UPDATEs of the group or batch row, so concurrent finishers serialise on that row
and exactly one of them sees ``pending`` reach zero.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.states import (
    BATCH_RUNNING,
    BatchStatus,
    GroupStatus,
    State,
    sources,
)
from backburner.store import codec
from backburner.store.base import Database, one_of
from backburner.store.outbox import Outbox
from backburner.store.queue import group_counts
from backburner.store.tables import batches, generations, groups, tenant_finished

B = batches
G = generations


class Terminal:
    """Runs on the caller's connection, inside the transaction that made the change."""

    def __init__(self, outbox: Outbox, db: Database) -> None:
        self._outbox = outbox
        self._db = db

    async def generations_finished(
        self,
        conn: AsyncConnection,
        finished: Sequence[Any],
        now: datetime,
        *,
        counted: bool = True,
    ) -> list[str]:
        """Book generations that just became terminal, on the ``conn`` that made them so.

        ``finished`` holds rows or mappings with at least id, group_id, webhook_id, batch_id
        and state (:data:`backburner.store.queue.TERMINAL_COLS`); a whole generation row is used
        as it is, otherwise one with a webhook is read back for its event. Returns the groups that
        completed. ``counted``: the generations were open (a realtime one kept for its webhook
        never was), so each tenant's ``open_generations`` goes down by its slow and group ones.
        """
        per_group: Counter[str] = Counter()
        per_tenant: Counter[str] = Counter()
        per_batch: dict[str, tuple[int, int]] = {}
        for r in finished:
            m = r._mapping if hasattr(r, "_mapping") else r
            if m["webhook_id"]:
                full = (
                    m
                    if "request" in m
                    else (await conn.execute(sa.select(G).where(G.c.id == m["id"]))).one()
                )
                await self._outbox.generation_completed(conn, codec.generation(full), now)
            if m["group_id"]:
                per_group[m["group_id"]] += 1
            if counted and not m["batch_id"]:
                per_tenant[m["tenant"]] += 1
            if m["batch_id"]:
                ok, bad = per_batch.get(m["batch_id"], (0, 0))
                success = m["state"] == State.SUCCESS.value
                per_batch[m["batch_id"]] = (ok + success, bad + (not success))
        if per_batch:
            await self.batch_generations_finished(conn, per_batch, now)
        completed = await self._groups_finished(conn, per_group, now)
        # after the group and batch rows, in tenant order; not the tenant's own row (a
        # submission holds that one while it inserts)
        await self._db.upsert_add(
            conn,
            tenant_finished,
            [{"tenant": t, "finished": n} for t, n in per_tenant.items()],
            ("tenant",),
            ("finished",),
        )
        return completed

    async def batch_generations_finished(
        self, conn: AsyncConnection, per_batch: Mapping[str, tuple[int, int]], now: datetime
    ) -> None:
        """Count ``(completed, failed)`` terminal generations against each batch; the one that
        brings ``pending`` to zero moves the batch to ``finalizing``."""
        for batch_id, (ok, bad) in sorted(per_batch.items()):
            row = (
                await conn.execute(
                    B.update()
                    .where(B.c.id == batch_id)
                    .values(
                        completed=B.c.completed + ok,
                        failed=B.c.failed + bad,
                        pending=B.c.pending - ok - bad,
                    )
                    .returning(B.c.pending, B.c.status)
                )
            ).first()
            if row is not None and row[0] <= 0 and row[1] in BATCH_RUNNING:
                # a cancelled batch stays "cancelling" until its files are written (as OpenAI's)
                await conn.execute(
                    B.update()
                    .where(B.c.id == batch_id, one_of(B.c.status, BATCH_RUNNING))
                    .values(
                        status=sa.case(
                            (
                                one_of(B.c.status, sources(BatchStatus.FINALIZING)),
                                BatchStatus.FINALIZING.value,
                            ),
                            else_=B.c.status,
                        ),
                        finalizing_at=now,
                    )
                )

    async def batch_finished(self, conn: AsyncConnection, batch_id: str, now: datetime) -> None:
        """The batch reached its final status: queue ``batch.completed``."""
        row = (await conn.execute(sa.select(B).where(B.c.id == batch_id))).one()
        await self._outbox.batch_completed(conn, codec.batch(row), now)

    async def _groups_finished(
        self, conn: AsyncConnection, per_group: Counter[str], now: datetime
    ) -> list[str]:
        completed: list[str] = []
        for group_id, n in sorted(per_group.items()):
            pending = (
                await conn.execute(
                    groups.update()
                    .where(groups.c.id == group_id)
                    .values(pending=groups.c.pending - n)
                    .returning(groups.c.pending)
                )
            ).scalar_one_or_none()
            if pending is not None and pending <= 0:
                done = await conn.execute(
                    groups.update()
                    .where(groups.c.id == group_id, groups.c.completed_at.is_(None))
                    .values(
                        completed_at=now,
                        # cancelled and expired groups keep their status
                        status=sa.case(
                            (
                                one_of(groups.c.status, sources(GroupStatus.COMPLETED)),
                                GroupStatus.COMPLETED.value,
                            ),
                            else_=groups.c.status,
                        ),
                    )
                )
                if done.rowcount == 1:
                    completed.append(group_id)
                    await self._group_completed(conn, group_id, now)
        return completed

    async def _group_completed(self, conn: AsyncConnection, group_id: str, now: datetime) -> None:
        row = (await conn.execute(sa.select(groups).where(groups.c.id == group_id))).one()
        if not row._mapping["webhook_id"]:
            return
        counts = await group_counts(conn, group_id)
        gens = (
            await conn.execute(
                sa.select(G).where(G.c.group_id == group_id).order_by(G.c.group_index)
            )
        ).all()
        await self._outbox.group_completed(
            conn, codec.group(row, counts), [codec.generation(g) for g in gens], now
        )
