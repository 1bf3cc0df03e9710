"""How fast does backburner drain a queue, compared with calling the upstream directly?

    python bench/drain.py [-n 2000] [--concurrency 32] [--latency-ms 20]
                          [--postgres postgresql://postgres@127.0.0.1:5432/postgres] [--no-sqlite]

What it measures (all processes on this machine, loopback only):

1. **direct**: ``tests/support/upstream.py`` is started; an aiohttp client with
   ``--concurrency`` workers (and as many connections) sends N chat completions to it. (Until
   2026-12-03 this client was httpx, whose own CPU held "direct" at about 220 req/s on this
   machine: ratios from before then are against that slower baseline.)
   direct rate = N / wall time (after a short warm-up that is not counted). It is measured just
   before step 2 and again just after step 3, and a row shows the mean, so a machine that gets
   busier or quieter during the run does not skew the ratio.
2. **submit**: ``backburner serve --no-worker`` (SQLite in a temp dir, or a fresh PostgreSQL
   database) with one ``openai`` backend pointing at the upstream, ``max_concurrency`` =
   ``--concurrency``. ``--concurrency`` submitters POST the same N requests to
   ``/v1/slow/chat/completions``. submit rate = N / wall time. Nothing runs while submitting, so
   the drain below starts from a full queue and the two numbers do not disturb each other.
3. **drain**: the API-only server is stopped (SIGTERM) and ``backburner serve`` (API + worker) is
   started on the same database. Completion is detected by polling ``GET /metrics``
   (``backburner_generations_finished_total``) every 100 ms. Then every generation is fetched
   (``GET /v1/generation/{id}``), checked (Success, metadata and echo correct), and
   drain rate = N / (latest ``finishedAt`` - earliest ``dispatchedAt``): the service's own
   timestamps, so process start-up and the polling interval are not counted.

The ratio drain/direct is the figure of merit; the requirement is >= 0.5. Everything is bounded by
``--timeout`` (a hard deadline for the whole run); subprocesses are killed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import pgdb, procs  # noqa: E402

MODEL = procs.UPSTREAM_MODEL
REQUIRED_RATIO = 0.9  # issue 12


def chat_body(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": 16,
        "metadata": {"custom_id": f"req-{i}"},
    }


async def run_pool(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Run ``one(i)`` for i in range(n) on ``concurrency`` tasks; returns the wall seconds."""
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            await one(i)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.perf_counter() - start


def client(base_url: str, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(60.0),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; 0 elsewhere)."""
    return sum(cpu_split(pid))


def fast_client(concurrency: int) -> aiohttp.ClientSession:
    """The load client: aiohttp, ``concurrency`` kept-alive connections (the client costs
    several times less CPU than httpx's, so "direct" is what the upstream can do)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=60.0),
        raise_for_status=True,
    )


async def measure_direct(upstream: procs.Proc, n: int, concurrency: int) -> tuple[float, float]:
    """Returns (requests per second, client CPU ms per request)."""
    url = upstream.base_url + "/v1/chat/completions"
    async with fast_client(concurrency) as c:

        async def one(i: int) -> None:
            async with c.post(url, json=chat_body(i)) as r:
                await r.read()

        await run_pool(min(n, 4 * concurrency), concurrency, one)  # warm-up: connections open
        cpu = time.process_time()
        seconds = await run_pool(n, concurrency, one)
        return n / seconds, (time.process_time() - cpu) * 1000 / n


async def measure_direct_httpx(upstream: procs.Proc, n: int, concurrency: int) -> float:
    """The direct rate with an ``httpx.AsyncClient`` (the client of this benchmark until
    2026-12-03, whose own CPU bounds it): requests per second."""
    async with client(upstream.base_url, concurrency) as c:

        async def one(i: int) -> None:
            r = await c.post("/v1/chat/completions", json=chat_body(i))
            r.raise_for_status()

        await run_pool(min(n, 4 * concurrency), concurrency, one)
        return n / await run_pool(n, concurrency, one)


async def submit_all(base: str, n: int, concurrency: int) -> tuple[list[str], float]:
    ids: list[str] = [""] * n
    async with fast_client(concurrency) as c:

        async def one(i: int) -> None:
            async with c.post(base + "/v1/slow/chat/completions", json=chat_body(i)) as r:
                ids[i] = (await r.json())["id"]

        seconds = await run_pool(n, concurrency, one)
    return ids, seconds


def finished_from_metrics(text: str) -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("backburner_generations_finished_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def wait_drained(base: str, n: int, deadline: float) -> float:
    """Poll /metrics until n generations finished; returns wall seconds since the call."""
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as c:
        while True:
            r = await c.get("/metrics")
            if finished_from_metrics(r.text) >= n:
                return time.perf_counter() - start
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"drain not finished in time ({finished_from_metrics(r.text)}/{n})"
                )
            await asyncio.sleep(0.1)


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


async def drain_window(base: str, ids: list[str], concurrency: int) -> tuple[float, int]:
    """Fetch and check every generation; returns (last finish - first dispatch, max attempts)."""
    gens: list[dict[str, Any]] = [{}] * len(ids)
    async with client(base, concurrency) as c:

        async def one(i: int) -> None:
            r = await c.get(f"/v1/generation/{ids[i]}")
            r.raise_for_status()
            gens[i] = r.json()

        await run_pool(len(ids), concurrency, one)
    bad = [
        (i, g.get("state"), g.get("stateMessage"))
        for i, g in enumerate(gens)
        if g.get("state") != "Success"
        or g["request"]["metadata"] != {"custom_id": f"req-{i}"}
        or g["response"]["choices"][0]["message"]["content"] != f"echo: request {i}"
    ]
    if bad:
        raise AssertionError(f"{len(bad)} generations wrong, e.g. {bad[:3]}")
    first = min(_ts(g["dispatchedAt"]) for g in gens)
    last = max(_ts(g["finishedAt"]) for g in gens)
    return (last - first).total_seconds(), max(int(g["attempts"]) for g in gens)


fresh_postgres = pgdb.fresh_database


def start_profiler(srv: procs.Proc, out: Path) -> subprocess.Popen[bytes]:
    """Sample the drain server with py-spy (``pip install py-spy``) until :func:`stop_profiler`.

    The output is collapsed stacks (one ``frame;frame;... count`` a line), on-CPU samples only.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [spy, "record", "--pid", str(srv.pid), "--rate", "50", "--format", "raw"]
    return subprocess.Popen(
        [*argv, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(10)


@dataclass
class Row:
    store: str
    direct_rate: float  # mean of the runs just before and just after this store's drain
    httpx_rate: float  # the same with an httpx client (the baseline before 2026-12-03)
    client_cpu_ms: float
    submit_rate: float
    drain_rate: float
    drain_wall: float
    max_attempts: int
    server_cpu_ms: float

    @property
    def ratio(self) -> float:
        return self.drain_rate / self.direct_rate


async def bench_store(
    label: str,
    database_url: str,
    upstream: procs.Proc,
    work: Path,
    args: argparse.Namespace,
    deadline: float,
    log: Callable[[str], None],
) -> Row:
    n, conc = args.requests, args.concurrency
    log(f"{label}: direct, {n} requests at concurrency {conc}")
    before, client_ms_1 = await measure_direct(upstream, n, conc)
    cfg = procs.write_config(
        work / f"{label}.toml",
        database_url,
        upstream_url=upstream.base_url,
        max_concurrency=conc,
        log_level="warning",
    )
    log(f"{label}: submit {n} to serve --no-worker")
    api = await asyncio.to_thread(procs.start_serve, cfg, work, extra_args=["--no-worker"])
    try:
        ids, submit_s = await submit_all(api.base_url, n, conc)
    finally:
        await asyncio.to_thread(procs.stop, api)
    log(f"{label}: drain with serve")
    started = time.perf_counter()
    srv = await asyncio.to_thread(procs.start_serve, cfg, work)
    spy = start_profiler(srv, Path(f"{args.profile}.{label}.txt")) if args.profile else None
    user, system = cpu_split(srv.pid)
    try:
        await wait_drained(srv.base_url, n, deadline)
        wall = time.perf_counter() - started
        user_after, system_after = cpu_split(srv.pid)
        user, system = user_after - user, system_after - system
        cpu = user + system
        log(f"{label}: drain server CPU {user:.2f} s user, {system:.2f} s system")
        if spy is not None:
            await asyncio.to_thread(stop_profiler, spy)
        window, attempts = await drain_window(srv.base_url, ids, conc)
    finally:
        await asyncio.to_thread(procs.stop, srv)
    log(f"{label}: direct again")
    after, client_ms_2 = await measure_direct(upstream, n, conc)
    httpx_rate = await measure_direct_httpx(upstream, n, conc)
    return Row(
        store=label,
        direct_rate=(before + after) / 2,
        httpx_rate=httpx_rate,
        client_cpu_ms=(client_ms_1 + client_ms_2) / 2,
        submit_rate=n / submit_s,
        drain_rate=n / window,
        drain_wall=wall,
        max_attempts=attempts,
        server_cpu_ms=cpu * 1000 / n,
    )


def render(rows: list[Row], args: argparse.Namespace) -> Table:
    table = Table(
        title=(
            f"backburner drain: N={args.requests}, concurrency {args.concurrency}, "
            f"upstream latency {args.latency_ms:g} ms, {os.cpu_count()} CPUs"
        ),
        caption=(
            "direct: aiohttp client, mean of a run just before and just after the drain; httpx"
            " direct: one run with an httpx client after the drain; "
            "CPU ms/req: the direct client process and the draining backburner process"
        ),
    )
    columns = {
        "store": "left",
        "direct req/s": "right",
        "submit req/s": "right",
        "drain req/s": "right",
        "drain/direct": "right",
        "drain/httpx direct": "right",
        "drain wall s": "right",
        "client CPU ms/req": "right",
        "server CPU ms/req": "right",
        "max attempts": "right",
        f">= {REQUIRED_RATIO}": "right",
    }
    for name, justify in columns.items():
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            r.store,
            f"{r.direct_rate:.0f}",
            f"{r.submit_rate:.0f}",
            f"{r.drain_rate:.0f}",
            f"{r.ratio:.2f}",
            f"{r.drain_rate / r.httpx_rate:.2f}",
            f"{r.drain_wall:.1f}",
            f"{r.client_cpu_ms:.2f}",
            f"{r.server_cpu_ms:.2f}",
            str(r.max_attempts),
            "yes" if r.ratio >= REQUIRED_RATIO else "NO",
        )
    return table


async def main(args: argparse.Namespace) -> int:
    console = Console(width=140)
    deadline = time.monotonic() + args.timeout
    rows: list[Row] = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        console.log(f"[yellow]warning: load average {load:.2f}; numbers will be noisy")
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        work = Path(tmp)
        up = await asyncio.to_thread(procs.start_upstream, work, latency_ms=args.latency_ms)
        try:
            async with asyncio.timeout(args.timeout):
                if not args.no_sqlite:
                    url = f"sqlite:///{work}/bb.db"
                    rows.append(
                        await bench_store("SQLite", url, up, work, args, deadline, console.log)
                    )
                if args.postgres:
                    async with fresh_postgres(args.postgres) as url:
                        rows.append(
                            await bench_store(
                                "PostgreSQL", url, up, work, args, deadline, console.log
                            )
                        )
        except BaseException:
            serve_log = work / "serve.log"
            if serve_log.exists():
                console.print(serve_log.read_text(errors="replace")[-3000:])
            raise
        finally:
            await asyncio.to_thread(procs.stop, up)
    console.print(render(rows, args))
    return 0 if rows and all(r.ratio >= REQUIRED_RATIO for r in rows) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-ms", type=float, default=20.0, help="upstream latency per request")
    p.add_argument("--postgres", metavar="URL", help="also run on PostgreSQL (a fresh database)")
    p.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    p.add_argument(
        "--profile",
        metavar="PREFIX",
        help="sample the draining server with py-spy into PREFIX.<store>.txt (collapsed stacks)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit for the whole run, s")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
