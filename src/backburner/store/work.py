"""Generations on the worker side: claim under a lease, heartbeat, finish, give back; and the
maintenance that recovers lost leases and expires overdue work.

Every write is a compare-and-set on the current state (allowed sources from
:func:`backburner.core.states.sources`) and, for running work, on the lease: each claim holds its
own lease token (``lease_owner``), so a run whose lease was taken away records nothing, even when
the same worker has claimed that generation again since. Lease times are read off the database's
clock (:meth:`Database.clock`), never a worker's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.core.outcome import Outcome
from backburner.core.prefix import Candidate
from backburner.core.states import GroupStatus, State, StateMessage, can_transition, sources
from backburner.errors import ServiceUnavailable
from backburner.schemas.generation import GenerationRecord
from backburner.store import codec
from backburner.store.base import Database, one_of, unreachable
from backburner.store.idempotency import IdempotencyKeys
from backburner.store.queue import HELD, TERMINAL_COLS, back_in_queue
from backburner.store.tables import UTCDateTime, generations, groups
from backburner.store.terminal import Terminal
from backburner.store.usage import Tally, Usage, day_of

G = generations
#: deadlines closer than this count as the same (the lines of one batch, say)
EDF_SLACK = timedelta(seconds=60)
#: a tenant found with nothing due soon is not looked at again for this long (new urgent work
#: waits at most this much longer for its earliest-first turn)
CALM_SECONDS = 1.0
Chooser = Callable[[Sequence[Candidate], int], Sequence[Candidate]]
"""Picks up to ``n`` of a window of queued generations (given in fair order) to claim."""
Leases = Mapping[str, str]
"""Generation id -> the lease token its claim holds (what :meth:`Work.claim` was given)."""
CLEARED = {"lease_owner": None, "lease_expires_at": None}


def _held(leases: Leases) -> sa.ColumnElement[bool]:
    """Rows whose (id, lease token) pair is one of ``leases``."""
    return sa.tuple_(G.c.id, G.c.lease_owner).in_(list(leases.items()))


def _stored(outcome: Outcome) -> tuple[str, str | None]:
    """An outcome's message and response as their columns hold them, or
    :class:`~backburner.store.codec.Unstorable`."""
    message = codec.checked_text(outcome.message, "the message")
    if outcome.response is None:
        return message, None
    return message, codec.answer(outcome.response)


_RAW_EXPIRES_AT = sa.type_coerce(G.c.expires_at, sa.String)
_UTC = UTCDateTime()


def _utc(raw: Any) -> datetime | None:
    return _UTC.process_result_value(raw, None)  # type: ignore[arg-type]  # unused there


class Work:
    def __init__(
        self, db: Database, terminal: Terminal, idempotency: IdempotencyKeys, usage: Usage
    ) -> None:
        self._db = db
        self._terminal = terminal
        self._idempotency = idempotency
        self._usage = usage
        # tenant -> (when, bound): it had no runnable work due before ``bound`` at ``when``
        self._calm: dict[str, tuple[float, datetime]] = {}

    async def claim(
        self,
        lease: str,
        models: Iterable[str],
        limit: int,
        lease_seconds: float,
        *,
        choose: Chooser | None = None,
        window: int = 0,
        horizon: float = 3600.0,
    ) -> list[GenerationRecord]:
        """Atomically take up to ``limit`` runnable generations for ``models`` under the lease
        token ``lease`` (unique per claim: it fences this run's writes).

        Plain: the first ``limit`` in fair order. With ``choose``: the first ``window`` in fair
        order are read (locked) and ``choose(window, limit)`` picks which to take, e.g. prefix
        runs (:mod:`backburner.scheduler.prefix_runs`). Then, inside each tenant's picks, work
        due within ``horizon`` seconds goes first, sooner before later
        (:meth:`_earliest_first`). The records come back in pick order."""
        models = list(models)
        if limit <= 0 or not models:
            return []
        now = utcnow()
        runnable = (
            one_of(G.c.state, sources(State.IN_PROGRESS)),
            G.c.available_at <= now,
            G.c.model.in_(models),
            G.c.fair_key < HELD,  # a disabled tenant's work is held (store/tenants.py)
        )
        take = (
            G.update()
            .values(
                state=State.IN_PROGRESS.value,
                state_message=StateMessage.RUNNING,
                lease_owner=lease,
                lease_expires_at=self._db.clock(lease_seconds),
                attempts=G.c.attempts + 1,
                dispatched_at=sa.func.coalesce(
                    G.c.dispatched_at, sa.bindparam("now", now, type_=G.c.dispatched_at.type)
                ),
            )
            .returning(G)
        )
        if choose is None:  # plain fair order
            window = limit

            def choose(seen: Sequence[Candidate], n: int) -> Sequence[Candidate]:
                return seen[:n]

        view = (
            # the deadline as the driver gives it: converted for the picks only (a window is
            # up to thousands of rows and most are not taken)
            sa.select(G.c.id, G.c.prefix_key, G.c.fair_key, G.c.tenant, _RAW_EXPIRES_AT)
            .where(*runnable)
            .order_by(G.c.fair_key)
            .limit(max(window, limit))
            .with_for_update(skip_locked=True)
        )
        async with self._db.writer.begin() as conn:
            seen = [Candidate(*r) for r in (await conn.execute(view)).all()]
            picks = [replace(c, deadline=_utc(c.deadline)) for c in choose(seen, limit)]
            if not picks:
                return []
            due = now + timedelta(seconds=horizon)
            picks = await self._earliest_first(conn, picks, runnable, due)
            chosen = [c.id for c in picks]
            rows = (await conn.execute(take.where(G.c.id.in_(chosen)))).all()
        order = {gid: i for i, gid in enumerate(chosen)}
        recs = [codec.generation(r) for r in rows]
        recs.sort(key=lambda r: order[r.id])
        return recs

    async def _earliest_first(
        self,
        conn: AsyncConnection,
        picks: list[Candidate],
        runnable: tuple[sa.ColumnElement[bool], ...],
        due: datetime,
    ) -> list[Candidate]:
        """Earliest deadline first inside each tenant's turns: a pick whose tenant has runnable
        work due before ``due`` and sooner than the pick (by more than :data:`EDF_SLACK`) is
        swapped for that work, which takes the pick's fair key while the pick, left queued,
        takes its (later) one. Each tenant keeps exactly the turns it had; only the order of
        its own work changes. Deadlines past ``due`` are far enough to leave the order to
        fairness and prefix runs (a 24 h batch and a 72 h group need no reordering now)."""
        dated = [c.deadline for c in picks if c.deadline is not None]
        if not dated:
            return picks
        bound = min(max(dated) - EDF_SLACK, due)
        tenants = sorted({c.tenant for c in picks})
        now = time.monotonic()
        if all(self._is_calm(t, bound, now) for t in tenants):
            return picks
        bound += timedelta(seconds=CALM_SECONDS)  # what is calm now stays calm a while
        urgent_rows = (
            await conn.execute(
                sa.select(G.c.id, G.c.prefix_key, G.c.fair_key, G.c.tenant, G.c.expires_at)
                .where(
                    G.c.tenant.in_(tenants),
                    *runnable,
                    G.c.expires_at < bound,
                    G.c.id.not_in([c.id for c in picks]),
                )
                .order_by(G.c.expires_at, G.c.fair_key)
                .limit(len(picks))
                .with_for_update(skip_locked=True)
            )
        ).all()
        if len(self._calm) > 10_000:
            self._calm.clear()
        busy = {r[3] for r in urgent_rows}
        for t in tenants:
            if t in busy:
                self._calm.pop(t, None)
            else:
                self._calm[t] = (now, bound)
        if not urgent_rows:
            return picks
        urgent: dict[str, list[Candidate]] = {}
        for r in urgent_rows:
            urgent.setdefault(r[3], []).append(Candidate(*r))
        out = list(picks)
        swaps: list[dict[str, Any]] = []
        for tenant, sooner in urgent.items():
            mine = [i for i, c in enumerate(out) if c.tenant == tenant and c.deadline is not None]
            mine.sort(key=lambda i: out[i].deadline or utcnow(), reverse=True)
            for i in mine:
                pick = out[i]
                if not sooner or pick.deadline is None:
                    break
                if sooner[0].deadline is None or sooner[0].deadline >= pick.deadline - EDF_SLACK:
                    break
                u = sooner.pop(0)
                swaps.append({"b_id": pick.id, "b_key": u.fair_key})
                swaps.append({"b_id": u.id, "b_key": pick.fair_key})
                out[i] = Candidate(u.id, u.prefix_key, pick.fair_key, tenant, u.deadline)
        if swaps:
            await conn.execute(
                G.update()
                .where(G.c.id == sa.bindparam("b_id"))
                .values(fair_key=sa.bindparam("b_key")),
                swaps,
            )
        return out

    def _is_calm(self, tenant: str, bound: datetime, now: float) -> bool:
        seen = self._calm.get(tenant)
        return seen is not None and now - seen[0] < CALM_SECONDS and seen[1] >= bound

    async def heartbeat(self, leases: Leases, lease_seconds: float) -> int:
        """Extend the leases still held (each generation under its own token); returns how
        many."""
        if not leases:
            return 0
        async with self._db.writer.begin() as conn:
            res = await conn.execute(
                G.update()
                .where(
                    G.c.id.in_(
                        # rows a writer holds are being finished: never wait on them (a wait
                        # here let this worker's other leases run out behind a slow write)
                        sa.select(G.c.id)
                        .where(_held(leases), G.c.state == State.IN_PROGRESS.value)
                        .with_for_update(skip_locked=True)
                        .scalar_subquery()
                    )
                )
                .values(lease_expires_at=self._db.clock(lease_seconds))
            )
        return int(res.rowcount)

    async def finish(self, leases: Leases, outcomes: Sequence[Outcome]) -> list[str]:
        """Record outcomes of generations held under ``leases``, in one transaction.

        Only generations still In Progress under the very lease token given for them are
        written (they are locked first, and each outcome must be a transition the table allows
        from the state read), so a run whose lease was taken away records nothing. Three
        statements whatever the batch size: lock-and-read, then one executemany per kind.
        Returns the ids of groups that completed.

        Nothing is written when it raises: :class:`~backburner.store.codec.Unstorable` (before
        any query) when an outcome holds what no column can (``reason`` says what),
        :class:`~backburner.errors.ServiceUnavailable` when the database
        could not be reached (the same call may succeed later), or what the database raised
        when it refused the write.
        """
        if not outcomes:
            return []
        stored = {o.generation_id: _stored(o) for o in outcomes}
        try:
            return await self._finish(leases, outcomes, stored)
        except Exception as exc:
            if unreachable(exc):
                said = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise ServiceUnavailable(
                    f"the database could not be reached: {codec.printable(said, 200)}"
                ) from exc
            raise

    async def _finish(
        self,
        leases: Leases,
        outcomes: Sequence[Outcome],
        stored: dict[str, tuple[str, str | None]],
    ) -> list[str]:
        now = utcnow()
        async with self._db.writer.begin() as conn:
            # locked by primary key, the lease checked here: PostgreSQL plans a row-valued
            # ``(id, lease_owner) IN (...)`` as a filter over every In Progress row (1.3 ms
            # for 256 outcomes, growing with the queue), ``id IN (...)`` as key lookups
            rows = (
                await conn.execute(
                    sa.select(
                        G.c.id,
                        G.c.tenant,
                        G.c.model,
                        G.c.group_id,
                        G.c.webhook_id,
                        G.c.batch_id,
                        G.c.state,
                        G.c.lease_owner,
                    )
                    .where(
                        G.c.id.in_([o.generation_id for o in outcomes]),
                        G.c.state == State.IN_PROGRESS.value,
                    )
                    .with_for_update()
                )
            ).all()
            owned = {
                r.id: {k: v for k, v in r._mapping.items() if k not in ("lease_owner", "model")}
                for r in rows
                if r.lease_owner is not None and r.lease_owner == leases.get(r.id)
            }
            models = {r.id: r.model for r in rows}
            tally = Tally()
            day = day_of(now)
            done: list[dict[str, Any]] = []
            retry: list[dict[str, Any]] = []
            finished: list[dict[str, Any]] = []
            for o in outcomes:
                row = owned.pop(o.generation_id, None)
                if row is None or not can_transition(State(row["state"]), o.state):
                    continue
                message, response = stored[o.generation_id]
                if o.state is State.QUEUED:
                    retry.append(
                        {
                            "b_id": o.generation_id,
                            "b_msg": message,
                            "b_at": o.retry_at or now,
                            "b_uncount": 0 if o.count_attempt else 1,
                        }
                    )
                    continue
                done.append(
                    {
                        "b_id": o.generation_id,
                        "b_state": o.state.value,
                        "b_msg": message,
                        "b_resp": response,
                    }
                )
                finished.append({**row, "state": o.state.value})
                tally.outcome(row, models[o.generation_id], day, o.state, o.response)
            if done:
                await conn.execute(
                    G.update()
                    .where(G.c.id == sa.bindparam("b_id"))
                    .values(
                        state=sa.bindparam("b_state"),
                        state_message=sa.bindparam("b_msg"),
                        response=sa.bindparam("b_resp"),
                        finished_at=now,
                        **CLEARED,
                    ),
                    done,
                )
            if retry:
                await conn.execute(
                    G.update()
                    .where(G.c.id == sa.bindparam("b_id"))
                    .values(
                        state=State.QUEUED.value,
                        state_message=sa.bindparam("b_msg"),
                        available_at=sa.bindparam("b_at", type_=G.c.available_at.type),
                        # a claim counted this try; work given back unfinished uncounts it
                        attempts=G.c.attempts - sa.bindparam("b_uncount", type_=sa.Integer),
                        fair_key=back_in_queue(),
                        **CLEARED,
                    ),
                    retry,
                )
            completed = await self._terminal.generations_finished(conn, finished, now)
            # usage with the outcome, in its transaction; its rows last (every writer's order)
            await self._usage.add_on(conn, tally)
        self._usage.committed(tally)
        return completed

    async def release(self, leases: Leases) -> int:
        """Give back generations a stopping worker did not finish (the try is not counted)."""
        if not leases:
            return 0
        async with self._db.writer.begin() as conn:
            res = await conn.execute(
                G.update()
                .where(
                    _held(leases),
                    one_of(G.c.state, sources(State.QUEUED, among=[State.IN_PROGRESS])),
                )
                .values(
                    state=State.QUEUED.value,
                    state_message=StateMessage.QUEUED,
                    attempts=sa.case((G.c.attempts > 0, G.c.attempts - 1), else_=0),
                    fair_key=back_in_queue(),
                    **CLEARED,
                )
            )
        return int(res.rowcount)

    async def recover_lost(self, batch: int = 500, give_up_after: int = 10) -> int:
        """In Progress generations whose lease ran out go back to Queued; one that has been
        tried ``give_up_after`` times (it may be what kills its workers) fails instead."""
        now = utcnow()
        pick = (
            sa.select(G.c.id)
            .where(G.c.state == State.IN_PROGRESS.value, G.c.lease_expires_at < self._db.clock())
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        async with self._db.writer.begin() as conn:
            ids = [r[0] for r in (await conn.execute(pick)).all()]
            if not ids:
                return 0
            doomed = (
                await conn.execute(
                    G.update()
                    .where(
                        G.c.id.in_(ids),
                        G.c.attempts >= give_up_after,
                        one_of(G.c.state, sources(State.FAILED, among=[State.IN_PROGRESS])),
                    )
                    .values(
                        state=State.FAILED.value,
                        state_message=f"Failed: its worker was lost on each of {give_up_after}"
                        " or more attempts",
                        finished_at=now,
                        **CLEARED,
                    )
                    .returning(*TERMINAL_COLS)
                )
            ).all()
            if doomed:
                await self._terminal.generations_finished(conn, doomed, now)
            res = await conn.execute(
                G.update()
                .where(
                    G.c.id.in_(ids),
                    # not the ones just given up on (Failed -> Queued is a batch retry)
                    one_of(G.c.state, sources(State.QUEUED, among=[State.IN_PROGRESS])),
                )
                .values(
                    state=State.QUEUED.value,
                    state_message=StateMessage.QUEUED,
                    available_at=now,
                    fair_key=back_in_queue(),
                    **CLEARED,
                )
            )
        return int(res.rowcount) + len(doomed)

    async def expire_overdue(
        self, batch: int = 500, *, idempotency_ttl_seconds: float = 86400.0
    ) -> tuple[int, list[str]]:
        """Queued work past its expiry becomes Failed "Expired"; so do its groups.
        Idempotency-Key answers older than their TTL are dropped on the way."""
        now = utcnow()
        pick = (
            sa.select(G.c.id)
            .where(
                one_of(G.c.state, sources(State.FAILED, among=[State.QUEUED])),
                G.c.expires_at < now,
            )
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        async with self._db.writer.begin() as conn:
            rows = (
                await conn.execute(
                    G.update()
                    .where(G.c.id.in_(pick.scalar_subquery()))
                    .values(
                        state=State.FAILED.value,
                        state_message=StateMessage.EXPIRED,
                        finished_at=now,
                    )
                    .returning(*TERMINAL_COLS)
                )
            ).all()
            await conn.execute(
                groups.update()
                .where(
                    one_of(groups.c.status, sources(GroupStatus.EXPIRED)),
                    groups.c.expires_at < now,
                    groups.c.pending > 0,
                )
                .values(status=GroupStatus.EXPIRED.value)
            )
            completed = await self._terminal.generations_finished(conn, rows, now)
            await self._idempotency.purge(conn, now - timedelta(seconds=idempotency_ttl_seconds))
        return len(rows), completed
