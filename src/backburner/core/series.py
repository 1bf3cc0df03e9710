"""A last-hour series kept in memory: per minute, how many, how many failed, and latency
quantiles from a fixed set of log-spaced buckets (bounded memory, no list of samples)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# upper bounds in seconds, ~25 % apart, 1 ms .. ~17 min; the last bucket is open
BOUNDS: tuple[float, ...] = tuple(0.001 * 1.25**i for i in range(60))
MINUTES = 60


@dataclass
class _Minute:
    start: int  # epoch minute
    count: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))

    def quantile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank and n:
                return BOUNDS[min(i, len(BOUNDS) - 1)]
        return BOUNDS[-1]


@dataclass(frozen=True)
class Point:
    minute: int  # epoch minute
    count: int
    errors: int
    p50: float | None
    p95: float | None


class MinuteSeries:
    def __init__(self) -> None:
        self._ring: list[_Minute | None] = [None] * MINUTES

    def observe(self, now: float, seconds: float, *, ok: bool = True) -> None:
        """One event at epoch time ``now`` that took ``seconds``."""
        minute = int(now // 60)
        slot = self._ring[minute % MINUTES]
        if slot is None or slot.start != minute:
            slot = self._ring[minute % MINUTES] = _Minute(minute)
        slot.count += 1
        slot.errors += 0 if ok else 1
        slot.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1

    def points(self, now: float) -> list[Point]:
        """The last hour oldest first, one point per minute (empty minutes count zero)."""
        last = int(now // 60)
        out = []
        for minute in range(last - MINUTES + 1, last + 1):
            slot = self._ring[minute % MINUTES]
            if slot is None or slot.start != minute:
                out.append(Point(minute, 0, 0, None, None))
            else:
                out.append(
                    Point(minute, slot.count, slot.errors, slot.quantile(0.5), slot.quantile(0.95))
                )
        return out
