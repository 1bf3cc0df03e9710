"""When will it be done? An estimate from the pace background work has kept lately.

A tenant's work goes at the rate its work has finished over the last few minutes (the fair order
and the engines' load are in that figure already). A tenant with too few recent completions to
measure is given an equal share of everything that finished lately. The estimate of a group or
batch is ``now + remaining ÷ rate``: what its own work needs at its tenant's pace. It is
optimistic for a tenant running several objects at once (they share the pace), and unknown
(None) when nothing finished lately.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

#: completions in the window below which a tenant's own pace is not trusted
MIN_SAMPLES = 5


@dataclass(frozen=True)
class Pace:
    window_seconds: float
    #: tenant -> background generations that finished in the window
    by_tenant: Mapping[str, int] = field(default_factory=dict)

    def rate(self, tenant: str) -> float | None:
        """Generations per second for ``tenant``'s work, or None when unknown."""
        own = self.by_tenant.get(tenant, 0)
        if own >= MIN_SAMPLES:
            return own / self.window_seconds
        total = sum(self.by_tenant.values())
        if total == 0:
            return None
        sharers = len(self.by_tenant) + (0 if tenant in self.by_tenant else 1)
        return total / self.window_seconds / sharers

    def eta(self, tenant: str, remaining: int, now: datetime) -> datetime | None:
        """When ``remaining`` generations of ``tenant`` should be done, or None."""
        if remaining <= 0:
            return None
        rate = self.rate(tenant)
        if not rate:
            return None
        return now + timedelta(seconds=remaining / rate)


@dataclass(frozen=True)
class OpenWork:
    """A group or batch with work left, and its deadline."""

    kind: str  # "group" | "batch"
    id: str
    tenant: str
    remaining: int
    deadline: datetime
