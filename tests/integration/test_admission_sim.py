"""Background admission against the engine simulator: probes, holds, preemption, full results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from backburner.api.app import create_app
from backburner.backends.admission import Held
from backburner.config import BackendSettings
from tests.conftest import AppHarness, make_settings
from tests.support.engine_sim import SimConfig, running_sim

MODEL = "sim-model"


def slow_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"background request number {i}"}],
        "max_tokens": max_tokens,
        "metadata": {"custom_id": f"bg-{i}"},
    }


@pytest.fixture
async def sim() -> AsyncIterator[str]:
    # time_scale 0.25: a token every 3 ms, so a 150-token answer takes about half a second
    config = SimConfig(model=MODEL, max_num_seqs=4, time_scale=0.25)
    async with running_sim(config) as base_url:
        yield base_url


async def start_app(sim_url: str, sqlite_url: str, **backend: Any) -> tuple[AppHarness, Any]:
    settings = make_settings(
        sqlite_url,
        backends=[
            BackendSettings(
                name="sim",
                type="openai",
                base_url=sim_url,
                models=[MODEL],
                max_concurrency=4,
                engine="vllm",
                probe_interval_seconds=0.05,
                realtime_quiet_seconds=0.5,
                **backend,
            )
        ],
    )
    app = create_app(settings, migrate=False)
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return AppHarness(app, client), ctx


async def submit(h: AppHarness, bodies: list[dict[str, Any]]) -> list[str]:
    ids = []
    for body in bodies:
        r = await h.client.post("/v1/slow/chat/completions", json=body)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    return ids


async def direct(sim_url: str, body: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in body.items() if k != "metadata"}
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(sim_url + "/chat/completions", json=body)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out


async def until(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_probe_reads_the_engine_and_a_queue_holds_background(
    sim: str, sqlite_url: str
) -> None:
    h, ctx = await start_app(sim, sqlite_url)
    try:
        lane = h.state.engines.lanes["sim"]
        await until(lambda: lane.snapshot().probe_error is None)
        assert lane.probe.url == sim.removesuffix("/v1") + "/metrics"
        # other clients fill the engine past its 4 running sequences: a queue forms, longer
        # than the few requests a quiet lane tolerates (arrivals between two engine steps)
        async with httpx.AsyncClient(timeout=30) as c:
            outside = [
                asyncio.create_task(
                    c.post(sim + "/chat/completions", json={**slow_body(1000 + i, 150)})
                )
                for i in range(16)
            ]
            await until(lambda: lane.held() is Held.ENGINE_QUEUE)
            ids = await submit(h, [slow_body(i, 4) for i in range(6)])
            await asyncio.sleep(0.1)
            # nothing of ours started while the engine had a queue
            assert lane.controller.background_inflight == 0
            ready = (await h.client.get("/readyz")).json()["scheduler"]["sim"]
            assert ready["held"] == "engine_queue" and ready["engine"]["waiting"] > 0
            await asyncio.gather(*outside)
        for gid in ids:
            done = await h.wait_terminal(gid)
            assert done["state"] == "Success"
    finally:
        await h.client.aclose()
        await ctx.__aexit__(None, None, None)


async def test_preempted_generation_completes_with_its_full_result(
    sim: str, sqlite_url: str
) -> None:
    h, ctx = await start_app(sim, sqlite_url, preempt=True)
    try:
        lane = h.state.engines.lanes["sim"]
        bodies = [slow_body(i, 150) for i in range(4)]
        ids = await submit(h, bodies)
        await until(lambda: len(lane._running) >= 2)
        r = await h.client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "now"}], "stream": True},
        )
        assert r.status_code == 200 and "[DONE]" in r.text
        assert lane.counters.preempted >= 2  # the window dropped to 0: all of it yielded
        for gid, body in zip(ids, bodies, strict=True):
            done = await h.wait_terminal(gid, timeout=30)
            assert done["state"] == "Success", done
            expected = await direct(sim, body)
            got = done["response"]["choices"][0]["message"]["content"]
            assert got == expected["choices"][0]["message"]["content"]
            assert done["response"]["usage"]["completion_tokens"] == 150
        records = [await h.state.store.generations.get("default", gid) for gid in ids]
        assert all(rec.attempts == 1 for rec in records), [rec.attempts for rec in records]
        async with httpx.AsyncClient() as c:
            stats = (await c.get(sim.removesuffix("/v1") + "/stats")).json()
        assert stats["requests_aborted"] >= 2  # the engine saw the aborts
        text = (await h.client.get("/metrics")).text
        assert 'backburner_lane_preempted_total{backend="sim"}' in text
    finally:
        await h.client.aclose()
        await ctx.__aexit__(None, None, None)


async def test_background_priority_is_sent_to_the_engine(sqlite_url: str) -> None:
    config = SimConfig(model=MODEL, max_num_seqs=4, time_scale=0.05, scheduling_policy="priority")
    async with running_sim(config) as url:
        h, ctx = await start_app(url, sqlite_url, background_priority=10)
        try:
            (gid,) = await submit(h, [slow_body(1, 4)])
            assert (await h.wait_terminal(gid))["state"] == "Success"
        finally:
            await h.client.aclose()
            await ctx.__aexit__(None, None, None)
    # the same with an fcfs engine fails: the engine refuses non-zero priorities, so the field
    # was really sent
    config = SimConfig(model=MODEL, max_num_seqs=4, time_scale=0.05)
    async with running_sim(config) as url:
        h, ctx = await start_app(url, sqlite_url, background_priority=10)
        try:
            (gid,) = await submit(h, [slow_body(2, 4)])
            done = await h.wait_terminal(gid)
            assert done["state"] == "Failed" and "priority" in done["stateMessage"]
        finally:
            await h.client.aclose()
            await ctx.__aexit__(None, None, None)
