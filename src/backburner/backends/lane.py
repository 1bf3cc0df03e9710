"""One backend's traffic: realtime passes straight through, background is admitted and preempted.

The lane polls the engine's probe (or, for a ``generic`` engine, counts its own requests against
``max_concurrency``), feeds the :class:`AdmissionController`, and keeps the background requests
it runs so that it can preempt the youngest when realtime needs the engine: their calls are
cancelled (the HTTP connection closes, and vLLM, SGLang and llama.cpp abort a request whose client
went away) and raise :class:`~backburner.errors.Preempted`, which the worker turns into a durable
requeue that does not count as a try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from backburner.backends.admission import AdmissionController, AdmissionSnapshot, Held
from backburner.backends.probe import Probe
from backburner.backends.signals import EngineLoad
from backburner.errors import BackendError, Preempted

log = logging.getLogger("backburner.lane")
T = TypeVar("T")
OVERLOAD_STATUS = frozenset({429, 503, 529})


@dataclass(eq=False)
class _Running:
    task: asyncio.Future[object]
    started: float
    preempted: bool = False


@dataclass
class LaneCounters:
    preempted: int = 0
    seconds_lost: float = 0.0
    realtime: int = 0
    probe_failures: int = 0
    held_checks: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RealtimeTicket:
    """Handed to a realtime request when it starts; says what ran beside it."""

    started: float
    background_inflight: int


class Lane:
    def __init__(
        self,
        name: str,
        controller: AdmissionController,
        *,
        probe: Probe | None,
        max_concurrency: int,
        preempt: bool,
        probe_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.controller = controller
        self.probe = probe
        self.max_concurrency = max_concurrency
        self.preempt_enabled = preempt
        self.probe_interval = probe_interval
        self.counters = LaneCounters()
        self._clock = clock
        self._running: list[_Running] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if probe is None:
            self._observe_local()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name=f"bb-probe-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _poll(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.probe_interval)

    async def poll_once(self) -> None:
        """One probe cycle (the poll loop's body; tests call it directly)."""
        if self.probe is None:
            self._observe_local()
        else:
            try:
                load = await asyncio.wait_for(self.probe.read(), self.probe_interval * 4)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counters.probe_failures += 1
                self.controller.observe_load(
                    None,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    running_background=len(self._running),
                )
            else:
                self.controller.observe_load(load, running_background=len(self._running))
        if self.controller.shared:
            self._preempt_excess()
        self._wake()

    def _observe_local(self) -> None:
        """A generic engine: backburner's own requests against ``max_concurrency``."""
        c = self.controller
        busy = c.background_inflight + c.realtime_inflight
        c.observe_load(
            EngineLoad(running=busy, waiting=max(0, busy - self.max_concurrency)),
            running_background=len(self._running),
            exact=True,
        )

    # ------------------------------------------------------------------ background
    def held(self) -> Held:
        if self.probe is None:
            self._observe_local()
        return self.controller.held()

    def free_for_background(self) -> int:
        if self.probe is None:
            self._observe_local()
        return self.controller.allowance()

    def take_background(self, n: int) -> int:
        """Reserve up to ``n`` background slots without waiting; returns how many."""
        k = min(n, self.free_for_background())
        if k > 0:
            self.controller.background_started(k)
        return k

    def release_background(self, n: int = 1) -> None:
        self.controller.background_finished(n)
        self._wake()

    async def wait_background_capacity(self, wait_seconds: float) -> None:
        """Return when background work could start, or after ``wait_seconds``."""
        if self.free_for_background() > 0:
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), wait_seconds)

    async def run_background(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one background call (its slot already taken); it can be preempted."""
        if self.preempt_enabled and self.controller.excess() > self._pending_preemptions():
            # realtime took the engine while this slot was being claimed: yield before starting
            self.counters.preempted += 1
            raise Preempted("Queued again: realtime traffic has the engine")
        task: asyncio.Future[T] = asyncio.ensure_future(call())
        entry = _Running(task, self._clock())  # type: ignore[arg-type]
        self._running.append(entry)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if entry.preempted and (current is None or not current.cancelling()):
                lost = self._clock() - entry.started
                self.counters.seconds_lost += lost
                raise Preempted(
                    "Queued again: preempted by realtime traffic", seconds_lost=lost
                ) from None
            task.cancel()
            raise
        except BackendError as exc:
            self.observe_error(exc)
            raise
        finally:
            self._running.remove(entry)

    def _pending_preemptions(self) -> int:
        return sum(1 for r in self._running if r.preempted)

    def _preempt_excess(self) -> int:
        if not self.preempt_enabled:
            return 0
        n = self.controller.excess() - self._pending_preemptions()
        if n <= 0:
            return 0
        victims = sorted(
            (r for r in self._running if not r.preempted), key=lambda r: r.started, reverse=True
        )[:n]
        for r in victims:
            r.preempted = True
            r.task.cancel()
        self.counters.preempted += len(victims)
        if victims:
            log.debug("lane %s preempted %d background requests", self.name, len(victims))
        return len(victims)

    def set_trickle(self, slots: int) -> None:
        """Keep ``slots`` background slots open whatever realtime does (work is at risk of
        missing its deadline); 0 ends it."""
        if slots != self.controller.trickle:
            self.controller.trickle = slots
            self._wake()

    # ------------------------------------------------------------------ realtime
    def realtime_started(self) -> RealtimeTicket:
        self.counters.realtime += 1
        ticket = RealtimeTicket(self._clock(), self.controller.background_inflight)
        self.controller.realtime_started()
        self._preempt_excess()
        return ticket

    def realtime_finished(self) -> None:
        self.controller.realtime_finished()
        self._wake()

    def observe_realtime(self, ticket: RealtimeTicket, metric: str, seconds: float) -> None:
        beside = max(ticket.background_inflight, self.controller.background_inflight)
        self.controller.observe_realtime(metric, seconds, background_inflight=beside)
        self._wake()

    def observe_error(self, exc: BackendError) -> None:
        if exc.upstream_status in OVERLOAD_STATUS:
            self.controller.observe_overload()

    # ------------------------------------------------------------------ visibility
    def snapshot(self) -> AdmissionSnapshot:
        if self.probe is None:
            self._observe_local()
        return self.controller.snapshot()

    def _wake(self) -> None:
        if self.controller.allowance() > 0:
            self._changed.set()
