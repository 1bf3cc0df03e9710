"""Tenants: do weights share the background capacity as they say, what do limits cost at
submission, and do concurrent submitters ever get past a limit? Side by side in one run.

    python bench/tenants.py [--quick] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
                            [--no-sqlite] [--parts weights,admission,race]

Everything in this process or on loopback; each part on a fresh database per store (a SQLite
file in a temp dir; a fresh PostgreSQL database, created and dropped with asyncpg).

1. **weights**: ``tests/support/upstream.py`` answers each chat completion after
   ``--latency-ms``. For each weight pair, tenants A and B are created with those weights
   (``store.tenants.create``), A's whole backlog is queued, then B's (``--backlog`` generations
   each, in groups of 50 through ``store.groups.submit``), and only then a real worker
   (:class:`backburner.services.Services`, one ``openai`` backend on the upstream,
   ``max_concurrency = --concurrency``, every other setting at its default) starts. It is
   stopped after ``--window`` generations succeeded, while both tenants still have work queued
   (checked), and the successes are counted per tenant. The *change* row starts at 1:1 and sets
   B's weight to ``--change-to`` (``store.tenants.update``) once half the window has succeeded;
   it is split at that moment by claim time (``dispatched_at``): what was claimed before, and
   what was claimed after. Expected: A/B = weight of A / weight of B.
2. **admission**: the real ASGI app in-process (``create_app``, lifespan included, worker off so
   only the submission path is timed) on the fake engine of ``tests/support/fake_backend.py``,
   through ``httpx.ASGITransport``, with API keys. Tenant ``plain`` has no limits; tenant
   ``limited`` has every submission limit set, high enough never to refuse
   (``max_queued_generations``, ``max_batch_lines_in_flight``, ``requests_per_minute``,
   ``tokens_per_day``, and a usage row for today so that the token sum reads something). The two
   alternate request by request, so both see the same database and the same machine.
   ``-n`` slow POSTs (``/v1/slow/chat/completions``) and ``-n / 4`` group POSTs of
   ``--group-size`` (``/v1/slow/group/chat/completions``) per tenant, by ``--clients`` concurrent
   clients. Realtime (``/v1/chat/completions``): tenants ``rt-plain`` (no limits), ``rt-rpm``
   (``realtime_requests_per_minute``) and ``rt-all`` (that and ``tokens_per_day``), ``-n`` each,
   alternating; then ``-n / 2`` each again in a second app on the same database whose worker
   drains ``--busy-backlog`` generations of another tenant meanwhile (the realtime rate check
   writes, and on SQLite the writer is shared with the worker). Latency: client wall time per
   request, nearest-rank p50 and p99; every answer must be 200.
3. **race**: ``--processes`` Store instances (one per API process) on one database;
   ``--racers`` submissions start at once, racer i on Store i mod processes, against a limit of
   ``--race-limit``: single slow generations against ``max_queued_generations``, groups of 5
   against the same limit, and single generations against ``requests_per_minute``. Accepted
   must equal the limit (groups: limit / 5) exactly (the rate: plus one for every 60 / limit
   seconds the race lasted, which the GCRA lets through); the exit status is 1 otherwise.

``--timeout`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import pgdb, procs  # noqa: E402
from tests.support.fake_backend import FakeBackend  # noqa: E402
from tests.support.tenancy import race  # noqa: E402

from backburner.api.app import create_app  # noqa: E402
from backburner.config import BackendSettings, Settings  # noqa: E402
from backburner.core.clock import utcnow  # noqa: E402
from backburner.core.states import Kind, State  # noqa: E402
from backburner.schemas.generation import NewGeneration  # noqa: E402
from backburner.services import Services  # noqa: E402
from backburner.store import Store  # noqa: E402
from backburner.store.migrate import upgrade_async  # noqa: E402
from backburner.store.tables import generations, usage  # noqa: E402
from backburner.store.usage import day_of  # noqa: E402

G = generations
UPSTREAM_MODEL = procs.UPSTREAM_MODEL
FAKE_MODEL = "fake-model"
GROUP_CHUNK = 50
EXPIRY = 72 * 3600.0
#: high enough never to refuse in this bench, low enough to be a real check
NEVER = 10**9
SUBMIT_LIMITS: dict[str, int | None] = {
    "max_queued_generations": NEVER,
    "max_batch_lines_in_flight": NEVER,
    "requests_per_minute": NEVER,
    "tokens_per_day": 10**12,
}
Log = Callable[[str], None]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def chat(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}


@contextlib.asynccontextmanager
async def databases(args: argparse.Namespace, work: Path, label: str) -> AsyncIterator[str]:
    """A fresh, migrated database of the store ``label`` names."""
    if label == "SQLite":
        path = work / f"{label}-{time.monotonic_ns()}.db"
        url = f"sqlite:///{path}"
        await upgrade_async(url)
        yield url
        return
    async with pgdb.fresh_database(args.postgres, prefix="bb_bench_tenants") as url:
        await upgrade_async(url)
        yield url


# -- 1. weights ------------------------------------------------------------------------------


@dataclass
class WeightRow:
    store: str
    label: str
    a_done: int
    b_done: int
    expected: float
    seconds: float
    left: tuple[int, int] = (0, 0)  # queued when the worker stopped: A, B

    @property
    def ratio(self) -> float:
        return self.a_done / self.b_done if self.b_done else math.inf


async def _queue_backlog(store: Store, tenant: str, n: int, model: str = UPSTREAM_MODEL) -> None:
    for start in range(0, n, GROUP_CHUNK):
        items = [
            NewGeneration(Kind.CHAT, model, chat(model, f"{tenant} {i}"))
            for i in range(start, min(n, start + GROUP_CHUNK))
        ]
        await store.groups.submit(tenant, Kind.CHAT, items, expiry_seconds=EXPIRY)


async def _succeeded(store: Store) -> int:
    async with store.engine.connect() as conn:
        q = sa.select(sa.func.count()).where(G.c.state == State.SUCCESS.value)
        return int((await conn.execute(q)).scalar_one())


async def weights_case(
    url: str,
    label: str,
    upstream: procs.Proc,
    work: Path,
    args: argparse.Namespace,
    weights: tuple[float, float],
    change_to: float | None,
) -> list[WeightRow]:
    settings = Settings(
        database_url=url,
        files_dir=str(work / "files"),
        log_level="warning",
        backends=[
            BackendSettings(
                name="upstream",
                type="openai",
                base_url=upstream.base_url + "/v1",
                models=[UPSTREAM_MODEL],
                max_concurrency=args.concurrency,
            )
        ],
    )
    services = Services.from_settings(settings, run_worker=True)
    store = services.store
    changed_at: datetime | None = None
    try:
        await store.tenants.create("A", weight=weights[0])
        await store.tenants.create("B", weight=weights[1])
        await _queue_backlog(store, "A", args.backlog)
        await _queue_backlog(store, "B", args.backlog)
        await services.start()
        services.start_background()
        started = time.perf_counter()
        async with asyncio.timeout(args.case_timeout):
            while (done := await _succeeded(store)) < args.window:
                if change_to is not None and changed_at is None and done >= args.window // 2:
                    await store.tenants.update("B", weight=change_to)
                    changed_at = utcnow()
                await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        await services.stop()
        async with store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(G.c.tenant, G.c.dispatched_at).where(G.c.state == State.SUCCESS.value)
                )
            ).all()
            left_rows = (
                await conn.execute(
                    sa.select(G.c.tenant, sa.func.count())
                    .where(G.c.state == State.QUEUED.value)
                    .group_by(G.c.tenant)
                )
            ).all()
    finally:
        await services.close()
        await store.close()
    left: dict[str, int] = {str(r[0]): int(r[1]) for r in left_rows}
    queued = (int(left.get("A", 0)), int(left.get("B", 0)))
    if min(queued) == 0:
        raise AssertionError(f"{label}: a tenant ran out of work inside the window: {queued}")

    def count(part: Sequence[Any]) -> tuple[int, int]:
        return sum(r[0] == "A" for r in part), sum(r[0] == "B" for r in part)

    name = f"{weights[0]:g} : {weights[1]:g}"
    if changed_at is None:
        a, b = count(rows)
        return [WeightRow(label, name, a, b, weights[0] / weights[1], seconds, queued)]
    assert change_to is not None
    when = changed_at.replace(tzinfo=None) if rows and rows[0][1].tzinfo is None else changed_at
    before = [r for r in rows if r[1] < when]
    after = [r for r in rows if r[1] >= when]
    a1, b1 = count(before)
    a2, b2 = count(after)
    return [
        WeightRow(label, f"{name}, claimed before B -> {change_to:g}", a1, b1, 1.0, seconds),
        WeightRow(
            label,
            f"{weights[0]:g} : {change_to:g}, claimed after",
            a2,
            b2,
            weights[0] / change_to,
            seconds,
            queued,
        ),
    ]


async def bench_weights(
    label: str, upstream: procs.Proc, work: Path, args: argparse.Namespace, log: Log
) -> list[WeightRow]:
    cases: list[tuple[tuple[float, float], float | None]] = [
        ((2.0, 1.0), None),
        ((1.0, 1.0), None),
        ((4.0, 1.0), None),
        ((1.0, 1.0), args.change_to),
    ]
    out: list[WeightRow] = []
    for weights, change in cases:
        log(f"{label}: weights {weights}, change to {change}")
        async with databases(args, work, label) as url:
            out += await weights_case(url, label, upstream, work, args, weights, change)
    return out


# -- 2. admission ----------------------------------------------------------------------------


@dataclass
class Latencies:
    by_tenant: dict[str, list[float]] = field(default_factory=dict)

    def add(self, tenant: str, seconds: float) -> None:
        self.by_tenant.setdefault(tenant, []).append(seconds)

    def p(self, tenant: str, q: float) -> float:
        return percentile(self.by_tenant[tenant], q) * 1000


@dataclass
class AdmissionResult:
    slow: Latencies
    group: Latencies
    realtime: Latencies
    busy: Latencies  # realtime while a worker drains a backlog
    busy_left: int = 0  # generations still queued when the busy part ended
    busy_rate: float = 0.0  # generations the worker finished per second meanwhile (about)


async def _alternate(
    client: httpx.AsyncClient,
    route: str,
    keys: dict[str, str],
    n: int,
    clients: int,
    body: Callable[[str, int], dict[str, Any]],
    into: Latencies,
) -> None:
    """``n`` requests per tenant, the tenants taking turns, by ``clients`` concurrent tasks."""
    names = list(keys)
    order = iter(range(n * len(names)))

    async def one_client() -> None:
        for i in order:
            tenant = names[i % len(names)]
            headers = {"Authorization": f"Bearer {keys[tenant]}"}
            t0 = time.perf_counter()
            r = await client.post(route, json=body(tenant, i), headers=headers)
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise AssertionError(f"{route} {tenant}: HTTP {r.status_code} {r.text[:300]}")
            into.add(tenant, elapsed)

    async with asyncio.TaskGroup() as tg:
        for _ in range(clients):
            tg.create_task(one_client())


async def bench_admission(
    label: str, work: Path, args: argparse.Namespace, log: Log
) -> AdmissionResult:
    async with databases(args, work, label) as url:
        setup = Store(url)
        keys: dict[str, str] = {}
        try:
            cases: list[tuple[str, dict[str, int | None]]] = [
                ("plain", {}),
                ("limited", SUBMIT_LIMITS),
                ("rt-plain", {}),
                ("rt-rpm", {"realtime_requests_per_minute": NEVER}),
                ("rt-all", {"realtime_requests_per_minute": NEVER, "tokens_per_day": 10**12}),
            ]
            for tenant, limits in cases:
                await setup.tenants.create(tenant, limits=limits or None)
                keys[tenant] = (await setup.keys.create(tenant, "bench"))[1]
            today = day_of(utcnow())
            async with setup.engine.begin() as conn:  # something for the token sums to read
                await conn.execute(
                    usage.insert(),
                    [
                        {
                            "tenant": t,
                            "day": today,
                            "model": FAKE_MODEL,
                            "lane": lane,
                            "requests": 10,
                            "failed": 0,
                            "prompt_tokens": 1000,
                            "completion_tokens": 500,
                        }
                        for t in ("plain", "limited", "rt-plain", "rt-rpm", "rt-all")
                        for lane in ("realtime", "slow", "group", "batch")
                    ],
                )
        finally:
            await setup.close()
        result = AdmissionResult(Latencies(), Latencies(), Latencies(), Latencies())
        submit_keys = {t: keys[t] for t in ("plain", "limited")}
        rt_keys = {t: keys[t] for t in ("rt-plain", "rt-rpm", "rt-all")}

        def slow(tenant: str, i: int) -> dict[str, Any]:
            return chat(FAKE_MODEL, f"{tenant} slow {i}")

        def group(tenant: str, i: int) -> dict[str, Any]:
            return {
                "requests": [
                    chat(FAKE_MODEL, f"{tenant} group {i} request {j}")
                    for j in range(args.group_size)
                ]
            }

        async with _app(url, work, run_worker=False) as client:
            warm = Latencies()
            slow_route = "/v1/slow/chat/completions"
            await _alternate(client, slow_route, submit_keys, 20, 1, slow, warm)
            await _alternate(client, "/v1/chat/completions", rt_keys, 20, 1, slow, warm)
            log(f"{label}: {args.requests} slow POSTs per tenant")
            await _alternate(
                client, slow_route, submit_keys, args.requests, args.clients, slow, result.slow
            )
            n_groups = max(1, args.requests // 4)
            log(f"{label}: {n_groups} group POSTs of {args.group_size} per tenant")
            await _alternate(
                client,
                "/v1/slow/group/chat/completions",
                submit_keys,
                n_groups,
                args.clients,
                group,
                result.group,
            )
            log(f"{label}: {args.requests} realtime POSTs per tenant")
            await _alternate(
                client,
                "/v1/chat/completions",
                rt_keys,
                args.requests,
                args.clients,
                slow,
                result.realtime,
            )
        # realtime again while a worker drains another tenant's backlog on the same database
        # (on SQLite the rate check's write waits for the worker's writes)
        backlog = Store(url)
        try:
            await _queue_backlog(backlog, "bg", args.busy_backlog, model=FAKE_MODEL)
            # the first app's submissions are queued too: the worker drains them as well
            before = (await backlog.generations.count_by_state()).get(State.QUEUED.value, 0)
        finally:
            await backlog.close()
        n_busy = max(1, args.requests // 2)
        log(f"{label}: {n_busy} realtime POSTs per tenant, worker draining")
        async with _app(url, work, run_worker=True) as client:
            # measured only once the worker is draining, and for at least BUSY_SECONDS (a fast
            # realtime part would otherwise end before the worker got going)
            before = await _until_draining(url, before)
            t0 = time.perf_counter()
            for _ in range(50):
                await _alternate(
                    client, "/v1/chat/completions", rt_keys, n_busy, args.clients, slow, result.busy
                )
                if time.perf_counter() - t0 >= BUSY_SECONDS:
                    break
            busy_seconds = time.perf_counter() - t0
            check = Store(url)
            try:
                left = (await check.generations.count_by_state()).get(State.QUEUED.value, 0)
            finally:
                await check.close()
        result.busy_left = left
        result.busy_rate = (before - left) / busy_seconds
    return result


BUSY_SECONDS = 5.0


async def _until_draining(url: str, queued: int, timeout: float = 30.0) -> int:
    """Wait (at most ``timeout``) until the worker has finished 200 of the ``queued``; returns
    what is queued then."""
    check = Store(url)
    try:
        deadline = time.monotonic() + timeout
        left = queued
        while time.monotonic() < deadline:
            left = (await check.generations.count_by_state()).get(State.QUEUED.value, 0)
            if queued - left >= 200:
                break
            await asyncio.sleep(0.1)
        return left
    finally:
        await check.close()


@contextlib.asynccontextmanager
async def _app(url: str, work: Path, *, run_worker: bool) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in this process, lifespan included, on the fake engine; a client for it."""
    settings = Settings(
        database_url=url,
        files_dir=str(work / "files"),
        log_level="warning",
        run_worker=run_worker,
        dashboard=False,
        backends=[
            BackendSettings(
                name="fake",
                type="openai",
                base_url="http://fake.invalid/v1",
                models=[FAKE_MODEL],
                max_concurrency=16,
            )
        ],
    )
    app = create_app(settings, backends={"fake": FakeBackend("fake")}, migrate=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", timeout=60.0
        ) as client:
            yield client
    await app.state.services.store.close()


# -- 3. race ---------------------------------------------------------------------------------


@dataclass
class RaceRow:
    store: str
    what: str
    racers: int
    limit: str
    expected: tuple[int, int]  # the least and the most that may be accepted
    accepted: int
    refused: int
    retry_after: str
    peak_connections: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.expected[0] <= self.accepted <= self.expected[1]


def _item(i: int) -> NewGeneration:
    return NewGeneration(Kind.CHAT, UPSTREAM_MODEL, chat(UPSTREAM_MODEL, f"race {i}"))


async def bench_race(label: str, work: Path, args: argparse.Namespace, log: Log) -> list[RaceRow]:
    limit = args.race_limit
    cases: list[tuple[str, str, dict[str, int | None], int, int]] = [
        # what, tenant, its limits, generations per submission, expected accepted
        ("slow generation", "q1", {"max_queued_generations": limit}, 1, limit),
        ("group of 5", "q5", {"max_queued_generations": limit}, 5, limit // 5),
        ("slow generation", "rpm", {"requests_per_minute": limit}, 1, limit),
    ]
    out: list[RaceRow] = []
    async with databases(args, work, label) as url:
        stores = [Store(url) for _ in range(args.processes)]
        try:
            for what, tenant, limits, size, expected in cases:
                await stores[0].tenants.create(tenant, limits=dict(limits))
                log(f"{label}: {args.racers} racers, {what}, {limits}")

                async def call(store: Store, i: int, tenant: str = tenant, size: int = size) -> Any:
                    if size == 1:
                        return await store.generations.submit(
                            tenant, _item(i), expiry_seconds=EXPIRY
                        )
                    items = [_item(i * 100 + j) for j in range(size)]
                    return await store.groups.submit(
                        tenant, Kind.CHAT, items, expiry_seconds=EXPIRY
                    )

                got = await race(stores, args.racers, call)
                low = high = expected
                if "requests_per_minute" in limits:  # one more every 60/limit s of the race
                    high = expected + int(got.elapsed / (60.0 / limit))
                waits = sorted({e.retry_after for e in got.refused}, key=lambda w: w or 0.0)
                shown = ", ".join("none" if w is None else f"{w:.1f}" for w in waits[:2])
                out.append(
                    RaceRow(
                        label,
                        what,
                        args.racers,
                        f"{next(iter(limits))} = {limit}",
                        (low, high),
                        got.accepted,
                        len(got.refused),
                        shown + (" ..." if len(waits) > 2 else ""),
                        got.peak_connections,
                        got.elapsed,
                    )
                )
        finally:
            for s in stores:
                await s.close()
    return out


# -- tables ----------------------------------------------------------------------------------


def render_weights(rows: list[WeightRow], args: argparse.Namespace) -> Table:
    t = Table(
        title=(
            f"Weights: A's {args.backlog} generations queued before B's {args.backlog}; a worker"
            f" at concurrency {args.concurrency}, upstream latency {args.latency_ms:g} ms;"
            f" stopped after {args.window} successes"
        ),
        caption=(
            "A done, B done: successes in the window (both tenants had work queued throughout;"
            " 'left': still queued when the worker stopped). The change case: B's weight set"
            " once half the window had succeeded; split by claim time"
        ),
    )
    for name in ("store", "weights A : B", "A done", "B done", "A/B", "expected", "s", "left"):
        t.add_column(name, justify="left" if name in ("store", "weights A : B") else "right")
    for r in rows:
        t.add_row(
            r.store,
            r.label,
            str(r.a_done),
            str(r.b_done),
            f"{r.ratio:.2f}",
            f"{r.expected:.2f}",
            f"{r.seconds:.1f}",
            f"{r.left[0]} / {r.left[1]}" if any(r.left) else "",
        )
    return t


def render_admission(results: dict[str, AdmissionResult], args: argparse.Namespace) -> Table:
    t = Table(
        title=(
            f"Admission cost: in-process app (ASGITransport), fake engine, worker off,"
            f" {args.clients} client(s); {args.requests} slow, {max(1, args.requests // 4)} group"
            f" (size {args.group_size}) and {args.requests} realtime POSTs per tenant"
        ),
        caption=(
            "p50 / p99 ms, client wall time; the tenants of a row took turns request by request."
            " limits: max_queued_generations, max_batch_lines_in_flight, requests_per_minute,"
            " tokens_per_day (never refusing); rpm: realtime_requests_per_minute"
        ),
    )
    t.add_column("store")
    t.add_column("route")
    t.add_column("without limits", justify="right")
    t.add_column("with limits", justify="right")
    t.add_column("ratio p50", justify="right")
    t.add_column("ratio p99", justify="right")

    def row(store: str, route: str, lat: Latencies, base: str, other: str) -> None:
        b50, b99, o50, o99 = lat.p(base, 50), lat.p(base, 99), lat.p(other, 50), lat.p(other, 99)
        t.add_row(
            store,
            route,
            f"{b50:.2f} / {b99:.2f}",
            f"{o50:.2f} / {o99:.2f}",
            f"{o50 / b50:.2f}",
            f"{o99 / b99:.2f}",
        )

    for store, r in results.items():
        row(store, "slow submit", r.slow, "plain", "limited")
        row(store, f"group submit ({args.group_size})", r.group, "plain", "limited")
        row(store, "realtime, rpm", r.realtime, "rt-plain", "rt-rpm")
        row(store, "realtime, rpm + tokens_per_day", r.realtime, "rt-plain", "rt-all")
        busy = (
            f"worker draining ~{r.busy_rate:.0f} gen/s"
            if r.busy_left
            else "[red]worker drained before the end"
        )
        row(store, f"realtime, rpm, {busy}", r.busy, "rt-plain", "rt-rpm")
        row(store, f"realtime, rpm + tokens_per_day, {busy}", r.busy, "rt-plain", "rt-all")
    return t


def render_race(rows: list[RaceRow]) -> Table:
    t = Table(
        title="Race: concurrent submitters across Store instances (one per API process)",
        caption=(
            "accepted must equal expected (a rate lets one more through every 60/limit s the race"
            " lasts); retry after: the refusals' retry_after, s (the header rounds up, at least 1)"
        ),
    )
    for name in (
        "store",
        "submission",
        "racers",
        "limit",
        "expected",
        "accepted",
        "refused",
        "retry after",
        "peak conns",
        "s",
    ):
        t.add_column(name, justify="left" if name in ("store", "submission", "limit") else "right")
    for r in rows:
        t.add_row(
            r.store,
            r.what,
            str(r.racers),
            r.limit,
            "-".join(str(x) for x in sorted(set(r.expected))),
            str(r.accepted) if r.ok else f"[red]{r.accepted}",
            str(r.refused),
            r.retry_after,
            str(r.peak_connections),
            f"{r.seconds:.2f}",
        )
    return t


async def main(args: argparse.Namespace) -> int:
    console = Console(width=170)
    # the deadline check calls every group "at risk" until a pace is measured (no pace yet at
    # the start of each weight case): a warning per maintenance pass, not about tenants
    logging.getLogger("backburner.worker").setLevel(logging.ERROR)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        console.log(f"[yellow]warning: load average {load:.2f}; numbers will be noisy")
    stores = ([] if args.no_sqlite else ["SQLite"]) + (["PostgreSQL"] if args.postgres else [])
    weight_rows: list[WeightRow] = []
    admission: dict[str, AdmissionResult] = {}
    race_rows: list[RaceRow] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bb-bench-tenants-") as tmp:
        work = Path(tmp)
        async with asyncio.timeout(args.timeout):
            if "weights" in args.parts:
                up = await asyncio.to_thread(procs.start_upstream, work, latency_ms=args.latency_ms)
                try:
                    for label in stores:
                        weight_rows += await bench_weights(label, up, work, args, console.log)
                finally:
                    await asyncio.to_thread(procs.stop, up)
            if "admission" in args.parts:
                for label in stores:
                    admission[label] = await bench_admission(label, work, args, console.log)
            if "race" in args.parts:
                for label in stores:
                    race_rows += await bench_race(label, work, args, console.log)
    if weight_rows:
        console.print(render_weights(weight_rows, args))
    if admission:
        console.print(render_admission(admission, args))
    if race_rows:
        console.print(render_race(race_rows))
    console.print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end,"
        f" {time.perf_counter() - started:.0f} s in all"
    )
    return 0 if all(r.ok for r in race_rows) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, to try the script")
    p.add_argument(
        "--parts",
        type=lambda s: {x.strip() for x in s.split(",") if x.strip()},
        default={"weights", "admission", "race"},
        help="comma-separated: weights, admission, race (default: all)",
    )
    p.add_argument("--postgres", metavar="URL", help="also run on PostgreSQL (a fresh database)")
    p.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    p.add_argument("--backlog", type=int, default=2000, help="generations queued per tenant")
    p.add_argument("--window", type=int, default=1500, help="successes counted per weight case")
    p.add_argument("--change-to", type=float, default=4.0, help="B's weight in the change case")
    p.add_argument("--concurrency", type=int, default=8, help="the backend's max_concurrency")
    p.add_argument("--latency-ms", type=float, default=20.0, help="upstream latency per request")
    p.add_argument("-n", "--requests", type=int, default=1000, help="POSTs per tenant and route")
    p.add_argument("--group-size", type=int, default=10, help="requests per group POST")
    p.add_argument("--clients", type=int, default=1, help="concurrent clients (admission)")
    p.add_argument(
        "--busy-backlog",
        type=int,
        default=20000,
        help="generations the worker drains during the last realtime part (admission)",
    )
    p.add_argument("--racers", type=int, default=200)
    p.add_argument("--processes", type=int, default=4, help="Store instances in the race")
    p.add_argument("--race-limit", type=int, default=50)
    p.add_argument("--case-timeout", type=float, default=120.0, help="one weight case, s")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit for the whole run, s")
    args = p.parse_args(argv)
    if args.quick:
        args.backlog, args.window, args.requests, args.racers = 200, 120, 40, 40
        args.busy_backlog = 400
        args.race_limit = 10
    unknown = args.parts - {"weights", "admission", "race"}
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    if args.window >= 2 * args.backlog or args.window < 2:
        p.error("--window must be at least 2 and well below twice --backlog")
    if args.race_limit % 5:
        p.error("--race-limit must be a multiple of 5 (the group case)")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
