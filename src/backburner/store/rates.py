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
    now_p = sa.bindparam("now", now, type_=sa.Float)
    new_tat = sa.case((R.c.tat > now_p, R.c.tat), else_=now_p) + interval
    take_one = (
        R.update()
        .where(R.c.tenant == tenant, R.c.bucket == bucket, new_tat - now_p <= PERIOD + _EPS)
        .values(tat=new_tat)
    )
    if (await conn.execute(take_one)).rowcount == 1:  # the usual case: one statement
        return None
    tat = (
        await conn.execute(sa.select(R.c.tat).where(R.c.tenant == tenant, R.c.bucket == bucket))
    ).scalar_one_or_none()
    if tat is None:  # the tenant's first request of this kind
        await db.insert_ignore(conn, R, {"tenant": tenant, "bucket": bucket, "tat": 0.0})
        if (await conn.execute(take_one)).rowcount == 1:
            return None
        tat = (
            await conn.execute(sa.select(R.c.tat).where(R.c.tenant == tenant, R.c.bucket == bucket))
        ).scalar_one()
    return max(0.0, float(tat) + interval - PERIOD - now)


class LocalCells:
    """The same cells in this process's memory (bounded): SQLite's realtime limit, where a
    write per request would queue behind the worker's on the one writer."""

    def __init__(self, max_cells: int = 100_000) -> None:
        self._tat: dict[str, float] = {}
        self._max = max_cells

    def take(self, key: str, per_minute: int, now: float) -> float | None:
        if per_minute <= 0:
            return float("inf")
        interval = PERIOD / per_minute
        new_tat = max(self._tat.get(key, 0.0), now) + interval
        if new_tat - now > PERIOD + _EPS:
            return max(0.0, new_tat - PERIOD - now)
        if len(self._tat) >= self._max:
            # the cells that are full again (tat in the past) mean nothing: drop them
            self._tat = {k: t for k, t in self._tat.items() if t > now}
        self._tat[key] = new_tat
        return None
