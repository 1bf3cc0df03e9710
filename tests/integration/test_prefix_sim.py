"""Prefix runs on the engine simulator: the engine's prefix-cache hits and the order in which it
sees the prompts, with prefix runs on and off (counts, not timings); and the fairness bound: a
tenant's lone request behind another tenant's batch of one prefix waits at most one round."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backburner.config import BackendSettings
from backburner.core.states import Kind
from backburner.schemas.batch import BatchCreate
from backburner.schemas.generation import NewGeneration
from backburner.services import Services
from tests.support.engine_sim import SimConfig, running_sim
from tests.support.fake_backend import FakeBackend
from tests.support.services import MODEL as FAKE_MODEL
from tests.support.services import burst_services, burst_settings

SIM_MODEL = "sim-model"
PREFIXES = 3
PER_PREFIX = 20
BLOCK = 16
SYSTEM_WORDS = 200  # 13 blocks of 16 tokens


def system_prompt(p: int) -> str:
    # distinct from the first word on, so that each prompt's first block differs
    return f"policy-{p} " + " ".join(f"p{p}w{i}" for i in range(SYSTEM_WORDS))


def chat(model: str, system: str, question: str, max_tokens: int = 4) -> NewGeneration:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
    }
    return NewGeneration(Kind.CHAT, model, body)


def runs(heads: list[str]) -> int:
    """Stretches of consecutive arrivals with the same system prompt."""
    return sum(1 for i, h in enumerate(heads) if i == 0 or heads[i - 1] != h)


async def drain_on_sim(
    database_url: str, files_dir: Path, *, prefix_runs: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """3 prompts x 20 requests, interleaved in fair order (p0 p1 p2 p0 ...), drained by one
    worker on a fresh simulator whose prefix cache holds about 1.5 prompts; returns the
    engine's stats and its arrivals."""
    prompt_blocks = (SYSTEM_WORDS + 4) // BLOCK
    config = SimConfig(
        model=SIM_MODEL,
        max_num_seqs=4,
        block_size=BLOCK,
        prefix_cache_blocks=prompt_blocks * 3 // 2,
        time_scale=0.02,
    )
    async with running_sim(config) as url:
        settings = burst_settings(
            database_url,
            files_dir,
            backends=[
                BackendSettings(
                    name="sim",
                    type="openai",
                    base_url=url,
                    models=[SIM_MODEL],
                    max_concurrency=4,
                    background_gate=False,
                )
            ],
            prefix_runs=prefix_runs,
            # this test is about runs; the fairness bound has its own test below
            prefix_fair_every=1000,
        )
        services = Services.from_settings(settings, run_worker=True)
        await services.start()
        try:
            for i in range(PREFIXES * PER_PREFIX):
                p = i % PREFIXES
                item = chat(SIM_MODEL, system_prompt(p), f"question {i}?")
                await services.store.generations.submit("t", item, expiry_seconds=3600)
            assert services.worker is not None
            await services.worker.run(burst=True)
            counts = await services.store.generations.count_by_state()
        finally:
            await services.close()
        async with httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=10) as c:
            stats: dict[str, Any] = (await c.get("/stats")).json()
            arrivals: list[dict[str, Any]] = (await c.get("/arrivals")).json()["arrivals"]
    assert counts == {"Success": stats["requests_finished"]}
    return stats, arrivals


async def test_prefix_runs_raise_cache_hits_and_the_engine_sees_prompts_in_runs(
    sqlite_template: Path, tmp_path: Path
) -> None:
    urls = []
    for mode in ("fair", "runs"):
        (tmp_path / mode).mkdir()
        shutil.copyfile(sqlite_template, tmp_path / mode / "bb.db")
        urls.append(f"sqlite:///{tmp_path / mode / 'bb.db'}")
    fair, fair_arrivals = await drain_on_sim(urls[0], tmp_path / "fair", prefix_runs=False)
    ours, our_arrivals = await drain_on_sim(urls[1], tmp_path / "runs", prefix_runs=True)
    n = PREFIXES * PER_PREFIX
    assert fair["requests_finished"] == ours["requests_finished"] == n
    # fair order interleaves the prompts: the engine switches prompt at almost every request,
    # and its cache (1.5 prompts) keeps almost nothing
    assert runs([a["head"] for a in fair_arrivals]) >= n // 2
    # prefix runs: each prompt arrives in a few stretches (its first request alone, then its
    # siblings: 6 when nothing interferes), so the cache serves far more of the prompt tokens
    assert runs([a["head"] for a in our_arrivals]) <= 4 * PREFIXES
    assert ours["prefix_cache_hits"] > fair["prefix_cache_hits"]
    assert ours["prefix_cache_hits"] >= ours["prefix_cache_queries"] / 2
    # a miss per prompt for its first request, and at most one claim's worth (the engine's 4
    # slots) of its siblings that reach the engine before the prompt is back in its cache
    hit_requests = sum(1 for a in our_arrivals if a["cached_tokens"] > 0)
    assert hit_requests >= n - PREFIXES * (1 + 4)
    # ... and prefill computed by the engine falls accordingly
    assert ours["prefill_tokens_computed"] < fair["prefill_tokens_computed"]


# ------------------------------------------------------------------ fairness
BATCH_LINES = 500
FAIR_EVERY = 16
CONCURRENCY = 4


@pytest.fixture
def engine() -> FakeBackend:
    return FakeBackend("fake", delay=0.002)


@pytest.fixture
async def services(sqlite_url: str, engine: FakeBackend, tmp_path: Path) -> AsyncIterator[Services]:
    async with burst_services(
        sqlite_url,
        tmp_path / "files",
        engine,
        prefix_runs=True,
        prefix_fair_every=FAIR_EVERY,
    ) as built:
        yield built


async def queue_batch(services: Services, tenant: str, system: str, n: int) -> None:
    lines = "".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": FAKE_MODEL,
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"line {i}"},
                    ],
                },
            }
        )
        + "\n"
        for i in range(n)
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield lines.encode()

    await services.blobs.write("blob-a", chunks())
    await services.store.files.create(
        tenant,
        file_id="file-a",
        filename="a.jsonl",
        purpose="batch",
        bytes=len(lines),
        lines=n,
        sha256=None,
        blob="blob-a",
    )
    await services.store.batches.create(
        tenant,
        BatchCreate(
            input_file_id="file-a", endpoint="/v1/chat/completions", completion_window="24h"
        ),
    )
    assert services.batches is not None
    await services.batches.run(burst=True)  # the lines are queued


def user_text(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


LONE = "b's only question"


async def lone_request_wait(services: Services, engine: FakeBackend, give_up: int) -> int | None:
    """Tenant a's 500-line batch of one prefix is running in a run when tenant b submits one
    request; returns how many of a's requests the engine started between b's submission and
    b's request (None: more than ``give_up``). The worker stops there: the rest of the batch
    would tell nothing more."""
    await queue_batch(services, "a", system_prompt(0), BATCH_LINES)
    worker = services.worker
    assert worker is not None
    drain = asyncio.create_task(worker.run(burst=True))
    try:
        async with asyncio.timeout(20):
            while len(engine.calls) < 40:  # a's run is well under way
                await asyncio.sleep(0.001)
            before = len(engine.calls)
            await services.store.generations.submit(
                "b", chat(FAKE_MODEL, system_prompt(1), LONE), expiry_seconds=3600
            )
            worker.wake()
            while True:
                texts = [user_text(body) for _, body in engine.calls]
                if LONE in texts:
                    return texts.index(LONE) - before
                if len(texts) > before + give_up or drain.done():
                    return None
                await asyncio.sleep(0.001)
    finally:
        await worker.stop()
        await drain


async def test_a_lone_request_behind_a_batch_of_one_prefix_waits_one_round(
    services: Services, engine: FakeBackend
) -> None:
    waited = await lone_request_wait(services, engine, give_up=BATCH_LINES)
    # b's fair key lands just after the queue's head (a's next line, and a tie with the one
    # after it): fair order itself runs those two first. Then one round: at most fair_every
    # picks pass b over. Plus the slots of a claim made before b arrived (its runs start later)
    # and what that claim took ahead of free slots (scheduler/ahead.py: at most the window)
    assert services.worker is not None
    ahead = min(services.worker.opts.claim_ahead, CONCURRENCY)
    assert waited is not None
    assert waited <= 2 + FAIR_EVERY + CONCURRENCY + ahead


async def test_without_the_bound_the_run_would_pass_the_lone_request_over(
    services: Services, engine: FakeBackend
) -> None:
    assert services.worker is not None
    services.worker.opts.prefix_fair_every = 100_000  # read when the lane's runs are built
    waited = await lone_request_wait(services, engine, give_up=4 * FAIR_EVERY)
    assert waited is None  # so the bound above is what keeps b's wait short
