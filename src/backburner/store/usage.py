"""Usage: requests and tokens per tenant, UTC day, model and lane.

Background work is counted in the transaction that stores its outcome (:meth:`Usage.add_on`,
from :meth:`backburner.store.work.Work.finish`), so a result and its usage are written together
or not at all. Realtime requests have no such transaction: each process tallies them in memory
(:class:`RealtimeUsage`) and writes the tally every second or so, one upsert per key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.states import State
from backburner.schemas.tenants import USAGE_KEYS, UsageKey, UsageRow
from backburner.store.base import Database
from backburner.store.tables import usage

U = usage
COUNTS = ("requests", "failed", "prompt_tokens", "completion_tokens")
#: a realtime tally is written at once when it holds this many keys (memory stays bounded)
MAX_KEYS = 10_000
Key = tuple[str, str, str, str]
"""(tenant, day, model, lane)"""


def day_of(when: datetime) -> str:
    return when.astimezone(UTC).date().isoformat()


def lane_of(batch_id: str | None, group_id: str | None) -> str:
    return "batch" if batch_id else "group" if group_id else "slow"


def tokens_of(response: Mapping[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) tokens an engine's answer reports; 0 for what it does not."""
    used = (response or {}).get("usage")
    if not isinstance(used, Mapping):
        return 0, 0

    def count(name: str) -> int:
        v = used.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

    return count("prompt_tokens"), count("completion_tokens")


@dataclass
class Tally:
    """Counts by key, to be added to the table in one go."""

    counts: dict[Key, list[int]] = field(default_factory=dict)

    def add(
        self,
        tenant: str,
        day: str,
        model: str,
        lane: str,
        *,
        failed: bool,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        c = self.counts.setdefault((tenant, day, model[:256], lane), [0, 0, 0, 0])
        c[0] += 1
        c[1] += int(failed)
        c[2] += prompt_tokens
        c[3] += completion_tokens

    def outcome(
        self,
        row: Mapping[str, Any],
        model: str,
        day: str,
        state: State,
        response: Mapping[str, Any] | None,
    ) -> None:
        """One background generation's outcome: ``row`` holds its tenant, batch_id, group_id."""
        prompt, completion = tokens_of(response)
        self.add(
            row["tenant"],
            day,
            model,
            lane_of(row["batch_id"], row["group_id"]),
            failed=state is State.FAILED,
            prompt_tokens=prompt,
            completion_tokens=completion,
        )

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "tenant": k[0],
                "day": k[1],
                "model": k[2],
                "lane": k[3],
                **dict(zip(COUNTS, c, strict=True)),
            }
            for k, c in self.counts.items()
        ]

    def __len__(self) -> int:
        return len(self.counts)


class Usage:
    def __init__(self, db: Database) -> None:
        self._db = db
        #: told of each request counted (the process's metrics): background work once its
        #: outcome is committed, a realtime request when it ends
        self.observer: Callable[[Tally], None] | None = None
        #: told of each tally once it is in the table (cached token counts are stale)
        self.on_written: list[Callable[[Tally], None]] = []

    def observe(self, tally: Tally) -> None:
        if self.observer is not None and tally:
            self.observer(tally)

    def committed(self, tally: Tally) -> None:
        """``tally`` was added on a transaction that has committed."""
        self.observe(tally)
        self._written(tally)

    def _written(self, tally: Tally) -> None:
        if tally:
            for fn in self.on_written:
                fn(tally)

    async def add_on(self, conn: AsyncConnection, tally: Tally) -> None:
        """Add ``tally`` on the caller's transaction."""
        await self._db.upsert_add(conn, U, tally.rows(), ("tenant", "day", "model", "lane"), COUNTS)

    async def add(self, tally: Tally) -> None:
        async with self._db.writer.begin() as conn:
            await self.add_on(conn, tally)
        self._written(tally)

    async def tokens_on(self, conn: AsyncConnection | None, tenant: str, day: str) -> int:
        """Prompt plus completion tokens of ``tenant`` on ``day``, every model and lane."""
        q = sa.select(sa.func.coalesce(sa.func.sum(U.c.prompt_tokens + U.c.completion_tokens), 0))
        q = q.where(U.c.tenant == tenant, U.c.day == day)
        if conn is not None:
            return int((await conn.execute(q)).scalar_one())
        async with self._db.reader.connect() as c:
            return int((await c.execute(q)).scalar_one())

    async def report(
        self,
        tenant: str | None,
        start: date,
        end: date,
        group_by: Sequence[UsageKey],
        *,
        model: str | None = None,
        lane: str | None = None,
    ) -> list[UsageRow]:
        """Totals from ``start`` to ``end`` (both included) per combination of ``group_by``;
        ``tenant`` None: every tenant."""
        keys = [k for k in USAGE_KEYS if k in group_by]
        cols = [U.c[k] for k in keys]
        sums = [sa.func.coalesce(sa.func.sum(U.c[c]), 0).label(c) for c in COUNTS]
        q = sa.select(*cols, *sums).where(U.c.day >= start.isoformat(), U.c.day <= end.isoformat())
        if tenant is not None:
            q = q.where(U.c.tenant == tenant)
        if model is not None:
            q = q.where(U.c.model == model)
        if lane is not None:
            q = q.where(U.c.lane == lane)
        if cols:
            q = q.group_by(*cols).order_by(*cols)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        out = []
        for r in rows:
            m = r._mapping
            if not cols and m["requests"] == 0:
                continue
            fields: dict[str, Any] = {k: m[k] for k in keys}
            if "day" in fields:
                fields["day"] = date.fromisoformat(fields["day"])
            fields.update({c: int(m[c]) for c in COUNTS})
            fields["total_tokens"] = fields["prompt_tokens"] + fields["completion_tokens"]
            out.append(UsageRow.model_validate(fields))
        return out


class RealtimeUsage:
    """This process's realtime requests not yet written: :meth:`record` per request,
    :meth:`flush` every second (and at shutdown)."""

    def __init__(self, store_usage: Usage) -> None:
        self._usage = store_usage
        self._tally = Tally()
        # one flush at a time: a flush returns once everything tallied before it is written
        self._flushing = asyncio.Lock()

    def record(
        self, tenant: str, model: str, *, failed: bool, response: Mapping[str, Any] | None
    ) -> bool:
        """Count one request; True when the tally is full and should be flushed now."""
        prompt, completion = tokens_of(response)
        one = Tally()
        for tally in (self._tally, one):
            tally.add(
                tenant,
                day_of(datetime.now(UTC)),
                model,
                "realtime",
                failed=failed,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
        self._usage.observe(one)
        return len(self._tally) >= MAX_KEYS

    def pending(self, tenant: str) -> int:
        """Tokens of ``tenant`` tallied here and not yet written (today's)."""
        today = day_of(datetime.now(UTC))
        return sum(
            c[2] + c[3] for k, c in self._tally.counts.items() if k[0] == tenant and k[1] == today
        )

    async def flush(self) -> None:
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        tally, self._tally = self._tally, Tally()
        if not tally:
            return
        try:
            await self._usage.add(tally)
        except BaseException:
            # kept for the next flush: merged back under what was tallied meanwhile
            for k, c in tally.counts.items():
                mine = self._tally.counts.setdefault(k, [0, 0, 0, 0])
                for i, v in enumerate(c):
                    mine[i] += v
            raise
