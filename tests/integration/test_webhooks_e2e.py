"""Webhooks end to end, in-process app, real HTTP receiver on loopback (SPEC section 6)."""

from __future__ import annotations

import asyncio
from typing import Any

from standardwebhooks import Webhook

from tests.conftest import FAKE_MODEL
from tests.support.receiver import Received, running_receiver

FAST = {"webhook_retry_schedule_seconds": [0.05, 0.1, 0.2], "webhook_poll_interval_seconds": 0.02}


def chat(text: str, custom_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": text}],
        "metadata": {"custom_id": custom_id, **extra},
    }


def verify(secret: str, r: Received) -> Any:
    return Webhook(secret).verify(r.body, r.headers)


async def wait_log(h: Any, hook_id: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The delivery log once it holds ``n`` attempts and none is still pending."""
    async with asyncio.timeout(timeout):
        while True:
            log: list[dict[str, Any]] = (
                await h.client.get(f"/v1/webhooks/{hook_id}/deliveries")
            ).json()["data"]
            if len(log) >= n and all(a["deliveryState"] != "pending" for a in log):
                return log
            await asyncio.sleep(0.02)


async def create_hook(h: Any, url: str, **body: Any) -> dict[str, Any]:
    r = await h.client.post("/v1/webhooks", json={"url": url, **body})
    assert r.status_code == 200, r.text
    hook: dict[str, Any] = r.json()
    assert hook["secret"].startswith("whsec_")
    return hook


async def test_group_completed_delivered_signed(harness_factory: Any) -> None:
    h = await harness_factory(**FAST)
    async with running_receiver() as rec:
        hook = await create_hook(h, rec.url, name="main")
        body = {
            "requests": [chat(f"q{i}", f"req-{i:03d}") for i in range(3)],
            "webhook_id": hook["id"],
        }
        r = await h.client.post("/v1/slow/group/chat/completions", json=body)
        assert r.status_code == 200, r.text
        group_id = r.json()["groupId"]
        (post,) = await rec.wait_posts(1)
        methods = [x.method for x in rec.requests]
        assert methods.index("OPTIONS") < methods.index("POST")
        payload = verify(hook["secret"], post)
        assert payload["event"] == "slow-group.completed"
        assert payload["group_id"] == payload["groupId"] == group_id
        assert payload["webhook_id"] == payload["webhookId"] == hook["id"]
        assert payload["data"]["group_size"] == 3
        assert payload["data"]["status"] == "completed"
        assert payload["data"]["summary"] == {"success": 3, "failed": 0}
        assert [g["customId"] for g in payload["data"]["generations"]] == [
            "req-000",
            "req-001",
            "req-002",
        ]
        assert post.headers["x-inference-event"] == "slow-group.completed"
        assert post.headers["x-inference-group-id"] == group_id
        assert post.headers["x-inference-webhook-id"] == hook["id"]
        assert post.headers["content-type"] == "application/json"


async def test_generation_completed_for_single_request(harness_factory: Any) -> None:
    h = await harness_factory(**FAST)
    async with running_receiver() as rec:
        hook = await create_hook(h, rec.url)
        r = await h.client.post(
            "/v1/slow/chat/completions", json=chat("hello", "one", webhook_id=hook["id"])
        )
        gid = r.json()["id"]
        (post,) = await rec.wait_posts(1)
        payload = verify(hook["secret"], post)
        assert payload["event"] == "generation.completed"
        assert payload["generation_id"] == payload["generationId"] == gid
        assert payload["data"]["state"] == "Success"
        assert payload["data"]["response"]["choices"][0]["message"]["content"] == "echo: hello"
        assert post.headers["x-inference-generation-id"] == gid


async def test_retries_keep_the_message_id(harness_factory: Any) -> None:
    h = await harness_factory(**FAST)
    async with running_receiver(500, 500, 200) as rec:
        hook = await create_hook(h, rec.url)
        await h.client.post("/v1/slow/chat/completions", json=chat("x", "r", webhook_id=hook["id"]))
        posts = await rec.wait_posts(3)
        assert len({p.headers["webhook-id"] for p in posts}) == 1
        for p in posts:
            verify(hook["secret"], p)
        log = await wait_log(h, hook["id"], 3)
        assert sorted(a["statusCode"] for a in log) == [200, 500, 500]
        assert {a["deliveryState"] for a in log} == {"delivered"}


async def test_4xx_is_not_retried_and_410_disables(harness_factory: Any) -> None:
    h = await harness_factory(**FAST)
    async with running_receiver(400, 410) as rec:
        hook = await create_hook(h, rec.url)
        await h.client.post("/v1/webhooks/" + hook["id"] + "/test")
        await rec.wait_posts(1)
        await h.client.post("/v1/webhooks/" + hook["id"] + "/test")
        await rec.wait_posts(2)
        log = await wait_log(h, hook["id"], 2)
        assert sorted(a["statusCode"] for a in log) == [400, 410]
        assert len(rec.posts()) == 2
        got = (await h.client.get(f"/v1/webhooks/{hook['id']}")).json()
        assert got["enabled"] is False
        assert all(a["deliveryState"] == "failed" for a in log)


async def test_redeliver_and_crud(harness_factory: Any) -> None:
    h = await harness_factory(**FAST)
    async with running_receiver(400) as rec:
        hook = await create_hook(h, rec.url, events=["webhook.test"])
        listed = (await h.client.get("/v1/webhooks")).json()["data"]
        assert [w["id"] for w in listed] == [hook["id"]]
        assert "secret" not in listed[0]
        t = (await h.client.post(f"/v1/webhooks/{hook['id']}/test")).json()
        await rec.wait_posts(1)
        r = await h.client.post(f"/v1/webhooks/deliveries/{t['id']}/redeliver")
        assert r.status_code == 200, r.text
        posts = await rec.wait_posts(2)
        assert posts[0].headers["webhook-id"] == posts[1].headers["webhook-id"] == t["id"]
        r = await h.client.patch(f"/v1/webhooks/{hook['id']}", json={"name": "renamed"})
        assert r.json()["name"] == "renamed"
        r = await h.client.patch(f"/v1/webhooks/{hook['id']}", json={"bogus": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
        assert (await h.client.delete(f"/v1/webhooks/{hook['id']}")).json()["deleted"] is True
        assert (await h.client.get(f"/v1/webhooks/{hook['id']}")).status_code == 404


async def test_url_rules(harness_factory: Any) -> None:
    h = await harness_factory(webhook_deny_private=True)
    for url in (
        "ftp://127.0.0.1/x",
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
    ):
        r = await h.client.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["param"] == "url"
    r = await h.client.post("/v1/webhooks", json={"url": "http://127.0.0.1/x", "events": ["nope"]})
    assert r.status_code == 400 and "events" in r.json()["error"]["param"]


async def test_realtime_requests_with_webhook_id_are_announced(harness_factory: Any) -> None:
    h = await harness_factory(**FAST)
    async with running_receiver() as rec:
        hook = await create_hook(h, rec.url)
        body = chat("now", "rt-1", webhook_id=hook["id"])
        r = await h.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        r = await h.client.post("/v1/chat/completions", json={**body, "stream": True})
        assert r.text.rstrip().endswith("data: [DONE]")
        posts = await rec.wait_posts(2)
        payloads = [verify(hook["secret"], p) for p in posts]
        assert {p["event"] for p in payloads} == {"generation.completed"}
        texts = sorted(p["data"]["response"]["choices"][0]["message"]["content"] for p in payloads)
        assert texts == ["Hello there!", "echo: now"]
        for p in payloads:
            g = (await h.client.get(f"/v1/generation/{p['generation_id']}")).json()
            assert g["state"] == "Success" and g["request"]["metadata"]["custom_id"] == "rt-1"
