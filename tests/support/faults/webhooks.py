"""Scenario 3: the webhook receiver is down for a while, then up."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook

from tests.support import procs
from tests.support.faults import common
from tests.support.faults.common import (
    Report,
    chat,
    check_echoed,
    prompt,
    until,
)
from tests.support.faults.peek import Peek
from tests.support.receiver import running_receiver


async def webhook_outage(
    work: Path,
    database_url: str,
    store: str,
    *,
    n: int,
    down_seconds: float,
    schedule: list[float] | None,
    within: float = 120.0,
) -> Report:
    """``backburner serve`` runs ``n`` generations, each subscribed to a webhook (and each group
    of 50 to ``slow-group.completed``), while nothing listens on the webhook's port; the receiver
    comes up ``down_seconds`` after the first submission (later if some event had not been tried
    by then: every event fails at least once). ``schedule`` is
    ``webhook_retry_schedule_seconds`` (None: the default, 5 s then 5 min...). Promises: every
    event is delivered, each under one ``webhook-id`` (a retry repeats it, body unchanged and
    signed), and every event had failed while the receiver was down."""
    report = Report(f"webhook receiver down {down_seconds:.0f} s", store)
    started = time.monotonic()
    tag = f"hook-{int(time.time() * 1000)}"
    port = procs.free_port()
    settings: dict[str, Any] = {
        "webhook_timeout_seconds": 2.0,
        "webhook_poll_interval_seconds": 0.1,
        "webhook_lease_seconds": 10.0,
    }
    if schedule is not None:
        settings["webhook_retry_schedule_seconds"] = schedule
    async with common.rig(work, database_url) as rig:
        up = await rig.upstream()
        cfg = rig.config(up, max_concurrency=32, **settings)
        srv = await rig.serve(cfg)
        hook = await common.create_webhook(srv.base_url, f"http://127.0.0.1:{port}/hook")
        texts = [prompt(tag, i) for i in range(n)]
        t0 = time.monotonic()
        group_ids = await common.submit_groups(
            srv.base_url,
            [chat(t, f"c{i}", hook["id"]) for i, t in enumerate(texts)],
            group_hook=hook["id"],
        )
        expected = n + len(group_ids)
        peek = Peek(database_url)
        try:

            async def all_tried() -> bool:
                events = await peek.events()
                tried = await peek.failed_attempts()
                return len(events) == expected and all(tried[e.id] for e in events)

            # the outage lasts down_seconds, and at least until every event has failed once
            await until(all_tried, within, "every event tried while down", alive=[srv])
            await asyncio.sleep(max(0.0, down_seconds - (time.monotonic() - t0)))
            failed_while_down = await peek.failed_attempts()
            events = await peek.events()
            async with running_receiver(port=port) as receiver:
                up_at = time.monotonic()

                async def delivered() -> bool:
                    return all(e.state == "delivered" for e in await peek.events())

                catch_up = await until(delivered, within, "every event delivered", alive=[srv])
                await asyncio.sleep(0.5)  # a late duplicate, if any, would land now
                posts = receiver.posts()
            events = await peek.events()
        finally:
            await peek.close()
        gens = await common.fetch_groups(srv.base_url, group_ids)

    by_id = {e.id: e for e in events}
    bodies: dict[str, set[bytes]] = {}
    bad_signatures = 0
    verifier = Webhook(hook["secret"])
    for post in posts:
        bodies.setdefault(post.headers.get("webhook-id", ""), set()).add(post.body)
        try:
            verifier.verify(post.body, post.headers)
        except Exception:
            bad_signatures += 1
    per_about = Counter(e.about for e in events)
    report.figures.update(
        {
            "events": len(events),
            "delivered": sum(1 for e in events if e.state == "delivered"),
            "failed attempts while down": sum(failed_while_down.values()),
            "webhook-ids received": len(bodies),
            "duplicate posts": len(posts) - len(bodies),
            "all delivered s after up": round(catch_up, 1),
            "down s": round(up_at - t0, 1),
        }
    )
    report.check(len(events) == expected, f"{len(events)} events, expected {expected}")
    report.check(
        all(e.state == "delivered" for e in events),
        f"undelivered: {[e.id for e in events if e.state != 'delivered'][:5]}",
    )
    report.check(set(bodies) == set(by_id), "the webhook-ids received are not the events' ids")
    changed = [i for i, b in bodies.items() if len(b) != 1]
    report.check(not changed, f"{len(changed)} webhook-ids arrived with different bodies")
    report.check(bad_signatures == 0, f"{bad_signatures} posts failed signature verification")
    report.check(
        all(failed_while_down[e.id] for e in events),
        "some events were not tried (and failed) while the receiver was down",
    )
    about = [g["id"] for g in gens] + group_ids
    report.check(
        all(per_about[a] == 1 for a in about) and len(per_about) == len(about),
        "not exactly one event per generation and per group",
    )
    check_echoed(report, gens, texts)
    report.seconds = time.monotonic() - started
    return report
