"""``backburner usage`` and ``Client.usage``: the query each sends (a mock transport), and the
command over real HTTP (uvicorn on loopback) to the real app, whose fake engine reported the
tokens of work that ran, on SQLite and PostgreSQL: the JSON and the table match the store's
report; bad input and a key asking for another tenant are one line each."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from rich.console import Console
from typer.testing import CliRunner, Result

from backburner.cli import app
from backburner.cli_client import usage_table
from backburner.client import AsyncClient, Backoff, Client
from backburner.schemas.tenants import UsageReport, UsageRow
from backburner.store import Store
from tests.conftest import FAKE_MODEL
from tests.support.receiver import free_port

FAST = Backoff(initial=0.01, factor=1.5, maximum=0.05)
EMPTY = {
    "object": "list",
    "start": "2026-12-01",
    "end": "2026-12-07",
    "group_by": [],
    "data": [],
    "total": {"object": "usage", "requests": 0},
}


def test_usage_sends_the_query_and_parses_the_report() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json=EMPTY)

    with Client("http://bb.test", "bb-k", transport=httpx.MockTransport(handler)) as bb:
        report = bb.usage(
            start=date(2026, 12, 1), end="2026-12-07", group_by=["tenant", "lane"], lane="batch"
        )
        assert isinstance(report, UsageReport) and report.start == date(2026, 12, 1)
        bb.usage()
        bb.usage(group_by=[])
    assert [u.path for u in seen] == ["/v1/usage"] * 3
    assert dict(seen[0].params) == {
        "start": "2026-12-01",
        "end": "2026-12-07",
        "group_by": "tenant,lane",
        "lane": "batch",
    }
    assert dict(seen[1].params) == {}  # the server's defaults
    assert dict(seen[2].params) == {"group_by": ""}  # one row of totals


async def test_the_async_client_sends_the_same_query() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json=EMPTY)

    async with AsyncClient("http://bb.test", transport=httpx.MockTransport(handler)) as bb:
        report = await bb.usage(tenant="acme", model="m", group_by="day")
    assert report.total.requests == 0
    assert dict(seen[0].params) == {"tenant": "acme", "model": "m", "group_by": "day"}


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table (header, rules and title left out)."""
    return [
        [c.strip() for c in line.split("│")[1:-1]]
        for line in text.splitlines()
        if line.startswith("│")
    ]


def render(report: UsageReport) -> str:
    out = io.StringIO()
    Console(width=200, file=out).print(usage_table(report))
    return out.getvalue()


def test_the_table_has_a_row_per_key_and_a_total() -> None:
    day = date(2026, 12, 3)
    rows = [
        UsageRow(day=day, lane="batch", requests=1000, prompt_tokens=12345, total_tokens=12345),
        UsageRow(day=day, lane="slow", requests=2, failed=1, completion_tokens=7, total_tokens=7),
    ]
    total = UsageRow(requests=1002, failed=1, prompt_tokens=12345, completion_tokens=7)
    total.total_tokens = 12352
    report = UsageReport(start=day, end=day, group_by=["day", "lane"], data=rows, total=total)
    assert table_rows(render(report)) == [
        ["2026-12-03", "batch", "1,000", "0", "12,345", "0", "12,345"],
        ["2026-12-03", "slow", "2", "1", "0", "7", "7"],
        ["total", "", "1,002", "1", "12,345", "7", "12,352"],
    ]
    bare = UsageReport(start=day, end=day, group_by=[], data=[], total=UsageRow())
    assert table_rows(render(bare)) == [["total", "0", "0", "0", "0", "0"]]


# ---------------------------------------------------------------- over HTTP, the real app


@dataclass
class Served:
    url: str
    acme: str  # acme's key
    beta: str
    admin: str  # an admin key (tenant ops)
    store: Store


@pytest.fixture
async def served(store: Store, harness_factory: Any, tmp_path: Any) -> AsyncIterator[Served]:
    """The app (fake engine, worker in-process) behind uvicorn on loopback, with work of two
    tenants finished: acme 3 slow requests and a group of 2, beta 1 slow request."""
    keys = {t: (await store.keys.create(t, "k"))[1] for t in ("acme", "beta")}
    keys["ops"] = (await store.keys.create("ops", "admin", admin=True))[1]
    h = await harness_factory(db=store.url, files_dir=str(tmp_path / "files"))

    def client(key: str) -> AsyncClient:
        return AsyncClient("http://testserver", key, transport=httpx.ASGITransport(app=h.app))

    def chat(text: str) -> dict[str, Any]:
        return {"model": FAKE_MODEL, "messages": [{"role": "user", "content": text}]}

    async with client(keys["acme"]) as acme, client(keys["beta"]) as beta:
        ids = [(acme, (await acme.submit(chat(f"a{i}"))).id) for i in range(3)]
        ids.append((beta, (await beta.submit(chat("b"))).id))
        group = await acme.submit_group([chat("g1"), chat("g2")])
        for bb, gid in ids:
            await bb.wait(gid, "generation", max_wait=15, backoff=FAST)
        await acme.wait(group.groupId, "group", max_wait=15, backoff=FAST)

    port = free_port()
    config = uvicorn.Config(h.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{port}", keys["acme"], keys["beta"], keys["ops"], store)
    finally:
        server.should_exit = True
        await task


async def cli(s: Served, key: str, *args: str) -> Result:
    """``backburner usage ...`` in a thread (its client blocks; the server runs on this loop)."""
    env = {"BACKBURNER_BASE_URL": s.url, "BACKBURNER_API_KEY": key, "COLUMNS": "200"}
    runner = CliRunner()
    return await asyncio.to_thread(lambda: runner.invoke(app, ["usage", *args], env=env))


def ok(done: Result) -> str:
    assert done.exit_code == 0, (done.stdout, done.stderr, done.exception)
    return done.stdout


def one_line_error(done: Result, *words: str) -> str:
    assert done.exit_code == 1 and done.stdout == "", (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.timeout(30)
async def test_usage_over_http_reports_the_work_that_ran(served: Served) -> None:
    s = served
    today = datetime.now(UTC).date()
    week = (today - timedelta(days=6), today)

    # a tenant's key: its own usage, by day, model and lane (the default), as the store has it
    got = json.loads(ok(await cli(s, s.acme, "--json")))
    want = await s.store.usage.report("acme", *week, ["day", "model", "lane"])
    assert got["data"] == [r.model_dump(mode="json") for r in want]
    assert got["group_by"] == ["day", "model", "lane"] and got["end"] == today.isoformat()
    by_lane: dict[str, int] = {}
    for row in got["data"]:
        assert row["model"] == FAKE_MODEL
        by_lane[row["lane"]] = by_lane.get(row["lane"], 0) + row["requests"]
    assert by_lane == {"slow": 3, "group": 2}
    # the fake engine reports 3 prompt and 2 completion tokens per chat
    total = got["total"]
    assert (total["tenant"], total["requests"], total["failed"]) == ("acme", 5, 0)
    assert (total["prompt_tokens"], total["completion_tokens"], total["total_tokens"]) == (
        15,
        10,
        25,
    )

    # an admin key: every tenant, as a table with a total row
    yesterday = (today - timedelta(days=1)).isoformat()
    text = ok(await cli(s, s.admin, "--group-by", "tenant,lane", "--start", yesterday))
    assert f"usage {yesterday} to {today}" in text
    assert table_rows(text) == [
        ["acme", "group", "2", "0", "6", "4", "10"],
        ["acme", "slow", "3", "0", "9", "6", "15"],
        ["beta", "slow", "1", "0", "3", "2", "5"],
        ["total", "", "6", "0", "18", "12", "30"],
    ]
    one = json.loads(ok(await cli(s, s.admin, "--tenant", "beta", "--group-by", "", "--json")))
    assert [r["requests"] for r in one["data"]] == [1] and one["total"]["tenant"] == "beta"
    lane = json.loads(ok(await cli(s, s.admin, "--lane", "group", "--json")))
    assert lane["total"]["requests"] == 2
    assert json.loads(ok(await cli(s, s.admin, "--model", "other", "--json")))["data"] == []

    # refusals: one line each, exit 1
    one_line_error(await cli(s, s.acme, "--tenant", "beta"), "No tenant 'beta'", "HTTP 404")
    one_line_error(await cli(s, s.acme, "--lane", "fast"), "unknown lane 'fast'", "HTTP 400")
    one_line_error(await cli(s, s.acme, "--start", "2026-13-01"), "start: expected a date")
    one_line_error(await cli(s, s.acme, "--group-by", "week"), "unknown key 'week'")
    one_line_error(await cli(s, "bb-wrong"), "HTTP 401", "--api-key")
