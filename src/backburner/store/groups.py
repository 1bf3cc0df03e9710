"""Groups: the group row's ``pending`` counter and the one moment a group completes."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.states import GroupStatus, State
from backburner.errors import NotFound
from backburner.schemas.generation import GenerationRecord, GroupCounts, GroupRecord
from backburner.store import codec
from backburner.store.tables import generations, groups
from backburner.store.webhooks import WebhooksMixin

G = generations


class GroupsMixin(WebhooksMixin):
    async def _group_counts(self, conn: AsyncConnection, group_id: str) -> GroupCounts:
        rows = (
            await conn.execute(
                sa.select(G.c.state, sa.func.count())
                .where(G.c.group_id == group_id)
                .group_by(G.c.state)
            )
        ).all()
        by = {r[0]: int(r[1]) for r in rows}
        return GroupCounts(
            queued=by.get(State.QUEUED.value, 0),
            in_progress=by.get(State.IN_PROGRESS.value, 0),
            success=by.get(State.SUCCESS.value, 0),
            failed=by.get(State.FAILED.value, 0),
        )

    async def get_group(
        self, tenant: str, group_id: str, *, with_generations: bool = False
    ) -> tuple[GroupRecord, list[GenerationRecord]]:
        async with self._reader.connect() as conn, conn.begin():
            row = (
                await conn.execute(
                    sa.select(groups).where(groups.c.id == group_id, groups.c.tenant == tenant)
                )
            ).first()
            if row is None:
                raise NotFound(f"No group with id '{group_id}'.", param="groupId")
            counts = await self._group_counts(conn, group_id)
            gens: list[GenerationRecord] = []
            if with_generations:
                rows = (
                    await conn.execute(
                        sa.select(G).where(G.c.group_id == group_id).order_by(G.c.group_index)
                    )
                ).all()
                gens = [codec.generation(r) for r in rows]
        return codec.group(row, counts), gens

    async def _groups_finished(
        self, conn: AsyncConnection, per_group: Counter[str], now: datetime
    ) -> list[str]:
        """Count finished generations against their groups; returns groups that just completed.

        The decrement is an UPDATE of the group row, so concurrent finishers serialise on it and
        exactly one of them sees ``pending`` reach zero and records the completion.
        """
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
                        status=sa.case(
                            (
                                groups.c.status == GroupStatus.IN_PROGRESS.value,
                                GroupStatus.COMPLETED.value,
                            ),
                            else_=groups.c.status,
                        ),
                    )
                )
                if done.rowcount == 1:
                    completed.append(group_id)
                    await self._group_completed_event(conn, group_id, now)
        return completed

    async def _group_completed_event(
        self, conn: AsyncConnection, group_id: str, now: datetime
    ) -> None:
        row = (await conn.execute(sa.select(groups).where(groups.c.id == group_id))).one()
        if not row._mapping["webhook_id"]:
            return
        counts = await self._group_counts(conn, group_id)
        gens = (
            await conn.execute(
                sa.select(G).where(G.c.group_id == group_id).order_by(G.c.group_index)
            )
        ).all()
        await self._enqueue_group_event(
            conn, codec.group(row, counts), [codec.generation(g) for g in gens], now
        )
