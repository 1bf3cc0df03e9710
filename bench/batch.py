"""Batch upload, validation and load at 10k, 100k and 1M lines, and the server's peak memory.

    python bench/batch.py [--lines 10k,100k,1M] [--postgres URL] [--no-sqlite]
                          [--upstream-latency-ms 1000] [--poll 0.1] [--timeout 3600]

For each size N and each store (SQLite in a temp dir; with ``--postgres``, a fresh PostgreSQL
database created with asyncpg and dropped afterwards), with a **new** ``backburner serve``
process each time (so its VmHWM is that run's own peak):

1. **generate**: N chat requests are written as JSONL to a temp file, line by line (never held in
   memory), each line about 150 bytes:
   ``{"custom_id":"r0000001","method":"POST","url":"/v1/chat/completions","body":{...}}``.
2. **upload**: ``POST /v1/files`` (multipart, ``purpose=batch``) with ``httpx``, the file object
   passed as is: httpx streams it from disk in 64 KiB chunks with a Content-Length from fstat, so
   the client never holds the file either (the "client RSS" column is this process's peak RSS).
   upload = wall time of that POST, until its 200.
3. **validate**: ``POST /v1/batches``, then ``GET /v1/batches/{id}`` every ``--poll`` seconds until
   the status is no longer ``validating``. validate = from the 200 of the create to the first
   poll that sees ``in_progress`` (the runner has read, parsed and checked every line and found
   no duplicate custom_id); that poll must show ``request_counts.total == N``.
4. **load**: the API does not expose how many lines are loaded as generations, so the bench reads
   the ``batches.loaded`` column from the database (a read-only connection) on the same polls.
   load = from the first ``in_progress`` poll to the first poll with ``loaded == N``; then the
   generations of the batch are counted in the database (must be N).
5. **memory**: a thread samples ``VmRSS`` of the serve process from ``/proc/<pid>/status`` every
   50 ms through steps 2 to 4 ("base" is VmRSS just before the upload); at the end the process's
   ``VmHWM`` (its peak RSS since it started) is read. The requirement is VmHWM < 300 MB at 1M.

The batch runner lives in the worker, so ``serve`` runs **with** its worker; to keep draining from
competing with validation and loading, the one backend points at the fake upstream with
``max_concurrency = 1`` and ``--upstream-latency-ms`` (default 1000 ms): about one generation a
second runs while the bench measures. The server is stopped (SIGTERM) after each size without
waiting for the batch, and every temp file (JSONL, blobs, SQLite database) is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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
from tests.support.s3 import ENV as S3_ENV  # noqa: E402
from tests.support.s3 import running_s3  # noqa: E402

MODEL = procs.UPSTREAM_MODEL
LINE_BYTES = 150  # newline included
RSS_LIMIT_MB = 300.0
MB = 1024 * 1024


def parse_count(text: str) -> int:
    t = text.strip().lower().replace("_", "")
    mult = 1
    if t.endswith("k"):
        mult, t = 1000, t[:-1]
    elif t.endswith("m"):
        mult, t = 1_000_000, t[:-1]
    return int(float(t) * mult)


def label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def make_line(i: int) -> bytes:
    obj = {
        "custom_id": f"r{i:07d}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": ""}]},
    }
    bare = len(json.dumps(obj, separators=(",", ":"))) + 1
    text = f"item {i} "
    obj["body"]["messages"][0]["content"] = text + "x" * max(0, LINE_BYTES - bare - len(text))
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def generate(path: Path, n: int) -> int:
    """Write N lines to ``path`` (buffered, line by line); returns the byte count."""
    with path.open("wb", buffering=MB) as fh:
        for i in range(1, n + 1):
            fh.write(make_line(i))
    return path.stat().st_size


def proc_status_kb(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/<pid>/status in kB (0 when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples VmRSS of ``pid`` every ``interval`` seconds on a thread; ``max_mb`` per phase."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.phase = "idle"
        self.max_kb: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kb = proc_status_kb(self.pid, "VmRSS")
            self.samples += 1
            self.max_kb[self.phase] = max(self.max_kb.get(self.phase, 0), kb)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def max_mb(self, *phases: str) -> float:
        return max((self.max_kb.get(p, 0) for p in phases), default=0) / 1024


@dataclass
class Row:
    store: str
    lines: int
    file_mb: float
    gen_s: float
    upload_s: float
    validate_s: float
    load_s: float
    base_mb: float
    rss_upload_mb: float
    rss_validate_mb: float
    rss_load_mb: float
    hwm_mb: float
    client_mb: float
    samples: int


class DbProbe:
    """Reads ``batches.loaded`` and counts a batch's generations, read-only."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None

    async def open(self) -> None:
        if self.url.startswith("sqlite"):
            path = self.url.split(":///", 1)[1]
            self._sqlite = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        else:
            import asyncpg

            self._pg = await asyncpg.connect(self.url.replace("postgresql+asyncpg", "postgresql"))

    async def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            await self._pg.close()

    async def _one(self, sql_sqlite: str, sql_pg: str, arg: str) -> int:
        if self._sqlite is not None:
            row = self._sqlite.execute(sql_sqlite, (arg,)).fetchone()
        else:
            row = await self._pg.fetchrow(sql_pg, arg)
        return -1 if row is None else int(row[0])

    async def loaded(self, batch_id: str) -> int:
        return await self._one(
            "SELECT loaded FROM batches WHERE id = ?",
            "SELECT loaded FROM batches WHERE id = $1",
            batch_id,
        )

    async def generations(self, batch_id: str) -> int:
        return await self._one(
            "SELECT count(*) FROM generations WHERE batch_id = ?",
            "SELECT count(*) FROM generations WHERE batch_id = $1",
            batch_id,
        )


def upload(base: str, path: Path) -> tuple[dict[str, Any], float]:
    """POST /v1/files with the file streamed from disk; (file object, seconds)."""
    with httpx.Client(base_url=base, timeout=httpx.Timeout(900.0)) as c, path.open("rb") as fh:
        t0 = time.perf_counter()
        r = c.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": (path.name, fh, "application/jsonl")},
        )
        seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise AssertionError(f"upload: HTTP {r.status_code} {r.text[:500]}")
    return r.json(), seconds


async def validate_and_load(
    base: str,
    file_id: str,
    n: int,
    probe: DbProbe,
    sampler: RssSampler,
    poll: float,
    deadline: float,
) -> tuple[float, float]:
    """Create the batch; (validate seconds, load seconds) as described in the module docstring."""
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as c:
        r = await c.post(
            "/v1/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        if r.status_code != 200:
            raise AssertionError(f"create batch: HTTP {r.status_code} {r.text[:500]}")
        batch_id = r.json()["id"]
        t0 = time.perf_counter()
        sampler.phase = "validate"
        validated: float | None = None
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not loaded before the deadline")
            b = (await c.get(f"/v1/batches/{batch_id}")).json()
            now = time.perf_counter()
            if validated is None and b["status"] != "validating":
                if b["status"] != "in_progress":
                    raise AssertionError(f"batch {batch_id} is {b['status']}: {b.get('errors')}")
                if b["request_counts"]["total"] != n:
                    raise AssertionError(f"request_counts.total {b['request_counts']} != {n}")
                validated = now
                sampler.phase = "load"
            if validated is not None and await probe.loaded(batch_id) == n:
                break
            await asyncio.sleep(poll)
        loaded = time.perf_counter()
    count = await probe.generations(batch_id)
    if count != n:
        raise AssertionError(f"batch {batch_id}: {count} generations, expected {n}")
    return validated - t0, loaded - validated


async def bench_one(
    store: str,
    database_url: str,
    n: int,
    upstream: procs.Proc,
    work: Path,
    args: argparse.Namespace,
    deadline: float,
    log: Callable[[str], None],
) -> Row:
    run = work / f"{store}-{label(n)}"
    run.mkdir()
    jsonl = run / f"batch-{label(n)}.jsonl"
    log(f"{store} {label(n)}: generating {jsonl.name}")
    t0 = time.perf_counter()
    size = await asyncio.to_thread(generate, jsonl, n)
    gen_s = time.perf_counter() - t0
    cfg = procs.write_config(
        run / "bb.toml",
        database_url,
        upstream_url=upstream.base_url,
        max_concurrency=1,
        log_level="warning",
        files_dir=str(run / "files"),
        **args.files,
    )
    srv = await asyncio.to_thread(procs.start_serve, cfg, run)
    probe = DbProbe(database_url)
    try:
        await probe.open()
        base_mb = proc_status_kb(srv.pid, "VmRSS") / 1024
        with RssSampler(srv.pid) as sampler:
            sampler.phase = "upload"
            log(f"{store} {label(n)}: uploading {size / MB:.1f} MB")
            f, upload_s = await asyncio.to_thread(upload, srv.base_url, jsonl)
            if f.get("bytes") != size:
                raise AssertionError(f"uploaded {f.get('bytes')} bytes, expected {size}")
            log(f"{store} {label(n)}: validating and loading")
            validate_s, load_s = await validate_and_load(
                srv.base_url, f["id"], n, probe, sampler, args.poll, deadline
            )
        hwm_mb = proc_status_kb(srv.pid, "VmHWM") / 1024
    except BaseException:
        print(srv.log_tail(3000), file=sys.stderr)
        raise
    finally:
        await probe.close()
        await asyncio.to_thread(procs.stop, srv)
        jsonl.unlink(missing_ok=True)
    return Row(
        store=store,
        lines=n,
        file_mb=size / MB,
        gen_s=gen_s,
        upload_s=upload_s,
        validate_s=validate_s,
        load_s=load_s,
        base_mb=base_mb,
        rss_upload_mb=sampler.max_mb("upload"),
        rss_validate_mb=sampler.max_mb("validate"),
        rss_load_mb=sampler.max_mb("load"),
        hwm_mb=hwm_mb,
        client_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        samples=sampler.samples,
    )


fresh_postgres = pgdb.fresh_database


def render(rows: list[Row], args: argparse.Namespace) -> Table:
    table = Table(
        title=(
            f"Batch upload, validation and load: serve with its worker (backend max_concurrency 1,"
            f" upstream latency {args.upstream_latency_ms:g} ms), {os.cpu_count()} CPUs,"
            f" load average {os.getloadavg()[0]:.1f} at the end"
            + (", files on S3 (moto_server)" if args.s3 else ", files in a local directory")
        ),
        caption=(
            "upload: POST /v1/files wall time; validate: batch created -> in_progress (polled"
            f" every {args.poll:g} s); load: in_progress -> batches.loaded == N (read from the"
            " DB); RSS: VmRSS samples of the serve process every 50 ms (base: before the upload)"
            "; VmHWM: its peak RSS since start"
        ),
    )
    cols = [
        ("store", "left"),
        ("lines", "right"),
        ("file MB", "right"),
        ("upload s", "right"),
        ("upload MB/s", "right"),
        ("validate s", "right"),
        ("load s", "right"),
        ("lines/s (v+l)", "right"),
        ("RSS base MB", "right"),
        ("RSS upload MB", "right"),
        ("RSS validate MB", "right"),
        ("RSS load MB", "right"),
        ("VmHWM MB", "right"),
        (f"< {RSS_LIMIT_MB:g} MB", "right"),
        ("client RSS MB", "right"),
    ]
    for name, justify in cols:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            r.store,
            label(r.lines),
            f"{r.file_mb:.1f}",
            f"{r.upload_s:.2f}",
            f"{r.file_mb / r.upload_s:.0f}",
            f"{r.validate_s:.1f}",
            f"{r.load_s:.1f}",
            f"{r.lines / (r.validate_s + r.load_s):.0f}",
            f"{r.base_mb:.0f}",
            f"{r.rss_upload_mb:.0f}",
            f"{r.rss_validate_mb:.0f}",
            f"{r.rss_load_mb:.0f}",
            f"{r.hwm_mb:.0f}",
            "yes" if r.hwm_mb < RSS_LIMIT_MB else "NO",
            f"{r.client_mb:.0f}",
        )
    return table


async def main(args: argparse.Namespace) -> int:
    console = Console(width=200)
    deadline = time.monotonic() + args.timeout
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        console.log(f"[yellow]warning: load average {load:.2f}; numbers will be noisy")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bb-bench-batch-") as tmp:
        work = Path(tmp)
        up = await asyncio.to_thread(
            procs.start_upstream, work, latency_ms=args.upstream_latency_ms
        )
        s3 = contextlib.ExitStack()
        args.files = {}
        if args.s3:
            server = s3.enter_context(running_s3(work))
            os.environ.update(S3_ENV)  # the serve processes sign with these
            bucket = server.create_bucket("bench-batch")
            args.files = {
                "files_url": f"s3://{bucket}/files",
                "files_endpoint_url": server.endpoint_url,
            }
        try:
            async with asyncio.timeout(args.timeout):
                for n in args.lines:
                    if not args.no_sqlite:
                        url = f"sqlite:///{work}/bb-{label(n)}.db"
                        rows.append(
                            await bench_one("SQLite", url, n, up, work, args, deadline, console.log)
                        )
                    if args.postgres:
                        async with fresh_postgres(args.postgres) as url:
                            rows.append(
                                await bench_one(
                                    "PostgreSQL", url, n, up, work, args, deadline, console.log
                                )
                            )
        finally:
            await asyncio.to_thread(procs.stop, up)
            s3.close()
    console.print(render(rows, args))
    big = [r for r in rows if r.lines >= 1_000_000]
    return 0 if rows and all(r.hwm_mb < RSS_LIMIT_MB for r in big) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lines",
        type=lambda s: [parse_count(x) for x in s.split(",") if x.strip()],
        default=[10_000, 100_000, 1_000_000],
        help="comma-separated sizes, k and M allowed (default 10k,100k,1M)",
    )
    p.add_argument("--postgres", metavar="URL", help="also run on PostgreSQL (a fresh database)")
    p.add_argument("--no-sqlite", action="store_true", help="skip the SQLite runs")
    p.add_argument(
        "--s3",
        action="store_true",
        help="files on S3 (moto_server on loopback) instead of a local directory",
    )
    p.add_argument(
        "--upstream-latency-ms",
        type=float,
        default=1000.0,
        help="fake upstream latency (the backend runs one request at a time)",
    )
    p.add_argument("--poll", type=float, default=0.1, help="seconds between status polls")
    p.add_argument("--timeout", type=float, default=3600.0, help="hard limit for the whole run, s")
    args = p.parse_args(argv)
    if not args.lines or min(args.lines) < 1 or max(args.lines) > 1_000_000:
        p.error("--lines: each size must be 1 to 1,000,000 (the most one batch holds)")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
