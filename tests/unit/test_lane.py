"""The lane: preemption of the youngest background calls, probes, the generic engine."""

from __future__ import annotations

import asyncio

import pytest

from backburner.backends.admission import AdmissionController, AdmissionOptions, Held
from backburner.backends.lane import Lane
from backburner.backends.signals import EngineLoad
from backburner.errors import BackendRetryable, Preempted


class ScriptedProbe:
    url = "scripted"

    def __init__(self, *loads: EngineLoad | Exception) -> None:
        self.loads = list(loads)

    async def read(self) -> EngineLoad:
        item = self.loads.pop(0) if len(self.loads) > 1 else self.loads[0]
        if isinstance(item, Exception):
            raise item
        return item


def lane(probe: ScriptedProbe | None = None, *, preempt: bool = True, **kw: object) -> Lane:
    opts = AdmissionOptions(**{"max_window": 8, "initial_window": 4, **kw})  # type: ignore[arg-type]
    return Lane("b", AdmissionController(opts), probe=probe, max_concurrency=8, preempt=preempt)


async def test_generic_lane_admits_without_a_probe_and_counts_realtime() -> None:
    ln = lane()
    assert ln.free_for_background() == 4
    assert ln.take_background(10) == 4
    assert ln.held() is Held.WINDOW_FULL
    ln.release_background(4)
    # realtime requests beyond max_concurrency make a queue: background is held
    for _ in range(9):
        ln.controller.realtime_inflight += 1
    assert ln.held() is Held.ENGINE_QUEUE


async def test_probe_failure_counts_as_busy() -> None:
    ln = lane(ScriptedProbe(ConnectionError("refused")))
    await ln.poll_once()
    assert ln.held() is Held.PROBE_STALE
    assert ln.counters.probe_failures == 1
    assert "refused" in (ln.snapshot().probe_error or "")


async def test_realtime_preempts_the_youngest_background_calls() -> None:
    ln = lane(ScriptedProbe(EngineLoad(waiting=0, running=0, kv_usage=0.0)))
    await ln.poll_once()
    assert ln.take_background(3) == 3
    started = asyncio.Event()
    order: list[int] = []

    async def call(i: int) -> str:
        order.append(i)
        if len(order) == 3:
            started.set()
        await asyncio.sleep(30)
        return f"done {i}"

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(ln.run_background(lambda i=i: call(i))))  # type: ignore[misc]
        await asyncio.sleep(0.01)  # distinct start times: 0 oldest, 2 youngest
    await started.wait()
    ln.controller.opts = AdmissionOptions(max_window=8, shared_window=1)
    ln.realtime_started()  # the window drops to 1: the two youngest yield
    results = await asyncio.gather(*tasks[1:], return_exceptions=True)
    assert all(isinstance(r, Preempted) for r in results)
    assert not tasks[0].done()  # the oldest keeps running
    tasks[0].cancel()
    await asyncio.gather(tasks[0], return_exceptions=True)
    assert ln.counters.preempted == 2
    assert ln.counters.seconds_lost > 0


async def test_no_preemption_when_disabled() -> None:
    ln = lane(ScriptedProbe(EngineLoad(waiting=0, running=0, kv_usage=0.0)), preempt=False)
    await ln.poll_once()
    ln.take_background(1)
    task = asyncio.create_task(ln.run_background(lambda: asyncio.sleep(0.05, "ok")))
    await asyncio.sleep(0.01)
    ln.realtime_started()
    assert await task == "ok"
    assert ln.counters.preempted == 0


async def test_cancelling_the_caller_is_not_a_preemption() -> None:
    ln = lane()
    task = asyncio.create_task(ln.run_background(lambda: asyncio.sleep(30)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ln.counters.preempted == 0


async def test_overload_answer_from_background_backs_off() -> None:
    ln = lane(ScriptedProbe(EngineLoad(waiting=0, running=0, kv_usage=0.0)))
    await ln.poll_once()

    async def overloaded() -> None:
        raise BackendRetryable("busy", upstream_status=429)

    with pytest.raises(BackendRetryable):
        await ln.run_background(overloaded)
    assert ln.held() is Held.OVERLOADED


async def test_a_claim_that_lands_after_realtime_arrived_does_not_start() -> None:
    ln = lane(ScriptedProbe(EngineLoad(waiting=0, running=0, kv_usage=0.0)))
    await ln.poll_once()
    assert ln.take_background(2) == 2  # slots reserved; the claim is still on its way
    ln.realtime_started()  # the window drops to 0
    calls: list[int] = []

    async def call() -> int:
        calls.append(1)
        return 1

    with pytest.raises(Preempted):
        await ln.run_background(call)
    assert calls == [] and ln.counters.preempted == 1
