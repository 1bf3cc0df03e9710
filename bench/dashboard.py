"""How fast are the dashboard's pages with a million generations in the store?

    python bench/dashboard.py [-n 1000000] [--requests 30] [--keep /tmp/bb-dash.db]

What it measures (all processes on this machine, loopback only):

- A SQLite store is filled with ``-n`` generations written straight into the tables (the
  schema comes from the migrations): one batch of 40 % of them for tenant ``acme`` (60 %
  succeeded, 2 % failed, the rest queued or running), 2,000 groups of 50 across 20 tenants,
  and the rest standalone requests over the last 24 hours (about 4 % of them finished in the
  last hour, 10 % queued). Plus 20 webhook endpoints with 10,000 events and their attempts.
  ``--keep PATH`` keeps (and reuses) the filled file: building a million rows takes minutes.
- An empty store is the baseline: the same pages, the same server settings.
- For each store one ``backburner serve --no-worker`` subprocess (the upstream stub as its
  backend; no worker, so the data holds still while it is measured). The client signs in
  through ``/ui/login`` with an admin key (every tenant: the widest queries; then the overview
  and batches again as tenant ``acme``, the owner of most open work) and requests each
  page ``--requests`` times one after the other on one keep-alive connection, after one "cold"
  request that is reported apart (the first overview of a scope computes its counts; later
  ones are served from a cache refreshed in the background).
- Latency is the client's wall time from send to the whole body read; p50/p95 nearest-rank.
  The ratio column divides the 1M-store p95 by the empty-store p95. The last row is what the
  dashboard avoids: one ``count(*) ... GROUP BY state`` over the table, timed in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import pgdb, procs  # noqa: E402

MODEL = procs.UPSTREAM_MODEL
TARGET_MS = 100.0


def ts(t: datetime) -> str:
    """A timestamp as SQLAlchemy writes it to SQLite (naive UTC)."""
    return t.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass
class Ids:
    batch: str
    batch_lines: int
    group: str
    generation: str
    webhook: str


def fill(path: Path, n: int, seed: int = 7) -> Ids:
    """Write ``n`` generations (and their batch, groups, webhooks) into a migrated SQLite file."""
    rnd = random.Random(seed)
    now = datetime.now(UTC)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    tenants = ["acme"] + [f"t{i:02d}" for i in range(1, 21)]
    db.executemany("INSERT INTO tenants (tenant, vclock) VALUES (?, 0)", [(t,) for t in tenants])
    cols = (
        "id, tenant, kind, model, request, response, state, state_message, attempts, fair_key,"
        " available_at, created_at, dispatched_at, finished_at, expires_at, group_id,"
        " group_index, batch_id, custom_id, webhook_id"
    )
    sql = f"INSERT INTO generations ({cols}) VALUES ({', '.join('?' * 20)})"
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]})
    key = 0

    def row(
        gid: str,
        tenant: str,
        state: str,
        created: datetime,
        *,
        group: str | None = None,
        index: int | None = None,
        batch: str | None = None,
    ) -> tuple[object, ...]:
        nonlocal key
        key += 1
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": f"question {key}"}]}
        )
        done = state in ("Success", "Failed")
        started = created + timedelta(seconds=rnd.uniform(0.1, 30)) if state != "Queued" else None
        finished = (started or created) + timedelta(seconds=rnd.uniform(0.2, 5)) if done else None
        message = {"Success": "Completed", "Failed": "Upstream error", "Queued": "Queued"}
        return (
            gid,
            tenant,
            "chat",
            MODEL,
            body,
            answer if state == "Success" else None,
            state,
            message.get(state, "Running"),
            1 if state != "Queued" else 0,
            key,
            ts(created),
            ts(created),
            ts(started) if started else None,
            ts(finished) if finished else None,
            ts(created + timedelta(hours=24)),
            group,
            index,
            batch,
            f"line-{index}" if batch else None,
            None,
        )

    def state_for(p_ok: float, p_fail: float, p_run: float) -> str:
        r = rnd.random()
        if r < p_ok:
            return "Success"
        if r < p_ok + p_fail:
            return "Failed"
        if r < p_ok + p_fail + p_run:
            return "In Progress"
        return "Queued"

    # the big batch
    n_batch = int(n * 0.4)
    batch_created = now - timedelta(hours=3)
    big = "bench_batch_acme_0000001"
    chunk: list[tuple[object, ...]] = []
    done_ok = done_fail = 0
    for i in range(n_batch):
        frac = i / max(n_batch, 1)
        st = state_for(0.97, 0.02, 0.0) if frac < 0.62 else state_for(0, 0, 0.001)
        done_ok += st == "Success"
        done_fail += st == "Failed"
        created = batch_created + timedelta(seconds=frac * 600)
        chunk.append(row(f"bb{i:011d}", "acme", st, created, index=i, batch=big))
        if len(chunk) >= 20_000:
            db.executemany(sql, chunk)
            chunk.clear()
    db.executemany(sql, chunk)
    chunk.clear()
    db.execute(
        "INSERT INTO files (id, tenant, filename, purpose, bytes, lines, status, created_at)"
        " VALUES ('bench_file_in', 'acme', 'in.jsonl', 'batch', 1, ?, 'processed', ?)",
        (n_batch, ts(batch_created)),
    )
    db.execute(
        "INSERT INTO batches (id, tenant, input_file_id, endpoint, completion_window, status,"
        " total, completed, failed, pending, loaded, created_at, expires_at, in_progress_at)"
        " VALUES (?, 'acme', 'bench_file_in', '/v1/chat/completions', '24h', 'in_progress',"
        " ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            big,
            n_batch,
            done_ok,
            done_fail,
            n_batch - done_ok - done_fail,
            n_batch,
            ts(batch_created),
            ts(batch_created + timedelta(hours=24)),
            ts(batch_created),
        ),
    )
    # 2,000 groups of 50
    n_groups = min(2000, max(1, n // 500))
    first_group = ""
    for g in range(n_groups):
        gid = f"bench_group_{g:08d}"
        first_group = first_group or gid
        tenant = tenants[1 + g % 20]
        created = now - timedelta(hours=24) * (1 - g / n_groups)
        finished = g < n_groups - 20
        rows = [
            row(
                f"bg{g:06d}{i:03d}",
                tenant,
                "Success" if finished else state_for(0.5, 0.0, 0.1),
                created,
                group=gid,
                index=i,
            )
            for i in range(50)
        ]
        pending = sum(r[6] not in ("Success", "Failed") for r in rows)
        db.executemany(sql, rows)
        db.execute(
            "INSERT INTO groups (id, tenant, kind, size, pending, status, created_at, expires_at)"
            " VALUES (?, ?, 'chat', 50, ?, ?, ?, ?)",
            (
                gid,
                tenant,
                pending,
                "completed" if pending == 0 else "in_progress",
                ts(created),
                ts(created + timedelta(hours=24)),
            ),
        )
    # the rest: standalone, over the last 24 h
    rest = n - n_batch - n_groups * 50
    one = ""
    for i in range(rest):
        created = now - timedelta(seconds=rnd.uniform(60, 86_400))
        st = state_for(0.86, 0.04, 0.0) if created < now - timedelta(minutes=5) else "Queued"
        r = row(f"bs{i:012d}", tenants[1 + i % 20], st, created)
        one = one or str(r[0])
        chunk.append(r)
        if len(chunk) >= 20_000:
            db.executemany(sql, chunk)
            chunk.clear()
    db.executemany(sql, chunk)
    # webhooks and 10,000 events with one attempt each
    hook = ""
    for w in range(20):
        wid = f"bench_hook_{w:04d}"
        hook = hook or wid
        db.execute(
            "INSERT INTO webhooks (id, tenant, url, secret, events, enabled, created_at,"
            " updated_at) VALUES (?, ?, 'https://hooks.example.com/x', 'whsec_x', ?, 1, ?, ?)",
            (wid, tenants[1 + w], '["generation.completed"]', ts(now), ts(now)),
        )
    for e in range(10_000):
        eid = f"msg_bench{e:08d}"
        wid = f"bench_hook_{e % 20:04d}"
        when = ts(now - timedelta(seconds=e * 8))
        db.execute(
            "INSERT INTO webhook_events (id, tenant, webhook_id, event, payload, state, attempts,"
            " next_attempt_at, created_at, subject_id) VALUES (?, ?, ?, 'generation.completed',"
            " '{}', 'delivered', 1, ?, ?, ?)",
            (eid, tenants[1 + e % 20], wid, when, when, f"bs{e:012d}"),
        )
        db.execute(
            "INSERT INTO webhook_attempts (id, event_id, webhook_id, tenant, attempt,"
            " status_code, duration_ms, created_at) VALUES (?, ?, ?, ?, 1, 200, 12, ?)",
            (f"att{e:09d}", eid, wid, tenants[1 + e % 20], when),
        )
    db.commit()
    db.execute("ANALYZE")
    db.close()
    return Ids(big, n_batch, first_group, one, hook)


def pages(ids: Ids | None) -> list[tuple[str, str]]:
    out = [
        ("overview", "/ui/"),
        ("overview, live part", "/ui/live"),
        ("batches", "/ui/batches"),
        ("groups", "/ui/groups"),
        ("webhooks", "/ui/webhooks"),
        ("keys", "/ui/keys"),
    ]
    if ids is not None:
        out += [
            ("batch, first page", f"/ui/batches/{ids.batch}"),
            ("batch, last page", f"/ui/batches/{ids.batch}?start={ids.batch_lines - 50}"),
            ("batch, Failed lines", f"/ui/batches/{ids.batch}?state=Failed"),
            ("group", f"/ui/groups/{ids.group}"),
            ("generation", f"/ui/generations/{ids.generation}"),
            ("webhook log", f"/ui/webhooks/{ids.webhook}"),
        ]
    return out


# as tenant acme (its 400,000-line batch: about 154,000 of its generations open)
TENANT_PAGES = [("overview, tenant acme", "/ui/"), ("batches, tenant acme", "/ui/batches")]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def measure(
    base_url: str, key: str, plan: list[tuple[str, str]], n: int
) -> dict[str, tuple[float, float, float, float, int]]:
    out: dict[str, tuple[float, float, float, float, int]] = {}
    with httpx.Client(base_url=base_url, timeout=60) as c:
        page = c.get("/ui/login").text
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token, page[:300]
        r = c.post("/ui/login", data={"key": key, "csrf": token.group(1)})
        assert r.status_code == 303, r.text
        for name, path in plan:
            t = time.perf_counter()
            r = c.get(path)
            cold = (time.perf_counter() - t) * 1e3
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
            times = []
            for _ in range(n):
                t = time.perf_counter()
                r = c.get(path)
                times.append((time.perf_counter() - t) * 1e3)
                assert r.status_code == 200
            p50, p95 = percentile(times, 50), percentile(times, 95)
            out[name] = (cold, p50, p95, max(times), len(r.content))
    return out


def naive_count(path: Path) -> float:
    db = sqlite3.connect(path)
    t = time.perf_counter()
    db.execute("SELECT state, count(*) FROM generations GROUP BY state").fetchall()
    took = (time.perf_counter() - t) * 1e3
    db.close()
    return took


async def naive_count_pg(url: str) -> float:
    import asyncpg

    u = sa.make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    try:
        t = time.perf_counter()
        await conn.fetch("SELECT state, count(*) FROM generations GROUP BY state")
        return (time.perf_counter() - t) * 1e3
    finally:
        await conn.close()


def serve(
    url: str, work: Path, upstream: str, fill_with: Path | None = None
) -> tuple[procs.Proc, str, str]:
    """A server on the database ``url`` (migrated first; on PostgreSQL, then filled from the
    SQLite file ``fill_with``), an admin key and a key of tenant ``acme``."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = procs.write_config(
        work / "backburner.toml", url, upstream_url=upstream, log_level="warning"
    )
    procs.run_cli("db", "upgrade", "--config", str(cfg), timeout=300)
    if fill_with is not None:
        asyncio.run(copy_to_postgres(fill_with, url))
    key = procs.run_cli("keys", "create", "--tenant", "ops", "--admin", "--config", str(cfg))
    tenant = procs.run_cli("keys", "create", "--tenant", "acme", "--config", str(cfg))
    srv = procs.start_serve(cfg, work, extra_args=["--no-worker"])
    return srv, key.strip().splitlines()[-1], tenant.strip().splitlines()[-1]


COPIED = (
    "tenants",
    "files",
    "batches",
    "groups",
    "generations",
    "webhooks",
    "webhook_events",
    "webhook_attempts",
)


async def copy_to_postgres(sqlite_path: Path, url: str) -> None:
    """The filled SQLite store's rows into a migrated PostgreSQL database (COPY), analyzed."""
    import asyncpg

    u = sa.make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    src = sqlite3.connect(sqlite_path)
    try:
        for table in COPIED:
            kinds = {
                r["column_name"]: r["data_type"]
                for r in await conn.fetch(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_name = $1",
                    table,
                )
            }
            cols = [c[1] for c in src.execute(f"PRAGMA table_info({table})")]
            cur = src.execute(f"SELECT {', '.join(cols)} FROM {table}")
            while chunk := cur.fetchmany(50_000):
                records = [
                    tuple(_pg_value(v, kinds[c]) for c, v in zip(cols, row, strict=True))
                    for row in chunk
                ]
                await conn.copy_records_to_table(table, records=records, columns=cols)
        await conn.execute("ANALYZE")
    finally:
        src.close()
        await conn.close()


def _pg_value(value: object, kind: str) -> object:
    if value is None:
        return None
    if kind.startswith("timestamp"):
        return datetime.fromisoformat(str(value))
    if kind == "boolean":
        return bool(value)
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=1_000_000, help="generations in the store")
    p.add_argument("--requests", type=int, default=30, help="requests per page")
    p.add_argument("--keep", type=Path, default=None, help="keep/reuse the filled SQLite file")
    p.add_argument(
        "--postgres",
        metavar="URL",
        help="measure on PostgreSQL instead: fresh databases on this server, filled by COPY",
    )
    args = p.parse_args()
    console = Console(width=140)
    tmp = Path(tempfile.mkdtemp(prefix="bb-dash-"))
    up = procs.start_upstream(tmp)
    started = [up]
    scratch: list[str] = []
    try:
        big = args.keep or tmp / "big.db"
        ids_file = big.with_suffix(".ids.json")
        if big.exists() and ids_file.exists():
            ids = Ids(**json.loads(ids_file.read_text()))
            console.print(f"reusing {big}")
        else:
            cfg = procs.write_config(tmp / "fill.toml", f"sqlite:///{big}")
            procs.run_cli("db", "upgrade", "--config", str(cfg))
            t = time.perf_counter()
            ids = fill(big, args.n)
            ids_file.write_text(json.dumps(ids.__dict__))
            console.print(f"filled {args.n:,} generations in {time.perf_counter() - t:.0f} s")
        rows = sqlite3.connect(big).execute("SELECT count(*) FROM generations").fetchone()[0]
        naive = naive_count(big)
        if args.postgres:
            store = "PostgreSQL"
            big_url = asyncio.run(pgdb.create_database(args.postgres, "bb_dash"))
            empty_url = asyncio.run(pgdb.create_database(args.postgres, "bb_dash"))
            scratch += [big_url, empty_url]
            t = time.perf_counter()
            srv, key, acme = serve(big_url, tmp / "big", up.base_url, fill_with=big)
            console.print(f"copied into PostgreSQL in {time.perf_counter() - t:.0f} s")
            naive = asyncio.run(naive_count_pg(big_url))
        else:
            store, big_url, empty_url = "SQLite", f"sqlite:///{big}", f"sqlite:///{tmp}/empty.db"
            srv, key, acme = serve(big_url, tmp / "big", up.base_url)
        started.append(srv)
        full = measure(srv.base_url, key, pages(ids), args.requests)
        full.update(measure(srv.base_url, acme, TENANT_PAGES, args.requests))
        procs.stop(srv)
        started.remove(srv)
        srv, key, acme = serve(empty_url, tmp / "empty", up.base_url)
        started.append(srv)
        empty = measure(srv.base_url, key, pages(None), args.requests)
        empty.update(measure(srv.base_url, acme, TENANT_PAGES, args.requests))
    finally:
        for proc in reversed(started):
            procs.kill(proc)
        for url in scratch:
            asyncio.run(pgdb.drop_database(url))
    title = f"dashboard pages, {rows:,} generations ({store}), {args.requests} requests each"
    table = Table(title=title)
    cols = ("page", "cold ms", "p50 ms", "p95 ms", "max ms", "KiB", "empty p95 ms", "p95 ÷ empty")
    for col in cols:
        table.add_column(col, justify="left" if col == "page" else "right")
    worst = 0.0
    for name, _ in pages(ids) + TENANT_PAGES:
        cold, p50, p95, mx, size = full[name]
        worst = max(worst, p95)
        base = empty.get(name)
        table.add_row(
            name,
            f"{cold:.1f}",
            f"{p50:.1f}",
            f"{p95:.1f}",
            f"{mx:.1f}",
            f"{size / 1024:.0f}",
            f"{base[2]:.1f}" if base else "-",
            f"{p95 / base[2]:.2f}" if base else "-",
        )
    table.add_row("(avoided: count(*) GROUP BY state)", "", f"{naive:.1f}", "", "", "", "", "")
    console.print(table)
    verdict = "met" if worst < TARGET_MS else "NOT met"
    console.print(f"worst p95 {worst:.1f} ms: target < {TARGET_MS:.0f} ms {verdict}")


if __name__ == "__main__":
    main()
