"""Deadlines: the pace estimate, open work, and the at-risk check in worker maintenance."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from prometheus_client import generate_latest

from backburner.core.clock import utcnow
from backburner.core.estimate import MIN_SAMPLES, Pace
from backburner.core.outcome import Outcome
from backburner.core.states import BatchStatus, Kind, State
from backburner.schemas.generation import NewGeneration
from backburner.store import Store
from backburner.store.tables import generations
from tests.support.fake_backend import FakeBackend
from tests.support.leases import finish_as
from tests.support.services import burst_services

M = "fake-model"
NOW = utcnow()


def test_a_tenant_goes_at_its_own_measured_pace() -> None:
    pace = Pace(100.0, {"a": 50, "b": 10})
    assert pace.rate("a") == 0.5
    eta = pace.eta("a", 100, NOW)
    assert eta is not None and abs((eta - NOW).total_seconds() - 200) < 1e-6


def test_without_enough_samples_a_tenant_gets_an_equal_share() -> None:
    pace = Pace(100.0, {"a": 60, "b": MIN_SAMPLES - 1})
    assert pace.rate("b") == (60 + MIN_SAMPLES - 1) / 100 / 2
    assert pace.rate("new") == (60 + MIN_SAMPLES - 1) / 100 / 3  # a newcomer shares too


def test_no_pace_no_estimate() -> None:
    assert Pace(100.0, {}).eta("a", 10, NOW) is None
    assert Pace(100.0, {"a": 50}).eta("a", 0, NOW) is None


def chat(i: int) -> NewGeneration:
    body = {"model": M, "messages": [{"role": "user", "content": f"q{i}"}]}
    return NewGeneration(Kind.CHAT, M, body)


async def test_pace_counts_background_work_that_finished_lately(store: Store) -> None:
    for i in range(4):
        await store.generations.submit("t1", chat(i), expiry_seconds=3600)
    got = await store.work.claim("w", [M], 3, 60)
    await finish_as(store, "w", [_ok(g.id) for g in got])
    async with store.engine.begin() as conn:  # one of them finished long ago
        await conn.execute(
            generations.update()
            .where(generations.c.id == got[0].id)
            .values(finished_at=utcnow() - timedelta(hours=1))
        )
    pace = await store.deadlines.pace(300)
    assert pace.by_tenant == {"t1": 2}


async def test_open_work_lists_groups_and_batches_by_deadline(store: Store) -> None:
    late = await store.groups.submit("t1", Kind.CHAT, [chat(0), chat(1)], expiry_seconds=7200)
    soon = await store.groups.submit("t2", Kind.CHAT, [chat(2)], expiry_seconds=600)
    work = await store.deadlines.open_work()
    assert [(w.kind, w.id, w.tenant, w.remaining) for w in work] == [
        ("group", soon.id, "t2", 1),
        ("group", late.id, "t1", 2),
    ]


def _ok(gid: str) -> Outcome:
    return Outcome(gid, State.SUCCESS, "Completed", {"choices": []})


async def test_maintenance_flags_work_at_risk_and_opens_a_trickle(
    sqlite_url: str, tmp_path: Any
) -> None:
    async with burst_services(sqlite_url, tmp_path / "files", FakeBackend("fake")) as s:
        assert s.worker is not None
        store = s.store
        # t1's pace: 30 finished in the last five minutes (0.1/s)
        for i in range(30):
            await store.generations.submit("t1", chat(i), expiry_seconds=3600)
        got = await store.work.claim("w", [M], 30, 60)
        await finish_as(store, "w", [_ok(g.id) for g in got])
        # 80 left due in 10 minutes: 800 s at 0.1/s misses it; 10 due in an hour makes it
        risky = await store.groups.submit(
            "t1", Kind.CHAT, [chat(i) for i in range(80)], expiry_seconds=600
        )
        safe = await store.groups.submit(
            "t1", Kind.CHAT, [chat(i) for i in range(10)], expiry_seconds=3600
        )
        found = await s.worker.check_deadlines()
        assert [(w.id, eta is not None) for w, eta in found] == [(risky.id, True)]
        assert safe.id not in {w.id for w, _ in found}
        lane = s.engines.lanes["fake"]
        assert lane.controller.trickle == 1
        text = _metrics(s)
        assert 'backburner_deadline_at_risk{kind="group"} 1.0' in text
        assert f'backburner_deadline_at_risk_work{{id="{risky.id}",kind="group"}}' in text
        await store.groups.cancel("t1", risky.id)
        assert await s.worker.check_deadlines() == []
        assert lane.controller.trickle == 0


async def test_no_pace_at_all_counts_as_at_risk(sqlite_url: str, tmp_path: Any) -> None:
    async with burst_services(sqlite_url, tmp_path / "files", FakeBackend("fake")) as s:
        assert s.worker is not None
        g = await s.store.groups.submit("t1", Kind.CHAT, [chat(0)], expiry_seconds=3600)
        ((work, eta),) = await s.worker.check_deadlines()
        assert work.id == g.id and eta is None
        assert math.isinf(s.worker.metrics.at_risk_work.labels("group", g.id)._value.get())


def _metrics(s: Any) -> str:
    return generate_latest(s.metrics.registry).decode()


def test_a_batch_estimate_counts_its_lines_not_yet_finished() -> None:
    from backburner.api.estimates import batch_eta
    from backburner.schemas.batch import BatchRecord

    def batch(status: str, total: int, completed: int, failed: int) -> BatchRecord:
        return BatchRecord(
            id="b",
            tenant="t",
            endpoint="/v1/chat/completions",
            input_file_id="f",
            completion_window="24h",
            status=BatchStatus(status),
            metadata=None,
            webhook_url=None,
            errors=None,
            total=total,
            completed=completed,
            failed=failed,
            pending=total - completed - failed,
            loaded=total,
            output_file_id=None,
            error_file_id=None,
            created_at=NOW,
            expires_at=NOW + timedelta(days=1),
        )

    pace = Pace(100.0, {"t": 50})  # 0.5/s
    eta = batch_eta(batch("in_progress", 100, 30, 20), pace)
    assert eta is not None and 95 < (eta - utcnow()).total_seconds() <= 100
    assert batch_eta(batch("completed", 100, 90, 10), pace) is None
    assert batch_eta(batch("validating", 0, 0, 0), pace) is None
    assert batch("in_progress", 1, 0, 0).to_wire(eta)["expected_completion_at"] == int(
        eta.timestamp()
    )
