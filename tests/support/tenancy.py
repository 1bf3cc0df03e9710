"""Helpers for the tenancy tests: races between Stores, and who holds a connection at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from backburner.errors import TooManyRequests
from backburner.store import Store


class Peak:
    """The most connections checked out of ``stores``' writer pools at once, over a race: more
    than one means the racers' transactions really were open side by side."""

    def __init__(self, stores: Iterable[Store]) -> None:
        self.now = 0
        self.most = 0
        self._engines = [s.engine.sync_engine for s in stores]
        for e in self._engines:
            sa.event.listen(e, "checkout", self._out)
            sa.event.listen(e, "checkin", self._in)

    def _out(self, *_: Any) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def _in(self, *_: Any) -> None:
        self.now -= 1

    def close(self) -> None:
        for e in self._engines:
            sa.event.remove(e, "checkout", self._out)
            sa.event.remove(e, "checkin", self._in)


@dataclass
class Race:
    """How a race went: who got in, who was refused (and why), how long it took."""

    accepted: int = 0
    refused: list[TooManyRequests] = field(default_factory=list)
    elapsed: float = 0.0
    peak_connections: int = 0


async def race(
    stores: list[Store], n: int, call: Callable[[Store, int], Awaitable[object]]
) -> Race:
    """Start ``n`` calls at once, racer ``i`` on ``stores[i % len(stores)]`` (one Store per API
    process); each either succeeds or raises :class:`TooManyRequests`."""
    peak = Peak(stores)
    out = Race()

    async def one(i: int) -> None:
        try:
            await call(stores[i % len(stores)], i)
        except TooManyRequests as exc:
            out.refused.append(exc)
        else:
            out.accepted += 1

    start = time.monotonic()
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        out.elapsed = time.monotonic() - start
        out.peak_connections = peak.most
        peak.close()
    return out
