"""The composition root: every long-lived object built once from settings.

``backburner serve`` (through :func:`backburner.api.app.create_app`) and ``backburner worker``
both call :meth:`Services.from_settings`; tests pass their own backends by name. Nothing here is
built at import time.

    Services
    ├── store        the database (SQLite or PostgreSQL)
    ├── engines      each backend's engine and lane (admission, probes, preemption)
    ├── metrics      the Prometheus registry
    ├── blobs        uploaded and result files
    └── with run_worker:
        ├── worker       claims generations and runs them on the backends
        ├── batches      validates, loads and finalizes batches
        └── dispatcher   delivers webhook events from the outbox
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from backburner.backends.base import Backend
from backburner.backends.engines import Engines
from backburner.backends.registry import build_backend
from backburner.config import Settings
from backburner.core.retry import Backoff
from backburner.metrics import LaneCollector, Metrics
from backburner.scheduler import Worker, WorkerOptions
from backburner.scheduler.batches import BatchRunner
from backburner.store import Store
from backburner.store.blobs import BlobStore, LocalBlobStore
from backburner.store.retention import retention_policy
from backburner.store.usage import RealtimeUsage
from backburner.webhooks.delivery import Deliverer, TargetPolicy, UrlGuard, guarded_transport
from backburner.webhooks.dispatcher import Dispatcher, DispatcherOptions

log = logging.getLogger("backburner")
#: how often realtime usage is written (what a crash can lose of it)
USAGE_FLUSH_SECONDS = 1.0


def worker_options(settings: Settings) -> WorkerOptions:
    return WorkerOptions(
        max_attempts=settings.max_attempts,
        idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
        max_lost_leases=settings.max_lost_leases,
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval_seconds,
        claim_ahead=settings.claim_ahead,
        claim_ahead_seconds=settings.claim_ahead_seconds,
        maintenance_interval=settings.maintenance_interval_seconds,
        backoff=Backoff(settings.retry_base_seconds, settings.retry_cap_seconds),
        prefix_runs=settings.prefix_runs,
        prefix_window=settings.prefix_window,
        prefix_max_runs=settings.prefix_max_runs,
        prefix_fair_every=settings.prefix_fair_every,
        prefix_warmup_seconds=settings.prefix_warmup_seconds,
        retention=retention_policy(settings),
        pace_window_seconds=settings.pace_window_seconds,
        deadline_horizon_seconds=settings.deadline_horizon_seconds,
        deadline_trickle=settings.deadline_trickle,
    )


def dispatcher_options(settings: Settings) -> DispatcherOptions:
    return DispatcherOptions(
        retry_schedule=tuple(settings.webhook_retry_schedule_seconds),
        retry_jitter=settings.webhook_retry_jitter,
        poll_interval=settings.webhook_poll_interval_seconds,
        concurrency=settings.webhook_concurrency,
        lease_seconds=settings.webhook_lease_seconds,
    )


KEYS_RECHECK_SECONDS = 5.0


def blob_store(settings: Settings) -> BlobStore:
    """Where file contents live: ``files_url`` (s3:// or file://), else ``files_dir``."""
    url = settings.files_url
    if url is not None and url.startswith("s3://"):
        from backburner.store.s3blobs import S3BlobStore

        return S3BlobStore(url, endpoint_url=settings.files_endpoint_url)
    if url is not None and url.startswith("file://"):
        return LocalBlobStore(Path(urlsplit(url).path))
    return LocalBlobStore(Path(settings.files_dir))


def webhook_targets(settings: Settings, store: Store) -> TargetPolicy:
    """Which addresses webhooks may reach. ``webhook_allow_private`` networks always; other
    private addresses only while the server runs open: on loopback with no API key ever created
    (a laptop with its receiver on localhost). Once a key exists they are refused, whatever the
    listen address (a loopback server behind a proxy is not private)."""
    allow = [ipaddress.ip_network(net, strict=False) for net in settings.webhook_allow_private]
    if settings.webhook_deny_private is not None or not settings.loopback_only:
        return TargetPolicy(settings.deny_private_webhooks, allow)
    seen = {"at": -math.inf, "keys": False}

    async def keys_in_use() -> bool:
        now = time.monotonic()
        if not seen["keys"] and now - float(seen["at"]) > KEYS_RECHECK_SECONDS:
            seen["keys"], seen["at"] = await store.keys.any_created(), now
        return bool(seen["keys"])

    return TargetPolicy(keys_in_use, allow)


def _report_crash(task: asyncio.Task[None]) -> None:
    """A background loop that dies takes its lane with it: say so loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped with an error", task.get_name(), exc_info=task.exception())


@dataclass
class Services:
    settings: Settings
    store: Store
    engines: Engines
    metrics: Metrics
    blobs: BlobStore
    webhook_targets: TargetPolicy
    worker: Worker | None = None
    batches: BatchRunner | None = None
    dispatcher: Dispatcher | None = None
    _hook_client: httpx.AsyncClient | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: realtime requests counted in this process, written to the usage table every second
    realtime_usage: RealtimeUsage | None = None
    _flushed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        backends: Mapping[str, Backend] | None = None,
        run_worker: bool | None = None,
    ) -> Services:
        """Build everything; ``backends`` replaces configured backends by name (tests inject
        fakes); ``run_worker`` defaults to ``settings.run_worker``."""
        given = dict(backends or {})
        engines = {
            r.name: given.get(r.name) or build_backend(r)
            for s in settings.backends
            for r in s.replicas()
        }
        catalog = Engines(settings.backends, engines)
        metrics = Metrics(tenant_label=settings.metrics_tenant_label)
        metrics.registry.register(LaneCollector(catalog.lanes))
        store = Store(settings.database_url, limits=settings.limits)
        store.usage.observer = metrics.count_usage
        blobs = blob_store(settings)
        targets = webhook_targets(settings, store)
        services = cls(settings, store, catalog, metrics, blobs, targets)
        services.realtime_usage = RealtimeUsage(store.usage)
        if settings.run_worker if run_worker is None else run_worker:
            services._build_background()
        return services

    def _build_background(self) -> None:
        s = self.settings
        self._hook_client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=s.webhook_timeout_seconds,
            transport=guarded_transport(
                self.webhook_targets, max_connections=s.webhook_concurrency * 2
            ),
        )
        deliverer = Deliverer(
            self._hook_client, UrlGuard(self.webhook_targets), timeout=s.webhook_timeout_seconds
        )
        self.dispatcher = Dispatcher(
            self.store, deliverer, dispatcher_options(s), metrics=self.metrics
        )
        self.worker = Worker(
            self.store,
            self.engines,
            worker_options(s),
            metrics=self.metrics,
            after_write=self.dispatcher.wake,
            blobs=self.blobs,
        )
        self.batches = BatchRunner(
            self.store,
            self.blobs,
            self.engines.models,
            max_lines=s.batch_max_lines,
            max_line_bytes=s.batch_max_line_bytes,
            poll_interval=max(s.poll_interval_seconds, 0.05) * 5,
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the engines and start the lanes' probes."""
        await self.engines.start()

    def start_background(self) -> None:
        """Run the worker, batch runner and dispatcher as tasks of the current loop."""
        for name, loop in (
            ("bb-worker", self.worker),
            ("bb-batches", self.batches),
            ("bb-dispatcher", self.dispatcher),
        ):
            if loop is not None:
                task = asyncio.create_task(loop.run(), name=name)
                task.add_done_callback(_report_crash)
                self._tasks.append(task)
        task = asyncio.create_task(self._flush_usage(), name="bb-usage")
        task.add_done_callback(_report_crash)
        self._tasks.append(task)

    async def _flush_usage(self) -> None:
        """Write the realtime usage tally every second, and once more when stopping."""
        assert self.realtime_usage is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), USAGE_FLUSH_SECONDS)
            try:
                await self.realtime_usage.flush()
            except Exception:  # kept for the next try
                log.warning("writing realtime usage failed; trying again", exc_info=True)
            if self._flushed.is_set():
                return

    async def run_burst(self) -> None:
        """Drain what is queued now (batches loaded, generations run, events sent), then
        return."""
        if self.worker is None or self.batches is None or self.dispatcher is None:
            raise RuntimeError("run_burst needs the background services (run_worker)")
        await self.batches.run(burst=True)
        await self.worker.run(burst=True)
        await self.batches.run(burst=True)
        await self.dispatcher.run(burst=True)

    async def stop(self) -> None:
        """Ask the background loops to finish what they hold, and wait for them."""
        for loop in (self.worker, self.dispatcher, self.batches):
            if loop is not None:
                await loop.stop()
        self._flushed.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def close(self) -> None:
        await self.stop()
        if self._hook_client is not None:
            await self._hook_client.aclose()
        await self.engines.close()
        await self.store.close()

    # ------------------------------------------------------------------ wake-up interface
    def wake_worker(self) -> None:
        """New work was submitted in this process: claim now instead of at the next poll."""
        if self.worker is not None:
            self.worker.wake()

    def wake_batches(self) -> None:
        if self.batches is not None:
            self.batches.wake()

    def wake_dispatcher(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()
