"""Does work that can meet its deadline meet it? Deadline-aware scheduling against the same
scheduler with the deadline trickle off, one mixed load, side by side in one run.

    python bench/deadlines.py [--cycles 4] [--busy 15] [--quiet 15] [--rate 4]
                              [--capacity-quiet 12] [--capacity-busy 2] [--margin 5]

Everything on loopback, a fresh engine and a fresh backburner per mode:

- **Engine**: ``tests/support/engine_sim.py`` (vLLM's timings for an 8B model on one H100,
  ``--max-num-seqs 64``, ``--scheduling-policy priority``) at ``--time-scale``.
- **backburner**: ``backburner serve`` (SQLite) with one ``openai`` backend on it,
  ``engine = "vllm"`` (admission reads the engine's metrics), ``max_concurrency = 64``,
  ``background_priority = 10``. Two modes: ``deadlines`` (the defaults: earliest deadline first
  inside each tenant's turns, ``deadline_trickle = 1``) and ``trickle off``
  (``deadline_trickle = 0``). EDF has no setting, so both modes order by deadline: the
  comparison shows what the trickle adds. Opt-in third mode ``no deadlines`` (``--modes``):
  trickle off and EDF off, by starting the server with ``store.work.EDF_SLACK`` patched to 100
  years (no work is ever "due sooner" by that much), a bench-only switch.
- **Realtime**: streaming chat completions through the realtime lane (unique ~200-token
  prompts, 32 output tokens), Poisson at ``--rate``/s in busy phases of ``--busy`` s, none in
  quiet phases of ``--quiet`` s, ``--cycles`` times (as ``bench/idle_capacity.py``). TTFT is
  measured by the client.
- **Background** (unique ~100-token prompts, 16 output tokens, seeded), 5 tenants, submitted
  over the phases: ``short`` groups (one every ``--short-every`` s from a random tenant,
  10-40 requests, deadline 20-60 s after submission); ``long`` groups (tenants 4 and 5 in turn,
  every 15 s, 40 requests, 180 s); ``single`` requests (tenant 3, one every 2 s, 180 s); two
  ``batch`` es at the start (tenants 1 and 2, ``--batch-lines`` and half of it, the 24 h
  window). Groups and single requests are written with ``store.groups.submit`` /
  ``store.generations.submit`` on the server's database (the HTTP API gives every group the
  server-wide ``expiry_seconds``); batches go through the API.

**The rule for "can meet its deadline"**, computed offline from the seeded arrival log, the
same for both modes: an ideal preemptive earliest-deadline-first schedule of all background
requests (fluid, no overhead, across tenants) on a server that completes ``--capacity-quiet``
requests/s outside busy phases and ``--capacity-busy`` requests/s inside them (what one trickle
slot gives beside realtime), finishes the object at least ``--margin`` s (one maintenance
interval) before its deadline. A second figure uses the same capacities but shares them equally
between the tenants with work queued (backburner's fair turns), earliest deadline first inside
each tenant: what the issue's design ("deadlines inside tenant fairness") can promise. The
default capacities (12 and 2 requests/s) are below what this bench measured on a 2-core machine
(15-21 quiet, 1-3 busy, shown in the table), so the rule does not ask for more than the machine
gives. Every object counts once: the 60 single requests weigh as much as 60 groups, so read the
per-class rows too.

An object (group, batch, single request) **meets** its deadline when every one of its
generations succeeded and finished at or before its ``expires_at``. Reported per mode: the share
of can-meet objects that met it (target >= 95 %), per class; realtime TTFT; background
requests/s in busy and quiet phases (from the generations' ``finished_at``: check them against
the assumed capacities); objects flagged at risk (``backburner_deadline_at_risk`` and
``backburner_deadline_at_risk_work`` on ``/metrics``, sampled every second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import procs  # noqa: E402

from backburner.core.states import BatchStatus, Kind, State, StateMessage  # noqa: E402
from backburner.schemas.generation import NewGeneration  # noqa: E402
from backburner.store import Store  # noqa: E402
from backburner.store.migrate import upgrade_async  # noqa: E402
from backburner.store.tables import generations  # noqa: E402

MODEL = "sim-model"
TENANTS = [f"tenant-{i}" for i in range(1, 6)]
CLASSES = ("short", "long", "single", "batch")
MODES: dict[str, dict[str, str]] = {
    "deadlines": {},
    "trickle off": {"deadline_trickle": "0"},
    # opt-in (--modes): no trickle and no earliest-deadline-first either; EDF has no setting, so
    # this mode's server runs with store.work.EDF_SLACK patched to 100 years (see NO_EDF)
    "no deadlines": {"deadline_trickle": "0"},
}
# `backburner serve` with earliest deadline first switched off: no deadline is 100 years sooner
NO_EDF = (
    "import datetime, sys; import backburner.store.work as w;"
    " w.EDF_SLACK = datetime.timedelta(days=36500);"
    " from backburner.cli import main; sys.argv[0] = 'backburner'; main()"
)
TARGET = 0.95
BATCH_DONE = {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED}
WORDS = [f"w{i}" for i in range(5000)]
AT_RISK = re.compile(r'^backburner_deadline_at_risk\{kind="(\w+)"\} (\S+)$')
AT_RISK_WORK = re.compile(r'^backburner_deadline_at_risk_work\{[^}]*id="([^"]+)"[^}]*\} (\S+)$')


# ------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Obj:
    """One submitted object: when (seconds after the phases start), whose, how big, due when."""

    name: str
    cls: str  # short | long | single | batch
    tenant: str
    offset: float
    size: int
    expiry: float

    @property
    def deadline(self) -> float:
        return self.offset + self.expiry


def schedule(args: argparse.Namespace) -> list[Obj]:
    rng = random.Random(args.seed)
    end = args.cycles * (args.busy + args.quiet)
    day = 24 * 3600.0
    objs = [
        Obj("batch-1", "batch", TENANTS[0], 0.0, args.batch_lines, day),
        Obj("batch-2", "batch", TENANTS[1], 0.0, args.batch_lines // 2, day),
    ]
    t, i = 4.0, 0
    while t < end:
        expiry = float(rng.randint(20, 60))
        objs.append(Obj(f"short-{i}", "short", rng.choice(TENANTS), t, rng.randint(10, 40), expiry))
        t, i = t + args.short_every, i + 1
    for i, t in enumerate(range(2, int(end), 15)):
        objs.append(Obj(f"long-{i}", "long", TENANTS[3 + i % 2], float(t), 40, 180.0))
    for i, t in enumerate(range(1, int(end), 2)):
        objs.append(Obj(f"single-{i}", "single", TENANTS[2], float(t), 1, 180.0))
    objs.sort(key=lambda o: o.offset)
    return objs


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def bodies(obj: Obj, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{seed}:{obj.name}")
    return [
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"{obj.name} {i} " + words(rng, 95)}],
            "max_tokens": 16,
            "metadata": {"custom_id": f"{obj.name}-{i}"},
        }
        for i in range(obj.size)
    ]


def interactive_schedule(args: argparse.Namespace) -> list[tuple[float, str]]:
    rng = random.Random(7)
    out: list[tuple[float, str]] = []
    for cycle in range(args.cycles):
        start = cycle * (args.busy + args.quiet)
        t = rng.expovariate(args.rate)
        while t < args.busy:
            out.append((start + t, words(rng, 190)))
            t += rng.expovariate(args.rate)
    return out


def busy_at(t: float, args: argparse.Namespace) -> bool:
    period = float(args.busy + args.quiet)
    return bool(0 <= t < args.cycles * period and t % period < args.busy)


# ------------------------------------------------------------------ the rule
def ideal_finish(objs: list[Obj], args: argparse.Namespace, *, fair: bool) -> dict[str, float]:
    """When each object finishes in the ideal fluid schedule (module docstring): earliest
    deadline first over everything, or (``fair``) equal shares per tenant with work, earliest
    deadline first inside each."""
    left = {o.name: float(o.size) for o in objs}
    done: dict[str, float] = {}
    step, t = 0.05, 0.0
    while len(done) < len(objs):
        rate = args.capacity_busy if busy_at(t, args) else args.capacity_quiet
        active = sorted(
            (o for o in objs if o.offset <= t and o.name not in done), key=lambda o: o.deadline
        )
        by_tenant: dict[str, list[Obj]] = defaultdict(list)
        for o in active:
            by_tenant[o.tenant if fair else ""].append(o)
        budget = rate * step
        queues = sorted(by_tenant.values(), key=lambda q: sum(left[o.name] for o in q))
        for k, queue in enumerate(queues):  # water-filling: small queues leave room to others
            share = budget / (len(queues) - k)
            for o in queue:
                took = min(share, left[o.name])
                left[o.name] -= took
                share -= took
                budget -= took
                if left[o.name] <= 1e-9:
                    done[o.name] = t + step
                if share <= 1e-12:
                    break
        t += step
    return done


def can_meet(objs: list[Obj], args: argparse.Namespace, *, fair: bool) -> set[str]:
    finish = ideal_finish(objs, args, fair=fair)
    return {o.name for o in objs if finish[o.name] <= o.deadline - args.margin}


# ------------------------------------------------------------------ processes
def start_sim(log_dir: Path, time_scale: float) -> procs.Proc:
    port = procs.free_port()
    argv = [
        sys.executable, "-m", "tests.support.engine_sim", "--port", str(port),
        "--max-num-seqs", "64", "--scheduling-policy", "priority", "--model", MODEL,
        "--time-scale", str(time_scale),
    ]  # fmt: skip
    log = log_dir / f"sim-{port}.log"
    proc = procs.Proc(procs._spawn(argv, log, {"PYTHONPATH": str(ROOT)}), "", log, argv)
    proc.base_url = f"http://{procs.LOOPBACK}:{port}"
    procs.wait_http(proc, "/health", 30)
    return proc


def write_config(work: Path, sim_url: str, settings: dict[str, str]) -> Path:
    lines = [
        f'database_url = "sqlite:///{work / "bb.db"}"',
        f'files_dir = "{work / "files"}"',
        "poll_interval_seconds = 0.05",
        *(f"{k} = {v}" for k, v in settings.items()),
        "",
        "[[backends]]",
        'name = "sim"',
        'type = "openai"',
        f'base_url = "{sim_url}/v1"',
        f'models = ["{MODEL}"]',
        "max_concurrency = 64",
        'engine = "vllm"',
        "background_priority = 10",
    ]
    path = work / "bb.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_patched_serve(config: Path, work: Path) -> procs.Proc:
    """``backburner serve`` without earliest deadline first (:data:`NO_EDF`)."""
    port = procs.free_port()
    argv = [sys.executable, "-c", NO_EDF, "serve", "--config", str(config), "--port", str(port)]
    log = work / "serve.log"
    proc = procs.Proc(procs._spawn(argv, log, None), f"http://{procs.LOOPBACK}:{port}", log, argv)
    procs.wait_http(proc, "/healthz", 60)
    return proc


# ------------------------------------------------------------------ one mode
@dataclass
class Mode:
    name: str
    ttft: list[float] = field(default_factory=list)
    realtime_errors: int = 0
    met: dict[str, bool] = field(default_factory=dict)  # object name -> met its deadline
    late: dict[str, float] = field(default_factory=dict)  # name -> last finish - deadline (s)
    unfinished: dict[str, int] = field(default_factory=dict)  # name -> generations not Success
    expired: int = 0
    busy_done: int = 0
    quiet_done: int = 0
    flagged: set[str] = field(default_factory=set)  # object names seen at risk
    flagged_paced: set[str] = field(default_factory=set)  # ... with a measured pace (not +Inf)
    peak_at_risk: int = 0
    samples: int = 0
    samples_at_risk: int = 0
    seconds: float = 0.0


async def one_interactive(c: httpx.AsyncClient, prompt: str) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
        "stream": True,
    }
    start = time.perf_counter()
    ttft: float | None = None
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():  # read to the end: the call holds the engine till then
            if ttft is not None or not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("no content chunk in an interactive stream")
    return ttft


async def realtime(args: argparse.Namespace, base: str, key: str, t0: float, mode: Mode) -> None:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits, headers=auth) as c:
        tasks = []
        for offset, prompt in interactive_schedule(args):
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one_interactive(c, prompt)))
        for got in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(got, BaseException):
                mode.realtime_errors += 1
            else:
                mode.ttft.append(got)


async def submit_batch(c: httpx.AsyncClient, key: str, obj: Obj, seed: int) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    lines = "".join(
        json.dumps(
            {
                "custom_id": b["metadata"]["custom_id"],
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {k: v for k, v in b.items() if k != "metadata"},
            }
        )
        + "\n"
        for b in bodies(obj, seed)
    )
    r = await c.post(
        "/v1/files",
        headers=auth,
        files={"file": (f"{obj.name}.jsonl", lines.encode(), "application/jsonl")},
        data={"purpose": "batch"},
    )
    r.raise_for_status()
    r = await c.post(
        "/v1/batches",
        headers=auth,
        json={"input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions",
              "completion_window": "24h"},
    )  # fmt: skip
    r.raise_for_status()
    return str(r.json()["id"])


async def submit_all(
    args: argparse.Namespace,
    objs: list[Obj],
    store: Store,
    c: httpx.AsyncClient,
    keys: dict[str, str],
    t0: float,
) -> dict[str, str]:
    """Submit each object at its offset; returns object name -> group, batch or generation
    id."""
    ids: dict[str, str] = {}
    for obj in objs:
        await asyncio.sleep(max(0.0, t0 + obj.offset - time.perf_counter()))
        items = [
            NewGeneration(Kind.CHAT, MODEL, b, custom_id=b["metadata"]["custom_id"])
            for b in bodies(obj, args.seed)
        ]
        if obj.cls == "batch":
            ids[obj.name] = await submit_batch(c, keys[obj.tenant], obj, args.seed)
        elif obj.cls == "single":
            gen = await store.generations.submit(obj.tenant, items[0], expiry_seconds=obj.expiry)
            ids[obj.name] = gen.id
        else:
            group = await store.groups.submit(
                obj.tenant, Kind.CHAT, items, expiry_seconds=obj.expiry, metadata={"b": obj.name}
            )
            ids[obj.name] = group.id
    return ids


async def sample_metrics(base: str, t0: float, mode: Mode, stop: asyncio.Event) -> dict[str, bool]:
    """Every second: at-risk counts and the ids named at risk (returns id -> whether it was
    ever named with a finite lateness, i.e. with a measured pace)."""
    ids: dict[str, bool] = {}
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        while not stop.is_set():
            try:
                text = (await c.get("/metrics")).text
            except httpx.HTTPError:
                text = ""
            total = 0
            for line in text.splitlines():
                if m := AT_RISK.match(line):
                    total += int(float(m.group(2)))
                elif m := AT_RISK_WORK.match(line):
                    paced = float(m.group(2)) != float("inf")
                    ids[m.group(1)] = ids.get(m.group(1), False) or paced
            mode.samples += 1
            mode.samples_at_risk += total > 0
            mode.peak_at_risk = max(mode.peak_at_risk, total)
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t0) % 1.0))
    return ids


async def settled(store: Store, batch_ids: list[tuple[str, str]]) -> bool:
    counts = await store.generations.count_by_state()
    if counts.get(State.QUEUED.value, 0) or counts.get(State.IN_PROGRESS.value, 0):
        return False
    for tenant, bid in batch_ids:
        if (await store.batches.get(tenant, bid)).status not in BATCH_DONE:
            return False
    return True


async def outcomes(
    store: Store,
    args: argparse.Namespace,
    objs: list[Obj],
    ids: dict[str, str],
    start: datetime,
    mode: Mode,
) -> None:
    """Per object: met, how late, generations not Success; expired generations; background
    finished in busy and in quiet phases."""
    g = generations
    owner = {oid: o.name for o in objs for oid in [ids[o.name]]}
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(g.c.id, g.c.group_id, g.c.batch_id, g.c.state).add_columns(
                    g.c.state_message, g.c.finished_at, g.c.expires_at
                )
            )
        ).all()
    seen: dict[str, int] = defaultdict(int)
    for gid, group_id, batch_id, state, message, finished, expires in rows:
        name = owner.get(group_id) or owner.get(batch_id) or owner.get(gid)
        if name is None:
            continue  # a realtime call recorded for a webhook
        seen[name] += 1
        mode.expired += message == StateMessage.EXPIRED
        if state != State.SUCCESS or finished is None:
            mode.unfinished[name] = mode.unfinished.get(name, 0) + 1
            continue
        late = (finished - expires).total_seconds()
        mode.late[name] = max(mode.late.get(name, late), late)
        offset = (finished - start).total_seconds()
        if 0 <= offset < args.cycles * (args.busy + args.quiet):
            mode.busy_done += busy_at(offset, args)
            mode.quiet_done += not busy_at(offset, args)
    for o in objs:  # generations never written (a batch not loaded) are not Success
        mode.unfinished[o.name] = mode.unfinished.get(o.name, 0) + o.size - seen[o.name]
        on_time = mode.late.get(o.name, 0.0) <= 0
        mode.met[o.name] = on_time and mode.unfinished[o.name] == 0


async def run_mode(
    args: argparse.Namespace, name: str, objs: list[Obj], tmp: Path, console: Console
) -> Mode:
    mode = Mode(name)
    work = tmp / name.replace(" ", "-")
    work.mkdir()
    settings = dict(kv.split("=", 1) for kv in args.setting)
    settings.update(MODES[name])
    url = f"sqlite:///{work / 'bb.db'}"
    await upgrade_async(url)
    store = Store(url)
    keys = {t: (await store.keys.create(t, "bench"))[1] for t in [*TENANTS, "interactive"]}
    sim = start_sim(work, args.time_scale)
    serve: procs.Proc | None = None
    try:
        config = write_config(work, sim.base_url, settings)
        if name == "no deadlines":
            serve = start_patched_serve(config, work)
        else:
            serve = procs.start_serve(config, work)
        console.print(f"[dim]mode {name}: {len(objs)} objects, settings {settings or 'defaults'}")
        stop = asyncio.Event()
        t0 = time.perf_counter() + 1.0
        start = datetime.fromtimestamp(time.time() + 1.0, UTC)
        sampler = asyncio.create_task(sample_metrics(serve.base_url, t0, mode, stop))
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=60) as c:
            ids, _ = await asyncio.gather(
                submit_all(args, objs, store, c, keys, t0),
                realtime(args, serve.base_url, keys["interactive"], t0, mode),
            )
        batches = [(o.tenant, ids[o.name]) for o in objs if o.cls == "batch"]
        async with asyncio.timeout(args.timeout):
            while not await settled(store, batches):
                await asyncio.sleep(1.0)
        mode.seconds = time.perf_counter() - t0
        stop.set()
        flagged_ids = await sampler
        await outcomes(store, args, objs, ids, start, mode)
        by_id = {oid: n for n, oid in ids.items()}
        mode.flagged = {by_id[i] for i in flagged_ids if i in by_id}
        mode.flagged_paced = {by_id[i] for i, paced in flagged_ids.items() if paced and i in by_id}
    finally:
        await store.close()
        if serve is not None:
            procs.stop(serve)
        procs.stop(sim)
    return mode


# ------------------------------------------------------------------ report
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


def share(mode: Mode, names: set[str]) -> str:
    if not names:
        return "-"
    n = sum(mode.met[x] for x in names)
    return f"{n / len(names):.1%} ({n}/{len(names)})"


def render(args: argparse.Namespace, objs: list[Obj], modes: list[Mode]) -> Table:
    feasible = can_meet(objs, args, fair=False)
    fair = can_meet(objs, args, fair=True)
    cls_of = {o.name: o.cls for o in objs}
    table = Table(title=f"Deadlines on the engine simulator ({time.strftime('%Y-%m-%d')})")
    table.add_column("")
    for m in modes:
        table.add_column(m.name, justify="right")

    def row(label: str, cells: list[str]) -> None:
        table.add_row(label, *cells)

    row("can meet (ideal EDF) ÷ objects", [f"{len(feasible)}/{len(objs)}"] * len(modes))
    row("[bold]met, of those that can[/bold]", [share(m, feasible) for m in modes])
    for cls in CLASSES:
        names = {n for n in feasible if cls_of[n] == cls}
        row(f"  {cls}", [share(m, names) for m in modes])
    row(f"met, of those that can inside fair shares ({len(fair)})", [share(m, fair) for m in modes])
    row("met, of all objects", [share(m, set(cls_of)) for m in modes])
    row("generations expired", [str(m.expired) for m in modes])
    row("realtime calls (errors)", [f"{len(m.ttft)} ({m.realtime_errors})" for m in modes])
    for q in (50, 95, 99):
        row(f"realtime TTFT p{q}", [f"{pct(m.ttft, q) * 1000:.0f} ms" for m in modes])
    busy, quiet = args.cycles * args.busy, args.cycles * args.quiet
    row("background req/s busy | quiet",
        [f"{m.busy_done / busy:.1f} | {m.quiet_done / quiet:.1f}" for m in modes])  # fmt: skip
    row("at risk: peak | seconds flagged",
        [f"{m.peak_at_risk} | {m.samples_at_risk}/{m.samples}" for m in modes])  # fmt: skip
    for cls in ("short", "long", "batch"):
        total = sum(1 for o in objs if o.cls == cls)
        cells = []
        for m in modes:
            ever = sum(cls_of[n] == cls for n in m.flagged)
            paced = sum(cls_of[n] == cls for n in m.flagged_paced)
            cells.append(f"{ever} | {paced} of {total}")
        row(f"  {cls} flagged: ever | with a measured pace", cells)
    row("run (s)", [f"{m.seconds:.0f}" for m in modes])
    return table


async def main(args: argparse.Namespace) -> int:
    console = Console(width=150)
    objs = schedule(args)
    modes: list[Mode] = []
    with tempfile.TemporaryDirectory(prefix="bb-deadlines-") as tmp:
        for name in args.modes.split(","):
            modes.append(await run_mode(args, name, objs, Path(tmp), console))
    console.print(render(args, objs, modes))
    by_cls = {c: sum(o.size for o in objs if o.cls == c) for c in CLASSES}
    console.print(
        f"load: {len(objs)} objects, {sum(by_cls.values())} requests ({by_cls}); rule: ideal EDF"
        f" at {args.capacity_quiet:g} req/s quiet, {args.capacity_busy:g} busy, done"
        f" {args.margin:g} s before the deadline; target >= {TARGET:.0%} met"
    )
    feasible = can_meet(objs, args, fair=False)
    fair = can_meet(objs, args, fair=True)
    for m in modes:
        for o in objs:
            if o.name in feasible and not m.met[o.name]:
                late = m.late.get(o.name)
                console.print(
                    f"{m.name} missed {o.name} ({o.tenant}, at {o.offset:g} s"
                    f" {'busy' if busy_at(o.offset, args) else 'quiet'}, {o.size} requests, due"
                    f" {o.expiry:g} s later{'' if o.name in fair else '; not within fair shares'}):"
                    f" {m.unfinished[o.name]} not done"
                    + ("" if late is None else f", the last done {late:+.1f} s after the deadline")
                )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--busy", type=float, default=15.0)
    p.add_argument("--quiet", type=float, default=15.0)
    p.add_argument("--rate", type=float, default=4.0, help="realtime requests/s when busy")
    p.add_argument("--short-every", type=float, default=5.0)
    p.add_argument("--batch-lines", type=int, default=600)
    p.add_argument("--capacity-quiet", type=float, default=12.0, help="the rule's req/s")
    p.add_argument("--capacity-busy", type=float, default=2.0, help="the rule's req/s")
    p.add_argument("--margin", type=float, default=5.0)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument(
        "--modes",
        default="deadlines,trickle off",
        help=f"comma-separated, in run order, of: {', '.join(MODES)}",
    )
    p.add_argument(
        "--setting", action="append", default=[], metavar="KEY=VALUE",
        help="a top-level setting for both modes (TOML value), e.g. maintenance_interval_seconds=1",
    )  # fmt: skip
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
