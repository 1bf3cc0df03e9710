"""How long does submitting a 50-request chat group take, on SQLite and on PostgreSQL?

    python bench/group_submit.py [-n 200] [--clients 1,50] [--group-size 50]
                                 [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
                                 [--no-sqlite] [--no-worker] [--latency-ms 20]

What it measures (all processes on this machine, loopback only):

- ``tests/support/upstream.py`` (the fake OpenAI-compatible upstream) is started once.
- For each store (SQLite in a temp dir; a fresh PostgreSQL database, created with asyncpg and
  dropped afterwards) one ``backburner serve`` subprocess is started with one ``openai`` backend
  pointing at the upstream. By default **the worker runs in the same process** and drains the
  queue in the background while submissions arrive, as in real use (``--no-worker`` serves the
  API only, so the numbers show the submission path alone).
- For each client count C (default 1 and 50): a warm-up of ``2 * C`` submissions (not counted),
  then N submissions (default 200) of one group of ``--group-size`` chat requests to
  ``POST /v1/slow/group/chat/completions``, by C concurrent clients (one ``httpx.AsyncClient``,
  C connections). Latency is each POST's wall time in the client, from send to the parsed 200;
  every answer is checked (``groupSize`` equal to the group size). p50/p99 are of those N
  latencies (nearest-rank); groups/s = N / wall time of the N submissions.
- The client counts run one after the other on the same server, so the 50-client run starts with
  whatever the worker has not drained of the 1-client run (the "backlog" column: generations
  queued when that run ended, from ``/metrics``).

The PG/SQLite columns divide the PostgreSQL figure by the SQLite one (latency: above 1 means
PostgreSQL is slower; throughput: above 1 means PostgreSQL is faster). Everything is bounded by
``--timeout``; subprocesses are stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import pgdb, procs  # noqa: E402

MODEL = procs.UPSTREAM_MODEL
ROUTE = "/v1/slow/group/chat/completions"


def group_body(n: int, size: int) -> dict[str, Any]:
    return {
        "requests": [
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"group {n} request {i}"}],
                "max_tokens": 16,
                "metadata": {"custom_id": f"g{n}-r{i}"},
            }
            for i in range(size)
        ],
        "metadata": {"bench": "group_submit"},
    }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Result:
    p50_ms: float
    p99_ms: float
    groups_per_s: float
    backlog: int


def queued_from_metrics(text: str) -> int:
    """Generations submitted minus finished, from backburner's Prometheus counters."""
    submitted = finished = 0.0
    for line in text.splitlines():
        if line.startswith("backburner_generations_submitted_total{"):
            submitted += float(line.rsplit(" ", 1)[1])
        elif line.startswith("backburner_generations_finished_total{"):
            finished += float(line.rsplit(" ", 1)[1])
    return max(0, int(submitted - finished))


async def run_clients(
    base: str, n: int, clients: int, size: int, start: int, deadline: float
) -> tuple[list[float], float]:
    """N submissions by ``clients`` concurrent tasks; (latencies in s, wall s)."""
    latencies: list[float] = []
    bodies = iter(range(start, start + n))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=limits) as c:

        async def one_client() -> None:
            for i in bodies:
                if time.monotonic() > deadline:
                    raise TimeoutError("benchmark deadline passed")
                body = group_body(i, size)
                t0 = time.perf_counter()
                r = await c.post(ROUTE, json=body)
                answer = r.json()
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or answer.get("groupSize") != size:
                    raise AssertionError(f"submission {i}: HTTP {r.status_code} {r.text[:300]}")

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(clients):
                tg.create_task(one_client())
        wall = time.perf_counter() - t0
    return latencies, wall


fresh_postgres = pgdb.fresh_database


async def bench_store(
    label: str,
    database_url: str,
    upstream: procs.Proc,
    work: Path,
    args: argparse.Namespace,
    deadline: float,
    log: Any,
) -> dict[int, Result]:
    cfg = procs.write_config(
        work / f"{label}.toml",
        database_url,
        upstream_url=upstream.base_url,
        max_concurrency=args.max_concurrency,
        log_level="warning",
        files_dir=str(work / f"{label}-files"),
    )
    extra = ["--no-worker"] if args.no_worker else []
    srv = await asyncio.to_thread(procs.start_serve, cfg, work, extra_args=extra)
    out: dict[int, Result] = {}
    next_body = 0
    try:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=10.0) as mc:
            for clients in args.clients:
                log(f"{label}: {clients} client(s), {args.requests} groups of {args.group_size}")
                await run_clients(srv.base_url, 2 * clients, clients, args.group_size, 0, deadline)
                next_body += 2 * clients
                lat, wall = await run_clients(
                    srv.base_url, args.requests, clients, args.group_size, next_body, deadline
                )
                next_body += args.requests
                backlog = queued_from_metrics((await mc.get("/metrics")).text)
                out[clients] = Result(
                    p50_ms=percentile(lat, 50) * 1000,
                    p99_ms=percentile(lat, 99) * 1000,
                    groups_per_s=len(lat) / wall,
                    backlog=backlog,
                )
    except BaseException:
        print(srv.log_tail(3000), file=sys.stderr)
        raise
    finally:
        await asyncio.to_thread(procs.stop, srv)
    return out


def render(results: dict[str, dict[int, Result]], args: argparse.Namespace) -> Table:
    mode = "API only (--no-worker)" if args.no_worker else "worker draining in the same process"
    table = Table(
        title=(
            f"POST {ROUTE}: {args.requests} groups of {args.group_size} per row, {mode}, "
            f"upstream latency {args.latency_ms:g} ms, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at the end"
        ),
        caption=(
            "latency: client wall time per POST (nearest-rank percentiles); groups/s = N / wall; "
            "backlog: generations still queued after the row; PG/SQLite: PostgreSQL / SQLite"
        ),
    )
    table.add_column("clients", justify="right")
    stores = [s for s in ("SQLite", "PostgreSQL") if s in results]
    short = {"SQLite": "SQLite", "PostgreSQL": "PG"}
    for s in stores:
        table.add_column(f"{short[s]} p50 ms", justify="right")
        table.add_column(f"{short[s]} p99 ms", justify="right")
        table.add_column(f"{short[s]} groups/s", justify="right")
    both = len(stores) == 2
    if both:
        table.add_column("PG/SQLite p50", justify="right")
        table.add_column("PG/SQLite p99", justify="right")
        table.add_column("PG/SQLite groups/s", justify="right")
    table.add_column("backlog " + " / ".join(short[s] for s in stores), justify="right")
    for clients in args.clients:
        row = [str(clients)]
        for s in stores:
            r = results[s][clients]
            row += [f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.groups_per_s:.1f}"]
        if both:
            sq, pg = results["SQLite"][clients], results["PostgreSQL"][clients]
            row += [
                f"{pg.p50_ms / sq.p50_ms:.2f}",
                f"{pg.p99_ms / sq.p99_ms:.2f}",
                f"{pg.groups_per_s / sq.groups_per_s:.2f}",
            ]
        row.append(" / ".join(str(results[s][clients].backlog) for s in stores))
        table.add_row(*row)
    return table


async def main(args: argparse.Namespace) -> int:
    console = Console(width=180)
    deadline = time.monotonic() + args.timeout
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        console.log(f"[yellow]warning: load average {load:.2f}; numbers will be noisy")
    results: dict[str, dict[int, Result]] = {}
    with tempfile.TemporaryDirectory(prefix="bb-bench-group-") as tmp:
        work = Path(tmp)
        up = await asyncio.to_thread(procs.start_upstream, work, latency_ms=args.latency_ms)
        try:
            async with asyncio.timeout(args.timeout):
                if not args.no_sqlite:
                    results["SQLite"] = await bench_store(
                        "SQLite", f"sqlite:///{work}/bb.db", up, work, args, deadline, console.log
                    )
                if args.postgres:
                    async with fresh_postgres(args.postgres) as url:
                        results["PostgreSQL"] = await bench_store(
                            "PostgreSQL", url, up, work, args, deadline, console.log
                        )
        finally:
            await asyncio.to_thread(procs.stop, up)
    console.print(render(results, args))
    return 0 if results else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--requests", type=int, default=200, help="submissions per row")
    p.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[1, 50],
        help="comma-separated concurrent client counts (default 1,50)",
    )
    p.add_argument("--group-size", type=int, default=50, help="requests per group (1..50)")
    p.add_argument("--postgres", metavar="URL", help="also run on PostgreSQL (a fresh database)")
    p.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    p.add_argument("--no-worker", action="store_true", help="serve the API only (no draining)")
    p.add_argument("--latency-ms", type=float, default=20.0, help="upstream latency per request")
    p.add_argument("--max-concurrency", type=int, default=32, help="backend max_concurrency")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit for the whole run, s")
    args = p.parse_args(argv)
    if not 1 <= args.group_size <= 50:
        p.error("--group-size must be 1 to 50")
    if args.requests < 1 or not args.clients or min(args.clients) < 1:
        p.error("-n and every --clients value must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
