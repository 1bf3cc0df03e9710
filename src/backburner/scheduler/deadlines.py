"""Deadlines in worker maintenance: which open groups and batches are expected to miss their
deadline; the metrics that name them and the trickle of background slots kept open meanwhile
(docs/scheduling.md)."""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import TYPE_CHECKING

from backburner.backends.engines import Engines
from backburner.core.clock import utcnow
from backburner.core.estimate import OpenWork
from backburner.metrics import Metrics
from backburner.store import Store

if TYPE_CHECKING:
    from backburner.scheduler.worker import WorkerOptions

log = logging.getLogger("backburner.worker")


async def work_at_risk(
    store: Store, engines: Engines, metrics: Metrics, opts: WorkerOptions, *, warn: bool
) -> list[tuple[OpenWork, datetime | None]]:
    """Which open groups and batches are expected to miss their deadline (None: no pace
    measured, so at risk too): set the metrics, and keep a trickle of background slots
    open on every lane while there are any."""
    pace = await store.deadlines.pace(opts.pace_window_seconds)
    now = utcnow()
    risky: list[tuple[OpenWork, datetime | None]] = []
    for work in await store.deadlines.open_work():
        eta = pace.eta(work.tenant, work.remaining, now)
        if eta is None or eta > work.deadline:
            risky.append((work, eta))
    for kind in ("group", "batch"):
        metrics.at_risk.labels(kind).set(sum(1 for w, _ in risky if w.kind == kind))
    metrics.at_risk_work.clear()
    for work, eta in risky[:50]:
        late = math.inf if eta is None else (eta - work.deadline).total_seconds()
        metrics.at_risk_work.labels(work.kind, work.id).set(late)
    trickle = opts.deadline_trickle if risky else 0
    for lane in engines.lanes.values():
        lane.set_trickle(trickle)
    if risky and warn:
        log.warning(
            "%d groups and batches may miss their deadline (first: %s %s); keeping %d"
            " background slots open per lane",
            len(risky),
            risky[0][0].kind,
            risky[0][0].id,
            trickle,
        )
    return risky
