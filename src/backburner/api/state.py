"""What the routers share, built once by the app factory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from backburner.backends.router import ModelRouter
from backburner.config import Settings
from backburner.metrics import Metrics
from backburner.scheduler import Worker
from backburner.scheduler.batches import BatchRunner
from backburner.store import Store
from backburner.store.blobs import LocalBlobStore
from backburner.webhooks.dispatcher import Dispatcher


@dataclass
class AppState:
    settings: Settings
    store: Store
    router: ModelRouter
    metrics: Metrics
    worker: Worker | None = None
    dispatcher: Dispatcher | None = None
    batches: BatchRunner | None = None
    blobs: LocalBlobStore | None = None
    keys_exist: bool = False
    keys_checked_at: float = field(default=0.0)
    key_cache: dict[str, tuple[str | None, float]] = field(default_factory=dict)

    def wake_worker(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    def wake_batches(self) -> None:
        if self.batches is not None:
            self.batches.wake()

    def wake_dispatcher(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def now(self) -> float:
        return time.monotonic()


def app_state(request: Request) -> AppState:
    st: AppState = request.app.state.bb
    return st
