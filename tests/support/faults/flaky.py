"""Scenario 2: an upstream that fails a share of its requests (5xx, resets, timeouts)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from tests.support.faults import common
from tests.support.faults.common import (
    ECHO,
    Report,
    answered,
    asked,
    chat,
    prompt,
    span,
)
from tests.support.faults.peek import Peek

# what a generation that failed on its last try says, by what that try got
SAID = {
    "500": "upstream HTTP 500: ",
    "502": "upstream HTTP 502: ",
    "reset": "upstream connection error: ",
    "timeout": "upstream timeout: ",
    "ok": "upstream timeout: ",
}


async def flaky_upstream(
    work: Path,
    database_url: str,
    store: str,
    *,
    n: int,
    fail_rate: float = 0.3,
    max_attempts: int = 3,
    timeout_seconds: float = 1.0,
    seed: int = 10,
    within: float = 300.0,
) -> Report:
    """``backburner serve`` drains ``n`` generations against an upstream that fails
    ``fail_rate`` of its requests: 500, 502, a connection reset, or no answer within the
    backend's ``timeout_seconds``. Promises: every generation ends (Success or Failed), after at
    most ``max_attempts`` tries, each try one upstream request; a Success holds its own answer;
    a Failed one used every try and says why."""
    report = Report(f"upstream failing {fail_rate:.0%}", store)
    started = time.monotonic()
    tag = f"flaky-{int(time.time() * 1000)}"
    async with common.rig(work, database_url) as rig:
        up = await rig.upstream(fail_rate=fail_rate, hang_seconds=timeout_seconds * 3, seed=seed)
        cfg = rig.config(
            up,
            max_concurrency=32,
            max_attempts=max_attempts,
            retry_base_seconds=0.05,
            retry_cap_seconds=0.2,
            lease_seconds=10.0,
            backend_options={"timeout_seconds": timeout_seconds},
        )
        srv = await rig.serve(cfg)
        texts = [prompt(tag, i) for i in range(n)]
        group_ids = await common.submit_groups(
            srv.base_url, [chat(t, f"c{i}") for i, t in enumerate(texts)]
        )
        peek = Peek(database_url)
        try:
            drain_s = await common.drained(peek, n, within, [srv])
        finally:
            await peek.close()
        gens = await common.fetch_groups(srv.base_url, group_ids)
        seen = await common.upstream_seen(up)

    fates = Counter(f for t in texts for f in seen.get(t, []))
    states = Counter(g["state"] for g in gens)
    report.figures.update(
        {
            "generations": n,
            "Success": states["Success"],
            "Failed": states["Failed"],
            "not terminal": n - states["Success"] - states["Failed"],
            "upstream requests": sum(fates.values()),
            "retries": sum(fates.values()) - n,
            "injected": ", ".join(f"{fates[m]} {m}" for m in ("500", "502", "reset", "timeout")),
            "attempts": span(g["attempts"] for g in gens),
            "max_attempts": max_attempts,
            "drain s": round(drain_s, 1),
        }
    )
    report.check(len(gens) == n, f"{len(gens)} generations listed, {n} sent")
    for g in gens:
        text, tries = asked(g), seen.get(asked(g), [])
        where = f"generation {g['id']} ({text!r}, upstream saw {tries})"
        report.check(g["state"] in common.TERMINAL, f"{where} is {g['state']}")
        report.check(1 <= g["attempts"] <= max_attempts, f"{where}: {g['attempts']} attempts")
        report.check(len(tries) == g["attempts"], f"{where}: {g['attempts']} attempts")
        if g["state"] == "Success":
            report.check(answered(g) == ECHO + text, f"{where}: answer {answered(g)!r}")
            report.check(bool(tries) and tries[-1] == "ok", f"{where}: Success, last try failed")
        elif g["state"] == "Failed":
            # the message names the last try's failure ("ok" too: its answer came too late)
            said = SAID[tries[-1] if tries else "ok"]
            report.check(
                g["attempts"] == max_attempts
                and g["stateMessage"].startswith(f"Failed after {max_attempts} attempts: {said}"),
                f"{where}: Failed with {g['attempts']} attempts: {g['stateMessage']!r}",
            )
    for mode in ("500", "502", "reset", "timeout"):
        report.check(fates[mode] > 0, f"no {mode} was injected: the run proves nothing about it")
    report.seconds = time.monotonic() - started
    return report
