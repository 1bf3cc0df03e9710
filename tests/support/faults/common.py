"""What the fault scenarios share: the report of a run, the processes of a run (a
:class:`Rig` kills what it started), its database, bounded waits, and the client calls."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import pgdb, procs
from tests.support.faults.peek import Peek

MODEL = procs.UPSTREAM_MODEL
TERMINAL = ("Success", "Failed")
ECHO = "echo: "  # the upstream answers "echo: <prompt>"
GROUP_SIZE = 50  # the most one group may hold
STORES = ("sqlite", "postgres")


@dataclass
class Report:
    """What one scenario run did: its figures, in order, and every broken promise it found."""

    scenario: str
    store: str
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def summary(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.figures.items())
        return f"{self.scenario} on {self.store} ({self.seconds:.1f} s): {shown}"


class Rig:
    """The processes of one scenario run, in ``work``; :meth:`close` kills what is left."""

    def __init__(self, work: Path, database_url: str) -> None:
        self.work = work
        self.database_url = database_url
        self.started: list[procs.Proc] = []

    async def upstream(self, **options: Any) -> procs.Proc:
        p = await asyncio.to_thread(procs.start_upstream, self.work, **options)
        self.started.append(p)
        return p

    async def serve(self, config: Path, *extra_args: str) -> procs.Proc:
        p = await asyncio.to_thread(
            procs.start_serve, config, self.work, extra_args=extra_args, timeout=90.0
        )
        self.started.append(p)
        return p

    def worker(self, config: Path) -> procs.Proc:
        p = procs.start_worker(config, self.work)
        self.started.append(p)
        return p

    def config(self, upstream: procs.Proc, **settings: Any) -> Path:
        defaults: dict[str, Any] = {
            "poll_interval_seconds": 0.05,
            "maintenance_interval_seconds": 0.5,
            "retry_base_seconds": 0,
            "log_level": "warning",
            "files_dir": str(self.work / "files"),
        }
        return procs.write_config(
            self.work / "backburner.toml",
            self.database_url,
            upstream_url=upstream.base_url,
            **{**defaults, **settings},
        )

    async def kill(self, proc: procs.Proc) -> None:
        await asyncio.to_thread(procs.kill, proc)

    async def close(self) -> None:
        for p in reversed(self.started):
            await asyncio.to_thread(procs.kill, p)


@contextlib.asynccontextmanager
async def database(work: Path, store: str, pg_base: str | None) -> AsyncIterator[str]:
    """An empty database for one run: a SQLite file in ``work``, or a fresh PostgreSQL database
    on ``pg_base``'s server (dropped afterwards)."""
    if store == "sqlite":
        yield f"sqlite:///{work}/bb.db"
        return
    if pg_base is None:
        raise ValueError("a PostgreSQL run needs the server's URL")
    url = await pgdb.create_database(pg_base, "bb_faults")
    try:
        yield url
    finally:
        await pgdb.drop_database(url)


@contextlib.asynccontextmanager
async def rig(work: Path, database_url: str) -> AsyncIterator[Rig]:
    r = Rig(work, database_url)
    try:
        yield r
    finally:
        await r.close()


async def until(
    check: Callable[[], Awaitable[bool]],
    within: float,
    what: str,
    *,
    interval: float = 0.05,
    alive: Sequence[procs.Proc] = (),
) -> float:
    """Poll ``check`` until it holds; returns the seconds it took. Raises AssertionError naming
    ``what`` after ``within`` seconds, or at once when a process in ``alive`` died."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        for p in alive:
            if p.popen.poll() is not None:
                raise AssertionError(
                    f"{what}: {p.argv[1:2]} exited with {p.popen.returncode};"
                    f" log tail:\n{p.log_tail()}"
                )
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(interval)


async def drained(
    peek: Peek, n: int, within: float, alive: Sequence[procs.Proc], what: str = ""
) -> float:
    """Wait until all ``n`` generations are terminal; returns the seconds it took. A database
    that cannot be read right now (it is restarting) counts as not yet."""

    async def done() -> bool:
        try:
            states = await peek.states()
        except Exception:
            return False
        return sum(states[s] for s in TERMINAL) == n

    return await until(done, within, what or f"all {n} generations terminal", alive=alive)


def prompt(tag: str, i: int) -> str:
    """The ``i``-th unique prompt of a run: the upstream counts runs per prompt."""
    return f"{tag} {i}"


def chat(text: str, custom_id: str, hook_id: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"custom_id": custom_id}
    if hook_id is not None:
        metadata["webhook_id"] = hook_id
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 16,
        "metadata": metadata,
    }


def asked(generation: dict[str, Any]) -> str:
    """The prompt of a generation (its last user message)."""
    return str(generation["request"]["messages"][-1]["content"])


def answered(generation: dict[str, Any]) -> str | None:
    response = generation.get("response")
    if not response:
        return None
    return str(response["choices"][0]["message"]["content"])


async def create_webhook(base: str, url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=30.0) as c:
        r = await c.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 200, r.text
    hook: dict[str, Any] = r.json()
    return hook


async def submit_groups(
    base: str,
    bodies: Sequence[dict[str, Any]],
    *,
    group_hook: str | None = None,
    concurrency: int = 4,
) -> list[str]:
    """Submit ``bodies`` as groups of 50; returns the group ids in order."""
    chunks = [list(bodies[i : i + GROUP_SIZE]) for i in range(0, len(bodies), GROUP_SIZE)]
    ids = [""] * len(chunks)
    todo = iter(range(len(chunks)))
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as c:

        async def submitter() -> None:
            for k in todo:
                body: dict[str, Any] = {"requests": chunks[k]}
                if group_hook is not None:
                    body["webhook_id"] = group_hook
                r = await c.post("/v1/slow/group/chat/completions", json=body)
                assert r.status_code == 200, r.text
                ids[k] = r.json()["groupId"]

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(submitter())
    return ids


async def fetch_groups(base: str, group_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Every generation of the groups, in submission order (``GET .../generations``)."""
    group_ids = list(group_ids)
    out: list[list[dict[str, Any]]] = [[] for _ in group_ids]
    sem = asyncio.Semaphore(4)
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as c:

        async def fetch(k: int) -> None:
            async with sem:
                r = await c.get(f"/v1/slow/group/{group_ids[k]}/generations")
            assert r.status_code == 200, r.text
            out[k] = r.json()["generations"]

        async with asyncio.TaskGroup() as tg:
            for k in range(len(group_ids)):
                tg.create_task(fetch(k))
    return [g for chunk in out for g in chunk]


async def upstream_seen(upstream: procs.Proc) -> dict[str, list[str]]:
    """Every completion request the upstream got, by prompt, with what it answered."""
    async with httpx.AsyncClient(base_url=upstream.base_url, timeout=30.0) as c:
        r = await c.get("/seen")
    r.raise_for_status()
    prompts: dict[str, list[str]] = r.json()["prompts"]
    return prompts


def reruns(seen: dict[str, list[str]], texts: Iterable[str]) -> int:
    """Upstream requests beyond the first, summed over the prompts ``texts``."""
    return sum(max(0, len(seen.get(t, [])) - 1) for t in texts)


def most(values: Iterable[int]) -> int:
    return max(values, default=0)


def span(values: Iterable[int]) -> str:
    """``3`` or ``1-3``: the range of ``values``."""
    got = list(values)
    if not got:
        return "-"
    low, high = min(got), max(got)
    return str(low) if low == high else f"{low}-{high}"


def check_echoed(report: Report, gens: list[dict[str, Any]], texts: list[str]) -> None:
    """Every generation Success, answering its own prompt (the upstream echoes it)."""
    report.check(len(gens) == len(texts), f"{len(gens)} generations listed, {len(texts)} sent")
    wrong = [
        g["id"]
        for g, text in zip(gens, texts, strict=False)
        if g["state"] != "Success" or asked(g) != text or answered(g) != ECHO + text
    ]
    report.check(
        not wrong, f"{len(wrong)} generations not Success with their own answer: {wrong[:5]}"
    )
