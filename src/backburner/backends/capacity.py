"""Per-backend concurrency with realtime priority.

Realtime requests wait in a FIFO and are handed the next free slot before slow work sees it; the
scheduler only takes slots that are free while no realtime request is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class CapacityGate:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.in_use = 0
        self._realtime: deque[asyncio.Future[None]] = deque()
        self._freed: asyncio.Event | None = None

    @property
    def realtime_waiting(self) -> int:
        return sum(1 for f in self._realtime if not f.done())

    def free_for_slow(self) -> int:
        if self.realtime_waiting:
            return 0
        return max(0, self.limit - self.in_use)

    def take_slow(self, n: int) -> int:
        """Take up to ``n`` slots for slow work without waiting; returns how many were taken."""
        k = min(n, self.free_for_slow())
        self.in_use += k
        return k

    async def acquire_realtime(self) -> None:
        if self.in_use < self.limit and not self.realtime_waiting:
            self.in_use += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._realtime.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            raise
        finally:
            if fut in self._realtime:
                self._realtime.remove(fut)

    def release(self, n: int = 1) -> None:
        self.in_use = max(0, self.in_use - n)
        while self._realtime and self.in_use < self.limit:
            fut = self._realtime.popleft()
            if not fut.done():
                self.in_use += 1
                fut.set_result(None)
        if self._freed is not None and self.free_for_slow() > 0:
            self._freed.set()

    async def wait_slow_capacity(self, wait_seconds: float) -> None:
        """Return when slow work could take a slot, or after ``wait_seconds``."""
        if self.free_for_slow() > 0:
            return
        if self._freed is None:
            self._freed = asyncio.Event()
        self._freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._freed.wait(), wait_seconds)
