"""Scenario 1: SIGKILL a ``backburner worker`` again and again mid-drain."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

from tests.support.faults import common
from tests.support.faults.common import (
    Report,
    asked,
    chat,
    check_echoed,
    prompt,
    span,
    until,
)
from tests.support.faults.peek import Peek
from tests.support.receiver import running_receiver


async def kill_worker_drain(
    work: Path,
    database_url: str,
    store: str,
    *,
    n: int,
    kills: int,
    concurrency: int = 32,
    latency_ms: float = 20.0,
    lease_seconds: float = 2.0,
    within: float = 600.0,
) -> Report:
    """``backburner serve --no-worker`` takes ``n`` generations (groups of 50, every request
    subscribed to a webhook); then a ``backburner worker`` drains them and is SIGKILLed ``kills``
    times, at evenly spaced points of the drain (after k/(kills+1) of the work is Success),
    and started again at once. Promises: nothing lost (all ``n`` Success, each with its own
    answer), no result recorded twice (one ``generation.completed`` event per generation, each
    delivered under one ``webhook-id``), and only work in flight at a kill runs again (every
    extra upstream request is of a generation held, In Progress, by a killed worker)."""
    report = Report("kill -9 the worker mid-drain", store)
    started = time.monotonic()
    tag = f"kill-{int(time.time() * 1000)}"
    jitter = random.Random(kills)
    async with common.rig(work, database_url) as rig, running_receiver() as receiver:
        up = await rig.upstream(latency_ms=latency_ms)
        cfg = rig.config(
            up,
            max_concurrency=concurrency,
            lease_seconds=lease_seconds,
            webhook_retry_schedule_seconds=[0.5] * 20,
            webhook_lease_seconds=lease_seconds,
            webhook_timeout_seconds=5.0,
            webhook_poll_interval_seconds=0.05,
        )
        api = await rig.serve(cfg, "--no-worker")
        hook = await common.create_webhook(api.base_url, receiver.url)
        texts = [prompt(tag, i) for i in range(n)]
        bodies = [chat(t, f"c{i}", hook["id"]) for i, t in enumerate(texts)]
        t0 = time.monotonic()
        group_ids = await common.submit_groups(api.base_url, bodies)
        report.figures["submit s"] = round(time.monotonic() - t0, 1)

        peek = Peek(database_url)
        try:
            held_at_kills: set[tuple[str, str]] = set()
            per_kill: list[int] = []
            drain_start = time.monotonic()
            worker = rig.worker(cfg)
            for k in range(1, kills + 1):
                target = k * n // (kills + 1)

                async def reached(target: int = target) -> bool:
                    return await peek.count("Success") >= target

                await until(reached, within, f"{target} Success before kill {k}", alive=[worker])
                await asyncio.sleep(jitter.uniform(0.0, 0.2))  # not always right after a write
                await rig.kill(worker)
                report.check(worker.popen.returncode == -9, f"kill {k}: not a SIGKILL")
                held = await peek.leases()  # frozen: its holder is dead
                per_kill.append(len(held - held_at_kills))
                held_at_kills |= held
                worker = rig.worker(cfg)

            await common.drained(peek, n, within, [worker], f"all {n} terminal after the kills")
            drain_s = time.monotonic() - drain_start
            events = await peek.events()

            async def delivered() -> bool:
                return all(e.state == "delivered" for e in await peek.events())

            await until(delivered, 60.0, "every webhook event delivered", alive=[worker])
            await asyncio.sleep(0.5)  # a late duplicate, if any, would land now
            states = await peek.states()
        finally:
            await peek.close()
        gens = await common.fetch_groups(api.base_url, group_ids)
        seen = await common.upstream_seen(up)
        posts = receiver.posts()

    held_ids = Counter(gid for gid, _ in held_at_kills)
    by_prompt = {asked(g): g for g in gens}
    rerun_not_held = [
        t for t in texts if len(seen.get(t, [])) - 1 > held_ids[by_prompt.get(t, {}).get("id", "")]
    ]
    never_run = [t for t in texts if not seen.get(t)]
    per_generation = Counter(e.about for e in events if e.event == "generation.completed")
    ids_per_generation: dict[str, set[str]] = {}
    for post in posts:
        body = post.json()
        ids_per_generation.setdefault(body.get("generation_id", ""), set()).add(
            post.headers["webhook-id"]
        )
    extra = common.reruns(seen, texts)
    report.figures.update(
        {
            "generations": n,
            "Success": states["Success"],
            "lost": n - states["Success"],
            "kills": kills,
            "kills with work in flight": sum(1 for h in per_kill if h),
            "held at kills": sum(per_kill),
            "most held at one kill": common.most(per_kill),
            "max_concurrency": concurrency,
            "re-runs": extra,
            "events per generation": span(per_generation[g["id"]] for g in gens),
            "attempts": span(g["attempts"] for g in gens),
            "webhook posts": len(posts),
            "duplicate posts": len(posts) - len({p.headers["webhook-id"] for p in posts}),
            "drain s": round(drain_s, 1),
        }
    )
    check_echoed(report, gens, texts)
    report.check(states["Success"] == n, f"lost work: states {dict(states)}")
    report.check(not never_run, f"{len(never_run)} prompts never reached the upstream")
    report.check(
        not rerun_not_held,
        f"{len(rerun_not_held)} generations ran again though no killed worker held them:"
        f" {rerun_not_held[:5]}",
    )
    report.check(extra <= sum(per_kill), f"{extra} re-runs > {sum(per_kill)} held at kills")
    twice = [g["id"] for g in gens if per_generation[g["id"]] != 1]
    report.check(not twice, f"{len(twice)} generations without exactly one event: {twice[:5]}")
    report.check(
        set(ids_per_generation) == {g["id"] for g in gens},
        "the receiver did not get an event for every generation",
    )
    many = [g for g, ids in ids_per_generation.items() if len(ids) != 1]
    report.check(not many, f"{len(many)} generations delivered under several webhook-ids")
    report.check(any(per_kill), "no kill landed while the worker held work")
    report.seconds = time.monotonic() - started
    return report
