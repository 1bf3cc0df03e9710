"""What deadline scheduling reads: the pace of background work, and the open groups and batches
with the earliest deadlines (:mod:`backburner.core.estimate`)."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.estimate import OpenWork, Pace
from backburner.core.states import BATCH_RUNNING, BatchStatus, GroupStatus
from backburner.store.base import Database, one_of
from backburner.store.tables import batches, generations, groups

G = generations


class Deadlines:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def pace(self, window_seconds: float = 300.0) -> Pace:
        """Background generations finished per tenant over the last ``window_seconds`` (work a
        worker claimed; realtime calls recorded for webhooks are not counted)."""
        since = utcnow() - timedelta(seconds=window_seconds)
        # grouped by an expression, not the column: grouped by ``tenant`` SQLite walks the whole
        # table in the order of the (tenant, ...) index instead of the few rows the index on
        # finished_at finds (3.4 s instead of 1 ms with a million generations)
        tenant = (G.c.tenant + "").label("tenant")
        async with self._db.reader.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(tenant, sa.func.count())
                    .where(G.c.finished_at >= since, G.c.attempts > 0)
                    .group_by(tenant)
                )
            ).all()
        return Pace(window_seconds, {str(t): int(n) for t, n in rows})

    async def open_work(self, limit: int = 500) -> list[OpenWork]:
        """Groups and batches with work left, earliest deadline first (up to ``limit`` of
        each)."""
        async with self._db.reader.connect() as conn:
            g = (
                await conn.execute(
                    sa.select(groups.c.id, groups.c.tenant, groups.c.pending, groups.c.expires_at)
                    .where(groups.c.status == GroupStatus.IN_PROGRESS.value, groups.c.pending > 0)
                    .order_by(groups.c.expires_at)
                    .limit(limit)
                )
            ).all()
            b = (
                await conn.execute(
                    sa.select(
                        batches.c.id,
                        batches.c.tenant,
                        batches.c.total - batches.c.completed - batches.c.failed,
                        batches.c.expires_at,
                    )
                    .where(one_of(batches.c.status, [BatchStatus.VALIDATING, *BATCH_RUNNING]))
                    .order_by(batches.c.expires_at)
                    .limit(limit)
                )
            ).all()
        work = [OpenWork("group", r[0], r[1], int(r[2]), r[3]) for r in g]
        work += [OpenWork("batch", r[0], r[1], int(r[2]), r[3]) for r in b if r[2] and r[2] > 0]
        work.sort(key=lambda w: w.deadline)
        return work
