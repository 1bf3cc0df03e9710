"""Open mode, operations endpoints and content types: what keeps a loopback server private."""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from tests.conftest import FAKE_MODEL, AppHarness

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def test_open_mode_answers_only_loopback_hosts(harness_factory: Any) -> None:
    h: AppHarness = await harness_factory(allowed_hosts=[])
    r = await h.client.post(
        "/v1/slow/chat/completions", json=CHAT, headers={"host": "attacker.example"}
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "host_not_allowed"
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        r = await h.client.post("/v1/slow/chat/completions", json=CHAT, headers={"host": host})
        assert r.status_code == 200, (host, r.text)


async def test_json_routes_refuse_other_content_types(harness: AppHarness) -> None:
    import json

    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": ctype} if ctype else {}
        r = await harness.client.post(
            "/v1/slow/chat/completions", content=json.dumps(CHAT), headers=headers
        )
        assert r.status_code == 415, (ctype, r.text)
        assert r.json()["error"]["param"] == "content-type"
    r = await harness.client.post(
        "/v1/slow/chat/completions",
        content=json.dumps(CHAT),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200
    counts = await harness.state.store.generations.count_by_state()
    assert sum(counts.values()) == 1  # only the JSON one


async def test_revoking_the_last_key_does_not_reopen_the_server(harness: AppHarness) -> None:
    store = harness.state.store
    key_id, _ = await store.keys.create("acme")
    harness.state.keys_exist = False  # as a fresh process would start
    harness.state.keys_checked_at = 0.0
    r = await harness.client.post("/v1/slow/chat/completions", json=CHAT)
    assert r.status_code == 401
    await store.keys.revoke(key_id)
    harness.state.keys_exist = False
    harness.state.keys_checked_at = 0.0
    r = await harness.client.post("/v1/slow/chat/completions", json=CHAT)
    assert r.status_code == 401  # still closed: a key was created once


async def test_ops_token_protects_readyz_and_metrics(harness_factory: Any) -> None:
    h: AppHarness = await harness_factory(ops_token=SecretStr("s3cret-ops-token"))
    for path in ("/readyz", "/metrics"):
        assert (await h.client.get(path)).status_code == 401
        bad = {"authorization": "Bearer nope"}
        assert (await h.client.get(path, headers=bad)).status_code == 401
        good = {"authorization": "Bearer s3cret-ops-token"}
        assert (await h.client.get(path, headers=good)).status_code == 200
    assert (await h.client.get("/healthz")).status_code == 200


async def test_metrics_counts_are_reused_between_scrapes(harness_factory: Any) -> None:
    h: AppHarness = await harness_factory(metrics_cache_seconds=3600)
    first = (await h.client.get("/metrics")).text
    assert 'backburner_generations{state="Queued"} 0.0' in first
    r = await h.client.post("/v1/slow/chat/completions", json=CHAT)
    assert r.status_code == 200
    again = (await h.client.get("/metrics")).text
    # the table was not counted again within metrics_cache_seconds
    assert 'backburner_generations{state="Queued"} 0.0' in again
    assert 'backburner_generations_submitted_total{kind="chat"} 1.0' in again


async def test_readyz_names_a_failing_backend_without_echoing_its_error(
    harness: AppHarness, fake_backend: Any
) -> None:
    async def broken() -> None:
        from backburner.errors import BackendRetryable

        raise BackendRetryable("upstream at http://10.1.2.3:8000 said: secret detail")

    fake_backend.check = broken
    harness.state.ops_cache.clear()
    r = await harness.client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["backend:fake"] == "error: BackendRetryable"
    assert "10.1.2.3" not in r.text
