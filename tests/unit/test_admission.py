"""The admission controller with a fake clock and scripted probe values."""

from __future__ import annotations

import pytest

from backburner.backends.admission import AdmissionController, AdmissionOptions, Held
from backburner.backends.signals import EngineLoad

IDLE = EngineLoad(waiting=0, running=0, kv_usage=0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def controller(clock: Clock, **kw: object) -> AdmissionController:
    opts = AdmissionOptions(**{"max_window": 16, **kw})  # type: ignore[arg-type]
    return AdmissionController(opts, clock)


def fill(c: AdmissionController) -> None:
    """Start as much background work as the controller admits."""
    c.background_started(c.allowance())


def cycle(c: AdmissionController, clock: Clock, load: EngineLoad = IDLE, n: int = 1) -> None:
    for _ in range(n):
        clock.advance(0.25)
        c.observe_load(load)
        fill(c)


def test_nothing_admitted_before_the_first_probe(clock: Clock) -> None:
    c = controller(clock)
    assert c.held() is Held.PROBE_STALE
    assert c.allowance() == 0


def test_window_grows_by_slow_start_while_the_engine_is_idle_and_the_window_used(
    clock: Clock,
) -> None:
    c = controller(clock)
    cycle(c, clock)
    assert c.allowance() == 0 and c.background_inflight == 2
    windows = []
    for _ in range(4):
        cycle(c, clock)
        windows.append(c.window)
    assert windows == [4, 8, 16, 16]  # doubling, capped at max_window
    assert c.background_inflight == 16


def test_no_growth_on_an_idle_lane(clock: Clock) -> None:
    c = controller(clock)
    for _ in range(10):
        clock.advance(0.25)
        c.observe_load(IDLE)  # nothing started: the window is not in use
    assert c.window == 2


def test_stale_probe_counts_as_busy(clock: Clock) -> None:
    c = controller(clock, stale_seconds=1.0)
    c.observe_load(IDLE)
    assert c.allowance() == 2
    clock.advance(1.5)
    assert c.held() is Held.PROBE_STALE
    assert c.allowance() == 0


def test_failed_probe_counts_as_busy_and_shrinks_the_window(clock: Clock) -> None:
    c = controller(clock)
    cycle(c, clock, n=4)
    assert c.window == 16
    for _ in range(8):  # failing for longer than stale_seconds
        clock.advance(0.25)
        c.observe_load(None, error="connection refused")
    assert c.held() is Held.PROBE_STALE
    assert c.window < 16


def test_engine_queue_halves_once_per_cooldown_and_holds(clock: Clock) -> None:
    c = controller(clock, decrease_cooldown=1.0, quiet_queue_probes=2)
    cycle(c, clock, n=4)
    assert c.window == 16
    busy = EngineLoad(waiting=12, running=20, kv_usage=0.5)
    clock.advance(0.25)
    c.observe_load(busy)
    assert c.window == 16 and c.held() is Held.WINDOW_FULL  # one probe may catch a step edge
    clock.advance(0.25)
    c.observe_load(busy)
    assert c.window == 8
    assert c.held() is Held.ENGINE_QUEUE and c.allowance() == 0
    clock.advance(0.25)
    c.observe_load(busy)
    assert c.window == 8  # one decrease per cooldown
    clock.advance(1.0)
    c.observe_load(busy)
    assert c.window == 4


def test_kv_over_threshold_holds(clock: Clock) -> None:
    c = controller(clock, idle_kv=0.7)
    clock.advance(0.25)
    c.observe_load(EngineLoad(waiting=0, running=4, kv_usage=0.75))
    assert c.held() is Held.KV_FULL and c.allowance() == 0


def test_llamacpp_server_without_idle_slots_holds(clock: Clock) -> None:
    c = controller(clock, quiet_queue_probes=2)
    c.observe_load(EngineLoad(running=4, idle_slots=0))
    c.observe_load(EngineLoad(running=4, idle_slots=0))
    assert c.held() is Held.ENGINE_QUEUE


def test_overload_answer_halves_and_holds_for_a_while(clock: Clock) -> None:
    c = controller(clock, overload_hold_seconds=1.0)
    cycle(c, clock, n=3)
    before = c.window
    c.observe_overload()
    assert c.window == before // 2
    assert c.held() is Held.OVERLOADED
    clock.advance(1.1)
    c.observe_load(IDLE)
    assert c.held() is not Held.OVERLOADED


def test_realtime_is_never_gated_and_takes_the_engine(clock: Clock) -> None:
    c = controller(clock, shared_window=0)
    cycle(c, clock, n=4)
    assert c.background_inflight == 16
    entered = c.realtime_started()
    assert entered
    # the window drops to the shared window: everything in flight is excess (preemptible)
    assert c.window == 0 and c.excess() == 16
    assert c.held() is Held.REALTIME and c.allowance() == 0
    # more realtime requests start regardless of background load: nothing here blocks them
    assert c.realtime_started() is False
    assert c.realtime_inflight == 2


def test_quiet_again_after_realtime_stops(clock: Clock) -> None:
    c = controller(clock, quiet_seconds=2.0)
    cycle(c, clock)
    c.realtime_started()
    c.realtime_finished()
    c.background_finished(c.background_inflight)
    cycle(c, clock, n=4)  # 1 s: still shared
    assert c.shared and c.allowance() == 0
    cycle(c, clock, n=5)  # past quiet_seconds
    assert not c.shared
    assert c.background_inflight > 0


def test_realtime_slowdown_halves_and_clean_realtime_grows_the_shared_window(
    clock: Clock,
) -> None:
    c = controller(clock, shared_window=4, slowdown=1.2, grow_after=3, decrease_cooldown=0)
    cycle(c, clock, n=4)
    c.realtime_started()
    assert c.window == 4
    # baseline: realtime with nothing beside it
    c.observe_realtime("ttft", 0.100, background_inflight=0)
    c.observe_realtime("ttft", 0.100, background_inflight=4)  # clean
    c.observe_realtime("ttft", 0.110, background_inflight=4)  # clean (under 1.2x)
    c.observe_realtime("ttft", 0.105, background_inflight=4)  # clean: third in a row
    assert c.window == 5
    c.observe_realtime("ttft", 0.200, background_inflight=4)  # slow: halve
    assert c.window == 2


def test_no_latency_rule_without_a_baseline(clock: Clock) -> None:
    c = controller(clock, shared_window=4)
    c.realtime_started()
    c.observe_realtime("ttft", 5.0, background_inflight=4)
    assert c.window == 2  # initial window, unchanged by a latency with nothing to compare to


def test_ungated_is_a_static_cap(clock: Clock) -> None:
    c = controller(clock, gated=False, max_window=8)
    assert c.allowance() == 8  # no probe needed
    c.background_started(8)
    assert c.held() is Held.WINDOW_FULL
    c.realtime_started()
    c.observe_overload()
    assert c.excess() == 0 and c.window == 8  # realtime and overload change nothing
    c.background_finished(3)
    assert c.allowance() == 3


def test_a_short_queue_is_tolerated_only_while_realtime_is_quiet(clock: Clock) -> None:
    c = controller(clock, quiet_queue_tolerance=4, queue_probes=2, quiet_queue_probes=2)
    short = EngineLoad(waiting=3, running=20, kv_usage=0.2)
    cycle(c, clock, short, n=3)
    assert c.held() is not Held.ENGINE_QUEUE  # arrivals between two engine steps
    c.realtime_started()
    cycle(c, clock, short, n=2)
    assert c.held() is Held.ENGINE_QUEUE  # realtime present: any queue counts


def test_a_deadline_trickle_keeps_background_going_while_realtime_holds_it(
    clock: Clock,
) -> None:
    c = controller(clock, shared_window=0)
    cycle(c, clock, n=4)
    c.realtime_started()
    assert c.held() is Held.REALTIME and c.allowance() == 0 and c.excess() == 16
    c.trickle = 2
    assert c.excess() == 14  # the trickle is not preempted
    c.background_finished(16)
    assert c.allowance() == 2  # held for realtime, yet two slots stay open
    c.background_started(2)
    assert c.allowance() == 0 and c.excess() == 0
    c.observe_overload()  # an overloaded engine gets no trickle
    c.background_finished(2)
    assert c.allowance() == 0
    c.trickle = 0
    clock.advance(60)
    c.observe_load(IDLE)
    assert c.held() is Held.REALTIME and c.allowance() == 0
