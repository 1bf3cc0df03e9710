"""Validate at the door: what could not be stored, read back or announced is a 400 naming the
field, and nothing is stored."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAKE_MODEL, AppHarness

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"content-type": "application/json"}


async def stored(h: AppHarness) -> int:
    counts = await h.state.store.generations.count_by_state()
    return sum(counts.values())


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (json.dumps(CHAT)[:-1] + ', "user": "\\ud800"}', "user"),
        (json.dumps(CHAT)[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}", "body"),
        (json.dumps({**CHAT, "metadata": {"custom_id": 7}}), "metadata.custom_id"),
        (json.dumps({**CHAT, "metadata": {"custom_id": "a\u0000"}}), "metadata.custom_id"),
        (json.dumps({**CHAT, "metadata": {"webhook_id": "nope"}}), "metadata.webhook_id"),
    ],
)
async def test_slow_submit_refuses_what_it_could_not_keep(
    harness: AppHarness, raw: str, param: str
) -> None:
    r = await harness.client.post("/v1/slow/chat/completions", content=raw, headers=HEADERS)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert await stored(harness) == 0


async def test_group_names_the_request_with_an_unknown_webhook(harness: AppHarness) -> None:
    body = {"requests": [CHAT, {**CHAT, "metadata": {"webhook_id": "nope"}}]}
    r = await harness.client.post("/v1/slow/group/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "requests[1].metadata.webhook_id"
    assert await stored(harness) == 0


async def test_realtime_with_an_unknown_webhook_is_refused(harness: AppHarness) -> None:
    r = await harness.client.post(
        "/v1/chat/completions", json={**CHAT, "metadata": {"webhook_id": "nope"}}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "metadata.webhook_id"


async def test_a_known_webhook_is_accepted(harness: AppHarness) -> None:
    hook = await harness.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h"})
    assert hook.status_code in (200, 201), hook.text
    body = {**CHAT, "metadata": {"webhook_id": hook.json()["id"], "custom_id": "c1"}}
    r = await harness.client.post("/v1/slow/chat/completions", json=body)
    assert r.status_code == 200, r.text
    done = await harness.wait_terminal(r.json()["id"])
    assert done["request"]["metadata"] == body["metadata"]
