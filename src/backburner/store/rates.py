"""Requests per minute, counted in the database so that every API process shares one count.

Each (tenant, bucket) is one GCRA cell (the generic cell rate algorithm, as in ATM networks and
``redis-cell``): a single number, the theoretical arrival time ``tat``. A limit of ``N`` per
minute lets up to ``N`` requests through at once and then one every ``60 / N`` seconds, and a
refused request learns exactly how long to wait. Taking a unit is one conditional UPDATE, so
concurrent requests in any number of processes never let more through than the limit allows.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.store.base import Database
from backburner.store.tables import rate_limits

R = rate_limits
#: the window the limit is stated over: N per this many seconds, all N at once at most
PERIOD = 60.0
_EPS = 1e-6


async def take(
    db: Database, conn: AsyncConnection, tenant: str, bucket: str, per_minute: int, now: float
) -> float | None:
    """Take one request of ``tenant``'s ``bucket`` at ``now`` (seconds since the epoch), on
    ``conn``'s transaction. None when it may go; else the seconds until one would be allowed
    (``inf`` for a limit of 0)."""
    if per_minute <= 0:
        return float("inf")
    interval = PERIOD / per_minute
    await db.insert_ignore(conn, R, {"tenant": tenant, "bucket": bucket, "tat": 0.0})
    now_p = sa.bindparam("now", now, type_=sa.Float)
    new_tat = sa.case((R.c.tat > now_p, R.c.tat), else_=now_p) + interval
    res = await conn.execute(
        R.update()
        .where(R.c.tenant == tenant, R.c.bucket == bucket, new_tat - now_p <= PERIOD + _EPS)
        .values(tat=new_tat)
    )
    if res.rowcount == 1:
        return None
    tat = (
        await conn.execute(sa.select(R.c.tat).where(R.c.tenant == tenant, R.c.bucket == bucket))
    ).scalar_one()
    return max(0.0, float(tat) + interval - PERIOD - now)
