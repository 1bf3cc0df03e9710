"""The Group API (SPEC section 3) through the in-process app: submission, listing, counts,
strict all-or-nothing validation, cancellation, tenants and fair ordering."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from backburner.core.outcome import Outcome
from backburner.core.states import State
from backburner.errors import BackendRejected
from backburner.store.queue import FAIR_STEP
from backburner.store.tables import generations, groups, webhooks
from tests.conftest import FAKE_MODEL

PREFIXES = ["/v1/slow", "/v1/async"]
ROUTES = ["chat/completions", "completions"]
TERMINAL = ("Success", "Failed")


def one(route: str, i: int = 0) -> dict[str, Any]:
    md = {"custom_id": f"req-{i:03d}"}
    if route == "chat/completions":
        return {
            "model": FAKE_MODEL,
            "messages": [{"role": "user", "content": f"q{i}"}],
            "metadata": md,
        }
    return {"model": FAKE_MODEL, "prompt": f"q{i}", "metadata": md}


def many(route: str, n: int) -> list[dict[str, Any]]:
    return [one(route, i) for i in range(n)]


CHAT_REQ = one("chat/completions")
COMPLETION_REQ = one("completions")


async def group_rows(h: Any) -> int:
    async with h.state.store.engine.connect() as conn:
        return int(
            (await conn.execute(sa.select(sa.func.count()).select_from(groups))).scalar_one()
        )


async def wait_group(h: Any, prefix: str, gid: str, limit: float = 20.0) -> dict[str, Any]:
    async with asyncio.timeout(limit):
        while True:
            r = await h.client.get(f"{prefix}/group/{gid}/generations")
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["status"] != "in_progress":
                return body
            await asyncio.sleep(0.02)


def assert_counts(body: dict[str, Any], **expected: int) -> None:
    counts = {"queued": 0, "inProgress": 0, "success": 0, "failed": 0}
    counts.update(expected)
    assert body["counts"] == counts


@pytest.fixture
async def idle(harness_factory: Any) -> Any:
    """A harness without a worker, for requests that must be refused before anything runs."""
    return await harness_factory(run_worker=False)


# ---------------------------------------------------------------- happy path


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("route", ROUTES)
async def test_group_of_50_completes_in_order(harness: Any, prefix: str, route: str) -> None:
    reqs = many(route, 50)
    r = await harness.client.post(f"{prefix}/group/{route}", json={"requests": reqs})
    assert r.status_code == 200, r.text
    gid = r.json()["groupId"]
    assert r.json() == {"groupId": gid, "groupSize": 50}

    body = await wait_group(harness, prefix, gid)
    assert body["groupId"] == gid and body["groupSize"] == 50
    assert body["status"] == "completed"
    assert_counts(body, success=50)
    gens = body["generations"]
    assert len(gens) == 50
    assert [g["request"]["metadata"]["custom_id"] for g in gens] == [
        f"req-{i:03d}" for i in range(50)
    ]
    assert [g["request"] for g in gens] == reqs
    assert len({g["id"] for g in gens}) == 50
    for g in gens:
        assert g["state"] == "Success" and g["groupId"] == gid
        assert "response" in g and "finishedAt" in g

    summary = (await harness.client.get(f"{prefix}/group/{gid}")).json()
    assert "generations" not in summary
    assert summary == {k: v for k, v in body.items() if k != "generations"}
    # each generation is also retrievable alone
    single = (await harness.client.get(f"/v1/generation/{gens[7]['id']}")).json()
    assert single == gens[7]


@pytest.mark.parametrize("other", PREFIXES)
async def test_alias_paths_read_the_same_group(harness: Any, other: str) -> None:
    r = await harness.client.post(
        "/v1/async/group/chat/completions",
        json={"requests": many("chat/completions", 3), "metadata": {"job": "x"}},
    )
    gid = r.json()["groupId"]
    body = await wait_group(harness, "/v1/slow", gid)
    assert body["metadata"] == {"job": "x"}
    again = (await harness.client.get(f"{other}/group/{gid}/generations")).json()
    assert again == body


async def test_group_with_a_failure_still_completes(harness: Any, fake_backend: Any) -> None:
    fake_backend.enqueue(BackendRejected("upstream HTTP 400: bad request", upstream_status=400))
    r = await harness.client.post(
        "/v1/slow/group/chat/completions", json={"requests": many("chat/completions", 50)}
    )
    gid = r.json()["groupId"]
    body = await wait_group(harness, "/v1/slow", gid)
    assert body["status"] == "completed"
    assert_counts(body, success=49, failed=1)
    failed = [g for g in body["generations"] if g["state"] == "Failed"]
    assert len(failed) == 1
    assert "response" not in failed[0]
    assert "bad request" in failed[0]["stateMessage"]
    assert all(g["state"] in TERMINAL for g in body["generations"])


async def test_queued_group_counts(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    r = await h.client.post("/v1/slow/group/completions", json={"requests": many("completions", 4)})
    gid = r.json()["groupId"]
    body = (await h.client.get(f"/v1/slow/group/{gid}/generations")).json()
    assert body["status"] == "in_progress" and body["groupSize"] == 4
    assert_counts(body, queued=4)
    assert [g["state"] for g in body["generations"]] == ["Queued"] * 4
    assert all("response" not in g for g in body["generations"])


# ---------------------------------------------------------------- refusals: nothing stored


def _refusals() -> list[Any]:
    chat, comp = "chat/completions", "completions"
    ok = many(chat, 2)
    return [
        pytest.param(chat, {}, "requests", ["required", "50", "Batch API"], id="missing"),
        pytest.param(
            chat, {"requests": {"a": 1}}, "requests", ["list", "Batch API"], id="not-list"
        ),
        pytest.param(chat, {"requests": []}, "requests", ["empty", "50"], id="empty"),
        pytest.param(
            chat, {"requests": many(chat, 51)}, "requests", ["51", "50", "Batch API"], id="51"
        ),
        pytest.param(comp, {"requests": many(comp, 51)}, "requests", ["50", "Batch API"], id="c51"),
        pytest.param(
            chat, {"requests": ok, "priority": 1}, "priority", ["unknown field"], id="unknown-key"
        ),
        pytest.param(
            chat,
            {"requests": ok, "webhook_url": "https://x.example/h"},
            "webhook_url",
            ["use webhook_id (webhook_url is the Batch API's)"],
            id="webhook_url",
        ),
        pytest.param(
            chat,
            {"requests": ok, "webhook_idd": "w"},
            "webhook_idd",
            ["did you mean webhook_id?"],
            id="near-miss",
        ),
        pytest.param(
            chat, {"requests": ok, "metadata": [1]}, "metadata", ["JSON object"], id="metadata"
        ),
        pytest.param(
            chat, {"requests": ok, "webhook_id": 7}, "webhook_id", ["string"], id="webhook_id-int"
        ),
        pytest.param(
            chat,
            {"requests": [*ok, one(comp, 2)]},
            "requests[2]",
            ["requests[2]", "prompt"],
            id="prompt-on-chat",
        ),
        pytest.param(
            comp,
            {"requests": [one(comp, 0), one(chat, 1)]},
            "requests[1]",
            ["requests[1]", "messages"],
            id="messages-on-completions",
        ),
        pytest.param(
            chat,
            {"requests": [*many(chat, 3), {"model": FAKE_MODEL}]},
            "requests[3].messages",
            ["requests[3].messages", "required"],
            id="missing-messages",
        ),
        pytest.param(
            chat,
            {"requests": [*ok, {**CHAT_REQ, "messages": [{"role": "robot", "content": "x"}]}]},
            "requests[2].messages[0].role",
            ["requests[2].messages[0].role"],
            id="bad-role",
        ),
        pytest.param(
            chat,
            {"requests": [*ok, {k: v for k, v in CHAT_REQ.items() if k != "model"}]},
            "requests[2].model",
            ["requests[2].model", "required"],
            id="missing-model",
        ),
        pytest.param(
            comp,
            {"requests": [{**COMPLETION_REQ, "model": "nope"}]},
            "requests[0].model",
            ["requests[0].model", "nope", FAKE_MODEL],
            id="unknown-model",
        ),
        pytest.param(
            chat,
            {"requests": [{**CHAT_REQ, "stream": True}]},
            "requests[0].stream",
            ["requests[0].stream"],
            id="stream",
        ),
        pytest.param(
            chat, {"requests": [*ok, "hello"]}, "requests[2]", ["JSON object"], id="not-object"
        ),
        pytest.param(
            chat,
            {"requests": ok, "webhook_id": "wh_missing"},
            "webhook_id",
            ["wh_missing"],
            id="unknown-webhook",
        ),
        pytest.param(chat, [CHAT_REQ], "body", ["requests"], id="body-is-list"),
    ]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("route", "body", "param", "says"), _refusals())
async def test_refusal_names_the_field_and_stores_nothing(
    idle: Any, prefix: str, route: str, body: Any, param: str, says: list[str]
) -> None:
    r = await idle.client.post(f"{prefix}/group/{route}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    for s in says:
        assert s in err["message"], err["message"]
    assert await idle.state.store.generations.count_by_state() == {}
    assert await group_rows(idle) == 0


async def test_every_problem_is_reported_at_once(idle: Any) -> None:
    body = {
        "requests": [
            CHAT_REQ,
            {**CHAT_REQ, "model": "nope"},
            {"model": FAKE_MODEL},
            {**CHAT_REQ, "stream": True},
        ],
        "webhook_url": "https://x.example",
        "webhook_id": "wh_missing",
    }
    r = await idle.client.post("/v1/slow/group/chat/completions", json=body)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    for field in (
        "webhook_url",
        "requests[1].model",
        "requests[2].messages",
        "requests[3].stream",
        "webhook_id",
    ):
        assert field in msg, (field, msg)
    assert "requests[0]" not in msg
    assert await idle.state.store.generations.count_by_state() == {}
    assert await group_rows(idle) == 0


@pytest.mark.parametrize("raw", [b"", b"{oops"])
async def test_empty_or_invalid_json_is_400(idle: Any, raw: bytes) -> None:
    r = await idle.client.post(
        "/v1/slow/group/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "body"
    assert await group_rows(idle) == 0


async def _add_webhook(h: Any, tenant: str, wid: str) -> None:
    now = datetime.now(UTC)
    async with h.state.store.engine.begin() as conn:
        await conn.execute(
            webhooks.insert().values(
                id=wid,
                tenant=tenant,
                url="https://hooks.example/x",
                name=None,
                secret="whsec_x",
                events="[]",
                enabled=True,
                created_at=now,
                updated_at=now,
            )
        )


async def test_group_idempotency_key(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    hdr = {"Idempotency-Key": "g-1"}
    body = {"requests": many("completions", 3)}
    r1 = await h.client.post("/v1/slow/group/completions", json=body, headers=hdr)
    r2 = await h.client.post("/v1/slow/group/completions", json=body, headers=hdr)
    assert r1.status_code == r2.status_code == 200 and r1.json() == r2.json()
    assert await group_rows(h) == 1
    assert await h.state.store.generations.count_by_state() == {"Queued": 3}
    body2 = {"requests": many("completions", 2)}
    r3 = await h.client.post("/v1/slow/group/completions", json=body2, headers=hdr)
    assert r3.status_code == 409
    assert await group_rows(h) == 1


async def test_group_body_over_limit_is_413(harness_factory: Any) -> None:
    h = await harness_factory(max_body_bytes=4096)
    r = await h.client.post(
        "/v1/slow/group/chat/completions", json={"requests": many("chat/completions", 50)}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert await group_rows(h) == 0


async def test_webhook_id_known_accepted_other_tenants_refused(harness_factory: Any) -> None:
    h = await harness_factory(run_worker=False)
    await _add_webhook(h, "default", "wh_mine")
    await _add_webhook(h, "someone-else", "wh_theirs")
    ok = await h.client.post(
        "/v1/slow/group/chat/completions", json={"requests": [CHAT_REQ], "webhook_id": "wh_mine"}
    )
    assert ok.status_code == 200, ok.text
    summary = (await h.client.get(f"/v1/slow/group/{ok.json()['groupId']}")).json()
    assert summary["webhook_id"] == "wh_mine"
    bad = await h.client.post(
        "/v1/slow/group/chat/completions", json={"requests": [CHAT_REQ], "webhook_id": "wh_theirs"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "webhook_id"
    assert await group_rows(h) == 1


def _count_lookups(h: Any) -> dict[str, int]:
    """Counts ``store.webhooks.exists`` calls by webhook id (the lookups a submission makes)."""
    webhooks_store = h.state.store.webhooks
    exists = webhooks_store.exists
    seen: dict[str, int] = {}

    async def counting(tenant: str, webhook_id: str) -> bool:
        seen[webhook_id] = seen.get(webhook_id, 0) + 1
        result: bool = await exists(tenant, webhook_id)
        return result

    webhooks_store.exists = counting
    return seen


@pytest.fixture
async def idle_both(harness_factory: Any, store: Any, db_url: str) -> Any:
    """:func:`idle` on SQLite and on PostgreSQL (``store`` empties the database first)."""
    return await harness_factory(db=db_url, run_worker=False)


async def test_each_webhook_id_is_looked_up_once(idle_both: Any) -> None:
    """A group naming the same webhook in many requests looks each distinct id up once, and
    still reports every request that names an unknown one."""
    h = idle_both
    await _add_webhook(h, "default", "wh_mine")
    lookups = _count_lookups(h)
    reqs = many("chat/completions", 12)
    for i, r in enumerate(reqs):
        r["metadata"]["webhook_id"] = "wh_missing" if i % 4 == 1 else "wh_mine"
    bad = await h.client.post(
        "/v1/slow/group/chat/completions", json={"requests": reqs, "webhook_id": "wh_mine"}
    )
    assert bad.status_code == 400
    err = bad.json()["error"]
    assert err["param"] == "requests[1].metadata.webhook_id"
    said = err["message"]
    for i in (1, 5, 9):
        assert f"requests[{i}].metadata.webhook_id: no webhook with id 'wh_missing'" in said
    assert said.count("no webhook with id") == 3
    assert lookups == {"wh_mine": 1, "wh_missing": 1}
    assert await group_rows(h) == 0

    lookups.clear()
    for r in reqs:
        r["metadata"]["webhook_id"] = "wh_mine"
    ok = await h.client.post(
        "/v1/slow/group/chat/completions", json={"requests": reqs, "webhook_id": "wh_mine"}
    )
    assert ok.status_code == 200, ok.text
    assert lookups == {"wh_mine": 1}
    body = (await h.client.get(f"/v1/slow/group/{ok.json()['groupId']}/generations")).json()
    assert [g["request"] for g in body["generations"]] == reqs


async def test_a_group_is_stored_in_order_with_consecutive_fair_keys(idle_both: Any) -> None:
    """The rows of a group: one per request in order, fair keys consecutive, and a tenant's next
    group continues after them."""
    idle = idle_both
    ids = []
    for n in (5, 3):
        r = await idle.client.post(
            "/v1/slow/group/completions", json={"requests": many("completions", n)}
        )
        assert r.status_code == 200 and r.json()["groupSize"] == n
        ids.append(r.json()["groupId"])
    c = generations.c
    query = sa.select(c.group_id, c.group_index, c.custom_id, c.fair_key).order_by(c.fair_key)
    async with idle.state.store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    expected = [(ids[0], i, f"req-{i:03d}") for i in range(5)]
    expected += [(ids[1], i, f"req-{i:03d}") for i in range(3)]
    assert [tuple(r[:3]) for r in rows] == expected
    keys = [r[3] for r in rows]
    assert keys == list(range(keys[0], keys[0] + 8 * FAIR_STEP, FAIR_STEP))


# ---------------------------------------------------------------- cancel and 404


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_cancel_queued_group(harness_factory: Any, prefix: str) -> None:
    h = await harness_factory(run_worker=False)
    r = await h.client.post(
        f"{prefix}/group/chat/completions", json={"requests": many("chat/completions", 3)}
    )
    gid = r.json()["groupId"]
    c = await h.client.post(f"{prefix}/group/{gid}/cancel")
    assert c.status_code == 200, c.text
    assert c.json()["status"] == "cancelled" and "generations" not in c.json()
    assert_counts(c.json(), failed=3)
    body = (await h.client.get(f"{prefix}/group/{gid}/generations")).json()
    assert body["status"] == "cancelled"
    assert [(g["state"], g["stateMessage"]) for g in body["generations"]] == [
        ("Failed", "Cancelled")
    ] * 3
    again = await h.client.post(f"{prefix}/group/{gid}/cancel")
    assert again.status_code == 409
    assert set(again.json()["error"]) == {"message", "type", "param", "code"}


async def test_cancel_completed_group_is_409(harness: Any) -> None:
    r = await harness.client.post("/v1/slow/group/completions", json={"requests": [COMPLETION_REQ]})
    gid = r.json()["groupId"]
    assert (await wait_group(harness, "/v1/slow", gid))["status"] == "completed"
    c = await harness.client.post(f"/v1/slow/group/{gid}/cancel")
    assert c.status_code == 409
    assert (await harness.client.get(f"/v1/slow/group/{gid}")).json()["status"] == "completed"


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_unknown_group_is_404(idle: Any, prefix: str) -> None:
    for method, path in [
        ("GET", "/generations"),
        ("GET", ""),
        ("POST", "/cancel"),
    ]:
        r = await idle.client.request(method, f"{prefix}/group/NoSuchGroup_123456789{path}")
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- tenants and fairness


async def _two_tenants(harness_factory: Any) -> tuple[Any, dict[str, str], dict[str, str]]:
    h = await harness_factory(auth="required", run_worker=False)
    _, ka = await h.state.store.keys.create("tenant-a")
    _, kb = await h.state.store.keys.create("tenant-b")
    return h, {"Authorization": f"Bearer {ka}"}, {"Authorization": f"Bearer {kb}"}


async def test_another_tenants_group_is_404(harness_factory: Any) -> None:
    h, a, b = await _two_tenants(harness_factory)
    r = await h.client.post(
        "/v1/slow/group/chat/completions", json={"requests": [CHAT_REQ]}, headers=a
    )
    gid = r.json()["groupId"]
    for prefix in PREFIXES:
        for method, path in [("GET", "/generations"), ("GET", ""), ("POST", "/cancel")]:
            url = f"{prefix}/group/{gid}{path}"
            assert (await h.client.request(method, url, headers=b)).status_code == 404
    assert (await h.client.get(f"/v1/slow/group/{gid}", headers=a)).json()["status"] == (
        "in_progress"
    )
    gen_id = (await h.client.get(f"/v1/slow/group/{gid}/generations", headers=a)).json()[
        "generations"
    ][0]["id"]
    assert (await h.client.get(f"/v1/generation/{gen_id}", headers=b)).status_code == 404


async def test_big_group_does_not_starve_another_tenant(harness_factory: Any) -> None:
    h, a, b = await _two_tenants(harness_factory)
    r = await h.client.post(
        "/v1/slow/group/chat/completions",
        json={"requests": many("chat/completions", 50)},
        headers=a,
    )
    assert r.status_code == 200
    single = await h.client.post("/v1/slow/chat/completions", json=CHAT_REQ, headers=b)
    b_id = single.json()["id"]
    claimed = await h.state.store.work.claim("test-worker", [FAKE_MODEL], 3, 30.0)
    assert b_id in {g.id for g in claimed}


async def test_a_group_shows_its_expected_completion_at_its_tenants_pace(
    harness_factory: Any,
) -> None:
    """Null while nothing has finished lately; once the tenant's work has a pace, the group's
    remaining work at that pace; null again when it is done."""
    h = await harness_factory(run_worker=False)
    r = await h.client.post("/v1/slow/group/completions", json={"requests": many("completions", 4)})
    gid = r.json()["groupId"]
    summary = (await h.client.get(f"/v1/slow/group/{gid}")).json()
    assert summary["expected_completion_at"] is None  # no pace measured yet
    store = h.state.store
    done = await store.work.claim("w", [FAKE_MODEL], 2, 60)
    await store.work.finish(
        {g.id: "w" for g in done},
        [Outcome(g.id, State.SUCCESS, "Completed", {"choices": []}) for g in done],
    )
    h.state.ops_cache.pop("pace", None)
    summary = (await h.client.get(f"/v1/slow/group/{gid}")).json()
    eta = datetime.fromisoformat(summary["expected_completion_at"].replace("Z", "+00:00"))
    # 2 finished in the pace window (an equal share of it), 2 left
    assert eta > datetime.now(UTC)
    full = (await h.client.get(f"/v1/slow/group/{gid}/generations")).json()
    again = datetime.fromisoformat(full["expected_completion_at"].replace("Z", "+00:00"))
    assert abs((again - eta).total_seconds()) < 5  # the same estimate, read a moment later
