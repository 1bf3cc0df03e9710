"""The overview's numbers, read so that a page never waits on a big query.

- Open work by model and state: an index range over open rows only, kept for ``DEPTH_SECONDS``
  and refreshed in the background once stale (the page shows the last value at once).
- Finished per minute over the last hour: minutes older than ``SETTLE_SECONDS`` never change, so
  each refresh reads only the last minute or two through the index on ``finished_at``.
- Realtime latency per minute and the engines' signals: this process's own memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from backburner.api.estimates import pace
from backburner.api.state import AppState
from backburner.core.clock import utcnow
from backburner.core.estimate import OpenWork
from backburner.core.states import State

DEPTH_SECONDS = 2.0
RISK_SECONDS = 5.0
FIRST_WAIT_SECONDS = 0.05
THROUGHPUT_SECONDS = 2.0
SETTLE_SECONDS = 15.0  # a minute this old holds every row that will ever finish in it
MINUTES = 60
MAX_SCOPES = 256


@dataclass
class _Cached:
    at: float
    value: Any
    refreshing: asyncio.Task[None] | None = None


@dataclass
class _Minutes:
    """Per-minute finished counts for one scope: ``minute -> {state: n}``, and what is final."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    final_before: datetime | None = None
    at: float = 0.0


def _minute_key(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M")


class OverviewData:
    def __init__(self, ctx: AppState) -> None:
        self._ctx = ctx
        self._depth: OrderedDict[str | None, _Cached] = OrderedDict()
        self._minutes: OrderedDict[str | None, _Minutes] = OrderedDict()
        self._reading = asyncio.Lock()  # one finished-per-minute read at a time
        self._open: _Cached | None = None

    # ------------------------------------------------------------------ open work
    async def depth(self, scope: str | None) -> list[tuple[str, str, int]] | None:
        """The last counts read, or None while the first count of this scope runs: a page never
        waits for it (a tenant with 150,000 open generations takes ~0.2-0.4 s to count on SQLite);
        the live part shows it 2 seconds later."""
        now = self._ctx.now()
        cached = self._depth.get(scope)
        if cached is None:
            cached = _Cached(0.0, None)
            self._remember(self._depth, scope, cached)
        if now - cached.at > DEPTH_SECONDS and cached.refreshing is None:
            cached.refreshing = asyncio.create_task(self._refresh_depth(scope, cached))
            if cached.value is None:
                # a small store answers at once: give the count a moment before the placeholder
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(cached.refreshing), FIRST_WAIT_SECONDS)
        result: list[tuple[str, str, int]] | None = cached.value
        return result

    async def _refresh_depth(self, scope: str | None, cached: _Cached) -> None:
        try:
            cached.value = await self._ctx.store.views.queue_depth(scope)
            cached.at = self._ctx.now()
        except Exception:  # the store being down: keep the last value, try again later
            cached.at = self._ctx.now()
        finally:
            cached.refreshing = None

    def _remember(self, table: OrderedDict[str | None, Any], scope: str | None, v: Any) -> None:
        table[scope] = v
        table.move_to_end(scope)
        while len(table) > MAX_SCOPES:
            table.popitem(last=False)

    # ------------------------------------------------------------------ finished per minute
    async def finished(self, scope: str | None) -> list[tuple[str, int, int]]:
        """``(minute, succeeded, failed)`` for each of the last 60 minutes, oldest first."""
        async with self._reading:
            m = self._minutes.get(scope)
            if m is None:
                m = _Minutes()
                self._remember(self._minutes, scope, m)
            if self._ctx.now() - m.at > THROUGHPUT_SECONDS or m.final_before is None:
                with contextlib.suppress(Exception):
                    await self._read_minutes(scope, m)
        now = datetime.now(UTC)
        out = []
        for i in range(MINUTES - 1, -1, -1):
            key = _minute_key(now - timedelta(minutes=i))
            c = m.counts.get(key, {})
            out.append((key, c.get(State.SUCCESS.value, 0), c.get(State.FAILED.value, 0)))
        return out

    async def _read_minutes(self, scope: str | None, m: _Minutes) -> None:
        now = datetime.now(UTC)
        start = (now - timedelta(minutes=MINUTES)).replace(second=0, microsecond=0)
        since = max(m.final_before or start, start)
        rows = await self._ctx.store.views.finished_by_minute(scope, since)
        first = _minute_key(since)
        for key in [k for k in m.counts if k >= first or k < _minute_key(start)]:
            del m.counts[key]
        for minute, state, n in rows:
            m.counts.setdefault(minute, {})[state] = n
        m.final_before = (now - timedelta(seconds=SETTLE_SECONDS)).replace(second=0, microsecond=0)
        m.at = self._ctx.now()

    # ------------------------------------------------------------------ deadlines
    async def at_risk(self, scope: str | None, limit: int = 8) -> list[dict[str, Any]]:
        """Open groups and batches expected to miss their deadline at their tenant's pace of
        the last minutes (no pace measured yet counts as at risk), earliest deadline first."""
        now = self._ctx.now()
        if self._open is None or now - self._open.at > RISK_SECONDS:
            self._open = _Cached(now, await self._ctx.store.deadlines.open_work())
        work: list[OpenWork] = self._open.value
        p = await pace(self._ctx)
        wall = utcnow()
        out = []
        for w in work:
            if scope is not None and w.tenant != scope:
                continue
            eta = p.eta(w.tenant, w.remaining, wall)
            if eta is None or eta > w.deadline:
                out.append(
                    {
                        "kind": w.kind,
                        "id": w.id,
                        "tenant": w.tenant,
                        "remaining": w.remaining,
                        "deadline": w.deadline,
                        "eta": eta,
                    }
                )
                if len(out) >= limit:
                    break
        return out

    # ------------------------------------------------------------------ this process
    def lanes(self) -> list[dict[str, Any]]:
        out = []
        for name, lane in self._ctx.engines.lanes.items():
            snap = lane.snapshot()
            load = snap.load
            out.append(
                {
                    "name": name,
                    "regime": snap.regime,
                    "held": snap.held.value,
                    "window": snap.window,
                    "background": snap.background_inflight,
                    "realtime": snap.realtime_inflight,
                    "probe": "engine metrics" if lane.probe is not None else "own count",
                    "probe_age": snap.probe_age,
                    "probe_error": snap.probe_error,
                    "waiting": None if load is None else load.waiting,
                    "running": None if load is None else load.running,
                    "kv": None if load is None else load.kv_usage,
                    "preempted": lane.counters.preempted,
                }
            )
        return out

    def realtime(self) -> list[Any]:
        return self._ctx.metrics.realtime_recent.points(time.time())
