"""A first end-to-end check through the in-process app and the fake engine."""

from __future__ import annotations

from typing import Any

from tests.conftest import FAKE_MODEL


async def test_slow_chat_round_trip(harness: Any) -> None:
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"custom_id": "c-1"},
        "x_extra": 1,
    }
    r = await harness.client.post("/v1/slow/chat/completions", json=body)
    assert r.status_code == 200, r.text
    gid = r.json()["id"]
    assert r.json() == {"id": gid, "object": "generation", "state": "Queued"}
    g = await harness.wait_terminal(gid)
    assert g["state"] == "Success"
    assert g["request"] == body
    assert g["response"]["choices"][0]["message"]["content"] == "echo: hi"
