"""CapacityGate: bounded slots, realtime first, no slot leaked by cancellation."""

from __future__ import annotations

import asyncio

import pytest

from backburner.backends.capacity import CapacityGate


async def spin() -> None:
    """Let every ready task run (no wall-clock waiting)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        CapacityGate(0)


def test_take_slow_is_bounded_by_the_limit() -> None:
    gate = CapacityGate(4)
    assert gate.free_for_slow() == 4
    assert gate.take_slow(3) == 3
    assert gate.take_slow(3) == 1
    assert gate.take_slow(3) == 0
    assert gate.in_use == 4
    assert gate.free_for_slow() == 0
    gate.release(2)
    assert gate.take_slow(10) == 2
    assert gate.in_use == 4


def test_release_never_goes_below_zero() -> None:
    gate = CapacityGate(2)
    gate.release(5)
    assert gate.in_use == 0
    assert gate.free_for_slow() == 2


async def test_realtime_takes_a_free_slot_at_once() -> None:
    gate = CapacityGate(2)
    await gate.acquire_realtime()
    assert gate.in_use == 1
    assert gate.free_for_slow() == 1


async def test_realtime_waiter_gets_the_next_slot_before_slow_work() -> None:
    gate = CapacityGate(2)
    assert gate.take_slow(2) == 2
    rt = asyncio.create_task(gate.acquire_realtime())
    await spin()
    assert not rt.done()
    assert gate.realtime_waiting == 1
    assert gate.free_for_slow() == 0

    gate.release()  # a slow job finished: the slot goes to the realtime waiter
    assert gate.free_for_slow() == 0
    assert gate.take_slow(1) == 0
    await rt
    assert gate.in_use == 2
    assert gate.realtime_waiting == 0

    gate.release()  # nobody waits now: slow work may have it
    assert gate.free_for_slow() == 1
    assert gate.take_slow(5) == 1


async def test_realtime_waiters_are_served_in_order() -> None:
    gate = CapacityGate(1)
    await gate.acquire_realtime()
    order: list[int] = []

    async def one(i: int) -> None:
        await gate.acquire_realtime()
        order.append(i)

    tasks = [asyncio.create_task(one(i)) for i in range(3)]
    await spin()
    assert gate.realtime_waiting == 3
    for _ in range(3):
        gate.release()
        await spin()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert gate.in_use == 1


async def test_a_new_realtime_request_does_not_jump_the_queue() -> None:
    gate = CapacityGate(1)
    assert gate.take_slow(1) == 1
    first = asyncio.create_task(gate.acquire_realtime())
    await spin()
    gate.release()  # handed to `first`, which has not run yet
    second = asyncio.create_task(gate.acquire_realtime())
    await spin()
    assert first.done()
    assert not second.done()
    gate.release()
    await second
    assert gate.in_use == 1


async def test_cancelled_waiter_leaks_no_slot() -> None:
    gate = CapacityGate(1)
    assert gate.take_slow(1) == 1
    rt = asyncio.create_task(gate.acquire_realtime())
    await spin()
    assert gate.free_for_slow() == 0
    rt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rt
    assert gate.realtime_waiting == 0
    assert gate.in_use == 1
    gate.release()
    assert gate.in_use == 0
    assert gate.free_for_slow() == 1


async def test_waiter_cancelled_after_the_slot_was_handed_over_gives_it_back() -> None:
    gate = CapacityGate(1)
    assert gate.take_slow(1) == 1
    rt = asyncio.create_task(gate.acquire_realtime())
    await spin()
    gate.release()  # the slot is handed to the waiter ...
    assert gate.in_use == 1
    rt.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await rt
    assert gate.in_use == 0
    assert gate.free_for_slow() == 1


async def test_cancelled_waiter_passes_the_slot_to_the_next_waiter() -> None:
    gate = CapacityGate(1)
    assert gate.take_slow(1) == 1
    a = asyncio.create_task(gate.acquire_realtime())
    await spin()
    b = asyncio.create_task(gate.acquire_realtime())
    await spin()
    gate.release()  # to `a`
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    await b  # `a` gave its slot back and `b` got it
    assert gate.in_use == 1
    assert gate.realtime_waiting == 0


async def test_wait_slow_capacity_returns_when_a_slot_frees() -> None:
    gate = CapacityGate(1)
    assert gate.take_slow(1) == 1
    waiter = asyncio.create_task(gate.wait_slow_capacity(30))
    await spin()
    assert not waiter.done()
    gate.release()
    await asyncio.wait_for(waiter, timeout=5)
    assert gate.free_for_slow() == 1


async def test_wait_slow_capacity_times_out_quietly() -> None:
    gate = CapacityGate(1)
    assert gate.take_slow(1) == 1
    await gate.wait_slow_capacity(0.01)
    assert gate.free_for_slow() == 0
