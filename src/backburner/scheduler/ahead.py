"""Claiming ahead: a lane's claim takes a few generations more than it has free slots and keeps
them ready, so the next slots that free up start work at once, without a database round trip.

Without it, a busy lane whose requests end one by one claims one by one: a transaction (and a
read of the claim window) for every generation or two. With a depth of ``d`` a lane claims
about once per ``d`` completions.

The depth follows the lane's pace: about :data:`AHEAD_SECONDS` of the starts it made lately,
at most ``max_depth`` and the lane's current window. Work that takes seconds per request (an LLM
under real load) is claimed as slots free up, as before; short requests, where claiming is
the cost that shows, are claimed in batches. A lane that realtime traffic holds back (window 0)
claims nothing ahead.

What is ready is claimed (In Progress, under the claim's lease, kept alive by the heartbeat).
A generation that waits longer than ``max_wait`` seconds (the engine's background window shrank
while realtime traffic took the engine) is given back to the queue, its try not counted, so
another worker may run it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from backburner.schemas.generation import GenerationRecord

#: how much work to hold ready, in seconds of the lane's recent starts
AHEAD_SECONDS = 0.1
#: the pace is an average over about this many seconds
PACE_SECONDS = 2.0


@dataclass(frozen=True)
class Ready:
    generation: GenerationRecord
    lease: str
    since: float


class ClaimAhead:
    def __init__(
        self,
        depth: int,
        max_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_depth = depth
        self.max_wait = max_wait
        self._clock = clock
        self._ready: deque[Ready] = deque()
        self._rate = 0.0  # starts per second, decaying
        self._rate_at = clock()

    def __len__(self) -> int:
        return len(self._ready)

    def started(self, n: int) -> None:
        """``n`` generations started on the lane (from a claim or from what was ready)."""
        self._decay()
        self._rate += n / PACE_SECONDS

    def _decay(self) -> None:
        now = self._clock()
        elapsed, self._rate_at = now - self._rate_at, now
        if elapsed > 0:
            self._rate *= max(0.0, 1.0 - elapsed / PACE_SECONDS)

    def depth(self, window: float) -> int:
        """How many to claim beyond the free slots, for a lane whose window is ``window``."""
        self._decay()
        return max(0, min(self.max_depth, int(window), int(self._rate * AHEAD_SECONDS)))

    def keep(self, generations: list[GenerationRecord], lease: str) -> None:
        now = self._clock()
        self._ready.extend(Ready(g, lease, now) for g in generations)

    def take(self, n: int) -> list[Ready]:
        """Up to ``n`` ready generations, in the order they were claimed."""
        return [self._ready.popleft() for _ in range(min(n, len(self._ready)))]

    def stale(self) -> list[Ready]:
        """Those that waited longer than ``max_wait`` (removed): to be given back."""
        limit = self._clock() - self.max_wait
        out: list[Ready] = []
        while self._ready and self._ready[0].since < limit:
            out.append(self._ready.popleft())
        return out

    def clear(self) -> list[Ready]:
        out = list(self._ready)
        self._ready.clear()
        return out
