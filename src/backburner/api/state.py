"""What the routers share, built once by the app factory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from backburner.backends.engines import Engines
from backburner.config import Settings
from backburner.metrics import Metrics
from backburner.store import Store
from backburner.store.blobs import BlobStore
from backburner.store.usage import RealtimeUsage
from backburner.webhooks.delivery import TargetPolicy


class WakeUp(Protocol):
    """The background loops a route may nudge after a write (no-ops without a worker)."""

    def wake_worker(self) -> None: ...

    def wake_batches(self) -> None: ...

    def wake_dispatcher(self) -> None: ...


@dataclass
class AppState:
    settings: Settings
    store: Store
    engines: Engines
    metrics: Metrics
    blobs: BlobStore
    wake: WakeUp
    webhook_targets: TargetPolicy
    keys_exist: bool = False
    keys_checked_at: float = field(default=0.0)
    realtime_usage: RealtimeUsage | None = None
    # API key -> ((tenant, admin, tenant disabled) or None, when looked up)
    key_cache: dict[str, tuple[tuple[str, bool, bool] | None, float]] = field(default_factory=dict)
    ops_cache: dict[str, tuple[float, Any]] = field(default_factory=dict)

    def wake_worker(self) -> None:
        self.wake.wake_worker()

    def wake_batches(self) -> None:
        self.wake.wake_batches()

    def wake_dispatcher(self) -> None:
        self.wake.wake_dispatcher()

    def now(self) -> float:
        return time.monotonic()


async def app_state(request: Request) -> AppState:
    # async: FastAPI runs a plain ``def`` dependency in a worker thread, a hop per request
    ctx: AppState = request.app.state.bb
    return ctx
