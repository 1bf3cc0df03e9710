"""The worker: a claim loop per backend, a heartbeat, a result writer, maintenance.

Flow of one generation: a backend loop takes the background slots its lane admits (the engine is
idle enough; docs/scheduling.md), claims that many generations (a leased compare-and-set in the
store), runs each on the backend, and queues the outcome; a generation preempted for realtime
traffic is queued again without counting the try; the writer records outcomes a group at a time; the
heartbeat extends leases of everything this worker holds until its outcome is written. A worker
that dies stops heart-beating; maintenance in any worker returns its generations to Queued when
their leases run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from backburner.backends.engines import Engines
from backburner.core.clock import utcnow
from backburner.core.estimate import OpenWork
from backburner.core.ids import lease_owner_id, new_id
from backburner.core.outcome import Outcome
from backburner.core.prefix import Candidate
from backburner.core.retry import Backoff, should_retry
from backburner.core.states import State, StateMessage
from backburner.errors import BackendError, Preempted, ServiceUnavailable
from backburner.metrics import Metrics
from backburner.scheduler.deadlines import work_at_risk
from backburner.scheduler.prefix_runs import PrefixRuns
from backburner.schemas.generation import GenerationRecord
from backburner.store import Store
from backburner.store.codec import Unstorable, printable
from backburner.store.retention import BlobRemover, RetentionPolicy

log = logging.getLogger("backburner.worker")


def _said(exc: Exception) -> str:
    """What an error says, for a message: the reason of an :class:`Unstorable`, else the first
    line of the error (a database error's later lines quote the statement and its values)."""
    if isinstance(exc, Unstorable):
        return exc.reason
    return (str(exc).splitlines() or [type(exc).__name__])[0]


@dataclass
class WorkerOptions:
    max_attempts: int = 3
    idempotency_ttl_seconds: float = 86400.0
    max_lost_leases: int = 10
    lease_seconds: float = 30.0
    poll_interval: float = 0.2
    maintenance_interval: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    claim_size: int = 64
    write_size: int = 256
    shutdown_grace: float = 10.0
    # prefix runs (scheduler/prefix_runs.py): claim from a window of the fair order in runs of
    # one prompt prefix; off: plain fair order
    prefix_runs: bool = True
    prefix_window: int = 256
    prefix_max_runs: int = 2
    prefix_fair_every: int = 16
    prefix_warmup_seconds: float = 2.0
    pace_window_seconds: float = 300.0
    deadline_horizon_seconds: float = 3600.0
    deadline_trickle: int = 1
    # what maintenance deletes once it is old enough (store/retention.py); default: nothing
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)


class Worker:
    def __init__(
        self,
        store: Store,
        engines: Engines,
        options: WorkerOptions | None = None,
        *,
        metrics: Metrics | None = None,
        worker_id: str | None = None,
        on_groups_completed: Callable[[list[str]], Awaitable[None]] | None = None,
        after_write: Callable[[], None] | None = None,
        blobs: BlobRemover | None = None,
    ) -> None:
        self.store = store
        self.engines = engines
        self.opts = options or WorkerOptions()
        self.metrics = metrics or Metrics()
        self.id = worker_id or lease_owner_id("worker")
        self.on_groups_completed = on_groups_completed
        self.after_write = after_write  # e.generation. wake the webhook dispatcher
        self.blobs = blobs  # where purged files' bytes are deleted
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # claimed and not yet written: generation id -> the lease token of its claim
        self._held: dict[str, str] = {}
        # outcomes to write, each with the lease token of the run that produced it
        self._results: asyncio.Queue[tuple[str, Outcome]] = asyncio.Queue(maxsize=4096)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._beat_stop = asyncio.Event()  # set once in-flight work is drained
        self._idle: dict[str, bool] = {}
        self._runs: dict[str, PrefixRuns] = {}  # by lane
        self._at_risk = False

    def wake(self) -> None:
        """New work was submitted in this process: claim now instead of at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    # ------------------------------------------------------------------ main
    async def run(self, *, burst: bool = False) -> None:
        """Run until :meth:`stop`; with ``burst`` return once nothing is claimable or running."""
        if burst:  # a burst is a one-shot drain: a worker may run several in a row
            self._stopping.clear()
            self._beat_stop.clear()
        log.info("worker %s starting (backends: %s)", self.id, ", ".join(self.engines.backends))
        writer = asyncio.create_task(self._writer(), name="bb-writer")
        beat = asyncio.create_task(self._heartbeat(), name="bb-heartbeat")
        maint = None if burst else asyncio.create_task(self._maintenance(), name="bb-maint")
        loops = [
            asyncio.create_task(self._backend_loop(name, burst), name=f"bb-loop-{name}")
            for name, models in self.engines.models_by_backend.items()
            if models
        ]
        try:
            if burst:
                await self.store.work.recover_lost(
                    give_up_after=max(self.opts.max_lost_leases, self.opts.max_attempts)
                )
                await asyncio.gather(*loops)
            else:
                await self._stopping.wait()
        finally:
            # Loops notice _stopping within a poll interval; cancelling them mid-query would
            # leave database drivers' threads answering a loop that may be gone.
            self._stopping.set()
            self._wake.set()
            background = [t for t in (*loops, maint) if t is not None]
            _, late = await asyncio.wait(background, timeout=self.opts.shutdown_grace)
            for t in late:
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._drain_inflight()
            await self._results.join()
            writer.cancel()  # idle: waiting on an empty queue
            await asyncio.gather(writer, return_exceptions=True)
            self._beat_stop.set()
            await asyncio.wait([beat], timeout=self.opts.shutdown_grace)
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            if self._held:
                released = await self.store.work.release(dict(self._held))
                log.info("worker %s released %d unfinished generations", self.id, released)
                self._held.clear()

    async def _drain_inflight(self) -> None:
        tasks = list(self._inflight.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.opts.shutdown_grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _everyone_idle(self) -> bool:
        return all(self._idle.values()) and not self._inflight and self._results.empty()

    async def _backend_loop(self, name: str, burst: bool) -> None:
        lane = self.engines.lanes[name]
        models = self.engines.models_by_backend[name]
        self._idle[name] = False
        settled = False
        while not self._stopping.is_set():
            if lane.free_for_background() == 0:
                await lane.wait_background_capacity(self.opts.poll_interval)
                continue
            n = lane.take_background(self.opts.claim_size)
            try:
                lease, claimed = await self._claim(name, models, n)
            except Exception:
                lane.release_background(n)
                log.exception("claim failed; retrying")
                await asyncio.sleep(self.opts.poll_interval)
                continue
            if len(claimed) < n:
                lane.release_background(n - len(claimed))
            for generation in claimed:
                stale = self._inflight.get(generation.id)
                if stale is not None:
                    # its lease ran out while it ran (the database was unreachable, say) and
                    # this worker claimed it again: the old run could record nothing anyway
                    log.warning(
                        "generation %s claimed again; its stale run is stopped", generation.id
                    )
                    stale.cancel()
                self._held[generation.id] = lease
                task = asyncio.create_task(
                    self._execute(name, generation, lease), name=f"bb-gen-{generation.id}"
                )
                self._inflight[generation.id] = task
            if claimed:
                self._idle[name] = False
                settled = False
                continue
            if burst:
                self._idle[name] = True
                # running work may still write retries that are claimable now: return only
                # after a claim that found nothing once every outcome was written
                if not self._everyone_idle():
                    settled = False
                    await asyncio.sleep(0.01)
                elif settled:
                    return
                else:
                    await self._results.join()
                    settled = True
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.opts.poll_interval)

    async def _claim(
        self, lane: str, models: list[str], n: int
    ) -> tuple[str, list[GenerationRecord]]:
        """Claim up to ``n`` for ``lane`` under a new lease token: in prefix runs, or in plain
        fair order when they are off. Returns the token and what was claimed."""
        lease = self.lease_token()
        runs = self._lane_runs(lane)
        horizon = self.opts.deadline_horizon_seconds
        if runs is None:
            plain = await self.store.work.claim(
                lease, models, n, self.opts.lease_seconds, horizon=horizon
            )
            return lease, plain
        picked: list[Candidate] = []

        allowed = self.engines.affinity(lane)

        def choose(window: Sequence[Candidate], k: int) -> Sequence[Candidate]:
            if allowed is not None:  # a replica takes its own prefixes (and spilled ones)
                window = [c for c in window if allowed(c.prefix_key)]
            picked[:] = runs.choose(window, k)
            return picked

        claimed: list[GenerationRecord] = []
        try:
            claimed = await self.store.work.claim(
                lease,
                models,
                n,
                self.opts.lease_seconds,
                choose=choose,
                window=self.opts.prefix_window,
                horizon=horizon,
            )
            return lease, claimed
        finally:  # picks the claim did not get are not running
            got = {g.id for g in claimed}
            for c in picked:
                if c.id not in got:
                    runs.finished(c.prefix_key)

    def _lane_runs(self, lane: str) -> PrefixRuns | None:
        if not self.opts.prefix_runs:
            return None
        runs = self._runs.get(lane)
        if runs is None:
            runs = self._runs[lane] = PrefixRuns(
                max_runs=self.opts.prefix_max_runs,
                fair_every=self.opts.prefix_fair_every,
                warmup_seconds=self.opts.prefix_warmup_seconds,
            )
        return runs

    def lease_token(self) -> str:
        """A new lease token for one claim: a random part first (unique), then who holds it."""
        return f"{new_id()[:8]}~{self.id}"[:64]

    async def _execute(self, backend: str, generation: GenerationRecord, lease: str) -> None:
        lane = self.engines.lanes[backend]
        me = asyncio.current_task()
        start = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            outcome = await self._attempt(generation, backend)
        finally:
            lane.release_background()
            self.metrics.inflight.dec()
            self.metrics.backend_seconds.labels(backend, "slow").observe(
                time.perf_counter() - start
            )
            if self._inflight.get(generation.id) is me:
                del self._inflight[generation.id]
            runs = self._runs.get(backend)
            if runs is not None and generation.prefix_key in runs.warming:
                runs.finished(generation.prefix_key)
                self._wake.set()  # its siblings may follow now
        await self._results.put((lease, outcome))

    async def _attempt(self, generation: GenerationRecord, lane: str) -> Outcome:
        try:
            response = await self.engines.run_background(generation.kind, generation.request, lane)
        except asyncio.CancelledError:
            raise
        except Preempted as exc:
            self.metrics.preempted.inc()
            return Outcome(generation.id, State.QUEUED, exc.message, count_attempt=False)
        except BackendError as exc:
            return self._failure(generation, exc.message, exc.retryable)
        except Exception as exc:  # an engine bug: treat as transient, keep the message
            log.exception("backend raised unexpectedly for generation %s", generation.id)
            return self._failure(generation, f"internal error: {exc!r}", True)
        return Outcome(generation.id, State.SUCCESS, StateMessage.COMPLETED, response=response)

    def _failure(self, generation: GenerationRecord, message: str, retryable: bool) -> Outcome:
        if should_retry(generation.attempts, self.opts.max_attempts, retryable):
            self.metrics.retried.inc()
            delay = self.opts.backoff.delay(generation.attempts)
            return Outcome(
                generation.id,
                State.QUEUED,
                f"Retrying (attempt {generation.attempts} of {self.opts.max_attempts} failed): "
                + message,
                retry_at=utcnow() + timedelta(seconds=delay),
            )
        if retryable and generation.attempts >= self.opts.max_attempts:
            message = f"Failed after {generation.attempts} attempts: {message}"
        return Outcome(generation.id, State.FAILED, message)

    # ------------------------------------------------------------------ writer
    async def _writer(self) -> None:
        while True:
            taken = [await self._results.get()]
            while len(taken) < self.opts.write_size and not self._results.empty():
                taken.append(self._results.get_nowait())
            # an outcome of a run whose generation was claimed again since is fenced out
            outcomes = [o for lease, o in taken if self._held.get(o.generation_id) == lease]
            try:
                if outcomes:
                    await self._write(outcomes)
            except Exception:  # one group must never stop the writer: the rest are written
                log.exception("the writer failed on %d outcomes", len(outcomes))
            finally:
                for _ in taken:
                    self._results.task_done()

    async def _write(self, outcomes: list[Outcome]) -> None:
        """Record a group of outcomes, then let go of them.

        A group the store will not take is tried once more, then split in halves until an
        outcome it refuses is alone: that one is recorded as Failed ("the engine's answer could
        not be stored"), without what it held; the others as they are. Only a database that
        cannot be reached keeps the writer on the same write (waiting, losing nothing).
        """
        leases = {o.generation_id: self._held[o.generation_id] for o in outcomes}
        written, completed = await self._record(leases, outcomes, retry=True)
        for outcome in outcomes:  # written, or let go for maintenance to take back
            if self._held.get(outcome.generation_id) == leases[outcome.generation_id]:
                del self._held[outcome.generation_id]
        for outcome in written:
            if outcome.state.terminal:
                self.metrics.finished.labels(outcome.state.value).inc()
        if any(outcome.state is State.QUEUED for outcome in written):
            self._wake.set()
        if self.after_write is not None:
            self.after_write()
        if completed:
            self.metrics.groups_completed.inc(len(completed))
            if self.on_groups_completed is not None:
                await self.on_groups_completed(completed)

    async def _record(
        self, leases: dict[str, str], outcomes: list[Outcome], *, retry: bool
    ) -> tuple[list[Outcome], list[str]]:
        """The outcomes written (a refused one replaced by its Failed outcome; one that could
        not be written at all left out) and the groups that completed."""
        try:
            return outcomes, await self._finish(leases, outcomes, retry=retry)
        except Exception as exc:
            if len(outcomes) == 1:
                return await self._record_refused(leases, outcomes[0], exc)
            log.warning(
                "recording %d outcomes failed (%s); recording them in halves",
                len(outcomes),
                _said(exc),
            )
            half = len(outcomes) // 2
            first, first_groups = await self._record(leases, outcomes[:half], retry=False)
            second, second_groups = await self._record(leases, outcomes[half:], retry=False)
            return first + second, first_groups + second_groups

    async def _record_refused(
        self, leases: dict[str, str], outcome: Outcome, exc: Exception
    ) -> tuple[list[Outcome], list[str]]:
        failed = Outcome(
            outcome.generation_id,
            State.FAILED,
            f"Failed: the engine's answer could not be stored: {printable(_said(exc), 200)}",
        )
        log.warning(
            "generation %s: its outcome (%s) could not be recorded: %s; recording it as Failed",
            outcome.generation_id,
            outcome.state.value,
            _said(exc),
        )
        try:
            return [failed], await self._finish(leases, [failed], retry=True)
        except Exception:
            log.exception(
                "generation %s: not even its failure could be recorded; it is let go, and"
                " maintenance takes it back when its lease runs out",
                outcome.generation_id,
            )
            return [], []

    async def _finish(
        self, leases: dict[str, str], outcomes: list[Outcome], *, retry: bool
    ) -> list[str]:
        """``store.work.finish``, waited out while the database cannot be reached; with
        ``retry`` another failure is tried once more before it is raised."""
        delay = 0.1
        again = retry
        while True:
            try:
                return await self.store.work.finish(leases, outcomes)
            except ServiceUnavailable as exc:
                log.warning("recording %d outcomes: %s; waiting", len(outcomes), exc.message)
            except Unstorable:
                raise  # refused before reaching the database: the same again would be too
            except Exception:
                if not again:
                    raise
                again = False
                log.warning("recording %d outcomes failed; once more", len(outcomes), exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------------ leases and upkeep
    async def _heartbeat(self) -> None:
        interval = max(0.05, self.opts.lease_seconds / 3)
        while not self._beat_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_stop.wait(), interval)
            if self._held and not self._beat_stop.is_set():
                try:
                    await self.store.work.heartbeat(dict(self._held), self.opts.lease_seconds)
                except Exception:
                    log.exception("heartbeat failed")

    async def maintain_once(self) -> tuple[int, int]:
        recovered = await self.store.work.recover_lost(
            give_up_after=max(self.opts.max_lost_leases, self.opts.max_attempts)
        )
        expired, completed = await self.store.work.expire_overdue(
            idempotency_ttl_seconds=self.opts.idempotency_ttl_seconds
        )
        if completed and self.on_groups_completed is not None:
            await self.on_groups_completed(completed)
        if expired and self.after_write is not None:
            self.after_write()
        if recovered or expired:
            log.info("maintenance: %d recovered, %d expired", recovered, expired)
            self._wake.set()
        await self.check_deadlines()
        if self.blobs is not None and not self.opts.retention.keeps_everything:
            purged = await self.store.retention.purge(self.opts.retention, blobs=self.blobs)
            if purged.rows:
                log.info("maintenance: purged %s", purged)
        return recovered, expired

    async def check_deadlines(self) -> list[tuple[OpenWork, datetime | None]]:
        """Work at risk of missing its deadline (:func:`work_at_risk`); metrics and the
        trickle follow it."""
        risky = await work_at_risk(
            self.store, self.engines, self.metrics, self.opts, warn=not self._at_risk
        )
        self._at_risk = bool(risky)
        return risky

    async def _maintenance(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.maintain_once()
            except Exception:
                log.exception("maintenance failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.opts.maintenance_interval)
