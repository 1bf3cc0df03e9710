"""A webhook event survives a SIGKILL between a group's completion and its delivery."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.support import procs
from tests.support.receiver import running_receiver

pytestmark = pytest.mark.acceptance


async def _until(fn: Any, timeout: float, what: str) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            got = await fn()
            if got:
                return got
            await asyncio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover


@pytest.mark.timeout(90)  # two server starts on a busy CI machine
async def test_group_event_delivered_after_restart(tmp_path: Path) -> None:
    upstream = await asyncio.to_thread(procs.start_upstream, tmp_path)
    hook_port = procs.free_port()  # nothing listens here until the server is dead
    config = procs.write_config(
        tmp_path / "bb.toml",
        f"sqlite:///{tmp_path}/bb.db",
        upstream_url=upstream.base_url,
        lease_seconds=2,
        maintenance_interval_seconds=0.5,
        webhook_retry_schedule_seconds=[0.2] * 30,  # compressed: retries every 0.2 s
        # the kill may land mid-attempt: the restarted dispatcher takes the event over soon
        webhook_lease_seconds=2,
        webhook_timeout_seconds=0.5,
        webhook_poll_interval_seconds=0.05,
    )
    server = await asyncio.to_thread(procs.start_serve, config, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
            url = f"http://127.0.0.1:{hook_port}/hook"
            hook = (await c.post("/v1/webhooks", json={"url": url})).json()
            reqs = [
                {
                    "model": procs.UPSTREAM_MODEL,
                    "messages": [{"role": "user", "content": f"q{i}"}],
                    "metadata": {"custom_id": f"c{i}"},
                }
                for i in range(5)
            ]
            r = await c.post(
                "/v1/slow/group/chat/completions", json={"requests": reqs, "webhook_id": hook["id"]}
            )
            group_id = r.json()["groupId"]

            async def completed() -> bool:
                g = (await c.get(f"/v1/slow/group/{group_id}")).json()
                return bool(g["status"] == "completed")

            await _until(completed, 30, "group never completed")
        await asyncio.to_thread(procs.kill, server)  # the event is queued, not delivered

        async with running_receiver(port=hook_port) as rec:
            server = await asyncio.to_thread(procs.start_serve, config, tmp_path)
            (post,) = await rec.wait_posts(1, timeout=30)
            payload = Webhook(hook["secret"]).verify(post.body, post.headers)
            assert payload["event"] == "slow-group.completed"
            assert payload["group_id"] == group_id
            assert [g["customId"] for g in payload["data"]["generations"]] == [
                f"c{i}" for i in range(5)
            ]
            await asyncio.sleep(0.5)
            assert len(rec.posts()) == 1
    finally:
        await asyncio.to_thread(procs.kill, server)
        await asyncio.to_thread(procs.kill, upstream)
