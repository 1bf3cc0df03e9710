"""``backburner tenants ...`` (on the database directly) through typer's CliRunner, against a
fresh database named by a ``--config`` file, on SQLite and PostgreSQL: create, show, set, list,
disable and enable (keys refused, queued work held and released), recount, and bad input refused
with one line each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from backburner.cli import app
from backburner.core.states import Kind
from backburner.schemas.generation import NewGeneration
from backburner.store import Store
from backburner.store.queue import HELD
from backburner.store.tables import generations, metadata, tenants

R = TypeVar("R")


def on_store(url: str, fn: Callable[[Store], Awaitable[R]]) -> R:
    """``fn`` on a Store of its own (the CLI runs its own event loop; so does this)."""

    async def run() -> R:
        store = Store(url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


async def _truncate(store: Store) -> None:
    if store.sqlite:
        return  # a fresh copy of the migrated template already
    async with store.engine.begin() as conn:
        names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
        await conn.execute(sa.text(f"TRUNCATE {names}"))


class Bb:
    """``backburner ... --config CONFIG`` in-process."""

    def __init__(self, config: Path, url: str) -> None:
        self.config = config
        self.url = url
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(
            app, [*args, "--config", str(self.config)], env={"COLUMNS": "200"}
        )

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.exit_code == 0, (done.stdout, done.stderr, done.exception)
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


@pytest.fixture
def bb(db_url: str, tmp_path: Path) -> Bb:
    on_store(db_url, _truncate)
    config = tmp_path / "backburner.toml"
    config.write_text(
        f'database_url = "{db_url}"\n\n[limits]\nrequests_per_minute = 60\ntokens_per_day = 5000\n'
    )
    return Bb(config, db_url)


def test_create_show_set_and_list(bb: Bb) -> None:
    made = bb.json(
        "tenants", "create", "acme", "--weight", "2",
        "--limit", "tokens_per_day=100", "--limit", "requests_per_minute=none",
    )  # fmt: skip
    assert made["id"] == "acme" and made["weight"] == 2.0 and made["disabled"] is False
    assert made["limits"] == {"tokens_per_day": 100, "requests_per_minute": None}
    # its own limits over the [limits] table: none means no limit, whatever the default
    assert made["effective_limits"]["tokens_per_day"] == 100
    assert made["effective_limits"]["requests_per_minute"] is None
    assert bb.json("tenants", "show", "acme") == made

    changed = bb.json(
        "tenants", "set", "acme", "--weight", "0.5",
        "--limit", "tokens_per_day=default", "--limit", "max_queued_generations=3",
    )  # fmt: skip
    assert changed["weight"] == 0.5
    assert changed["limits"] == {"requests_per_minute": None, "max_queued_generations": 3}
    eff = changed["effective_limits"]
    assert eff["tokens_per_day"] == 5000 and eff["max_queued_generations"] == 3
    assert bb.json("tenants", "set", "acme", "--limit", "tokens_per_day=0")["limits"] == {
        "requests_per_minute": None,
        "max_queued_generations": 3,
        "tokens_per_day": 0,
    }

    table = bb.ok("tenants", "show", "acme")
    assert "tenant acme: weight 0.5, enabled, 0 open generations" in table
    cells = {
        row[0]: row[1:]
        for line in table.splitlines()
        if len(row := [c.strip() for c in line.split("│")[1:-1]]) == 3
    }
    assert cells["requests_per_minute"] == ["none", "none"]
    assert cells["tokens_per_day"] == ["0", "0"]
    assert cells["max_queued_generations"] == ["3", "3"]
    assert cells["realtime_requests_per_minute"] == ["(default)", "none"]

    bb.ok("tenants", "create", "beta", "--disabled")
    listed = bb.json("tenants", "list")
    assert [(t["id"], t["disabled"]) for t in listed] == [("acme", False), ("beta", True)]
    table = bb.ok("tenants", "list")
    assert "max_queued_generations=3" in table and "tokens_per_day=0" in table
    beta = next(line for line in table.splitlines() if "beta" in line)
    assert "disabled since" in beta and " 1 " in beta


def test_disable_refuses_keys_and_holds_queued_work_until_enabled(bb: Bb) -> None:
    bb.ok("tenants", "create", "acme")

    async def setup(store: Store) -> tuple[str, str]:
        _, key = await store.keys.create("acme", "k")
        item = NewGeneration(Kind.CHAT, "m", {"model": "m", "messages": []})
        rec = await store.generations.submit("acme", item, expiry_seconds=3600)
        return key, rec.id

    key, gid = on_store(bb.url, setup)

    async def seen(store: Store) -> tuple[bool, int]:
        found = await store.keys.lookup(key)
        assert found is not None
        async with store.engine.connect() as conn:
            q = sa.select(generations.c.fair_key).where(generations.c.id == gid)
            fair_key = (await conn.execute(q)).scalar_one()
        return found[2], int(fair_key)

    disabled, key_before = on_store(bb.url, seen)
    assert not disabled and key_before < HELD

    done = bb("tenants", "disable", "acme")
    assert done.exit_code == 0 and done.stdout.startswith("disabled acme")
    assert bb.json("tenants", "show", "acme")["disabled"] is True
    disabled, held = on_store(bb.url, seen)
    assert disabled and held >= HELD

    assert bb.ok("tenants", "enable", "acme").strip() == "enabled acme"
    assert bb.json("tenants", "show", "acme")["disabled"] is False
    disabled, released = on_store(bb.url, seen)
    assert not disabled and released < HELD


def test_recount_repairs_open_generations(bb: Bb) -> None:
    bb.ok("tenants", "create", "acme")
    bb.ok("tenants", "create", "beta")

    async def drift(store: Store) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(tenants.update().values(accepted_generations=7))

    on_store(bb.url, drift)
    assert bb.json("tenants", "show", "acme")["open_generations"] == 7
    out = bb.ok("tenants", "recount", "acme")
    assert out.strip() == "recounted open generations of tenant acme: 1 fixed"
    assert bb.json("tenants", "show", "acme")["open_generations"] == 0
    assert bb.json("tenants", "show", "beta")["open_generations"] == 7
    assert bb.ok("tenants", "recount").strip().endswith("every tenant: 1 fixed")
    assert bb.ok("tenants", "recount").strip().endswith("every tenant: 0 fixed")


BAD: list[tuple[list[str], str]] = [
    (["create", "x", "--weight", "500"], "weight: must be between 0.01 and 100.0"),
    (["create", "x", "--weight", "0"], "weight: must be between 0.01 and 100.0"),
    (["create", "x", "--weight", "heavy"], "--weight: expected a number from 0.01 to 100"),
    (["create", "x", "--limit", "tokens=5"], "unknown limit 'tokens'; known: max_queued"),
    (["create", "x", "--limit", "tokens_per_day"], "expected NAME=VALUE"),
    (["create", "x", "--limit", "tokens_per_day=lots"], "expected a whole number or 'none'"),
    (["create", "x", "--limit", "tokens_per_day=-1"], "tokens_per_day: Input should be greater"),
    (["create", "x", "--limit", "tokens_per_day=default"], "a new tenant takes the default"),
    (["create", "x", "--limit", "tokens_per_day=1", "--limit", "tokens_per_day=2"], "twice"),
    (["create", "bad name"], "id: String should match pattern"),
    (["create", "acme"], "tenant 'acme' exists already; change it with: backburner tenants set"),
    (["set", "acme"], "nothing to change: give --weight or --limit"),
    (["set", "acme", "--weight", "101"], "weight: must be between 0.01 and 100.0"),
    (["set", "acme", "--limit", "requests_per_minute=1.5"], "'none' or 'default', got '1.5'"),
    (["set", "nobody", "--weight", "2"], "No tenant 'nobody'. Create it with"),
    (["show", "nobody"], "No tenant 'nobody'."),
    (["disable", "nobody"], "No tenant 'nobody'."),
    (["enable", "nobody"], "No tenant 'nobody'."),
    (["recount", "nobody"], "No tenant 'nobody'."),
]


def test_bad_input_prints_one_line_and_exits_1(bb: Bb) -> None:
    bb.ok("tenants", "create", "acme", "--weight", "3")
    for args, words in BAD:
        done = bb("tenants", *args)
        assert done.exit_code == 1, (args, done.stdout, done.stderr, done.exception)
        assert done.stdout == "", args
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, done.stderr)
        assert words in lines[0], (args, lines[0])
    # nothing changed: no tenant was created, acme kept its weight
    assert [t["id"] for t in bb.json("tenants", "list")] == ["acme"]
    assert bb.json("tenants", "show", "acme")["weight"] == 3.0


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    done = CliRunner().invoke(
        app, ["tenants", "list", "--config", str(tmp_path / "nope.toml")], env={"COLUMNS": "200"}
    )
    assert done.exit_code == 1
    assert done.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.toml'}"
