"""How far one PostgreSQL goes: the cost of claim + finish per generation with 1, 2, 4 workers.

    python bench/scale.py [-n 20000] [--workers 1,2,4] [--latency-ms 5] [--concurrency 64]
                          [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
                          [--timeout 1500]

What it measures (all processes on this machine, loopback only), for each worker count k:

1. **Engine**: ``tests/support/upstream.py`` with ``--latency-ms`` (default 5 ms), started once.
   It answers a chat completion after the latency for about one uvicorn request's CPU, so the
   engine is never what limits the drain: the database and the workers' CPU are. (The engine
   simulator, ``tests/support/engine_sim.py``, models an H100's timings: about 100 ms + 12 ms
   per token per request and ``max_num_seqs`` at a time, plus a step loop and a tokenizer on
   the same two cores; it would be the limit. Its CPU is reported as "engine CPU".)
2. **Pre-fill**: a fresh database (``bb_bench_<random>`` on ``--postgres``, dropped afterwards),
   migrated to the newest schema; N Queued chat generations inserted with direct SQL (rows from
   ``backburner.store.queue.new_rows``, 1,000 per INSERT), one tenant, consecutive fair keys,
   each with a distinct prompt. They are held: a transaction of the benchmark locks them all
   (``SELECT ... FOR UPDATE``), and claims skip locked rows.
3. **Workers**: k ``backburner worker --config F.toml`` subprocesses (one ``openai`` backend
   pointing at the engine, ``max_concurrency = --concurrency`` per worker, every other setting
   the default: claim_size 64, claim_ahead 32, prefix runs on, write_size 256). The benchmark
   waits until each has connected and its CPU has settled (imports and start-up are not
   counted).
4. **Drain**: database statistics are read, the holding transaction is rolled back (it writes
   nothing; every generation is claimable at once) and CPU counters are read; then
   ``SELECT count(*)`` of the Queued and In Progress rows is polled every 0.2 s until it is 0.
   Then CPU is read again, the workers are stopped (SIGTERM) and the statistics read again.

Reported per generation:

- **gen/s** = N / (latest ``finished_at`` - earliest ``dispatched_at``), the service's own
  timestamps; "1st / 2nd half" the same rate over the first and the last N/2 finishes; **wall**:
  release to the poll that saw the queue empty.
- **worker CPU**: user + system of the k worker processes (``/proc/<pid>/stat``) over the drain.
- **PG CPU**: user + system of the PostgreSQL processes over the drain: the client backends of
  this database (the workers' connections and the benchmark's one polling connection) and every
  background process (walwriter, checkpointer, autovacuum, ...), from ``/proc``; a backend that
  exits during the drain is counted through the postmaster's reaped-children CPU.
- **engine CPU**: the upstream stub's CPU.
- **commits + rollbacks**, **gen scans**, **tup upd**: deltas of ``pg_stat_database``'s
  ``xact_commit`` and ``xact_rollback`` (a read outside ``begin()`` ends in a rollback),
  ``pg_stat_user_tables.idx_scan + seq_scan`` (generations) and ``pg_stat_database.tup_updated``,
  less the benchmark's own (its polls, the hold); **WAL** records and KiB: the server's
  ``pg_stat_wal`` delta. ``pg_stat_statements`` is not preloaded on the shared server, so
  statements are not counted one by one; docs/scaling.md derives them from the code.
- **x 1 worker**: gen/s with k workers / gen/s with one worker.

Every wait is bounded by ``--timeout`` (a hard deadline for the whole run); the workers and the
upstream are killed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import pgdb, procs  # noqa: E402

from backburner.core.ids import new_id  # noqa: E402
from backburner.core.states import Kind, State  # noqa: E402
from backburner.schemas.generation import NewGeneration  # noqa: E402
from backburner.store.engine import async_url  # noqa: E402
from backburner.store.migrate import upgrade  # noqa: E402
from backburner.store.queue import new_rows  # noqa: E402
from backburner.store.tables import generations, tenants  # noqa: E402

G = generations
MODEL = procs.UPSTREAM_MODEL
TENANT = "default"
INSERT_CHUNK = 1000
POLL_SECONDS = 0.2
OPEN = (State.QUEUED.value, State.IN_PROGRESS.value)
TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ /proc
def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (None once it is gone)."""
    f = _stat_fields(pid)
    return None if f is None else (int(f[11]) + int(f[12])) / TICK


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU of the children ``pid`` has reaped (cutime + cstime)."""
    f = _stat_fields(pid)
    return 0.0 if f is None else (int(f[13]) + int(f[14])) / TICK


def parent_pid(pid: int) -> int:
    f = _stat_fields(pid)
    if f is None:
        raise RuntimeError(f"process {pid} is gone")
    return int(f[1])


def total_cpu(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in pids)


# ------------------------------------------------------------------ PostgreSQL
@dataclass
class PgCpu:
    """CPU of this database's backends and the server's background processes at one moment."""

    per_pid: dict[int, float]
    reaped: float  # the postmaster's reaped children


async def pg_pids(conn: AsyncConnection) -> list[int]:
    rows = await conn.execute(
        sa.text(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() OR backend_type <> 'client backend'"
        )
    )
    return [int(r[0]) for r in rows]


async def pg_cpu(conn: AsyncConnection, postmaster: int) -> PgCpu:
    per_pid: dict[int, float] = {}
    for pid in await pg_pids(conn):
        s = cpu_seconds(pid)
        if s is not None:
            per_pid[pid] = s
    return PgCpu(per_pid, children_cpu_seconds(postmaster))


def pg_cpu_delta(before: PgCpu, after: PgCpu) -> float:
    """CPU spent between the two moments: live processes' growth, plus what exited processes
    spent (the postmaster's reaped-children CPU grew by their whole lifetime's CPU, so their
    CPU before ``before`` is taken off)."""
    grown = sum(s - before.per_pid.get(pid, 0.0) for pid, s in after.per_pid.items())
    exited = sum(s for pid, s in before.per_pid.items() if pid not in after.per_pid)
    return grown + (after.reaped - before.reaped) - exited


STATS_SQL = """
SELECT d.xact_commit, d.xact_rollback, d.tup_returned, d.tup_fetched, d.tup_inserted,
       d.tup_updated, d.tup_deleted, d.blks_hit, d.blks_read,
       coalesce(t.idx_scan, 0), coalesce(t.seq_scan, 0), coalesce(t.n_tup_hot_upd, 0),
       w.wal_records, w.wal_fpi, w.wal_bytes
FROM pg_stat_database d
LEFT JOIN pg_stat_user_tables t ON t.relname = 'generations'
CROSS JOIN pg_stat_wal w
WHERE d.datname = current_database()
"""
STAT_NAMES = (
    "xact_commit",
    "xact_rollback",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "blks_hit",
    "blks_read",
    "gen_idx_scan",
    "gen_seq_scan",
    "gen_hot_upd",
    "wal_records",  # the whole server's (pg_stat_wal): a quiet server is assumed
    "wal_fpi",
    "wal_bytes",
)


async def pg_stats(conn: AsyncConnection) -> dict[str, int]:
    await conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
    row = (await conn.execute(sa.text(STATS_SQL))).one()
    return {k: int(v) for k, v in zip(STAT_NAMES, row, strict=True)}


# ------------------------------------------------------------------ setup
def chat_body(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": 16,
        "metadata": {"custom_id": f"req-{i}"},
    }


async def prefill(conn: AsyncConnection, n: int) -> float:
    """Insert ``n`` held Queued generations; returns the seconds it took."""
    start = time.perf_counter()
    now = datetime.now(UTC)
    await conn.execute(tenants.insert().values(tenant=TENANT, vclock=n))
    for first in range(0, n, INSERT_CHUNK):
        idx = range(first, min(n, first + INSERT_CHUNK))
        items = [NewGeneration(Kind.CHAT, MODEL, chat_body(i), f"req-{i}") for i in idx]
        rows = new_rows(
            TENANT, items, [new_id() for _ in idx], first + 1, now, now + timedelta(days=1)
        )
        await conn.execute(G.insert(), rows)
    await conn.commit()
    return time.perf_counter() - start


async def hold(conn: AsyncConnection) -> int:
    """Lock every generation in a transaction left open: claims skip locked rows, so nothing
    is claimable until :func:`release` (which writes nothing: a rollback). Returns the pid of
    the backend that holds them."""
    await conn.execute(sa.select(G.c.id).with_for_update())
    return int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


async def release(conn: AsyncConnection) -> None:
    await conn.rollback()


async def open_count(conn: AsyncConnection) -> int:
    q = sa.select(sa.func.count()).select_from(G).where(G.c.state.in_(OPEN))
    n = (await conn.execute(q)).scalar_one()
    await conn.commit()
    return int(n)


async def wait_workers_ready(
    conn: AsyncConnection, workers: list[procs.Proc], mine: list[int], deadline: float
) -> None:
    """Until each worker has a connection to the database and their CPU has settled."""
    while True:
        for w in workers:
            if w.popen.poll() is not None:
                raise RuntimeError(f"a worker exited with {w.popen.returncode}:\n{w.log_tail()}")
        n = (
            await conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> ALL(:mine)"
                ),
                {"mine": mine},
            )
        ).scalar_one()
        await conn.commit()
        if n >= len(workers):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n} of {len(workers)} workers connected")
        await asyncio.sleep(0.2)
    last = total_cpu(w.pid for w in workers)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = total_cpu(w.pid for w in workers)
        if now - last < 0.02 * len(workers):  # idle polling only
            return
        last = now
    raise TimeoutError("the workers' CPU did not settle")


# ------------------------------------------------------------------ one worker count
@dataclass
class Row:
    workers: int
    n: int
    prefill_s: float
    rate: float
    first_half: float
    second_half: float
    wall: float
    worker_cpu: float
    pg_cpu: float
    engine_cpu: float
    stats: dict[str, int]
    max_attempts: int

    def per_gen_ms(self, seconds: float) -> float:
        return seconds * 1000 / self.n

    def per_gen(self, key: str) -> float:
        return self.stats[key] / self.n

    @property
    def cpu_share(self) -> float:
        """Worker + PostgreSQL + engine CPU over the drain, as a share of every core's time."""
        cpus = os.cpu_count() or 1
        return (self.worker_cpu + self.pg_cpu + self.engine_cpu) / (self.wall * cpus)


@contextlib.asynccontextmanager
async def workers_running(cfg: Path, work: Path, k: int) -> AsyncIterator[list[procs.Proc]]:
    started: list[procs.Proc] = []
    try:
        for _ in range(k):
            started.append(await asyncio.to_thread(procs.start_worker, cfg, work))
        yield started
    finally:
        await asyncio.gather(*(asyncio.to_thread(procs.stop, w) for w in started))


async def bench_workers(
    k: int,
    args: argparse.Namespace,
    upstream: procs.Proc,
    work: Path,
    deadline: float,
    log: Callable[[str], None],
) -> Row:
    n = args.requests
    async with pgdb.fresh_database(args.postgres) as url:
        await asyncio.to_thread(upgrade, url)
        # its own connection, closed before anything is measured: a backend reports its
        # statistics (rows, WAL) when it goes idle or exits, never inside a transaction
        filler = create_async_engine(async_url(url), poolclass=sa.pool.NullPool)
        try:
            async with filler.connect() as conn:
                prefill_s = await prefill(conn, n)
                log(f"{k} worker(s): {n} generations inserted in {prefill_s:.1f} s")
                ac = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await ac.execute(sa.text("VACUUM ANALYZE generations"))
        finally:
            await filler.dispose()
        engine = create_async_engine(async_url(url), pool_size=2, max_overflow=0)
        try:
            cfg = procs.write_config(
                work / f"scale-{k}.toml",
                url,
                upstream_url=upstream.base_url,
                max_concurrency=args.concurrency,
                log_level="warning",
            )
            async with engine.connect() as holder, engine.connect() as conn:
                lsn = sa.text("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
                lsn0 = int((await conn.execute(lsn)).scalar_one())
                await conn.commit()
                held_by = await hold(holder)
                # the hold's WAL (one lock record per row) is reported when it ends: taken off
                hold_wal = int((await conn.execute(lsn)).scalar_one()) - lsn0
                await conn.commit()
                mine = int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
                await conn.commit()
                postmaster = parent_pid(mine)
                async with workers_running(cfg, work, k) as workers:
                    await wait_workers_ready(conn, workers, [mine, held_by], deadline)
                    stats0 = await pg_stats(conn)
                    await conn.commit()
                    own_xacts, own_rollbacks, polls = 1, 1, 0  # that read; the release
                    await release(holder)
                    pg0 = await pg_cpu(conn, postmaster)
                    w0 = total_cpu(w.pid for w in workers)
                    e0 = cpu_seconds(upstream.pid) or 0.0
                    await conn.commit()
                    own_xacts += 1
                    started = time.perf_counter()
                    log(f"{k} worker(s): released; draining")
                    while True:
                        left = await open_count(conn)
                        own_xacts += 1
                        polls += 1
                        if left == 0:
                            break
                        for w in workers:
                            if w.popen.poll() is not None:
                                raise RuntimeError(f"a worker exited:\n{w.log_tail()}")
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"drain not finished in time ({left} of {n} open)")
                        await asyncio.sleep(POLL_SECONDS)
                    wall = time.perf_counter() - started
                    w1 = total_cpu(w.pid for w in workers)
                    e1 = cpu_seconds(upstream.pid) or 0.0
                    pg1 = await pg_cpu(conn, postmaster)
                    await conn.commit()
                    own_xacts += 1
                # the workers are stopped here: their backends flushed their statistics
                await asyncio.sleep(1.5)  # backends flush statistics once a second
                stats1 = await pg_stats(conn)
                await conn.commit()
                by_state = sa.select(G.c.state, sa.func.count()).group_by(G.c.state)
                counts: dict[str, int] = {
                    str(r[0]): int(r[1]) for r in (await conn.execute(by_state)).all()
                }
                attempts = int(
                    (await conn.execute(sa.select(sa.func.max(G.c.attempts)))).scalar_one()
                )
                first = (await conn.execute(sa.select(sa.func.min(G.c.dispatched_at)))).scalar_one()
                ends = list(
                    (await conn.execute(sa.select(G.c.finished_at).order_by(G.c.finished_at)))
                    .scalars()
                    .all()
                )
                await conn.commit()
        finally:
            await engine.dispose()
    if counts.get(State.SUCCESS.value, 0) != n:
        raise AssertionError(f"{k} worker(s): not all Success: {counts}")
    half = ends[n // 2 - 1]
    window = (ends[-1] - first).total_seconds()
    stats = {key: stats1[key] - stats0[key] for key in STAT_NAMES}
    stats["xact_commit"] -= own_xacts
    stats["xact_rollback"] -= own_rollbacks
    stats["wal_records"] -= n  # the hold's lock records
    stats["wal_bytes"] -= hold_wal
    # scans of generations: the workers' (the polls and the hold are the benchmark's)
    stats["gen_scans"] = stats["gen_idx_scan"] + stats["gen_seq_scan"] - polls - 1
    return Row(
        workers=k,
        n=n,
        prefill_s=prefill_s,
        rate=n / window,
        first_half=(n // 2) / (half - first).total_seconds(),
        second_half=(n - n // 2) / (ends[-1] - half).total_seconds(),
        wall=wall,
        worker_cpu=w1 - w0,
        pg_cpu=pg_cpu_delta(pg0, pg1),
        engine_cpu=e1 - e0,
        stats=stats,
        max_attempts=attempts,
    )


# ------------------------------------------------------------------ report
def render(rows: list[Row], args: argparse.Namespace) -> Table:
    table = Table(
        title=(
            f"backburner on one PostgreSQL: N={args.requests} per run, upstream stub latency"
            f" {args.latency_ms:g} ms, max_concurrency {args.concurrency} per worker,"
            f" {os.cpu_count()} CPUs"
        ),
        caption=(
            "gen/s: N / (last finished_at - first dispatched_at), also over the first and the"
            " last N/2 finishes; CPU: ms per generation of the k workers, of PostgreSQL and of"
            " the upstream stub; CPU used: their sum / (wall x CPUs); per generation: xacts"
            " (commits + rollbacks), scans of generations (index + sequential), tuples"
            " updated, WAL records and KiB (the whole server's); max att: the most attempts"
        ),
    )
    columns = {
        "workers": "right",
        "gen/s": "right",
        "x 1 worker": "right",
        "1st/2nd half": "right",
        "wall s": "right",
        "worker CPU": "right",
        "PG CPU": "right",
        "engine CPU": "right",
        "CPU used": "right",
        "xacts": "right",
        "scans": "right",
        "tup upd": "right",
        "WAL rec": "right",
        "WAL KiB": "right",
        "max att": "right",
    }
    for name, justify in columns.items():
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    base = rows[0].rate if rows and rows[0].workers == 1 else None
    for r in rows:
        table.add_row(
            str(r.workers),
            f"{r.rate:.0f}",
            "-" if base is None else f"{r.rate / base:.2f}",
            f"{r.first_half:.0f}/{r.second_half:.0f}",
            f"{r.wall:.1f}",
            f"{r.per_gen_ms(r.worker_cpu):.2f}",
            f"{r.per_gen_ms(r.pg_cpu):.2f}",
            f"{r.per_gen_ms(r.engine_cpu):.2f}",
            f"{r.cpu_share:.0%}",
            f"{(r.stats['xact_commit'] + r.stats['xact_rollback']) / r.n:.2f}",
            f"{r.per_gen('gen_scans'):.2f}",
            f"{r.per_gen('tup_updated'):.2f}",
            f"{r.per_gen('wal_records'):.1f}",
            f"{r.per_gen('wal_bytes') / 1024:.2f}",
            str(r.max_attempts),
        )
    return table


async def main(args: argparse.Namespace) -> int:
    console = Console(width=170)
    deadline = time.monotonic() + args.timeout
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    if not counts or min(counts) < 1 or max(counts) > 32:
        raise SystemExit("--workers: a list of 1..32, e.g. 1,2,4")
    load = os.getloadavg()[0]
    if load > 0.5:
        console.log(f"[yellow]warning: load average {load:.2f}; numbers will be noisy")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bb-scale-") as tmp:
        work = Path(tmp)
        up = await asyncio.to_thread(procs.start_upstream, work, latency_ms=args.latency_ms)
        try:
            async with asyncio.timeout(args.timeout):
                for k in counts:
                    rows.append(await bench_workers(k, args, up, work, deadline, console.log))
                    r = rows[-1]
                    console.log(
                        f"{k} worker(s): {r.rate:.0f} gen/s, worker CPU"
                        f" {r.per_gen_ms(r.worker_cpu):.2f} ms/gen, PG CPU"
                        f" {r.per_gen_ms(r.pg_cpu):.2f} ms/gen; stats {r.stats}"
                    )
        except BaseException:
            log = work / "worker.log"
            if log.exists():
                console.print(log.read_text(errors="replace")[-3000:])
            raise
        finally:
            await asyncio.to_thread(procs.stop, up)
    console.print(render(rows, args))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--requests", type=int, default=20000, help="generations per run")
    p.add_argument("--workers", default="1,2,4", help="worker process counts, comma-separated")
    p.add_argument(
        "--postgres",
        metavar="URL",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="server to create the scratch databases on",
    )
    p.add_argument("--latency-ms", type=float, default=5.0, help="upstream stub latency")
    p.add_argument("--concurrency", type=int, default=64, help="max_concurrency per worker")
    p.add_argument("--timeout", type=float, default=1500.0, help="hard limit for the whole run, s")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
