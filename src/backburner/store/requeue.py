"""Moving a tenant's queued work in the fair order: holding it (a disabled tenant), releasing it
(enabled again), re-spacing it (a new weight); and recounting its open generations.

Each runs in its own transaction after the tenant's row was changed and committed
(:meth:`backburner.store.tenants.Tenants.update`), taking the generations' rows before the
tenant's, the order every writer locks them in.
"""

from __future__ import annotations

import sqlalchemy as sa

from backburner.core.states import BATCH_RUNNING, UNFINISHED, State
from backburner.store.base import Database, one_of
from backburner.store.queue import HELD, floor_key
from backburner.store.tables import batches, generations, tenant_finished, tenants

T = tenants
F = tenant_finished
G = generations
B = batches


async def hold(db: Database, tenant: str) -> int:
    """Hold ``tenant``'s queued work (idempotent); returns how many were moved."""
    async with db.writer.begin() as conn:
        res = await conn.execute(
            G.update()
            .where(G.c.tenant == tenant, G.c.state == State.QUEUED.value, G.c.fair_key < HELD)
            .values(fair_key=G.c.fair_key + HELD)
        )
    return int(res.rowcount)


async def release(db: Database, tenant: str) -> None:
    async with db.writer.begin() as conn:
        floor = await floor_key(conn)
        first = (
            await conn.execute(
                sa.select(sa.func.min(G.c.fair_key)).where(
                    G.c.tenant == tenant, G.c.state == State.QUEUED.value, G.c.fair_key >= HELD
                )
            )
        ).scalar_one()
        if first is None:
            return
        delta = int(first) - floor
        await conn.execute(
            G.update()
            .where(G.c.tenant == tenant, G.c.state == State.QUEUED.value, G.c.fair_key >= HELD)
            .values(fair_key=G.c.fair_key - delta)
        )
        last = (
            await conn.execute(
                sa.select(sa.func.max(G.c.fair_key)).where(
                    G.c.tenant == tenant, G.c.state == State.QUEUED.value, G.c.fair_key < HELD
                )
            )
        ).scalar_one()
        await conn.execute(T.update().where(T.c.tenant == tenant).values(vclock=int(last or floor)))


async def rescale(db: Database, tenant: str, old: int, new: int) -> None:
    """Re-space ``tenant``'s queued keys (and its loading batches' keys) from ``old`` to
    ``new`` apart, measured from the floor: its place in the fair order changes now, not
    once its backlog has drained."""
    async with db.writer.begin() as conn:
        floor = await floor_key(conn)
        await conn.execute(
            G.update()
            .where(
                G.c.tenant == tenant,
                G.c.state == State.QUEUED.value,
                G.c.fair_key >= floor,
                G.c.fair_key < HELD,
            )
            .values(fair_key=floor + ((G.c.fair_key - floor) * new) // old)
        )
        held = (G.c.tenant == tenant, G.c.state == State.QUEUED.value, G.c.fair_key >= HELD)
        first = (await conn.execute(sa.select(sa.func.min(G.c.fair_key)).where(*held))).scalar()
        if first is not None:  # held work (a disabled tenant's) keeps its own order, re-spaced
            await conn.execute(
                G.update()
                .where(*held)
                .values(fair_key=int(first) + ((G.c.fair_key - int(first)) * new) // old)
            )
        running = (
            await conn.execute(
                sa.select(B.c.id, B.c.fair_start).where(
                    B.c.tenant == tenant,
                    one_of(B.c.status, BATCH_RUNNING),
                    B.c.fair_start.is_not(None),
                )
            )
        ).all()
        for bid, start in running:
            await conn.execute(
                B.update()
                .where(B.c.id == bid)
                .values(fair_start=floor + (int(start) - floor) * new // old, fair_step=new)
            )
        vclock = (
            await conn.execute(sa.select(T.c.vclock).where(T.c.tenant == tenant))
        ).scalar_one()
        if vclock > floor:
            await conn.execute(
                T.update()
                .where(T.c.tenant == tenant)
                .values(vclock=floor + (int(vclock) - floor) * new // old)
            )


async def recount(db: Database, tenant: str | None = None) -> int:
    """Set ``accepted_generations`` so that accepted minus finished is what is open now (a
    repair: the counts are kept in step by every path that opens or finishes work). Returns the
    tenants fixed. The tenants' rows are locked first (submissions wait); the open count and
    the finished count are read in one statement, so a finish committing meanwhile is in both
    or in neither."""
    fixed = 0
    async with db.writer.begin() as conn:
        q = sa.select(T.c.tenant, T.c.accepted_generations).with_for_update()
        if tenant is not None:
            q = q.where(T.c.tenant == tenant)
        for name, accepted in (await conn.execute(q)).all():
            real, done = (
                await conn.execute(
                    sa.select(
                        sa.select(sa.func.count())
                        .where(
                            G.c.tenant == name,
                            one_of(G.c.state, UNFINISHED),
                            G.c.batch_id.is_(None),
                        )
                        .scalar_subquery(),
                        sa.func.coalesce(
                            sa.select(F.c.finished).where(F.c.tenant == name).scalar_subquery(),
                            0,
                        ),
                    )
                )
            ).one()
            if int(accepted) != int(real) + int(done):
                fixed += 1
                await conn.execute(
                    T.update()
                    .where(T.c.tenant == name)
                    .values(accepted_generations=int(real) + int(done))
                )
    return fixed
