"""Acceptance: the ``backburner`` client commands as subprocesses against a real ``backburner
serve`` (with an API key) and the upstream stub: a 1,000-line batch and a 40-request group
submitted, watched and downloaded, and bad input refused with one line each."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import procs

pytestmark = pytest.mark.acceptance

MODEL = procs.UPSTREAM_MODEL


@dataclass
class Server:
    base_url: str
    key: str
    work: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    started: list[procs.Proc] = []
    try:
        up = procs.start_upstream(tmp_path, latency_ms=0)
        started.append(up)
        cfg = procs.write_config(
            tmp_path / "backburner.toml",
            f"sqlite:///{tmp_path}/bb.db",
            upstream_url=up.base_url,
            poll_interval_seconds=0.05,
            files_dir=str(tmp_path / "files"),
        )
        out = procs.run_cli("keys", "create", "--tenant", "acme", "--config", str(cfg))
        key = out.strip().splitlines()[-1].strip()
        srv = procs.start_serve(cfg, tmp_path)
        started.append(srv)
        yield Server(srv.base_url, key, tmp_path)
    finally:
        for p in reversed(started):
            procs.kill(p)


def cli(
    *args: str, base_url: str, key: str | None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKBURNER_")}
    env["BACKBURNER_BASE_URL"] = base_url
    if key is not None:
        env["BACKBURNER_API_KEY"] = key
    env["COLUMNS"] = "200"
    return subprocess.run(
        procs.backburner_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def chat(i: int) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"request {i}"}]}


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode != 0, done
    assert done.stdout == "", done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.timeout(120)  # two process starts, ~1,000 generations, ~10 CLI runs on 2 cores
def test_batch_and_group_submitted_watched_and_downloaded(server: Server) -> None:
    at: dict[str, Any] = {"base_url": server.base_url, "key": server.key}

    # a 1,000-line batch of OpenAI batch lines, submitted, watched and downloaded in one go
    batch_in = server.work / "batch.jsonl"
    ids = [f"b-{i:04d}" for i in range(1000)]
    with batch_in.open("w") as f:
        for i, cid in enumerate(ids):
            line = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": chat(i)}) + "\n")
    batch_out = server.work / "batch-results.jsonl"
    done = cli("submit", str(batch_in), "--wait", "-o", str(batch_out), **at, timeout=90)
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip().splitlines()[-1]
    assert len(batch_id) == 21
    got = read_jsonl(batch_out)
    assert [r["custom_id"] for r in got] == ids
    assert all(r["error"] is None for r in got)
    first = got[0]["response"]
    assert isinstance(first, dict)
    assert first["body"]["choices"][0]["message"]["content"] == "echo: request 0"

    # a 40-request group of plain bodies; two carry no custom id and get their line number
    group_in = server.work / "group.jsonl"
    want = []
    with group_in.open("w") as f:
        for i in range(40):
            body = chat(1000 + i)
            cid = f"line-{i + 1}" if i in (3, 7) else f"g-{i}"
            if i not in (3, 7):
                body["metadata"] = {"custom_id": cid}
            want.append(cid)
            f.write(json.dumps(body) + "\n")
    done = cli("submit", str(group_in), **at)
    assert done.returncode == 0, done.stderr
    group_id = done.stdout.strip().splitlines()[-1]

    done = cli("watch", group_id, "--json", "--interval", "0.5", **at)
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["kind"] == "group" and verdict["id"] == group_id
    assert verdict["ok"] is True and verdict["total"] == verdict["succeeded"] == 40

    group_out = server.work / "group-results.jsonl"
    done = cli("results", group_id, "-o", str(group_out), **at)
    assert done.returncode == 0, done.stderr
    got = read_jsonl(group_out)
    assert [r["custom_id"] for r in got] == want
    assert all(r["error"] is None for r in got)

    # the batch by its id alone: watch knows it is a batch; ls lists it
    done = cli("watch", batch_id, "--json", **at)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kind"] == "batch"
    done = cli("ls", "--json", **at)
    assert done.returncode == 0, done.stderr
    assert batch_id in [b["id"] for b in json.loads(done.stdout)]
    done = cli("cancel", batch_id, **at)  # finished: the server refuses, in one line
    assert_one_line_error(done)


@pytest.mark.timeout(60)
def test_bad_input_prints_one_line_and_fails(server: Server) -> None:
    at: dict[str, Any] = {"base_url": server.base_url, "key": server.key}
    bad = server.work / "bad.jsonl"
    bad.write_text(json.dumps(chat(0)) + "\n{not json\n" + json.dumps(chat(2)) + "\n")
    assert_one_line_error(cli("submit", str(bad), **at), "line 2", "not valid JSON")

    missing = server.work / "nope.jsonl"
    assert_one_line_error(cli("submit", str(missing), **at), "nope.jsonl", "no such file")

    good = server.work / "good.jsonl"
    good.write_text(json.dumps(chat(0)) + "\n")
    nowhere = f"http://127.0.0.1:{procs.free_port()}"
    assert_one_line_error(
        cli("submit", str(good), base_url=nowhere, key=server.key), "cannot reach", nowhere
    )
    assert_one_line_error(cli("ls", base_url=nowhere, key=server.key), "cannot reach")

    done = cli("submit", str(good), base_url=server.base_url, key="bb-not-a-key")
    assert_one_line_error(done, "401")
    assert_one_line_error(cli("watch", "x" * 21, **at), "404")
