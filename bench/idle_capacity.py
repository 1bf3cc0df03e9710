"""Does slow work stay out of realtime's way? Interactive latency with and without a backlog.

    python bench/idle_capacity.py [--background 3000] [--cycles 3] [--busy 10] [--quiet 15]
                                  [--rate 4] [--skip-embedded] [--embedded-only]

The shape of llm-d batch-gateway's benchmark (llm-d-batch-gateway issue 491), scaled to two cores,
all on loopback:

- **Engine**: ``tests/support/engine_sim.py`` as a subprocess, a continuous-batching engine with
  vLLM's timings for an 8B model on one H100 (prefill 30 ms + 0.25 ms/token, 12 ms per token
  growing to 2.5x at a full batch), ``--max-num-seqs 64``, ``--scheduling-policy priority``, and
  vLLM's metric names on ``/metrics``. A fresh engine per scenario.
- **backburner**: ``backburner serve`` (SQLite) with one ``openai`` backend on the engine,
  ``max_concurrency = 64``.
- **Interactive**: streaming chat completions through backburner's realtime lane (unique
  ~200-token prompts, 32 output tokens), Poisson arrivals at ``--rate`` per second during busy
  phases of ``--busy`` seconds, none during quiet phases of ``--quiet`` seconds, ``--cycles``
  times. TTFT is the time from sending to the first content chunk, measured by the client.
- **Background**: ``--background`` slow requests (unique ~100-token prompts, 16 output tokens):
  a quarter as single requests, a quarter as groups of 50, half as one batch; all queued before
  the first phase starts.

Scenarios, one after the other in one run:

1. ``alone``: interactive traffic only (busy phases only; nothing else runs);
2. ``gated``: backlog + interactive, admission on (``engine = "vllm"``: probes, the AIMD window,
   preemption, ``background_priority = 10``);
3. ``ungated``: backlog + interactive, ``background_gate = false``: background runs at
   ``max_concurrency`` whatever the engine does (the old behaviour).

Reported: interactive TTFT p50/p95/p99 per scenario and the ratio to ``alone``; background
throughput in the quiet phases (requests the engine finished per second while no interactive
request ran) gated ÷ ungated; tokens thrown away by preemption (the engine's own count of tokens
generated and then aborted or preempted) ÷ background tokens; and whether gated and ungated
drained the backlog to the same results (every custom id once, identical text).

Then the **embedded engine** (SmolLM2-135M in-process, ``backburner serve`` on its defaults):
realtime chat latency p50/p95 over ``--embedded-calls`` calls alone, and again with 20 slow
requests queued and running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
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

MODEL = "sim-model"
EMBEDDED_MODEL = "smollm2-135m-instruct"
WORDS = [f"w{i}" for i in range(5000)]


# ------------------------------------------------------------------ workload
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def interactive_schedule(args: argparse.Namespace) -> list[tuple[float, str]]:
    """(offset from the phase start in seconds, prompt) for each busy phase, seeded."""
    rng = random.Random(7)
    out: list[tuple[float, str]] = []
    for cycle in range(args.cycles):
        start = cycle * (args.busy + args.quiet)
        t = rng.expovariate(args.rate)
        while t < args.busy:
            out.append((start + t, words(rng, 190)))
            t += rng.expovariate(args.rate)
    return out


def background_bodies(n: int) -> list[dict[str, Any]]:
    rng = random.Random(11)
    return [
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": words(rng, 95)}],
            "max_tokens": 16,
            "metadata": {"custom_id": f"bg-{i}"},
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------ processes
def start_sim(log_dir: Path) -> procs.Proc:
    port = procs.free_port()
    argv = [
        sys.executable, "-m", "tests.support.engine_sim", "--port", str(port),
        "--max-num-seqs", "64", "--scheduling-policy", "priority", "--model", MODEL,
    ]  # fmt: skip
    log = log_dir / f"sim-{port}.log"
    proc = procs.Proc(procs._spawn(argv, log, {"PYTHONPATH": str(ROOT)}), "", log, argv)
    proc.base_url = f"http://{procs.LOOPBACK}:{port}"
    procs.wait_http(proc, "/health", 30)
    return proc


def write_config(
    path: Path, db: Path, sim_url: str, *, gated: bool, files: Path, knobs: dict[str, str]
) -> Path:
    backend = [
        "[[backends]]",
        'name = "sim"',
        'type = "openai"',
        f'base_url = "{sim_url}/v1"',
        f'models = ["{MODEL}"]',
        "max_concurrency = 64",
        'engine = "vllm"',
    ]
    backend += ["background_priority = 10"] if gated else ["background_gate = false"]
    backend += [f"{k} = {v}" for k, v in knobs.items()]
    lines = [
        f'database_url = "sqlite:///{db}"',
        f'files_dir = "{files}"',
        "poll_interval_seconds = 0.05",
        "",
        *backend,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ measuring
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def one_interactive(c: httpx.AsyncClient, prompt: str) -> tuple[float, int]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
        "stream": True,
    }
    start = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("no content chunk in an interactive stream")
    return ttft, tokens


async def sim_stats(c: httpx.AsyncClient, sim_url: str) -> dict[str, float]:
    r = await c.get(sim_url + "/stats")
    r.raise_for_status()
    out: dict[str, float] = r.json()
    return out


@dataclass
class Scenario:
    name: str
    ttft: list[float] = field(default_factory=list)
    interactive_tokens: int = 0
    quiet_finished: float = 0.0
    quiet_seconds: float = 0.0
    busy_finished: float = 0.0
    busy_seconds: float = 0.0
    thrown_tokens: float = 0.0
    generated_tokens: float = 0.0
    preempted: int = 0
    results: dict[str, str] = field(default_factory=dict)
    drain_seconds: float = 0.0

    @property
    def background_tokens(self) -> float:
        return self.generated_tokens - self.interactive_tokens - self.thrown_tokens


async def run_phases(
    args: argparse.Namespace, base: str, sim_url: str, sc: Scenario, *, quiet: bool
) -> None:
    """The interactive bursts; samples the engine's finished count at phase edges."""
    schedule = interactive_schedule(args)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c,
        httpx.AsyncClient(timeout=10) as s,
    ):
        tasks: list[asyncio.Task[tuple[float, int]]] = []
        t0 = time.perf_counter()

        async def at(offset: float) -> None:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

        idx = 0
        for cycle in range(args.cycles):
            start = cycle * (args.busy + args.quiet)
            before = await sim_stats(s, sim_url)
            while idx < len(schedule) and schedule[idx][0] < start + args.busy:
                offset, prompt = schedule[idx]
                await at(offset)
                tasks.append(asyncio.create_task(one_interactive(c, prompt)))
                idx += 1
            await at(start + args.busy)
            # the busy phase ends when its last interactive request has answered
            await asyncio.gather(*tasks[-8:], return_exceptions=True)
            mid = await sim_stats(s, sim_url)
            busy_end = time.perf_counter()
            sc.busy_finished += mid["requests_finished"] - before["requests_finished"]
            sc.busy_seconds += busy_end - (t0 + start)
            if not quiet:
                continue
            await at(start + args.busy + args.quiet)
            after = await sim_stats(s, sim_url)
            sc.quiet_finished += after["requests_finished"] - mid["requests_finished"]
            sc.quiet_seconds += time.perf_counter() - busy_end
        for ttft, tokens in await asyncio.gather(*tasks):
            sc.ttft.append(ttft)
            sc.interactive_tokens += tokens


async def submit_backlog(c: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(bodies)
    singles, grouped, batched = bodies[: n // 4], bodies[n // 4 : n // 2], bodies[n // 2 :]
    single_ids: list[str] = []
    for i in range(0, len(singles), 16):
        answers = await asyncio.gather(
            *(c.post("/v1/slow/chat/completions", json=b) for b in singles[i : i + 16])
        )
        for r in answers:
            r.raise_for_status()
            single_ids.append(r.json()["id"])
    group_ids: list[str] = []
    for i in range(0, len(grouped), 50):
        r = await c.post("/v1/slow/group/chat/completions", json={"requests": grouped[i : i + 50]})
        r.raise_for_status()
        group_ids.append(r.json()["groupId"])
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
        for b in batched
    )
    r = await c.post(
        "/v1/files",
        files={"file": ("backlog.jsonl", lines.encode(), "application/jsonl")},
        data={"purpose": "batch"},
    )
    r.raise_for_status()
    r = await c.post(
        "/v1/batches",
        json={
            "input_file_id": r.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    r.raise_for_status()
    batch_id = r.json()["id"]
    async with asyncio.timeout(120):  # every batch line queued before the phases start
        while True:
            b = (await c.get(f"/v1/batches/{batch_id}")).json()
            if b["status"] == "in_progress" and b["request_counts"]["total"] == len(batched):
                break
            await asyncio.sleep(0.2)
    return {"singles": single_ids, "groups": group_ids, "batch": batch_id}


async def _settled(c: httpx.AsyncClient, path: str) -> dict[str, Any]:
    """GET ``path`` until the group or generation it names is no longer running."""
    while True:
        obj: dict[str, Any] = (await c.get(path)).json()
        if obj.get("status", "") != "in_progress" and obj.get("state") not in (
            "Queued",
            "In Progress",
        ):
            return obj
        await asyncio.sleep(0.2)


async def collect_results(
    c: httpx.AsyncClient, backlog: dict[str, Any], deadline: float
) -> dict[str, str]:
    results: dict[str, str] = {}

    def keep(custom_id: str, response: dict[str, Any] | None) -> None:
        if custom_id in results:
            raise RuntimeError(f"custom id {custom_id} answered twice")
        text = "" if response is None else response["choices"][0]["message"]["content"]
        results[custom_id] = text

    while True:  # the batch finishes last or close to it: wait for it first
        b = (await c.get(f"/v1/batches/{backlog['batch']}")).json()
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"backlog not drained in time: {b['request_counts']}")
        await asyncio.sleep(0.5)
    if b["status"] != "completed" or b["request_counts"]["failed"]:
        raise RuntimeError(f"batch ended {b['status']}: {b['request_counts']}")
    out = await c.get(f"/v1/files/{b['output_file_id']}/content")
    for line in out.text.splitlines():
        row = json.loads(line)
        keep(row["custom_id"], row["response"]["body"])
    for gid in backlog["groups"]:
        for gen in (await _settled(c, f"/v1/slow/group/{gid}/generations"))["generations"]:
            if gen["state"] != "Success":
                raise RuntimeError(f"group generation {gen['id']} ended {gen['state']}")
            keep(gen["request"]["metadata"]["custom_id"], gen["response"])
    for sid in backlog["singles"]:
        gen = await _settled(c, f"/v1/generation/{sid}")
        if gen["state"] != "Success":
            raise RuntimeError(f"generation {sid} ended {gen['state']}: {gen['stateMessage']}")
        keep(gen["request"]["metadata"]["custom_id"], gen["response"])
    return results


def preempted_from_metrics(text: str) -> int:
    for line in text.splitlines():
        if line.startswith('backburner_lane_preempted_total{backend="sim"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def scenario(args: argparse.Namespace, name: str, tmp: Path) -> Scenario:
    sc = Scenario(name)
    work = tmp / name
    work.mkdir()
    sim = start_sim(work)
    serve: procs.Proc | None = None
    try:
        cfg = write_config(
            work / "bb.toml", work / "bb.db", sim.base_url, gated=name != "ungated",
            files=work / "files", knobs=dict(kv.split("=", 1) for kv in args.knob),
        )  # fmt: skip
        serve = procs.start_serve(cfg, work)
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=60) as c:
            backlog = None
            if name != "alone":
                backlog = await submit_backlog(c, background_bodies(args.background))
                await asyncio.sleep(args.warmup)  # background at its steady rate
            await run_phases(args, serve.base_url, sim.base_url, sc, quiet=backlog is not None)
            if backlog is not None:
                started = time.monotonic()
                sc.results = await collect_results(c, backlog, started + args.timeout)
                sc.drain_seconds = time.monotonic() - started
                sc.preempted = preempted_from_metrics((await c.get("/metrics")).text)
            async with httpx.AsyncClient(timeout=10) as s:
                stats = await sim_stats(s, sim.base_url)
            sc.thrown_tokens = stats["aborted_tokens"] + stats["preempted_tokens"]
            sc.generated_tokens = stats["generation_tokens"]
    finally:
        if serve is not None:
            procs.stop(serve)
        procs.stop(sim)
    return sc


# ------------------------------------------------------------------ embedded engine
EMBEDDED_QUICK = {
    "model": EMBEDDED_MODEL,
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 8,
    "temperature": 0,
}


async def embedded(args: argparse.Namespace, tmp: Path) -> tuple[list[float], list[float], int]:
    work = tmp / "embedded"
    work.mkdir()
    cfg = work / "bb.toml"
    cfg.write_text(
        f'database_url = "sqlite:///{work / "bb.db"}"\nfiles_dir = "{work / "files"}"\n'
        "poll_interval_seconds = 0.05\n"
    )
    serve = procs.start_serve(cfg, work, timeout=120)
    try:
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=120) as c:

            async def calls(n: int) -> list[float]:
                out = []
                for _ in range(n):
                    t = time.perf_counter()
                    r = await c.post("/v1/chat/completions", json=EMBEDDED_QUICK)
                    r.raise_for_status()
                    out.append(time.perf_counter() - t)
                    await asyncio.sleep(0.05)
                return out

            await calls(3)  # warm-up: the realtime context is loaded
            alone = await calls(args.embedded_calls)
            ids = []
            for i in range(20):
                body = {
                    "model": EMBEDDED_MODEL,
                    "messages": [{"role": "user", "content": f"Write a story about ship {i}."}],
                    "max_tokens": 256,
                    "temperature": 0,
                    "metadata": {"custom_id": f"slow-{i}"},
                }
                r = await c.post("/v1/slow/chat/completions", json=body)
                r.raise_for_status()
                ids.append(r.json()["id"])
            async with asyncio.timeout(60):  # the first slow generation has started
                while (await c.get(f"/v1/generation/{ids[0]}")).json()["state"] == "Queued":
                    await asyncio.sleep(0.05)
            busy = await calls(args.embedded_calls)
            queued = 0
            for gid in ids:
                queued += (await c.get(f"/v1/generation/{gid}")).json()["state"] != "Success"
            async with asyncio.timeout(args.timeout):
                for gid in ids:
                    while (await c.get(f"/v1/generation/{gid}")).json()["state"] not in (
                        "Success",
                        "Failed",
                    ):
                        await asyncio.sleep(0.2)
            return alone, busy, queued
    finally:
        procs.stop(serve)


# ------------------------------------------------------------------ report
def render(rows: list[Scenario], args: argparse.Namespace) -> Table:
    alone = next(r for r in rows if r.name == "alone")
    table = Table(title=f"Idle capacity on the engine simulator ({time.strftime('%Y-%m-%d')})")
    for col in ("scenario", "interactive", "TTFT p50", "p95", "p99", "p95 ÷ alone", "p99 ÷ alone"):
        table.add_column(col, justify="right")
    table.add_column("bg req/s quiet", justify="right")
    table.add_column("bg req/s busy", justify="right")
    table.add_column("thrown ÷ bg tokens", justify="right")
    table.add_column("drain after", justify="right")

    def ms(v: float) -> str:
        return f"{v * 1000:.0f} ms"

    for r in rows:
        quiet = r.quiet_finished / r.quiet_seconds if r.quiet_seconds else None
        busy = r.busy_finished / r.busy_seconds if r.busy_seconds and r.name != "alone" else None
        bg = r.background_tokens
        table.add_row(
            r.name,
            str(len(r.ttft)),
            ms(pct(r.ttft, 50)),
            ms(pct(r.ttft, 95)),
            ms(pct(r.ttft, 99)),
            f"{pct(r.ttft, 95) / pct(alone.ttft, 95):.2f}",
            f"{pct(r.ttft, 99) / pct(alone.ttft, 99):.2f}",
            "-" if quiet is None else f"{quiet:.1f}",
            "-" if busy is None else f"{busy:.1f}",
            "-" if r.name == "alone" else f"{r.thrown_tokens / bg:.2%} ({r.preempted} pre.)",
            "-" if r.name == "alone" else f"{r.drain_seconds:.0f} s",
        )
    return table


async def main(args: argparse.Namespace) -> int:
    console = Console(width=170)
    with tempfile.TemporaryDirectory(prefix="bb-idle-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.embedded_only:
            rows = []
            for name in ("alone", "gated", "ungated"):
                if name != "alone" and name not in args.scenarios.split(","):
                    continue
                console.print(f"[dim]scenario {name}...[/dim]")
                rows.append(await scenario(args, name, tmp))
            console.print(render(rows, args))
            gated = next((r for r in rows if r.name == "gated"), None)
            ungated = next((r for r in rows if r.name == "ungated"), None)
            alone = rows[0]
            if gated is None or ungated is None:
                return 0
            same = gated.results == ungated.results and len(gated.results) == args.background
            console.print(
                f"interactive TTFT p95 with backlog ÷ alone: gated "
                f"{pct(gated.ttft, 95) / pct(alone.ttft, 95):.2f}, ungated "
                f"{pct(ungated.ttft, 95) / pct(alone.ttft, 95):.2f}; "
                f"background in quiet phases gated ÷ ungated: "
                f"{(gated.quiet_finished / gated.quiet_seconds) / (ungated.quiet_finished / ungated.quiet_seconds):.2f}; "  # noqa: E501
                f"thrown away ÷ background tokens (gated): "
                f"{gated.thrown_tokens / gated.background_tokens:.2%}; "
                f"backlog results gated == ungated, {len(gated.results)} custom ids once each: "
                f"{'yes' if same else 'NO'}"
            )
        if not args.skip_embedded:
            alone_s, busy_s, queued = await embedded(args, tmp)
            t = Table(title="Embedded engine (SmolLM2-135M in-process): realtime chat, 8 tokens")
            for col in ("", "calls", "p50", "p95", "p95 ÷ alone", "slow unfinished"):
                t.add_column(col, justify="right")
            t.add_row("alone", str(len(alone_s)), f"{statistics.median(alone_s) * 1000:.0f} ms",
                      f"{pct(alone_s, 95) * 1000:.0f} ms", "1.00", "-")  # fmt: skip
            t.add_row("20 slow queued", str(len(busy_s)),
                      f"{statistics.median(busy_s) * 1000:.0f} ms",
                      f"{pct(busy_s, 95) * 1000:.0f} ms",
                      f"{pct(busy_s, 95) / pct(alone_s, 95):.2f}",
                      f"{queued} of 20 when the calls ended")  # fmt: skip
            console.print(t)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--background", type=int, default=3000)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--busy", type=float, default=10.0)
    p.add_argument("--quiet", type=float, default=15.0)
    p.add_argument("--rate", type=float, default=4.0, help="interactive requests/s when busy")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--embedded-calls", type=int, default=30)
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [[backends]] setting for the sim backend, e.g. realtime_quiet_seconds=1",
    )
    p.add_argument("--scenarios", default="gated,ungated", help="besides 'alone'")
    p.add_argument("--skip-embedded", action="store_true")
    p.add_argument("--embedded-only", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
