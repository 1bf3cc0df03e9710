"""Background admission: how many background requests a backend may have in flight right now.

Pure logic with an injected clock, so it is tested with scripted probe values and a fake clock.
The :class:`Lane` feeds it three kinds of evidence:

- **engine load** from the probe (``waiting``, ``kv_usage``; a probe that failed or is older than
  ``stale_seconds`` counts as busy);
- **realtime traffic** that backburner itself proxies: when each realtime request starts, and its
  latency (time to first token for streams, seconds per output token otherwise);
- **overload answers** (429, 503, 529) from the engine.

It keeps an AIMD window of background requests in flight, in two regimes:

- **quiet**: no realtime request for ``quiet_seconds``. The window grows by slow start (doubling
  every clean probe cycle up to ``max_window``, then +1) while the engine shows no queue and KV
  use stays under ``idle_kv``.
- **shared**: realtime traffic is present. Entering it drops the window to ``shared_window``
  (0 by default: realtime gets the engine to itself), and the lane preempts background work above
  it. The window then grows by one after ``grow_after`` realtime requests in a row ran within
  ``slowdown`` times their idle baseline, and halves on a slow realtime request.

In both regimes an engine queue, KV use over ``idle_kv``, a stale probe or an overload answer
halves the window (at most once per ``decrease_cooldown``) and admits nothing while it lasts.
Realtime requests are never gated here: this decides background work only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from backburner.backends.signals import EngineLoad


class Held(StrEnum):
    """Why background work is held back (``none``: it may start)."""

    NONE = "none"
    PROBE_STALE = "probe_stale"
    ENGINE_QUEUE = "engine_queue"
    KV_FULL = "kv_full"
    OVERLOADED = "overloaded"
    REALTIME = "realtime"
    WINDOW_FULL = "window_full"


@dataclass(frozen=True)
class AdmissionOptions:
    max_window: int = 16
    gated: bool = True  # False: a static cap of max_window, blind to the engine and realtime
    initial_window: float = 2.0
    shared_window: float = 0.0
    idle_kv: float = 0.7
    stale_seconds: float = 1.0
    quiet_seconds: float = 2.0
    slowdown: float = 1.2
    grow_after: int = 8
    decrease_cooldown: float = 1.0
    grow_interval: float = 0.25
    overload_hold_seconds: float = 1.0
    baseline_alpha: float = 0.2
    # an engine queue counts once seen on this many probes in a row: requests that arrive
    # between two engine steps wait for the next one, and one probe can catch them there
    queue_probes: int = 2
    quiet_queue_probes: int = 4  # with realtime quiet, a queue must last about a second
    # while realtime is quiet, a queue this short is requests that arrived between two steps
    quiet_queue_tolerance: int = 4


@dataclass(frozen=True)
class AdmissionSnapshot:
    """What /metrics and /readyz show for one backend."""

    window: float
    held: Held
    regime: str
    background_inflight: int
    realtime_inflight: int
    load: EngineLoad | None
    probe_age: float | None
    probe_error: str | None
    baseline_ttft: float | None
    baseline_tpot: float | None


class AdmissionController:
    def __init__(
        self, options: AdmissionOptions, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.opts = options
        self._clock = clock
        self.window = min(float(options.max_window), options.initial_window)
        if not options.gated:
            self.window = float(options.max_window)
        self._slow_start = True
        self.background_inflight = 0
        self.realtime_inflight = 0
        self._last_realtime = -math.inf
        self._last_decrease = -math.inf
        self._last_grow = -math.inf
        self._overloaded_until = -math.inf
        self._clean_streak = 0
        self._shared = False
        self._running_background: int | None = None
        self._quiet_window = self.window
        self._queue_streak = 0
        # background slots kept open while work is at risk of missing its deadline, whatever
        # realtime does (not while the engine is unreachable or overloaded)
        self.trickle = 0
        self.load: EngineLoad | None = None
        self._load_at: float | None = None
        self.probe_error: str | None = "no probe yet"
        self.baseline: dict[str, float] = {}

    # ------------------------------------------------------------------ evidence
    def observe_load(
        self,
        load: EngineLoad | None,
        *,
        error: str | None = None,
        running_background: int | None = None,
        exact: bool = False,
    ) -> None:
        """A probe cycle: the engine's load, or the error that stopped the probe.
        ``running_background``: background requests actually running (not just reserved);
        ``exact``: the load is counted, not sampled (a queue counts at once)."""
        now = self._clock()
        self._running_background = running_background
        if load is None:
            self.probe_error = error or "probe failed"
        else:
            self.load, self._load_at, self.probe_error = load, now, None
            tolerance = 0 if self._shared or exact else self.opts.quiet_queue_tolerance
            queued = (load.waiting or 0) > tolerance or load.idle_slots == 0
            if not queued:
                self._queue_streak = 0
            elif exact:
                self._queue_streak = max(self.opts.queue_probes, self.opts.quiet_queue_probes)
            else:
                self._queue_streak += 1
        self._tick(now)

    def realtime_started(self) -> bool:
        """A realtime request starts; True when it moved the lane into the shared regime
        (the lane then preempts background work above the window)."""
        now = self._clock()
        self.realtime_inflight += 1
        if not self.opts.gated:
            return False
        entered = not self._realtime_recent(now)
        self._last_realtime = now
        if entered or not self._shared:
            if not self._shared:
                self._quiet_window = self.window
            self._shared = True
            self.window = min(self.window, self.opts.shared_window)
            self._clean_streak = 0
        return entered

    def realtime_finished(self) -> None:
        self.realtime_inflight = max(0, self.realtime_inflight - 1)
        self._last_realtime = self._clock()

    def observe_realtime(self, metric: str, seconds: float, *, background_inflight: int) -> None:
        """A realtime latency (``ttft`` or ``tpot``), with how much background ran beside it."""
        if seconds <= 0 or not math.isfinite(seconds):
            return
        base = self.baseline.get(metric)
        if background_inflight == 0:
            # the idle baseline: realtime with no background beside it
            a = self.opts.baseline_alpha
            self.baseline[metric] = seconds if base is None else (1 - a) * base + a * seconds
        elif base is not None and seconds > self.opts.slowdown * base:
            self._clean_streak = 0
            self._decrease(self._clock())
            return
        elif base is None:
            return
        # a realtime request that ran at its idle speed: evidence that one more may fit
        self._clean_streak += 1
        if self._shared and self._clean_streak >= self.opts.grow_after:
            self._clean_streak = 0
            self.window = min(float(self.opts.max_window), math.floor(self.window) + 1.0)

    def observe_overload(self) -> None:
        """The engine answered 429/503/529: back off now."""
        now = self._clock()
        self._overloaded_until = now + self.opts.overload_hold_seconds
        self._decrease(now)

    def background_started(self, n: int = 1) -> None:
        self.background_inflight += n

    def background_finished(self, n: int = 1) -> None:
        self.background_inflight = max(0, self.background_inflight - n)

    # ------------------------------------------------------------------ decisions
    def held(self) -> Held:
        """Why no more background may start now, or ``Held.NONE``."""
        if not self.opts.gated:
            full = self.background_inflight >= self.opts.max_window
            return Held.WINDOW_FULL if full else Held.NONE
        now = self._clock()
        if self._load_at is None or now - self._load_at > self.opts.stale_seconds:
            return Held.PROBE_STALE
        if self.probe_error is not None and self.load is None:
            return Held.PROBE_STALE
        if now < self._overloaded_until:
            return Held.OVERLOADED
        load = self.load
        needed = self.opts.queue_probes if self._shared else self.opts.quiet_queue_probes
        if self._queue_streak >= needed:
            return Held.ENGINE_QUEUE  # waiting requests, or a llama.cpp server with no idle slot
        if load is not None and load.kv_usage is not None and load.kv_usage >= self.opts.idle_kv:
            return Held.KV_FULL
        if self.background_inflight >= math.floor(self.window):
            return Held.REALTIME if self._shared and self.window < 1 else Held.WINDOW_FULL
        return Held.NONE

    def allowance(self) -> int:
        """How many more background requests may start now."""
        held = self.held()
        floor = 0
        if self.trickle and held not in (Held.PROBE_STALE, Held.OVERLOADED):
            floor = max(0, min(self.trickle, self.opts.max_window) - self.background_inflight)
        if held is not Held.NONE:
            return floor
        if not self.opts.gated:
            return max(0, self.opts.max_window - self.background_inflight)
        return max(floor, math.floor(self.window) - self.background_inflight)

    def excess(self) -> int:
        """Background requests in flight above the window (candidates for preemption); the
        deadline trickle is never preempted."""
        if not self.opts.gated:
            return 0
        return max(0, self.background_inflight - max(math.floor(self.window), self.trickle))

    @property
    def shared(self) -> bool:
        return self._shared

    def snapshot(self) -> AdmissionSnapshot:
        now = self._clock()
        return AdmissionSnapshot(
            window=self.window,
            held=self.held(),
            regime="shared" if self._shared else "quiet",
            background_inflight=self.background_inflight,
            realtime_inflight=self.realtime_inflight,
            load=self.load,
            probe_age=None if self._load_at is None else now - self._load_at,
            probe_error=self.probe_error,
            baseline_ttft=self.baseline.get("ttft"),
            baseline_tpot=self.baseline.get("tpot"),
        )

    # ------------------------------------------------------------------ internals
    def _realtime_recent(self, now: float) -> bool:
        return self.realtime_inflight > 1 or now - self._last_realtime < self.opts.quiet_seconds

    def _decrease(self, now: float) -> None:
        if not self.opts.gated:
            return
        self._slow_start = False
        if now - self._last_decrease < self.opts.decrease_cooldown:
            return
        self._last_decrease = now
        self.window = math.floor(self.window / 2)

    def _tick(self, now: float) -> None:
        if not self.opts.gated:
            self.window = float(self.opts.max_window)
            return
        held = self.held()
        if held in (Held.PROBE_STALE, Held.ENGINE_QUEUE, Held.KV_FULL):
            if self.background_inflight > 0:
                self._decrease(now)
            return
        if self._shared:
            if self.realtime_inflight == 0 and now - self._last_realtime >= self.opts.quiet_seconds:
                # realtime went quiet: the engine is ours again; slow start from half the
                # window the quiet regime had reached
                self._shared = False
                self._slow_start = True
                self.window = max(self.window, self.opts.initial_window, self._quiet_window // 2)
            return
        if held is Held.OVERLOADED:
            return
        # quiet regime: grow once per cycle while the window is in use (not on an idle lane)
        if now - self._last_grow < self.opts.grow_interval:
            return
        used = self.background_inflight
        if self._running_background is not None:
            used = self._running_background
        if used >= math.floor(self.window) or self.window < 1:
            self._last_grow = now
            if self._slow_start:
                self.window = min(float(self.opts.max_window), max(1.0, self.window * 2))
            else:
                self.window = min(float(self.opts.max_window), math.floor(self.window) + 1.0)
