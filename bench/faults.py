"""The fault suite of issue #10 at full size: what backburner promises when things break.

    python bench/faults.py [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
                           [--no-sqlite] [--only kill,flaky,webhook,pgstop,poison]

Each scenario is the one ``tests/acceptance/test_faults.py`` runs small on every CI run (the code
is shared: ``tests/support/faults/``), here at the sizes of the issue, on SQLite (a file in a
temporary directory) and on PostgreSQL (a fresh database on ``--postgres``'s server, dropped
afterwards; the PostgreSQL-restart scenario makes its own private cluster instead, with
``initdb``/``pg_ctl``, and never touches that server):

1. **kill**: ``backburner serve --no-worker`` takes ``--kill-n`` (5,000) generations in groups
   of 50, each subscribed to a webhook; a ``backburner worker`` drains them and is SIGKILLed
   ``--kills`` (20) times at evenly spaced points of the drain, restarted at once each time.
2. **flaky**: ``--flaky-n`` (2,000) generations against an upstream failing 30 % of requests
   (500, 502, connection reset, no answer within the backend's 1 s timeout); max_attempts 3.
3. **webhook**: ``--hook-n`` (1,000) generations, each with a webhook, while the receiver is
   down for ``--hook-down`` (120) seconds, then up; the retry schedule is the default one
   (5 s, 5 min, ...) unless ``--hook-schedule`` gives another.
4. **pgstop**: a private PostgreSQL cluster is stopped (``pg_ctl stop -m immediate``) once a
   third of ``--pg-n`` (5,000) generations are done and started ``--pg-down`` (10) s later.
5. **poison**: ``--poison-n`` (2,000) generations, every 10th asking for a poison answer, with
   a batch file holding poison lines and a batch whose answers are partly poison.

Leases are 2 s, the upstream is ``tests/support/upstream.py`` on loopback. One table: a row per
scenario and store, with the scenario's figures and any broken promise. Exit status 1 if any.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.faults import (  # noqa: E402
    flaky,
    kill,
    poison,
    postgres,
    private_pg,
    webhooks,
)
from tests.support.faults.common import Report, database  # noqa: E402

SCENARIOS = ("kill", "flaky", "webhook", "pgstop", "poison")
Run = Callable[[Path, str, str], Awaitable[Report]]


def runs(args: argparse.Namespace) -> dict[str, Run]:
    """Each scenario with its full-size arguments, as f(work, database_url, store)."""
    schedule = json.loads(args.hook_schedule) if args.hook_schedule else None
    hook_within = 600.0 if schedule is None else 300.0  # the default waits 5 min after 5 s
    return {
        "kill": lambda w, url, store: kill.kill_worker_drain(
            w, url, store, n=args.kill_n, kills=args.kills
        ),
        "flaky": lambda w, url, store: flaky.flaky_upstream(w, url, store, n=args.flaky_n),
        "webhook": lambda w, url, store: webhooks.webhook_outage(
            w,
            url,
            store,
            n=args.hook_n,
            down_seconds=args.hook_down,
            schedule=schedule,
            within=hook_within,
        ),
        "poison": lambda w, url, store: poison.poison_mix(w, url, store, n=args.poison_n),
    }


async def run_pgstop(work: Path, args: argparse.Namespace) -> Report:
    with private_pg.private_postgres() as cluster:
        return await postgres.postgres_restart(
            work,
            cluster,
            n=args.pg_n,
            down_seconds=args.pg_down,
            max_lost_leases=args.pg_max_lost_leases,
        )


def render(reports: list[Report], args: argparse.Namespace) -> Table:
    table = Table(
        title=(
            f"backburner fault suite, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC,"
            f" {os.cpu_count()} CPUs, Python {platform.python_version()}"
        ),
        show_lines=True,
    )
    table.add_column("scenario")
    table.add_column("store")
    table.add_column("figures")
    table.add_column("broken promises")
    table.add_column("s", justify="right")
    for r in reports:
        figures = "\n".join(f"{k}: {v}" for k, v in r.figures.items())
        problems = "\n".join(r.problems) if r.problems else "none"
        table.add_row(r.scenario, r.store, figures, problems, f"{r.seconds:.0f}")
    return table


async def main(args: argparse.Namespace) -> int:
    console = Console(width=160)
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(unknown)}")
    stores = ([] if args.no_sqlite else ["sqlite"]) + (["postgres"] if args.postgres else [])
    load = os.getloadavg()[0]
    if load > 0.5:
        console.log(f"[yellow]warning: load average {load:.2f}; timings will be noisy")
    table = runs(args)
    reports: list[Report] = []
    async with asyncio.timeout(args.timeout):
        for name in only:
            if name == "pgstop":
                why = private_pg.unavailable()
                if why:
                    console.log(f"[yellow]pgstop skipped: {why}")
                    continue
                with tempfile.TemporaryDirectory(prefix="bb-faults-") as tmp:
                    console.log("pgstop ...")
                    reports.append(await run_pgstop(Path(tmp), args))
                    console.log(reports[-1].summary())
                continue
            for store in stores:
                with tempfile.TemporaryDirectory(prefix="bb-faults-") as tmp:
                    work = Path(tmp)
                    console.log(f"{name} on {store} ...")
                    started = time.monotonic()
                    try:
                        async with database(work, store, args.postgres) as url:
                            reports.append(await table[name](work, url, store))
                    except AssertionError as exc:  # a bounded wait ran out: that is a finding
                        failed = Report(name, store, seconds=time.monotonic() - started)
                        failed.problems.append(str(exc)[:2000])
                        reports.append(failed)
                    console.log(reports[-1].summary())
                    for problem in reports[-1].problems:
                        console.log(f"[red]{problem}")
    console.print(render(reports, args))
    return 1 if any(r.problems for r in reports) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--postgres", metavar="URL", help="also run on PostgreSQL (fresh databases)")
    p.add_argument("--no-sqlite", action="store_true", help="skip the SQLite runs")
    p.add_argument("--only", metavar="LIST", help=f"some of {','.join(SCENARIOS)}")
    p.add_argument("--kill-n", type=int, default=5000)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--flaky-n", type=int, default=2000)
    p.add_argument("--hook-n", type=int, default=1000)
    p.add_argument("--hook-down", type=float, default=120.0, help="seconds the receiver is down")
    p.add_argument(
        "--hook-schedule", metavar="JSON", help="webhook_retry_schedule_seconds (default: default)"
    )
    p.add_argument("--pg-n", type=int, default=5000)
    p.add_argument("--pg-down", type=float, default=10.0, help="seconds PostgreSQL is down")
    p.add_argument("--pg-max-lost-leases", type=int, default=10, help="the max_lost_leases setting")
    p.add_argument("--poison-n", type=int, default=2000)
    p.add_argument("--timeout", type=float, default=3600.0, help="hard limit for the whole run, s")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
