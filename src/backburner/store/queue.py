"""The generations table as a fair queue: new rows, fair keys, and counts by state.

Fair ordering: each generation gets a ``fair_key`` when it is enqueued. A tenant's requests get
keys ``FAIR_STEP / weight`` apart starting at ``max(tenant's virtual clock, smallest key still
queued)`` (only the smallest key when the tenant has nothing queued), and workers claim in
``fair_key`` order. A
tenant who submits 50 (or a million) requests therefore cannot push another tenant's single
request behind all of them: the newcomer's key lands just after the work that is running now,
and the tenants' queues interleave round-robin from there, a tenant of weight 2 taking two turns
for every one of a tenant of weight 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.prefix import prefix_key
from backburner.core.states import State, StateMessage
from backburner.schemas.generation import GroupCounts, NewGeneration
from backburner.store import codec
from backburner.store.tables import generations, tenants

G = generations

# What terminal bookkeeping needs to know of each generation that just finished.
TERMINAL_COLS = (G.c.id, G.c.tenant, G.c.group_id, G.c.webhook_id, G.c.batch_id, G.c.state)


#: how far apart a weight-1 tenant's fair keys are; a tenant of weight ``w`` steps
#: ``FAIR_STEP / w``, so it gets ``w`` turns for every turn of a weight-1 tenant
FAIR_STEP = 1000
#: held work (a disabled tenant's) is keyed from here on: after every runnable key, and out of
#: every claim (claims and the floor look only below it)
HELD = 1 << 62


def back_in_queue() -> sa.ColumnElement[int]:
    """The fair key of work going back to the queue (a retry, a lease lost, work given back):
    its own, moved above :data:`HELD` when its tenant is disabled meanwhile. Part of each such
    UPDATE, so nothing has to sweep the queue for it later."""
    off = sa.select(tenants.c.tenant).where(tenants.c.disabled_at.is_not(None))
    return sa.case(
        (sa.and_(G.c.fair_key < HELD, G.c.tenant.in_(off)), G.c.fair_key + HELD),
        else_=G.c.fair_key,
    )


def step_for(weight: float) -> int:
    """The distance between a tenant's consecutive fair keys at ``weight``."""
    return max(1, round(FAIR_STEP / weight))


async def floor_key(conn: AsyncConnection) -> int:
    """The smallest fair key still queued and runnable (0 when nothing is): now, in virtual time."""
    floor = (
        await conn.execute(
            sa.select(sa.func.min(G.c.fair_key)).where(
                G.c.state == State.QUEUED.value, G.c.fair_key < HELD
            )
        )
    ).scalar_one()
    return int(floor or 0)


async def fair_keys(conn: AsyncConnection, tenant: str, n: int, vclock: int, step: int) -> int:
    """Reserve ``n`` fair keys ``step`` apart for ``tenant``, whose row the caller has locked
    and whose clock it read (``vclock``); returns the first.

    A tenant's keys continue from its virtual clock only while it still has work queued; a
    tenant with nothing queued starts at the smallest key still queued (now, in virtual time).
    So a tenant whose big batch finished yesterday does not wait behind another tenant's whole
    batch today: its clock does not carry over once its queue is empty."""
    floor = await floor_key(conn)
    queued = (
        await conn.execute(
            sa.select(G.c.id)
            .where(G.c.tenant == tenant, G.c.state == State.QUEUED.value, G.c.fair_key < HELD)
            .limit(1)
        )
    ).first()
    start = max(vclock, floor) if queued is not None else floor
    await conn.execute(
        tenants.update().where(tenants.c.tenant == tenant).values(vclock=start + n * step)
    )
    return start + step


def new_rows(
    tenant: str,
    items: Sequence[NewGeneration],
    ids: Sequence[str],
    first_key: int,
    now: datetime,
    expires_at: datetime,
    group_id: str | None = None,
    step: int = FAIR_STEP,
) -> list[dict[str, Any]]:
    """Rows for Queued generations, fair keys ``step`` apart from ``first_key`` on."""
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
            "fair_key": first_key + i * step,
            "available_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
            "created_at": now,
            "dispatched_at": None,
            "finished_at": None,
            "expires_at": expires_at,
            "group_id": group_id,
            "group_index": i if group_id else None,
            "batch_id": None,
            "custom_id": item.custom_id,
            "webhook_id": item.webhook_id,
            "prefix_key": prefix_key(item.model, item.request),
        }
        for i, (gid, item) in enumerate(zip(ids, items, strict=True))
    ]


async def group_counts(conn: AsyncConnection, group_id: str) -> GroupCounts:
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
