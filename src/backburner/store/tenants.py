"""Tenants: who may submit how much (limits), whose turn is how long (weights), and who is
disabled (keys refused, queued work held).

Every submission is admitted by :meth:`Tenants.admit` inside its own transaction, on the
tenant's row locked first: the checks, the counts they read and the write they make commit or
roll back together, so two API processes racing for a tenant's last unit of a limit cannot both
win (PostgreSQL serialises them on the row lock, SQLite on its one writer). What is refused
stores nothing.

- ``max_queued_generations``: the row's ``accepted_generations``, raised here, less
  ``tenant_finished.finished``, raised by :class:`~backburner.store.terminal.Terminal` when a
  generation becomes terminal (a row of its own: finishing never waits on a submission);
- ``max_batch_lines_in_flight``: the lines of the tenant's unfinished batches;
- ``requests_per_minute``: a GCRA cell per tenant in ``rate_limits`` (:mod:`.rates`);
- ``tokens_per_day``: today's row sums in ``usage`` (:mod:`.usage`).

A disabled tenant's queued generations are *held*: their fair keys move above
:data:`~backburner.store.queue.HELD`, where no claim looks. Enabling moves them back to the
front of the fair order, in their old order, as if they had just arrived.
"""

from __future__ import annotations

import builtins
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.states import BATCH_RUNNING, BatchStatus
from backburner.errors import Conflict, NotFound, TenantDisabled, TooManyRequests
from backburner.schemas.tenants import Limit, Limits, Tenant
from backburner.store import rates, requeue
from backburner.store.base import Database, one_of
from backburner.store.queue import fair_keys, step_for
from backburner.store.tables import batches, files, generations, tenant_finished, tenants
from backburner.store.usage import Tally, Usage, day_of

T = tenants
G = generations
B = batches
#: a full queue: try again when enough has finished at the tenant's pace over the last
#: PACE_SECONDS (this many seconds when nothing finished then), at most MAX_QUEUE_WAIT
QUEUE_RETRY_AFTER = 10.0
PACE_SECONDS = 60.0
PACE_SAMPLE_SECONDS = 5.0
MAX_QUEUE_WAIT = 300.0
Bucket = Literal["submit", "realtime"]
#: a batch whose lines count against max_batch_lines_in_flight
LINES_IN_FLIGHT = (BatchStatus.VALIDATING, *BATCH_RUNNING, BatchStatus.FINALIZING)


@dataclass(frozen=True, slots=True)
class Admitted:
    """What an admitted submission of generations gets: its fair keys."""

    first_key: int
    step: int


F = tenant_finished
# a tenant's row with how many of its generations finished (open = accepted - finished)
_ROW = sa.select(
    T,
    sa.func.coalesce(
        sa.select(F.c.finished).where(F.c.tenant == T.c.tenant).scalar_subquery(), 0
    ).label("finished"),
)


def _tenant(row: Any, defaults: Limits) -> Tenant:
    m = row._mapping
    own: dict[str, Limit] = json.loads(m["limits"]) if m["limits"] else {}
    return Tenant(
        id=m["tenant"],
        weight=float(m["weight"]),
        disabled=m["disabled_at"] is not None,
        disabled_at=m["disabled_at"],
        created_at=m["created_at"],
        limits=own,
        effective_limits=defaults.merged(own),
        open_generations=int(m["accepted_generations"]) - int(m["finished"]),
    )


def _monotonic() -> float:
    return time.monotonic()


def _seconds_to_midnight(now: datetime) -> float:
    tomorrow = (now.astimezone(UTC) + timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return max(1.0, (tomorrow - now).total_seconds())


def _not_found(tenant: str) -> NotFound:
    return NotFound(f"No tenant '{tenant[:128]}'.", param="id")


class Tenants:
    def __init__(self, db: Database, usage: Usage, defaults: Limits | None = None) -> None:
        self._db = db
        self._usage = usage
        #: the ``[limits]`` table: what a tenant without its own limits gets
        self.defaults = defaults or Limits()
        # tenant -> (read at, record): realtime checks read a tenant at most once a second
        self._cache: dict[str, tuple[float, Tenant | None]] = {}
        # tenant -> (day, read at, tokens used that day): and its tokens as often
        self._tokens_seen: dict[str, tuple[str, float, int]] = {}
        usage.on_written.append(self._tokens_written)
        # tenant -> [(monotonic time, finished count)]: the pace a full queue's Retry-After uses
        self._finished_seen: dict[str, list[tuple[float, int]]] = {}
        # SQLite's realtime requests per minute, counted in this process
        self._local = rates.LocalCells()

    # -- admission ----------------------------------------------------------------------------

    async def _locked(self, conn: AsyncConnection, tenant: str, now: datetime) -> Any:
        await self._db.insert_ignore(
            conn, T, {"tenant": tenant, "vclock": 0, "weight": 1.0, "created_at": now}
        )
        q = _ROW.where(T.c.tenant == tenant).with_for_update(of=T)
        return (await conn.execute(q)).one()

    async def admit(
        self,
        conn: AsyncConnection,
        tenant: str,
        *,
        generations: int = 0,
        batch_lines: int = 0,
        bucket: Bucket | None = "submit",
    ) -> Admitted:
        """Check ``tenant``'s limits for a submission of ``generations`` slow or group
        generations (or a batch of ``batch_lines`` lines), on the caller's transaction, and
        count it; raises :class:`TenantDisabled` or :class:`TooManyRequests`."""
        now = utcnow()
        row = await self._locked(conn, tenant, now)
        t = _tenant(row, self.defaults)
        if t.disabled:
            raise TenantDisabled(tenant)
        lim = t.effective_limits
        if bucket is not None:
            await self._rate(conn, tenant, bucket, lim, now)
        await self._tokens(conn, tenant, lim, now)
        if generations and lim.max_queued_generations is not None:
            cap = lim.max_queued_generations
            self._note_finished(tenant, int(row._mapping["finished"]))
            if t.open_generations + generations > cap:
                fits = generations <= cap
                wait = None
                if fits:
                    need = t.open_generations + generations - cap
                    wait = self._queue_wait(tenant, need, int(row._mapping["finished"]))
                raise TooManyRequests(
                    f"tenant '{tenant}' has reached its limit of {cap} queued generations"
                    f" (max_queued_generations = {cap}): {t.open_generations} are Queued or"
                    f" In Progress and this request adds {generations}."
                    + (
                        " Retry when some have finished."
                        if fits
                        else f" A request of {generations} never fits: send at most {cap}."
                    ),
                    limit="max_queued_generations",
                    retry_after=wait,
                )
        if batch_lines and lim.max_batch_lines_in_flight is not None:
            cap = lim.max_batch_lines_in_flight
            busy = await self._batch_lines_in_flight(conn, tenant)
            if busy + batch_lines > cap:
                fits = batch_lines <= cap
                raise TooManyRequests(
                    f"tenant '{tenant}' has reached its limit of {cap} batch lines in flight"
                    f" (max_batch_lines_in_flight = {cap}): its unfinished batches hold {busy}"
                    f" lines and this batch adds {batch_lines}."
                    + (
                        " Retry when a batch has finished."
                        if fits
                        else f" A batch of {batch_lines} lines never fits: split it."
                    ),
                    limit="max_batch_lines_in_flight",
                    retry_after=QUEUE_RETRY_AFTER if fits else None,
                )
        step = step_for(t.weight)
        if not generations:
            return Admitted(0, step)
        await conn.execute(
            T.update()
            .where(T.c.tenant == tenant)
            .values(accepted_generations=T.c.accepted_generations + generations)
        )
        first = await fair_keys(conn, tenant, generations, int(row._mapping["vclock"]), step)
        return Admitted(first, step)

    async def disabled(self, conn: AsyncConnection, tenant: str) -> bool:
        at = (
            await conn.execute(sa.select(T.c.disabled_at).where(T.c.tenant == tenant))
        ).scalar_one_or_none()
        return at is not None

    def _queue_wait(self, tenant: str, need: int, finished: int) -> float:
        """Seconds until ``need`` of ``tenant``'s open generations have finished, at the pace
        its finished count grew over the last minute as this process saw it (no query: a
        tenant at its limit may be refused many times a second), within 1 s to 5 min;
        :data:`QUEUE_RETRY_AFTER` with no pace to go by."""
        seen = self._finished_seen.get(tenant)
        if not seen:
            return QUEUE_RETRY_AFTER
        at, then = seen[0]
        elapsed, done = _monotonic() - at, finished - then
        if elapsed < 1.0 or done <= 0:
            return QUEUE_RETRY_AFTER
        return min(MAX_QUEUE_WAIT, max(1.0, need * elapsed / done))

    def _note_finished(self, tenant: str, finished: int) -> None:
        """A sample of ``tenant``'s finished count: at most one per PACE_SAMPLE_SECONDS, the
        last minute's kept."""
        now = _monotonic()
        seen = self._finished_seen.get(tenant)
        if seen is None:
            if len(self._finished_seen) > 10_000:
                self._finished_seen.clear()
            seen = self._finished_seen[tenant] = []
        if seen and now - seen[-1][0] < PACE_SAMPLE_SECONDS:
            return
        seen.append((now, finished))
        while len(seen) > 2 and now - seen[1][0] >= PACE_SECONDS:
            seen.pop(0)

    async def keys(self, conn: AsyncConnection, tenant: str, n: int) -> Admitted:
        """Fair keys for ``n`` lines of an admitted batch, on the caller's transaction."""
        row = await self._locked(conn, tenant, utcnow())
        step = step_for(float(row._mapping["weight"]))
        first = await fair_keys(conn, tenant, n, int(row._mapping["vclock"]), step)
        return Admitted(first, step)

    async def _rate(
        self, conn: AsyncConnection, tenant: str, bucket: Bucket, lim: Limits, now: datetime
    ) -> None:
        name = "requests_per_minute" if bucket == "submit" else "realtime_requests_per_minute"
        per_minute: int | None = getattr(lim, name)
        if per_minute is None:
            return
        wait = await rates.take(self._db, conn, tenant, bucket, per_minute, now.timestamp())
        self._refuse_rate(tenant, bucket, per_minute, wait)

    @staticmethod
    def _refuse_rate(tenant: str, bucket: Bucket, per_minute: int, wait: float | None) -> None:
        if wait is None:
            return
        name = "requests_per_minute" if bucket == "submit" else "realtime_requests_per_minute"
        what = "submissions" if bucket == "submit" else "realtime requests"
        raise TooManyRequests(
            f"tenant '{tenant}' has reached its limit of {per_minute} {what} per minute"
            f" ({name} = {per_minute})."
            + (f" Retry in {math.ceil(wait)} s." if math.isfinite(wait) else ""),
            limit=name,
            retry_after=wait if math.isfinite(wait) else None,
        )

    async def _tokens(
        self, conn: AsyncConnection | None, tenant: str, lim: Limits, now: datetime, extra: int = 0
    ) -> None:
        cap = lim.tokens_per_day
        if cap is None:
            return
        used = await self._usage.tokens_on(conn, tenant, day_of(now)) + extra
        self._refuse_tokens(tenant, cap, used, now)

    @staticmethod
    def _refuse_tokens(tenant: str, cap: int, used: int, now: datetime) -> None:
        if used < cap:
            return
        raise TooManyRequests(
            f"tenant '{tenant}' has used {used} of its {cap} tokens today (tokens_per_day ="
            f" {cap})"
            + ("; the count starts again at 00:00 UTC." if cap else ": none are allowed."),
            limit="tokens_per_day",
            retry_after=_seconds_to_midnight(now) if cap else None,
        )

    async def _batch_lines_in_flight(self, conn: AsyncConnection, tenant: str) -> int:
        rows = (
            await conn.execute(
                sa.select(B.c.total, B.c.completed, B.c.failed, files.c.lines, B.c.status)
                .select_from(B.outerjoin(files, files.c.id == B.c.input_file_id))
                .where(B.c.tenant == tenant, one_of(B.c.status, LINES_IN_FLIGHT))
            )
        ).all()
        # a batch still validating counts as its file's lines, at least one (as it was admitted)
        return sum(
            max(1, int(r[3] or 0))
            if r[4] == BatchStatus.VALIDATING.value
            else max(0, int(r[0] or 0) - int(r[1]) - int(r[2]))
            for r in rows
        )

    async def check_realtime(
        self, tenant: str, pending_tokens: int | Callable[[], int] = 0
    ) -> None:
        """A realtime request of ``tenant``: refused when disabled, over today's tokens
        (``pending_tokens``: this process's, not yet written) or over its realtime requests per
        minute. Reads the tenant and its tokens at most once a second. The per-minute count is
        the database's on PostgreSQL (one small write, not waiting for the disk), this
        process's on SQLite (a write there would queue behind the worker's on the one
        writer)."""
        t = await self.cached(tenant)
        if t is None:
            t = Tenant(
                id=tenant, weight=1.0, disabled=False, effective_limits=self.defaults.merged({})
            )
        if t.disabled:
            raise TenantDisabled(tenant)
        lim = t.effective_limits
        now = utcnow()
        if lim.tokens_per_day is not None:
            extra = pending_tokens() if callable(pending_tokens) else pending_tokens
            used = await self._tokens_today(tenant, now)
            self._refuse_tokens(tenant, lim.tokens_per_day, used + extra, now)
        per_minute = lim.realtime_requests_per_minute
        if per_minute is None:
            return
        if self._db.sqlite:
            self._refuse_rate(
                tenant,
                "realtime",
                per_minute,
                self._local.take(tenant, per_minute, now.timestamp()),
            )
            return
        async with self._db.writer.begin() as conn:
            # losing the last moments of a rate cell in a crash is harmless: no flush waited for
            await conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
            await self._rate(conn, tenant, "realtime", lim, now)

    def _tokens_written(self, tally: Tally) -> None:
        """Tokens written by this process: its cached counts of them are stale."""
        for tenant, *_ in tally.counts:
            self._tokens_seen.pop(tenant, None)

    async def _tokens_today(self, tenant: str, now: datetime) -> int:
        day = day_of(now)
        seen = self._tokens_seen.get(tenant)
        mono = _monotonic()
        if seen is not None and seen[0] == day and mono - seen[1] < 1.0:
            return seen[2]
        used = await self._usage.tokens_on(None, tenant, day)
        if len(self._tokens_seen) > 10_000:
            self._tokens_seen.clear()
        self._tokens_seen[tenant] = (day, mono, used)
        return used

    async def cached(self, tenant: str, max_age: float = 1.0) -> Tenant | None:
        seen = self._cache.get(tenant)
        now = _monotonic()
        if seen is not None and now - seen[0] < max_age:
            return seen[1]
        found = await self.find(tenant)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[tenant] = (now, found)
        return found

    def forget(self, tenant: str | None = None) -> None:
        """Drop cached tenants (this process saw a change)."""
        if tenant is None:
            self._cache.clear()
        else:
            self._cache.pop(tenant, None)

    # -- the admin's side ---------------------------------------------------------------------

    async def find(self, tenant: str) -> Tenant | None:
        async with self._db.reader.connect() as conn:
            row = (await conn.execute(_ROW.where(T.c.tenant == tenant))).first()
        return None if row is None else _tenant(row, self.defaults)

    async def get(self, tenant: str) -> Tenant:
        found = await self.find(tenant)
        if found is None:
            raise _not_found(tenant)
        return found

    async def create(
        self, tenant: str, *, weight: float = 1.0, limits: dict[str, Limit] | None = None
    ) -> Tenant:
        """A tenant with its own weight and limits; Conflict when it exists (a tenant that
        only ever submitted exists too, with the defaults)."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            found = (await conn.execute(sa.select(T.c.tenant).where(T.c.tenant == tenant))).first()
            if found is not None:
                raise Conflict(
                    f"tenant '{tenant}' exists already; change it with PATCH"
                    f" /v1/admin/tenants/{tenant}",
                    code="tenant_exists",
                )
            await conn.execute(
                T.insert().values(
                    tenant=tenant,
                    vclock=0,
                    weight=weight,
                    limits=json.dumps(limits) if limits else None,
                    created_at=now,
                    accepted_generations=0,
                )
            )
        self.forget(tenant)
        return await self.get(tenant)

    async def list(self, *, after: str | None = None, limit: int = 100) -> builtins.list[Tenant]:
        q = _ROW.order_by(T.c.tenant).limit(limit)
        if after is not None:
            q = q.where(T.c.tenant > after)
        async with self._db.reader.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_tenant(r, self.defaults) for r in rows]

    async def update(
        self,
        tenant: str,
        *,
        weight: float | None = None,
        limits: dict[str, int | str | None] | None = None,
        disabled: bool | None = None,
    ) -> Tenant:
        """Change what is given. ``limits``: a number or None sets the tenant's own limit,
        ``"default"`` drops it. Disabling holds the queued work, enabling releases it; a new
        weight re-spaces the queued work's fair keys at once."""
        async with self._db.writer.begin() as conn:
            row = (
                await conn.execute(sa.select(T).where(T.c.tenant == tenant).with_for_update())
            ).first()
            if row is None:
                raise _not_found(tenant)
            m = row._mapping
            values: dict[str, Any] = {}
            if limits:
                own: dict[str, Any] = json.loads(m["limits"]) if m["limits"] else {}
                for k, v in limits.items():
                    if v == "default":
                        own.pop(k, None)
                    else:
                        own[k] = v
                values["limits"] = json.dumps(own) if own else None
            old_weight = float(m["weight"])
            if weight is not None:
                values["weight"] = weight
            was_disabled = m["disabled_at"] is not None
            if disabled is not None and disabled != was_disabled:
                values["disabled_at"] = utcnow() if disabled else None
            if values:
                await conn.execute(T.update().where(T.c.tenant == tenant).values(**values))
        # the tenant's row is committed first: submissions see the change from now on; the
        # queued work moves in its own transaction, rows before the tenant's (the order
        # every writer locks them in)
        self.forget(tenant)
        if weight is not None and step_for(weight) != step_for(old_weight):
            await requeue.rescale(self._db, tenant, step_for(old_weight), step_for(weight))
        if disabled is True:
            await self.hold(tenant)
        elif disabled is False and was_disabled:
            await requeue.release(self._db, tenant)
        return await self.get(tenant)

    async def hold(self, tenant: str) -> int:
        """Hold ``tenant``'s queued work (idempotent); returns how many were moved."""
        return await requeue.hold(self._db, tenant)

    async def recount(self, tenant: str | None = None) -> int:
        """Set ``open_generations`` from the generations themselves (a repair: the count is
        kept in step by every path that opens or finishes work). Returns the tenants fixed."""
        return await requeue.recount(self._db, tenant)
