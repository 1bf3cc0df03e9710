"""The delivery worker: claims due outbox events with a lease, makes one attempt each, and logs
it. A failed attempt that may be retried comes back after the next delay of the retry schedule
(jittered; ``Retry-After`` may push it later); when the schedule is spent the event fails.

Events of a disabled endpoint are not claimed: they wait in the outbox, pending, until the endpoint
is enabled again (``store.webhooks.update`` then makes them due at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from backburner.config import WEBHOOK_RETRY_SCHEDULE
from backburner.core.clock import utcnow
from backburner.core.ids import lease_owner_id
from backburner.metrics import Metrics
from backburner.schemas.webhook import DueEvent
from backburner.store import Store
from backburner.webhooks.delivery import Deliverer, next_delay

log = logging.getLogger("backburner.webhooks")


@dataclass
class DispatcherOptions:
    # seconds to wait after each failed attempt; len(retry_schedule) + 1 attempts in all
    retry_schedule: tuple[float, ...] = WEBHOOK_RETRY_SCHEDULE
    retry_jitter: float = 0.2
    poll_interval: float = 0.25
    concurrency: int = 16
    lease_seconds: float = 120.0


class Dispatcher:
    def __init__(
        self,
        store: Store,
        deliverer: Deliverer,
        options: DispatcherOptions | None = None,
        *,
        metrics: Metrics | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.deliverer = deliverer
        self.opts = options or DispatcherOptions()
        self.metrics = metrics or Metrics()
        self.id = worker_id or lease_owner_id("hooks")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._sem = asyncio.Semaphore(self.opts.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self, *, burst: bool = False) -> None:
        """Deliver until stopped; with ``burst``, return when nothing is due or in flight."""
        try:
            while not self._stopping.is_set():
                free = self.opts.concurrency - len(self._tasks)
                due: list[DueEvent] = []
                if free > 0:
                    try:
                        due = await self.store.outbox.claim(self.id, free, self.opts.lease_seconds)
                    except Exception:
                        log.exception("claiming webhook events failed")
                for ev in due:
                    task = asyncio.create_task(self._deliver(ev), name=f"bb-hook-{ev.id}")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if due:
                    continue
                if burst and not self._tasks:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.opts.poll_interval)
        finally:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=35)

    async def _deliver(self, ev: DueEvent) -> None:
        async with self._sem:
            try:
                await self.deliver_once(ev)
            except Exception:
                log.exception("webhook delivery of %s failed unexpectedly", ev.id)

    async def deliver_once(self, ev: DueEvent) -> None:
        if ev.url is None:  # its endpoint was deleted after it was claimed
            await self.store.outbox.record_attempt(
                self.id,
                ev,
                status_code=None,
                duration_ms=0,
                error="webhook deleted",
                delivered=False,
                retry_at=None,
            )
            return
        if not ev.endpoint_enabled:  # disabled after it was claimed: it waits, no attempt made
            await self.store.outbox.release(self.id, ev)
            return
        now = utcnow()
        attempt = await self.deliverer.deliver(ev.url, ev.secret, ev.id, ev.payload, now)
        number = ev.attempts + 1
        retry_at = None
        if not attempt.delivered and attempt.retryable:
            delay = next_delay(
                number,
                attempt.retry_after,
                self.opts.retry_schedule,
                jitter=self.opts.retry_jitter,
            )
            if delay is not None:
                retry_at = utcnow() + timedelta(seconds=delay)
        outcome = "delivered" if attempt.delivered else ("retry" if retry_at else "failed")
        self.metrics.webhook_attempts.labels(ev.event, outcome).inc()
        self.metrics.webhook_seconds.observe(attempt.duration_ms / 1000)
        if not attempt.delivered:
            log.log(
                logging.WARNING if outcome == "failed" else logging.INFO,
                "webhook %s attempt %d to webhook %s: %s (%s)",
                ev.id,
                number,
                ev.webhook_id,
                attempt.error,
                outcome if retry_at is None else f"retry at {retry_at.isoformat()}",
            )
        await self.store.outbox.record_attempt(
            self.id,
            ev,
            status_code=attempt.status_code,
            duration_ms=attempt.duration_ms,
            error=attempt.error,
            delivered=attempt.delivered,
            retry_at=retry_at,
            disable_endpoint=attempt.disable_endpoint,
        )
        if retry_at is not None:
            self._wake.set()
