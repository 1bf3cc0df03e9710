"""Groups: up to 50 generations submitted together, counted until the last one finishes.

A group row holds ``size`` and ``pending``; the terminal bookkeeping
(:mod:`backburner.store.terminal`) counts finished generations against it and completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.outcome import Idempotency
from backburner.core.states import GroupStatus, Kind, State, StateMessage, sources
from backburner.errors import Conflict, NotFound
from backburner.schemas.generation import (
    GenerationRecord,
    GroupCounts,
    GroupRecord,
    NewGeneration,
)
from backburner.store import codec
from backburner.store.base import Database, one_of
from backburner.store.codec import printable
from backburner.store.idempotency import IdempotencyKeys
from backburner.store.queue import TERMINAL_COLS, group_counts, new_rows
from backburner.store.tables import generations, groups
from backburner.store.tenants import Tenants
from backburner.store.terminal import Terminal

G = generations

# built once: a statement with its values given as parameters is compiled once and cached
_INSERT_GROUP = groups.insert()
_INSERT_GENERATIONS = G.insert()


def _not_found(group_id: str) -> NotFound:
    return NotFound(f"No group with id '{printable(group_id, 100)}'.", param="groupId")


def _not_cancellable(group_id: str, status: str) -> Conflict:
    return Conflict(
        f"Group '{group_id}' is {status} and cannot be cancelled.",
        code="group_not_cancellable",
    )


class Groups:
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
        """Store a whole group and its generations in one transaction: the group row and one
        bulk insert (executemany) of the generations.

        Everything that does not need the writer (ids, the stored JSON of each request, prefix
        keys, the rows themselves) is built before the transaction opens; inside it only the
        fair keys are reserved and written into the rows. On SQLite the writer is one
        connection shared with the worker, so what runs while it is held delays everyone."""
        now = utcnow()
        gid = group_id or new_id()
        expires = now + timedelta(seconds=expiry_seconds)
        size = len(items)
        group_row = {
            "id": gid,
            "tenant": tenant,
            "kind": kind.value,
            "size": size,
            "pending": size,
            "status": GroupStatus.IN_PROGRESS.value,
            "metadata": None if metadata is None else codec.dumps(metadata),
            "webhook_id": webhook_id,
            "created_at": now,
            "expires_at": expires,
            "completed_at": None,
        }
        # fair keys from 0 for now: the real first key is known only inside the transaction
        rows = new_rows(tenant, items, [new_id() for _ in items], 0, now, expires, group_id=gid)
        async with self._db.writer.begin() as conn:
            # the tenant's limits first (its row locked): refused, nothing is written
            keys = await self._tenants.admit(conn, tenant, generations=size)
            if idempotency is not None:
                await self._idempotency.save_on(conn, tenant, idempotency, now, idempotency_ttl)
            await conn.execute(_INSERT_GROUP, group_row)
            for i, row in enumerate(rows):
                row["fair_key"] = keys.first_key + i * keys.step
            await conn.execute(_INSERT_GENERATIONS, rows)
        return GroupRecord(
            id=gid,
            tenant=tenant,
            kind=kind,
            size=size,
            status=GroupStatus.IN_PROGRESS,
            metadata=metadata,
            webhook_id=webhook_id,
            created_at=now,
            expires_at=expires,
            counts=GroupCounts(queued=size),
        )

    async def get(
        self, tenant: str, group_id: str, *, with_generations: bool = False
    ) -> tuple[GroupRecord, list[GenerationRecord]]:
        """The group with its counts, and (``with_generations``) every generation in order."""
        async with self._db.reader.connect() as conn, conn.begin():
            row = (
                await conn.execute(
                    sa.select(groups).where(groups.c.id == group_id, groups.c.tenant == tenant)
                )
            ).first()
            if row is None:
                raise _not_found(group_id)
            counts = await group_counts(conn, group_id)
            gens: list[GenerationRecord] = []
            if with_generations:
                rows = (
                    await conn.execute(
                        sa.select(G).where(G.c.group_id == group_id).order_by(G.c.group_index)
                    )
                ).all()
                gens = [codec.generation(r) for r in rows]
        return codec.group(row, counts), gens

    async def cancel(self, tenant: str, group_id: str) -> GroupRecord:
        """The group becomes ``cancelled`` and its Queued generations Failed "Cancelled"."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            status = (
                await conn.execute(
                    sa.select(groups.c.status).where(
                        groups.c.id == group_id, groups.c.tenant == tenant
                    )
                )
            ).scalar_one_or_none()
            if status is None:
                raise _not_found(group_id)
            if status not in sources(GroupStatus.CANCELLED):
                raise _not_cancellable(group_id, status)
            res = await conn.execute(
                groups.update()
                .where(
                    groups.c.id == group_id,
                    one_of(groups.c.status, sources(GroupStatus.CANCELLED)),
                )
                .values(status=GroupStatus.CANCELLED.value)
            )
            if res.rowcount == 0:  # it completed or expired between the read and the write
                status = (
                    await conn.execute(sa.select(groups.c.status).where(groups.c.id == group_id))
                ).scalar_one()
                raise _not_cancellable(group_id, status)
            rows = (
                await conn.execute(
                    G.update()
                    .where(
                        G.c.group_id == group_id,
                        one_of(G.c.state, sources(State.FAILED, among=[State.QUEUED])),
                    )
                    .values(
                        state=State.FAILED.value,
                        state_message=StateMessage.CANCELLED,
                        finished_at=now,
                    )
                    .returning(*TERMINAL_COLS)
                )
            ).all()
            await self._terminal.generations_finished(conn, rows, now)
        group, _ = await self.get(tenant, group_id)
        return group
