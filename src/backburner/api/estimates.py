"""``expected_completion_at`` on batches and groups: remaining work at its tenant's pace
(:mod:`backburner.core.estimate`), the pace read at most every few seconds per process."""

from __future__ import annotations

from datetime import datetime

from backburner.api.state import AppState
from backburner.core.clock import utcnow
from backburner.core.estimate import Pace
from backburner.core.states import BatchStatus, GroupStatus
from backburner.schemas.batch import BatchRecord
from backburner.schemas.generation import GroupRecord

PACE_CACHE_SECONDS = 5.0
_OPEN_BATCH = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)


async def pace(ctx: AppState) -> Pace:
    hit = ctx.ops_cache.get("pace")
    if hit is not None and ctx.now() - hit[0] < PACE_CACHE_SECONDS:
        cached: Pace = hit[1]
        return cached
    fresh = await ctx.store.deadlines.pace(ctx.settings.pace_window_seconds)
    ctx.ops_cache["pace"] = (ctx.now(), fresh)
    return fresh


def batch_eta(batch: BatchRecord, p: Pace) -> datetime | None:
    if batch.status not in _OPEN_BATCH or batch.total <= 0:
        return None
    return p.eta(batch.tenant, batch.total - batch.completed - batch.failed, utcnow())


def group_eta(group: GroupRecord, p: Pace) -> datetime | None:
    if group.status is not GroupStatus.IN_PROGRESS:
        return None
    return p.eta(group.tenant, group.counts.queued + group.counts.in_progress, utcnow())
