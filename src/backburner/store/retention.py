"""Retention: what maintenance deletes once it is old enough, and nothing else.

    results  generations of neither a group nor a batch, Success or Failed: from ``finished_at``
             groups whose generations are all finished (``completed_at`` set), with them
             batches in a final status, from the time they reached it: their generations, then
             the batch row with the output and error files it wrote (rows, then blobs)
    events   webhook events delivered or failed for good, with their delivery attempts: from
             the last attempt (an event failed before it was due, because its webhook was
             deleted, from its creation)
    files    files deleted, or past their own expiry: from that time (rows, then any blob left)

Never touched: Queued or In Progress generations, groups still counting, batches not in a final
status (or with a generation not finished), pending events, live files (an uploaded file stays
until it is deleted or expires, even after the batches that read it are purged), and a file that
a batch is still reading.

One :meth:`Retention.purge` deletes in chunks of at most ``batch`` rows, one transaction each,
and stops after about ``max_rows`` rows: a maintenance pass stays short however much is due, and
the next pass goes on. The kinds take turns chunk by chunk, so a backlog of one does not hold up
the others. Children go before their parent, so nothing is ever left orphaned: a group (at most
50 generations) goes whole in one transaction; a batch's generations go in as many chunks as it
takes (possibly over several passes) and the batch row, with its files, goes in the transaction
that removes the last of them. Meanwhile the batch is still there with its counts and output
file; a retry in that window queues only the failed requests that are left. Rows are deleted
first and blobs only after their transaction commits: a blob left behind is harmless, a row that
names a missing blob is not.

The tables have no foreign keys; the order above is what keeps them consistent. On PostgreSQL
candidates are taken ``FOR UPDATE SKIP LOCKED``, so several workers purging at once split the
work, and a batch being retried waits for (or is skipped by) the chunk that holds it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Protocol

import sqlalchemy as sa

from backburner.config import Settings
from backburner.core.clock import utcnow
from backburner.core.states import (
    BATCH_FINISHED,
    BATCH_RUNNING,
    UNFINISHED,
    BatchStatus,
    EventState,
    GroupStatus,
    State,
)
from backburner.store.base import Database, one_of
from backburner.store.tables import (
    STANDALONE,
    batches,
    files,
    generations,
    groups,
    webhook_attempts,
    webhook_events,
)

log = logging.getLogger("backburner.retention")

B = batches
F = files
G = generations
W = webhook_events
A = webhook_attempts

FINISHED: tuple[State, ...] = tuple(s for s in State if s.terminal)
GROUP_FINISHED: tuple[GroupStatus, ...] = tuple(
    s for s in GroupStatus if s is not GroupStatus.IN_PROGRESS
)
SETTLED: tuple[EventState, ...] = (EventState.DELIVERED, EventState.FAILED)


class BlobRemover(Protocol):
    """What purging needs of a blob store (:class:`~backburner.store.blobs.LocalBlobStore`)."""

    async def delete(self, key: str) -> None: ...


@dataclass(frozen=True)
class RetentionPolicy:
    """How long finished things are kept; ``None`` keeps them forever (see the module
    docstring for what each covers)."""

    results: timedelta | None = None
    events: timedelta | None = None
    files: timedelta | None = None

    def __post_init__(self) -> None:
        for name in ("results", "events", "files"):
            kept = getattr(self, name)
            if kept is not None and kept < timedelta(0):
                raise ValueError(f"retention of {name} must not be negative: {kept}")

    @property
    def keeps_everything(self) -> bool:
        return self.results is None and self.events is None and self.files is None


def retention_policy(settings: Settings) -> RetentionPolicy:
    """The policy the ``retention_*_days`` settings describe (0 days: keep forever)."""

    def kept(days: int) -> timedelta | None:
        return timedelta(days=days) if days > 0 else None

    return RetentionPolicy(
        results=kept(settings.retention_results_days),
        events=kept(settings.retention_events_days),
        files=kept(settings.retention_files_days),
    )


@dataclass
class PurgeReport:
    """What one purge deleted. ``generations`` counts those of groups and batches too;
    ``files`` those of purged batches too; ``blobs`` the blobs removed after the rows.
    ``done`` is False when the purge stopped at ``max_rows`` with more possibly due."""

    generations: int = 0
    groups: int = 0
    batches: int = 0
    events: int = 0
    attempts: int = 0
    files: int = 0
    blobs: int = 0
    done: bool = True

    @property
    def rows(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name not in ("blobs", "done"))

    def __str__(self) -> str:
        counts = ", ".join(
            f"{getattr(self, f.name)} {f.name}"
            for f in fields(self)
            if f.name != "done" and getattr(self, f.name)
        )
        return (counts or "nothing") + ("" if self.done else " (more due)")


Step = Callable[[int], Awaitable[int]]


class Retention:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def purge(
        self,
        policy: RetentionPolicy,
        *,
        blobs: BlobRemover,
        now: datetime | None = None,
        batch: int = 500,
        max_rows: int = 5000,
    ) -> PurgeReport:
        """Delete what ``policy`` no longer keeps, as of ``now``: chunks of at most ``batch``
        rows, about ``max_rows`` rows in all (call again while ``done`` is False to go on)."""
        if batch < 1 or max_rows < 1:
            raise ValueError("batch and max_rows must be at least 1")
        now = now or utcnow()
        report = PurgeReport()
        keys: list[str] = []  # blobs of committed deletions only
        steps: list[Step] = []
        if policy.results is not None:
            cutoff = now - policy.results
            steps += [
                lambda limit: self._generations(cutoff, limit, report),
                lambda limit: self._groups(cutoff, limit, report),
                lambda limit: self._batches(cutoff, limit, report, keys),
            ]
        if policy.events is not None:
            events_cutoff = now - policy.events
            steps.append(lambda limit: self._events(events_cutoff, now, limit, report))
        if policy.files is not None:
            files_cutoff = now - policy.files
            steps.append(lambda limit: self._files(files_cutoff, limit, report, keys))
        budget = max_rows
        try:
            while steps and budget > 0:
                for step in list(steps):
                    if budget <= 0:
                        break
                    deleted = await step(min(batch, budget))
                    budget -= deleted
                    if deleted == 0:
                        steps.remove(step)
        finally:
            report.blobs = await _remove(blobs, keys)
        report.done = not steps
        return report

    async def _generations(self, cutoff: datetime, limit: int, report: PurgeReport) -> int:
        """Finished generations of neither a group nor a batch."""
        pick = (
            sa.select(G.c.id)
            # the partial index's own predicate; only finished rows have a finished_at (the
            # DELETE checks the state: a condition on it here would lead SQLite to the state
            # indexes instead)
            .where(sa.text(STANDALONE), G.c.finished_at < cutoff)
            .order_by(G.c.finished_at)  # along the partial index, stopping at ``limit``
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with self._db.writer.begin() as conn:
            res = await conn.execute(
                G.delete().where(G.c.id.in_(pick.scalar_subquery()), one_of(G.c.state, FINISHED))
            )
        deleted = int(res.rowcount)
        report.generations += deleted
        return deleted

    async def _groups(self, cutoff: datetime, limit: int, report: PurgeReport) -> int:
        """Whole groups, each with its generations, about ``limit`` rows (at least one group)."""
        unfinished = sa.exists().where(G.c.group_id == groups.c.id, one_of(G.c.state, UNFINISHED))
        async with self._db.writer.begin() as conn:
            due = (
                await conn.execute(
                    sa.select(groups.c.id, groups.c.size)
                    .where(
                        groups.c.completed_at < cutoff,
                        one_of(groups.c.status, GROUP_FINISHED),
                        ~unfinished,
                    )
                    .order_by(groups.c.completed_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True, of=groups)
                )
            ).all()
            chosen: list[str] = []
            size = 0
            for group_id, members in due:
                if chosen and size + members + 1 > limit:
                    break
                chosen.append(group_id)
                size += members + 1
            if not chosen:
                return 0
            gens = await conn.execute(G.delete().where(G.c.group_id.in_(chosen)))
            rows = await conn.execute(groups.delete().where(groups.c.id.in_(chosen)))
        report.generations += int(gens.rowcount)
        report.groups += int(rows.rowcount)
        return int(gens.rowcount) + int(rows.rowcount)

    async def _batches(
        self, cutoff: datetime, limit: int, report: PurgeReport, keys: list[str]
    ) -> int:
        """Finished batches: up to ``limit`` of their generations, and each batch whose last
        ones go, with its output and error files."""
        finished_before = sa.or_(
            *(sa.and_(B.c.status == s.value, B.c[f"{s.value}_at"] < cutoff) for s in BATCH_FINISHED)
        )
        unfinished = sa.exists().where(G.c.batch_id == B.c.id, one_of(G.c.state, UNFINISHED))
        gens = batch_rows = file_rows = 0
        blob_keys: list[str] = []
        async with self._db.writer.begin() as conn:
            due = (
                await conn.execute(
                    sa.select(B.c.id, B.c.output_file_id, B.c.error_file_id)
                    .where(finished_before, ~unfinished)
                    .limit(limit)
                    .with_for_update(skip_locked=True, of=B)
                )
            ).all()
            for batch_id, output_file_id, error_file_id in due:
                room = limit - gens - batch_rows - file_rows
                if room <= 0:
                    break
                pick = sa.select(G.c.id).where(G.c.batch_id == batch_id).limit(room)
                res = await conn.execute(G.delete().where(G.c.id.in_(pick.scalar_subquery())))
                gens += int(res.rowcount)
                if res.rowcount == room:  # perhaps more left: the batch goes in a later chunk
                    break
                own = [f for f in (output_file_id, error_file_id) if f is not None]
                removed = (
                    await conn.execute(
                        F.delete()
                        .where(sa.or_(F.c.batch_id == batch_id, F.c.id.in_(own)))
                        .returning(F.c.blob)
                    )
                ).all()
                blob_keys += [r.blob for r in removed if r.blob is not None]
                file_rows += len(removed)
                await conn.execute(B.delete().where(B.c.id == batch_id))
                batch_rows += 1
        keys += blob_keys  # committed: the blobs may go now
        report.generations += gens
        report.batches += batch_rows
        report.files += file_rows
        return gens + batch_rows + file_rows

    async def _events(
        self, cutoff: datetime, now: datetime, limit: int, report: PurgeReport
    ) -> int:
        """Settled events and their attempts. ``next_attempt_at`` is the last attempt's time; one
        still in the future (held for a disabled endpoint, then failed when it was deleted) was
        never attempted again, and counts from the event's creation."""
        settled_before = sa.or_(
            W.c.next_attempt_at < cutoff,
            sa.and_(W.c.next_attempt_at > now, W.c.created_at < cutoff),
        )
        pick = (
            sa.select(W.c.id)
            .where(one_of(W.c.state, SETTLED), settled_before)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with self._db.writer.begin() as conn:
            ids: Sequence[str] = (
                (
                    await conn.execute(
                        W.delete()
                        .where(W.c.id.in_(pick.scalar_subquery()), one_of(W.c.state, SETTLED))
                        .returning(W.c.id)
                    )
                )
                .scalars()
                .all()
            )
            attempts = 0
            if ids:
                res = await conn.execute(A.delete().where(A.c.event_id.in_(ids)))
                attempts = int(res.rowcount)
        report.events += len(ids)
        report.attempts += attempts
        return len(ids) + attempts

    async def _files(
        self, cutoff: datetime, limit: int, report: PurgeReport, keys: list[str]
    ) -> int:
        """Files deleted or expired before ``cutoff``, unless a batch is still reading one."""
        reading = sa.exists().where(
            B.c.input_file_id == F.c.id,
            sa.or_(
                B.c.status == BatchStatus.VALIDATING.value,
                sa.and_(one_of(B.c.status, BATCH_RUNNING), B.c.loaded < B.c.total),
            ),
        )
        pick = (
            sa.select(F.c.id)
            .where(sa.or_(F.c.deleted_at < cutoff, F.c.expires_at < cutoff), ~reading)
            .limit(limit)
            .with_for_update(skip_locked=True, of=F)
        )
        async with self._db.writer.begin() as conn:
            removed = (
                await conn.execute(
                    F.delete().where(F.c.id.in_(pick.scalar_subquery())).returning(F.c.blob)
                )
            ).all()
        keys += [r.blob for r in removed if r.blob is not None]
        report.files += len(removed)
        return len(removed)


async def _remove(blobs: BlobRemover, keys: Sequence[str]) -> int:
    """Remove the blobs of deleted rows; one that cannot be removed is only left behind."""
    removed = 0
    for key in keys:
        try:
            await blobs.delete(key)
        except (OSError, ValueError):
            log.warning("retention: blob %s could not be removed; left behind", key, exc_info=True)
        else:
            removed += 1
    return removed
