"""Realtime passthrough side by side with peer gateways: req/s, latency and server CPU per request.

    python bench/peers.py [--requests 2000 | --seconds S] [--rounds 3] [--concurrency 16]
                          [--skip-litellm] [--skip-portkey] [--cache ~/.cache/backburner-bench]
                          [--profile PREFIX]

What it starts (``bench/peer_servers.py``; loopback only; every process in its own session,
stopped by its PID on the way out, Ctrl-C, SIGTERM and errors included):

- **stub**: an instant OpenAI-compatible upstream (an ``aiohttp.web`` server) answering
  ``POST /v1/chat/completions`` at once: one JSON answer, or with ``"stream": true`` four chunks
  as server-sent events (role, two content deltas, finish) and ``data: [DONE]``;
- **backburner**: ``backburner serve`` (SQLite in a temp dir, worker running, nothing queued, so
  the slow lane is idle) with one ``openai`` backend pointing at the stub; its realtime lane is
  ``POST /v1/chat/completions``;
- **Portkey**: ``@portkey-ai/gateway`` from npm (installed once into ``CACHE/portkey``, with
  ``@hono/node-server`` held below 1.14: see ``install_portkey``), run with node in production
  mode; each request names the stub with ``x-portkey-provider: openai`` and
  ``x-portkey-custom-host: <stub>/v1``;
- **LiteLLM**: ``litellm[proxy]`` from PyPI (installed once into its own venv,
  ``CACHE/litellm/venv``), one worker, no database, a generated config whose one model points at
  the stub, ``LITELLM_LOCAL_MODEL_COST_MAP=True`` and a random strong master key.

Each server runs at its default log level (backburner and LiteLLM write one access-log line per
request to a file, as out of the box). A peer that cannot be installed or started is left out
with a note under the table.

The same aiohttp client (``--concurrency`` tasks over as many keep-alive connections) sends the
same chat completion to each path: the stub directly, backburner, and each peer. Every round
measures every path in turn (the order rotates from round to round), first the plain JSON
rounds, then the streaming (SSE) rounds. A round is a warm-up of ``2 * concurrency`` requests
(not counted), then ``--requests`` requests (or ``--seconds`` of them); each answer is checked
(HTTP 200, and a completion or an event stream that ends in ``[DONE]``).

Per path and mode the table shows medians over rounds of: req/s (answers / wall time), p50 and p99
latency (nearest rank, send to last byte), and server CPU ms per request (user + system CPU of the
server's process tree, children included, from ``/proc/<pid>/stat`` before and after the counted
requests; for "direct" that is the stub's). "bb ÷ this" is the median over rounds of backburner's
req/s divided by this path's in the same round. Exit status 1 when any answer was bad.

``--profile PREFIX`` samples backburner with py-spy (``pip install py-spy``) through the JSON
and the SSE rounds into ``PREFIX.json.txt`` and ``PREFIX.sse.txt`` (collapsed stacks); the
sampler takes CPU of its own, so a profiled run's figures are not for the record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from peer_servers import (  # noqa: E402  (bench/ is this script's directory)
    BACKBURNER,
    DEFAULT_CACHE,
    LITELLM,
    MODEL,
    PORTKEY,
    Target,
    start_backburner,
    start_litellm,
    start_portkey,
    start_stub,
    tree_cpu_seconds,
)
from tests.support import procs  # noqa: E402

# ---------------------------------------------------------------- the load


@dataclass
class Sample:
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def request_body(i: int, *, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


async def measure(target: Target, args: argparse.Namespace, *, stream: bool) -> Sample:
    """One round on one path: warm-up, then the counted requests, with the server's CPU."""
    headers = {"Content-Type": "application/json", **target.headers}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    latencies: list[float] = []
    errors: list[str] = []

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        started = time.perf_counter()
        async with session.post(
            target.url, data=request_body(i, stream=stream), headers=headers
        ) as resp:
            data = await resp.read()
        latencies.append(time.perf_counter() - started)
        good = data.rstrip().endswith(b"[DONE]") if stream else b'"choices"' in data
        if resp.status != 200 or not good:
            errors.append(f"HTTP {resp.status}: {data[:200]!r}")

    async def pool(session: aiohttp.ClientSession, count: int, until: float | None) -> int:
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while (sent < count) if until is None else (time.perf_counter() < until):
                sent += 1
                await one(session, sent)

        async with asyncio.TaskGroup() as group:
            for _ in range(args.concurrency):
                group.create_task(worker())
        return sent

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await pool(session, 2 * args.concurrency, None)
        latencies.clear()
        errors.clear()
        cpu = tree_cpu_seconds(target.proc.pid)
        started = time.perf_counter()
        until = started + args.seconds if args.seconds else None
        sent = await pool(session, args.requests, until)
        seconds = time.perf_counter() - started
        cpu = tree_cpu_seconds(target.proc.pid) - cpu
    if errors:
        print(f"  {target.name}: {len(errors)} bad answers, e.g. {errors[0]}", file=sys.stderr)
    return Sample(sent, seconds, latencies, len(errors), cpu)


async def run_rounds(
    targets: list[Target], args: argparse.Namespace, log: Callable[[str], None]
) -> dict[tuple[bool, str], list[Sample]]:
    samples: dict[tuple[bool, str], list[Sample]] = {}
    backburner = next(t for t in targets if t.name == BACKBURNER)
    for stream in (False, True):
        mode = "sse" if stream else "json"
        spy = None
        if args.profile:
            spy = start_profiler(backburner.proc.pid, f"{args.profile}.{mode}")
        try:
            await measure_mode(targets, args, samples, log, stream=stream)
        finally:
            if spy is not None:
                await asyncio.to_thread(stop_profiler, spy)
    return samples


async def measure_mode(
    targets: list[Target],
    args: argparse.Namespace,
    samples: dict[tuple[bool, str], list[Sample]],
    log: Callable[[str], None],
    *,
    stream: bool,
) -> None:
    """Every round of one mode: each path in turn, the order rotating from round to round."""
    mode = "SSE" if stream else "JSON"
    for round_no in range(args.rounds):
        shift = round_no % len(targets)
        for target in targets[shift:] + targets[:shift]:
            sample = await measure(target, args, stream=stream)
            samples.setdefault((stream, target.name), []).append(sample)
            log(
                f"{mode} round {round_no + 1}/{args.rounds} {target.name}: "
                f"{sample.rate:.0f} req/s, p50 {1000 * sample.percentile(0.5):.1f} ms"
            )


def start_profiler(pid: int, prefix: str) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` into ``PREFIX.txt`` (collapsed stacks) until stopped."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw"]
    out = f"{prefix}.txt"
    return subprocess.Popen(
        [*argv, "--output", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(10)


# ---------------------------------------------------------------- the table


def ratio(bb: list[Sample], other: list[Sample]) -> float:
    """Median over rounds of backburner's req/s ÷ the other path's, round by round."""
    return statistics.median(b.rate / o.rate for b, o in zip(bb, other, strict=True))


def render(
    targets: list[Target],
    samples: dict[tuple[bool, str], list[Sample]],
    args: argparse.Namespace,
    notes: list[str],
) -> Table:
    amount = f"{args.seconds:g} s" if args.seconds else f"{args.requests} requests"
    table = Table(
        title=(
            f"realtime passthrough: {args.rounds} rounds of {amount} per path, concurrency "
            f"{args.concurrency}, instant stub upstream, {os.cpu_count()} CPUs (medians)"
        ),
        caption="\n".join(notes) or None,
    )
    for name, justify in {
        "mode": "left",
        "path": "left",
        "req/s": "right",
        "p50 ms": "right",
        "p99 ms": "right",
        "server CPU ms/req": "right",
        "bad": "right",
        "bb ÷ this": "right",
        "version": "left",
    }.items():
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for stream in (False, True):
        bb = samples[(stream, BACKBURNER)]
        for target in targets:
            rows = samples[(stream, target.name)]
            table.add_row(
                "SSE" if stream else "JSON",
                f"[bold]{target.name}[/]" if target.name == BACKBURNER else target.name,
                f"{statistics.median(s.rate for s in rows):,.0f}",
                f"{1000 * statistics.median(s.percentile(0.5) for s in rows):.1f}",
                f"{1000 * statistics.median(s.percentile(0.99) for s in rows):.1f}",
                f"{statistics.median(1000 * s.cpu_seconds / s.requests for s in rows):.2f}",
                str(sum(s.errors for s in rows)),
                f"{ratio(bb, rows):.2f}",
                target.version,
            )
        if not stream:
            table.add_section()
    return table


def summary(targets: list[Target], samples: dict[tuple[bool, str], list[Sample]]) -> list[str]:
    names = {t.name for t in targets}
    lines = []
    for peer, target in ((PORTKEY, 1.5), (LITELLM, 6.0)):
        if peer not in names:
            continue
        for stream in (False, True):
            value = ratio(samples[(stream, BACKBURNER)], samples[(stream, peer)])
            mode = "SSE" if stream else "JSON"
            lines.append(f"backburner ÷ {peer} ({mode}): {value:.2f} (target ≥ {target:g})")
    return lines


# ---------------------------------------------------------------- main


def start_all(
    args: argparse.Namespace,
    work: Path,
    spawned: list[procs.Proc],
    notes: list[str],
    console: Console,
) -> list[Target]:
    """Start the stub, backburner and each peer that comes up; every process started is in
    ``spawned`` from its start on, whatever happens next."""
    started = [start_stub(work, spawned)]
    stub = started[0].proc.base_url
    started.append(start_backburner(stub, work, args.concurrency, spawned))
    peers: list[tuple[str, Callable[[Path, str, Path, list[procs.Proc]], Target]]] = []
    if not args.skip_portkey:
        peers.append((PORTKEY, start_portkey))
    if not args.skip_litellm:
        peers.append((LITELLM, start_litellm))
    for name, start in peers:
        console.log(f"{name}: installing into {args.cache} (once) and starting")
        try:
            started.append(start(args.cache, stub, work, spawned))
        except (RuntimeError, OSError, subprocess.SubprocessError, TimeoutError) as exc:
            note = f"{name} skipped: {exc}".splitlines()[0][:300]
            notes.append(note)
            console.log(f"[yellow]{note}")
    return started


def main(args: argparse.Namespace) -> int:
    console = Console(width=150)
    load = os.getloadavg()[0]
    if load > 0.5:
        console.log(f"[yellow]warning: load average {load:.2f}; numbers will be noisy")
    notes: list[str] = []
    spawned: list[procs.Proc] = []
    with tempfile.TemporaryDirectory(prefix="bb-peers-") as tmp:
        work = Path(tmp)
        try:
            started = start_all(args, work, spawned, notes, console)
            samples = asyncio.run(run_rounds(started, args, console.log))
        except BaseException:
            for proc in spawned:
                console.print(f"--- {proc.log_path.name} tail:\n{proc.log_tail(1500)}")
            raise
        finally:
            for proc in reversed(spawned):  # by PID: SIGTERM to its session, SIGKILL if need be
                procs.stop(proc, timeout=15)
    notes.append(
        f"load average (1 min): {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    console.print(render(started, samples, args, notes))
    for line in summary(started, samples):
        console.print(line)
    return 1 if any(s.errors for rows in samples.values() for s in rows) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("-n", "--requests", type=int, default=2000, help="counted requests per round")
    p.add_argument("--seconds", type=float, default=0.0, help="instead: seconds per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--skip-portkey", action="store_true")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where peers are installed")
    p.add_argument("--profile", metavar="PREFIX", help="py-spy backburner into PREFIX.<mode>.txt")
    return p.parse_args(argv)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop children on SIGTERM too
    sys.exit(main(parse_args()))
