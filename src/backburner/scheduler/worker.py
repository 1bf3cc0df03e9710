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
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from backburner.backends.engines import Engines
from backburner.core.clock import utcnow
from backburner.core.estimate import OpenWork
from backburner.core.ids import lease_owner_id, new_id
from backburner.core.outcome import Outcome
from backburner.core.retry import Backoff, should_retry
from backburner.core.states import State, StateMessage
from backburner.errors import BackendError, Preempted
from backburner.metrics import Metrics
from backburner.scheduler.ahead import ClaimAhead, Ready
from backburner.scheduler.claims import claim
from backburner.scheduler.deadlines import work_at_risk
from backburner.scheduler.prefix_runs import PrefixRuns
from backburner.scheduler.recorder import Recorder
from backburner.schemas.generation import GenerationRecord
from backburner.store import Store
from backburner.store.retention import BlobRemover, RetentionPolicy

log = logging.getLogger("backburner.worker")
WRITER_BUSY_SECONDS = 0.1


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
    # claim up to this many more than a lane has free slots (at most its window, and about 0.1 s
    # of its recent starts), to start them as slots free up; give back what waited longer than
    # claim_ahead_seconds (scheduler/ahead.py)
    claim_ahead: int = 32
    claim_ahead_seconds: float = 2.0
    write_size: int = 256
    # while outcomes keep coming (a write less than WRITER_BUSY_SECONDS ago), the writer waits
    # this long to write more of them at once
    write_linger: float = 0.01
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
        self._recorder = Recorder(store)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._beat_stop = asyncio.Event()  # set once in-flight work is drained
        self._idle: dict[str, bool] = {}
        self._runs: dict[str, PrefixRuns] = {}  # by lane
        self._ahead: dict[str, ClaimAhead] = {}  # by lane: claimed, not yet started
        self._refills: dict[str, asyncio.Task[None]] = {}  # by lane: a claim for _ahead
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
            await asyncio.gather(*self._refills.values(), return_exceptions=True)
            await self._drain_inflight()
            await self._results.join()
            writer.cancel()  # idle: waiting on an empty queue
            await asyncio.gather(writer, return_exceptions=True)
            self._beat_stop.set()
            await asyncio.wait([beat], timeout=self.opts.shutdown_grace)
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            for ahead in self._ahead.values():
                ahead.clear()  # held: given back with the rest just below
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
        ready = any(len(ahead) for ahead in self._ahead.values())
        ready = ready or any(not t.done() for t in self._refills.values())
        return all(self._idle.values()) and not (self._inflight or ready) and self._results.empty()

    async def _backend_loop(self, name: str, burst: bool) -> None:
        lane = self.engines.lanes[name]
        models = self.engines.models_by_backend[name]
        ahead = self._ahead.setdefault(
            name, ClaimAhead(self.opts.claim_ahead, self.opts.claim_ahead_seconds)
        )
        self._idle[name] = False
        settled = False
        while not self._stopping.is_set():
            await self._give_back(name, ahead.stale())
            if lane.free_for_background() == 0:
                await lane.wait_background_capacity(self.opts.poll_interval)
                continue
            if len(ahead):  # claimed before: starts without a claim
                for ready in ahead.take(lane.take_background(len(ahead))):
                    self._start(name, ready.generation, ready.lease)
                    ahead.started(1)
                self._refill(name, models, ahead)
                continue
            refill = self._refills.get(name)
            if refill is not None and not refill.done():  # what it claims is started next
                await asyncio.wait([refill], timeout=self.opts.poll_interval)
                continue
            n = lane.take_background(self.opts.claim_size)
            try:
                lease, claimed = await self._claim(
                    name, models, n + ahead.depth(lane.controller.window)
                )
            except Exception:
                lane.release_background(n)
                log.exception("claim failed; retrying")
                await asyncio.sleep(self.opts.poll_interval)
                continue
            if len(claimed) < n:
                lane.release_background(n - len(claimed))
            for generation in claimed[:n]:
                self._start(name, generation, lease)
            ahead.started(min(n, len(claimed)))
            for generation in claimed[n:]:
                self._held[generation.id] = lease
            ahead.keep(claimed[n:], lease)
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

    def _refill(self, lane: str, models: list[str], ahead: ClaimAhead) -> None:
        """Once half of what is ready has started, claim more in the background, so the slots
        that free up meanwhile need not wait for a claim."""
        depth = ahead.depth(self.engines.lanes[lane].controller.window)
        running = self._refills.get(lane)
        if len(ahead) > depth // 2 or (running is not None and not running.done()):
            return

        async def claim_more() -> None:
            try:
                lease, claimed = await self._claim(lane, models, depth)
            except Exception:
                log.exception("claiming ahead failed")
                return
            for generation in claimed:
                self._held[generation.id] = lease
            ahead.keep(claimed, lease)

        self._refills[lane] = asyncio.create_task(claim_more(), name=f"bb-refill-{lane}")

    def _start(self, lane: str, generation: GenerationRecord, lease: str) -> None:
        """Run a claimed generation in a slot of ``lane`` the caller took."""
        stale = self._inflight.get(generation.id)
        if stale is not None:
            # its lease ran out while it ran (the database was unreachable, say) and this
            # worker claimed it again: the old run could record nothing anyway
            log.warning("generation %s claimed again; its stale run is stopped", generation.id)
            stale.cancel()
        self._held[generation.id] = lease
        task = asyncio.create_task(
            self._execute(lane, generation, lease), name=f"bb-gen-{generation.id}"
        )
        self._inflight[generation.id] = task

    async def _give_back(self, lane: str, ready: list[Ready]) -> None:
        """Return generations claimed ahead that waited too long to the queue (uncounted)."""
        if not ready:
            return
        leases = {r.generation.id: r.lease for r in ready}
        for r in ready:
            if self._held.get(r.generation.id) == r.lease:
                del self._held[r.generation.id]
            self._prefix_done(lane, r.generation)
        try:
            await self.store.work.release(leases)
        except Exception:  # their leases run out and maintenance takes them back
            log.exception("giving back %d generations claimed ahead failed", len(leases))

    async def _claim(
        self, lane: str, models: list[str], n: int
    ) -> tuple[str, list[GenerationRecord]]:
        """Claim up to ``n`` for ``lane`` under a new lease token; returns the token and what
        was claimed."""
        lease = self.lease_token()
        claimed = await claim(
            self.store.work,
            lease,
            models,
            n,
            lease_seconds=self.opts.lease_seconds,
            horizon=self.opts.deadline_horizon_seconds,
            runs=self._lane_runs(lane),
            window=self.opts.prefix_window,
            allowed=self.engines.affinity(lane),
        )
        return lease, claimed

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
            self._prefix_done(backend, generation)
        await self._results.put((lease, outcome))

    def _prefix_done(self, lane: str, generation: GenerationRecord) -> None:
        runs = self._runs.get(lane)
        if runs is not None and generation.prefix_key in runs.warming:
            runs.finished(generation.prefix_key)
            self._wake.set()  # its siblings may follow now

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
        wrote_at = -math.inf
        while True:
            taken = [await self._results.get()]
            busy = time.monotonic() - wrote_at < WRITER_BUSY_SECONDS
            if (
                busy
                and self._results.qsize() < self.opts.write_size
                and not self._stopping.is_set()
            ):
                # outcomes arrive steadily: gather a few milliseconds' worth into one write
                await asyncio.sleep(self.opts.write_linger)
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
                wrote_at = time.monotonic()
                for _ in taken:
                    self._results.task_done()

    async def _write(self, outcomes: list[Outcome]) -> None:
        """Record a group of outcomes (:mod:`backburner.scheduler.recorder`), then let go of
        them."""
        leases = {o.generation_id: self._held[o.generation_id] for o in outcomes}
        written, completed = await self._recorder.record(leases, outcomes, retry=True)
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
