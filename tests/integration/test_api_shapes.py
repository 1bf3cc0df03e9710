"""Bodies read by the models that the OpenAPI document declares, and answers shaped by the models
(SPEC sections 1, 2, 6): non-finite numbers, one wording of validation problems, absent keys."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import FAKE_MODEL, AppHarness

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def idle(harness_factory: Any) -> AppHarness:
    h: AppHarness = await harness_factory(run_worker=False)
    return h


def error(r: Any, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "-Infinity"])
@pytest.mark.parametrize(
    "route", ["/v1/slow/chat/completions", "/v1/chat/completions", "/v1/webhooks", "/v1/batches"]
)
async def test_non_finite_numbers_are_refused(idle: AppHarness, route: str, number: str) -> None:
    raw = f'{{"model": "{FAKE_MODEL}", "messages": [], "x": {number}}}'
    r = await idle.client.post(
        route, content=raw.encode(), headers={"content-type": "application/json"}
    )
    err = error(r)
    assert err["param"] == "body" and "JSON" in err["message"]
    assert await idle.state.store.generations.count_by_state() == {}


async def test_unknown_keys_get_the_allowed_fields_everywhere(idle: AppHarness) -> None:
    batch = {
        "input_file_id": "f",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "webhok_url": "https://x.example",
    }
    err = error(await idle.client.post("/v1/batches", json=batch))
    assert err["param"] == "webhok_url"
    assert "did you mean webhook_url?" in err["message"]
    err = error(await idle.client.post("/v1/webhooks", json={"url": "http://x", "colour": 1}))
    assert err["param"] == "colour"
    assert "allowed fields: url, name, events, enabled" in err["message"]


async def test_every_problem_of_a_body_at_once(idle: AppHarness) -> None:
    body = {"input_file_id": "", "endpoint": "/v1/responses", "completion_window": "48h"}
    err = error(await idle.client.post("/v1/batches", json=body))
    for field in ("input_file_id", "endpoint", "completion_window"):
        assert f"{field}: " in err["message"], err
    assert err["param"] == "input_file_id" and err["code"] == "invalid_request"


async def test_query_problems_are_the_same_envelope(idle: AppHarness) -> None:
    err = error(await idle.client.get("/v1/batches", params={"limit": "many"}))
    assert err["param"] == "limit" and err["message"] == "limit: must be an integer"
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"


async def test_webhook_patch_refuses_null_and_keeps_absent_keys(idle: AppHarness) -> None:
    hook = (await idle.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h"})).json()
    path = f"/v1/webhooks/{hook['id']}"
    err = error(await idle.client.patch(path, json={"url": None, "enabled": None}))
    assert "url: must not be null" in err["message"]
    assert "enabled: must not be null" in err["message"]
    r = await idle.client.patch(path, json={"name": None})
    assert r.status_code == 200, r.text
    assert r.json()["url"] == hook["url"] and r.json()["name"] is None
    assert "secret" not in r.json()


async def test_answers_keep_absent_keys_absent(idle: AppHarness) -> None:
    hook = (await idle.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h"})).json()
    sent = (await idle.client.post(f"/v1/webhooks/{hook['id']}/test")).json()
    assert set(sent) == {"id", "object", "event", "webhookId", "state"}
    again = await idle.client.post(f"/v1/webhooks/deliveries/{sent['id']}/redeliver")
    assert again.status_code == 200, again.text
    assert set(again.json()) == {"id", "object", "state"}  # no null event, webhookId
    gid = (await idle.client.post("/v1/slow/chat/completions", json=CHAT)).json()["id"]
    g = (await idle.client.get(f"/v1/generation/{gid}")).json()
    assert not {"response", "dispatchedAt", "finishedAt", "groupId", "batchId"} & set(g)
    assert None not in g.values()
    cancelled = (await idle.client.post(f"/v1/generation/{gid}/cancel")).json()
    assert "response" not in cancelled and "dispatchedAt" not in cancelled
