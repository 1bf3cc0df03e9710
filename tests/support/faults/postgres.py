"""Scenario 4: the PostgreSQL server stops mid-drain and starts again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.support.faults import common
from tests.support.faults.common import (
    Report,
    chat,
    check_echoed,
    prompt,
    span,
    until,
)
from tests.support.faults.peek import Peek
from tests.support.faults.private_pg import PrivatePostgres
from tests.support.receiver import running_receiver


async def postgres_restart(
    work: Path,
    cluster: PrivatePostgres,
    *,
    n: int,
    down_seconds: float,
    mode: str = "immediate",
    lease_seconds: float = 2.0,
    max_lost_leases: int = 10,
    within: float = 300.0,
) -> Report:
    """``backburner serve`` drains ``n`` generations (each subscribed to a webhook) from a
    private PostgreSQL cluster, which is stopped (``pg_ctl stop -m MODE``) once a third of them
    are Success and started again ``down_seconds`` later; then 50 more are submitted. Promises:
    the process survives and recovers by itself (the API answers and takes work again, the
    worker and the webhook dispatcher carry on), every generation ends Success with its own
    answer, with one ``generation.completed`` event, delivered. (``max_lost_leases`` is the
    setting: a generation whose lease runs out that many times fails.)"""
    report = Report(f"PostgreSQL stopped ({mode}) {down_seconds:.0f} s mid-drain", "postgres")
    started = time.monotonic()
    tag = f"pg-{int(time.time() * 1000)}"
    async with common.rig(work, cluster.url) as rig, running_receiver() as receiver:
        up = await rig.upstream(latency_ms=20.0)
        cfg = rig.config(
            up,
            max_concurrency=32,
            lease_seconds=lease_seconds,
            max_lost_leases=max_lost_leases,
            webhook_retry_schedule_seconds=[0.5] * 20,
            webhook_lease_seconds=lease_seconds,
            webhook_poll_interval_seconds=0.05,
        )
        srv = await rig.serve(cfg)
        hook = await common.create_webhook(srv.base_url, receiver.url)
        texts = [prompt(tag, i) for i in range(n + common.GROUP_SIZE)]
        bodies = [chat(t, f"c{i}", hook["id"]) for i, t in enumerate(texts)]
        group_ids = await common.submit_groups(srv.base_url, bodies[:n])
        peek = Peek(cluster.url)
        try:

            async def a_third() -> bool:
                return await peek.count("Success") >= n // 3

            await until(a_third, within, f"{n // 3} Success before the stop", alive=[srv])
            held = len(await peek.leases())
            await asyncio.to_thread(cluster.stop, mode)
            down = await _answers_for(srv.base_url, f"/v1/slow/group/{group_ids[0]}", down_seconds)
            await asyncio.to_thread(cluster.start)
            restarted = time.monotonic()
            errors_after = await _until_answered(srv.base_url, f"/v1/slow/group/{group_ids[0]}")
            api_back = time.monotonic() - restarted
            group_ids += await common.submit_groups(srv.base_url, bodies[n:])
            await common.drained(peek, len(texts), within, [srv])
            drain_after = time.monotonic() - restarted

            async def delivered() -> bool:
                return all(e.state == "delivered" for e in await peek.events())

            await until(delivered, 60.0, "every webhook event delivered", alive=[srv])
            states = await peek.states()
            events = await peek.events()
        finally:
            await peek.close()
        gens = await common.fetch_groups(srv.base_url, group_ids)
        seen = await common.upstream_seen(up)
        alive = srv.popen.poll() is None
        posts = receiver.posts()

    per_generation = Counter(e.about for e in events if e.event == "generation.completed")
    report.figures.update(
        {
            "generations": len(texts),
            "Success": states["Success"],
            "lost": len(texts) - states["Success"],
            "In Progress at the stop": held,
            "re-runs": common.reruns(seen, texts),
            "attempts": span(g["attempts"] for g in gens),
            "API answers while down": dict(sorted(down.items())),
            "API errors after start": errors_after,
            "API back s": round(api_back, 1),
            "drained s after start": round(drain_after, 1),
            "events per generation": span(per_generation[g["id"]] for g in gens),
            "webhook posts": len(posts),
        }
    )
    failed = Counter(g["stateMessage"] for g in gens if g["state"] == "Failed")
    if failed:
        report.figures["Failed, saying"] = dict(failed)
    report.check(alive, "the server process died")
    report.check(states["Success"] == len(texts), f"lost work: states {dict(states)}")
    report.check(
        set(down) <= {0, 500, 503}, f"while the database was down the API answered {dict(down)}"
    )
    never_run = [t for t in texts if not seen.get(t)]
    report.check(not never_run, f"{len(never_run)} prompts never reached the upstream")
    check_echoed(report, gens, texts)
    twice = [g["id"] for g in gens if per_generation[g["id"]] != 1]
    report.check(not twice, f"{len(twice)} generations without exactly one event: {twice[:5]}")
    report.check(
        {p.json().get("generation_id") for p in posts} == {g["id"] for g in gens},
        "the receiver did not get an event for every generation",
    )
    report.seconds = time.monotonic() - started
    return report


async def _answers_for(base: str, path: str, seconds: float) -> Counter[int]:
    """``GET path`` every 0.25 s for ``seconds``: how many answers of each status (0: none)."""
    answers = Counter[int]()
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as c:
        while time.monotonic() < stop:
            try:
                answers[(await c.get(path)).status_code] += 1
            except httpx.HTTPError:
                answers[0] += 1
            await asyncio.sleep(0.25)
    return answers


async def _until_answered(base: str, path: str, within: float = 60.0) -> int:
    """``GET path`` every 0.1 s until it answers 200; returns how many tries failed first."""
    failed = 0
    stop = time.monotonic() + within
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as c:
        while time.monotonic() < stop:
            try:
                if (await c.get(path)).status_code == 200:
                    return failed
            except httpx.HTTPError:
                pass
            failed += 1
            await asyncio.sleep(0.1)
    raise AssertionError(f"GET {path} did not answer 200 within {within:.0f} s of the restart")
