"""Tenancy through HTTP (SPEC section 7, "Limits per tenant"): each limit answers 429 with the
error envelope, the limit named and ``Retry-After`` where waiting helps, and stores nothing; the
admin API; disabling a tenant; usage reports; the usage metrics; and a race for a tenant's last
places. On SQLite and PostgreSQL (the ``store`` fixture empties the PostgreSQL tables first)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backburner.core.states import Kind
from backburner.errors import BackendRejected, BackendRetryable
from tests.conftest import FAKE_MODEL, AppHarness
from tests.support.fake_backend import FakeBackend, echo_response
from tests.support.services import burst_services
from tests.support.tenancy_api import (
    GROUP,
    REALTIME,
    SLOW,
    Headers,
    bad_request,
    batch_body,
    chat,
    create_tenant,
    envelope,
    group,
    key_for,
    patch,
    poll,
    retry_after,
    rows,
    samples,
    stored,
    too_many,
    upload,
)

Make = Callable[..., Awaitable[AppHarness]]
TERMINAL = ("Success", "Failed")


@pytest.fixture
async def make(harness_factory: Any, store: Any, db_url: str, tmp_path: Path) -> Make:
    """Apps on the parametrised database (SQLite or PostgreSQL), keys required."""

    async def build(**overrides: Any) -> AppHarness:
        overrides.setdefault("auth", "required")
        overrides.setdefault("files_dir", str(tmp_path / "files"))
        h: AppHarness = await harness_factory(db=db_url, **overrides)
        return h

    return build


def chat_answer() -> dict[str, Any]:
    return echo_response(Kind.CHAT, chat())


async def submit(h: AppHarness, headers: Headers, i: int = 0) -> str:
    r = await h.client.post(SLOW, json=chat(i), headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


async def wait_done(h: AppHarness, headers: Headers, gid: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body: dict[str, Any] = (await h.client.get(f"/v1/generation/{gid}", headers=headers)).json()
        return body if body.get("state") in TERMINAL else None

    return await poll(probe, timeout=15)


# ---------------------------------------------------------------- limits


async def test_max_queued_generations_on_slow_submissions(make: Make) -> None:
    h = await make(run_worker=False, limits={"max_queued_generations": 2})
    acme, beta = await key_for(h, "acme"), await key_for(h, "beta")
    admin = await key_for(h, "ops", admin=True)
    for i in range(2):
        await submit(h, acme, i)
    refused = await h.client.post(SLOW, json=chat(), headers=acme)
    err = too_many(refused, "max_queued_generations", 2, retry=True)
    assert "acme" in err["message"] and err["param"] is None
    assert await stored(h, "acme") == (2, 0, 0)
    # another tenant has its own count
    await submit(h, beta)
    # an Idempotency-Key of a refused request is not kept: the same request goes once there is room
    idem = {**acme, "Idempotency-Key": "k-1"}
    too_many(
        await h.client.post(SLOW, json=chat(9), headers=idem),
        "max_queued_generations",
        2,
        retry=True,
    )

    # a tenant's own limit overrides the default; "default" drops it; null is no limit
    t = await patch(h, admin, "acme", limits={"max_queued_generations": 3})
    assert t["limits"] == {"max_queued_generations": 3}
    assert t["effective_limits"]["max_queued_generations"] == 3
    assert t["open_generations"] == 2
    ok = await h.client.post(SLOW, json=chat(9), headers=idem)
    assert ok.status_code == 200, ok.text
    assert ok.headers.get("Idempotent-Replayed") is None
    too_many(
        await h.client.post(SLOW, json=chat(), headers=acme),
        "max_queued_generations",
        3,
        retry=True,
    )
    t = await patch(h, admin, "acme", limits={"max_queued_generations": "default"})
    assert t["limits"] == {} and t["effective_limits"]["max_queued_generations"] == 2
    too_many(
        await h.client.post(SLOW, json=chat(), headers=acme),
        "max_queued_generations",
        2,
        retry=True,
    )
    t = await patch(h, admin, "acme", limits={"max_queued_generations": None})
    assert t["limits"] == {"max_queued_generations": None}
    assert t["effective_limits"]["max_queued_generations"] is None
    for i in range(3):
        await submit(h, acme, 10 + i)
    # a limit of 0: waiting never helps
    await patch(h, admin, "beta", limits={"max_queued_generations": 0})
    too_many(
        await h.client.post(SLOW, json=chat(), headers=beta),
        "max_queued_generations",
        0,
        retry=False,
    )
    assert await stored(h, "acme") == (6, 0, 0)
    assert await stored(h, "beta") == (1, 0, 0)


async def test_max_queued_generations_on_groups(make: Make) -> None:
    h = await make(run_worker=False, limits={"max_queued_generations": 5})
    acme = await key_for(h, "acme")
    assert (await h.client.post(GROUP, json=group(3), headers=acme)).status_code == 200
    # would fit once some finish: Retry-After
    r = await h.client.post(GROUP, json=group(3), headers=acme)
    err = too_many(r, "max_queued_generations", 5, retry=True)
    assert "adds 3" in err["message"]
    # larger than the limit: never fits, no Retry-After
    r = await h.client.post(GROUP, json=group(6), headers=acme)
    err = too_many(r, "max_queued_generations", 5, retry=False)
    assert "never fits" in err["message"]
    assert await stored(h) == (3, 1, 0)
    assert (await h.client.post(GROUP, json=group(2), headers=acme)).status_code == 200
    too_many(
        await h.client.post(SLOW, json=chat(), headers=acme),
        "max_queued_generations",
        5,
        retry=True,
    )
    assert await stored(h) == (5, 2, 0)


async def test_finished_work_frees_its_places(make: Make, fake_backend: FakeBackend) -> None:
    """Success, a retry then Success, and Failed each give the place back once."""
    h = await make(limits={"max_queued_generations": 1})
    acme = await key_for(h, "acme")
    admin = await key_for(h, "ops", admin=True)
    fake_backend.enqueue(
        BackendRetryable("upstream HTTP 503: busy", upstream_status=503),
        chat_answer(),
        BackendRejected("upstream HTTP 400: bad request", upstream_status=400),
    )
    for i in range(3):
        gid = await submit(h, acme, i)
        assert (await wait_done(h, acme, gid))["state"] == ("Success", "Failed", "Success")[i]

        async def freed() -> bool | None:
            t = (await h.client.get("/v1/admin/tenants/acme", headers=admin)).json()
            return True if t["open_generations"] == 0 else None

        await poll(freed)
    assert await rows(h, "generations", "acme") == 3


async def test_cancelled_work_frees_its_places(make: Make) -> None:
    h = await make(run_worker=False, limits={"max_queued_generations": 3})
    acme = await key_for(h, "acme")
    gid = await submit(h, acme)
    g = await h.client.post(GROUP, json=group(2), headers=acme)
    assert g.status_code == 200, g.text
    too_many(
        await h.client.post(SLOW, json=chat(), headers=acme),
        "max_queued_generations",
        3,
        retry=True,
    )
    r = await h.client.post(f"/v1/generation/{gid}/cancel", headers=acme)
    assert r.status_code == 200, r.text
    await submit(h, acme, 1)
    r = await h.client.post(f"/v1/slow/group/{g.json()['groupId']}/cancel", headers=acme)
    assert r.status_code == 200, r.text
    for i in range(2):
        await submit(h, acme, 2 + i)
    too_many(
        await h.client.post(SLOW, json=chat(), headers=acme),
        "max_queued_generations",
        3,
        retry=True,
    )
    assert await stored(h, "acme") == (6, 1, 0)


async def test_requests_per_minute_on_slow_group_and_batch(make: Make) -> None:
    h = await make(run_worker=False, limits={"requests_per_minute": 2})
    acme, beta = await key_for(h, "acme"), await key_for(h, "beta")
    admin = await key_for(h, "ops", admin=True)
    file_id = await upload(h, acme, 3)  # uploads are not submissions
    assert (await h.client.post(SLOW, json=chat(), headers=acme)).status_code == 200
    assert (await h.client.post(GROUP, json=group(2), headers=acme)).status_code == 200
    for r in (
        await h.client.post(SLOW, json=chat(), headers=acme),
        await h.client.post(GROUP, json=group(2), headers=acme),
        await h.client.post("/v1/batches", json=batch_body(file_id), headers=acme),
    ):
        too_many(r, "requests_per_minute", 2, retry=True)
        assert retry_after(r) <= 60
    assert await stored(h, "acme") == (3, 1, 0)
    assert (await h.client.get("/v1/batches", headers=acme)).json()["data"] == []

    # beta's batch goes (its own count); then beta's own limit of 0 refuses without Retry-After
    beta_file = await upload(h, beta, 2)
    r = await h.client.post("/v1/batches", json=batch_body(beta_file), headers=beta)
    assert r.status_code == 200, r.text
    await patch(h, admin, "beta", limits={"requests_per_minute": 0})
    for r in (
        await h.client.post(SLOW, json=chat(), headers=beta),
        await h.client.post("/v1/batches", json=batch_body(beta_file), headers=beta),
    ):
        too_many(r, "requests_per_minute", 0, retry=False)
    await patch(h, admin, "beta", limits={"requests_per_minute": None})
    for i in range(3):
        await submit(h, beta, i)
    assert await stored(h, "beta") == (3, 0, 1)


async def test_a_replayed_submission_is_answered_not_refused(make: Make) -> None:
    """A repeat with the same Idempotency-Key gets the first answer: not counted again, not
    refused by a limit the first one reached."""
    h = await make(run_worker=False, limits={"requests_per_minute": 1})
    acme = await key_for(h, "acme")
    idem = {**acme, "Idempotency-Key": "once"}
    first = await h.client.post(SLOW, json=chat(), headers=idem)
    assert first.status_code == 200, first.text
    again = await h.client.post(SLOW, json=chat(), headers=idem)
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    too_many(
        await h.client.post(SLOW, json=chat(), headers=acme), "requests_per_minute", 1, retry=True
    )
    assert await stored(h, "acme") == (1, 0, 0)


async def test_a_realtime_request_with_an_idempotency_key_is_counted(
    make: Make, fake_backend: FakeBackend
) -> None:
    h = await make(run_worker=False, limits={"tokens_per_day": 5})
    acme = await key_for(h, "acme")
    first = await h.client.post(REALTIME, json=chat(), headers={**acme, "Idempotency-Key": "k1"})
    assert first.status_code == 200, first.text
    # its 5 tokens are the day's: the next request is refused
    r = await h.client.post(REALTIME, json=chat(1), headers=acme)
    too_many(r, "tokens_per_day", 5, retry=True)
    assert len(fake_backend.calls) == 1


async def test_a_replayed_realtime_request_spends_nothing(
    make: Make, fake_backend: FakeBackend
) -> None:
    h = await make(run_worker=False, limits={"realtime_requests_per_minute": 2})
    acme = await key_for(h, "acme")
    idem = {**acme, "Idempotency-Key": "rt-once"}
    first = await h.client.post(REALTIME, json=chat(), headers=idem)
    assert first.status_code == 200, first.text
    again = await h.client.post(REALTIME, json=chat(), headers=idem)
    assert again.status_code == 200 and again.json() == first.json()
    assert len(fake_backend.calls) == 1
    # the replay spent nothing: one request of the minute is left
    assert (await h.client.post(REALTIME, json=chat(1), headers=acme)).status_code == 200
    r = await h.client.post(REALTIME, json=chat(2), headers=acme)
    too_many(r, "realtime_requests_per_minute", 2, retry=True)
    # and a replay is answered even when the minute's requests are spent
    assert (await h.client.post(REALTIME, json=chat(), headers=idem)).status_code == 200


async def test_a_refused_submission_does_not_spend_a_request(make: Make) -> None:
    """The per-minute count is taken in the submission's transaction: a request refused by
    another limit gives its unit back."""
    h = await make(run_worker=False, limits={"requests_per_minute": 2, "max_queued_generations": 1})
    acme = await key_for(h, "acme")
    admin = await key_for(h, "ops", admin=True)
    await submit(h, acme)
    for _ in range(3):
        r = await h.client.post(SLOW, json=chat(), headers=acme)
        too_many(r, "max_queued_generations", 1, retry=True)
    await patch(h, admin, "acme", limits={"max_queued_generations": None})
    await submit(h, acme)  # the second of two per minute
    r = await h.client.post(SLOW, json=chat(), headers=acme)
    too_many(r, "requests_per_minute", 2, retry=True)
    assert await rows(h, "generations") == 2


async def test_max_batch_lines_in_flight(make: Make) -> None:
    h = await make(run_worker=False, limits={"max_batch_lines_in_flight": 5})
    acme = await key_for(h, "acme")
    admin = await key_for(h, "ops", admin=True)
    three, six = await upload(h, acme, 3), await upload(h, acme, 6)
    first = await h.client.post("/v1/batches", json=batch_body(three), headers=acme)
    assert first.status_code == 200, first.text
    r = await h.client.post("/v1/batches", json=batch_body(three), headers=acme)
    err = too_many(r, "max_batch_lines_in_flight", 5, retry=True)
    assert "hold 3" in err["message"] and "adds 3" in err["message"]
    r = await h.client.post("/v1/batches", json=batch_body(six), headers=acme)
    err = too_many(r, "max_batch_lines_in_flight", 5, retry=False)
    assert "never fits" in err["message"]
    listed = (await h.client.get("/v1/batches", headers=acme)).json()["data"]
    assert [b["id"] for b in listed] == [first.json()["id"]]
    assert await stored(h) == (0, 0, 1)
    # a tenant's own limit
    await patch(h, admin, "acme", limits={"max_batch_lines_in_flight": 9})
    r = await h.client.post("/v1/batches", json=batch_body(six), headers=acme)
    assert r.status_code == 200, r.text
    assert await rows(h, "batches") == 2


async def test_realtime_requests_per_minute(make: Make, fake_backend: FakeBackend) -> None:
    h = await make(limits={"realtime_requests_per_minute": 2})
    acme, beta = await key_for(h, "acme"), await key_for(h, "beta")
    admin = await key_for(h, "ops", admin=True)
    assert (await h.client.post(REALTIME, json=chat(), headers=acme)).status_code == 200
    streamed = await h.client.post(REALTIME, json={**chat(), "stream": True}, headers=acme)
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    for body in (chat(), {**chat(), "stream": True}):
        r = await h.client.post(REALTIME, json=body, headers=acme)
        too_many(r, "realtime_requests_per_minute", 2, retry=True)
        assert retry_after(r) <= 60
    assert len(fake_backend.calls) == 2  # the refused ones never reached the engine
    # the slow lane has its own count
    assert (await h.client.post(SLOW, json=chat(), headers=acme)).status_code == 200
    await patch(h, admin, "beta", limits={"realtime_requests_per_minute": 0})
    r = await h.client.post(REALTIME, json=chat(), headers=beta)
    too_many(r, "realtime_requests_per_minute", 0, retry=False)
    assert len(fake_backend.calls) == 2


async def test_tokens_per_day(make: Make, fake_backend: FakeBackend) -> None:
    # the fake engine reports 3 + 2 tokens an answer
    h = await make(run_worker=False, limits={"tokens_per_day": 5})
    acme, beta = await key_for(h, "acme"), await key_for(h, "beta")
    admin = await key_for(h, "ops", admin=True)
    assert (await h.client.post(REALTIME, json=chat(), headers=acme)).status_code == 200
    # counted at once in this process, before the tally is written
    r = await h.client.post(REALTIME, json=chat(), headers=acme)
    err = too_many(r, "tokens_per_day", 5, retry=True)
    assert "used 5" in err["message"]
    assert retry_after(r) <= 86400
    assert len(fake_backend.calls) == 1

    # once written, submissions to the slow lane are refused as well
    async def written() -> int | None:
        u = (await h.client.get("/v1/usage?group_by=", headers=acme)).json()
        return 1 if u["total"]["total_tokens"] == 5 else None

    await poll(written)
    r = await h.client.post(SLOW, json=chat(), headers=acme)
    too_many(r, "tokens_per_day", 5, retry=True)
    assert await stored(h, "acme") == (0, 0, 0)
    # other tenants have their own day; a tenant's own limit overrides the default
    assert (await h.client.post(REALTIME, json=chat(), headers=beta)).status_code == 200
    await patch(h, admin, "acme", limits={"tokens_per_day": None})
    assert (await h.client.post(REALTIME, json=chat(), headers=acme)).status_code == 200
    await submit(h, acme)


# ---------------------------------------------------------------- the admin API


async def test_admin_routes_need_an_admin_key(make: Make) -> None:
    h = await make(run_worker=False)
    acme = await key_for(h, "acme")
    admin = await key_for(h, "ops", admin=True)
    calls: list[tuple[str, str, Any]] = [
        ("GET", "/v1/admin/tenants", None),
        ("POST", "/v1/admin/tenants", {"id": "newbie"}),
        ("GET", "/v1/admin/tenants/acme", None),
        ("PATCH", "/v1/admin/tenants/acme", {"disabled": True}),
    ]
    for method, path, body in calls:
        r = await h.client.request(method, path, json=body)
        assert envelope(r, 401)["type"] == "authentication_error"
        r = await h.client.request(method, path, json=body, headers={"Authorization": "Bearer x"})
        envelope(r, 401)
        r = await h.client.request(method, path, json=body, headers=acme)
        envelope(r, 403, code="admin_key_required")
    t = (await h.client.get("/v1/admin/tenants/acme", headers=admin)).json()
    assert t["disabled"] is False
    assert (await h.client.get("/v1/admin/tenants/newbie", headers=admin)).status_code == 404


async def test_admin_create_get_and_list(make: Make) -> None:
    h = await make(run_worker=False, limits={"max_queued_generations": 10})
    admin = await key_for(h, "ops", admin=True)
    made = await create_tenant(
        h, admin, "acme", weight=2.5, limits={"requests_per_minute": 60, "tokens_per_day": None}
    )
    assert made["object"] == "tenant" and made["id"] == "acme"
    assert made["weight"] == 2.5 and made["disabled"] is False and made["disabled_at"] is None
    assert made["limits"] == {"requests_per_minute": 60, "tokens_per_day": None}
    assert made["effective_limits"] == {
        "max_queued_generations": 10,
        "max_batch_lines_in_flight": None,
        "requests_per_minute": 60,
        "realtime_requests_per_minute": None,
        "tokens_per_day": None,
    }
    assert made["open_generations"] == 0
    got = await h.client.get("/v1/admin/tenants/acme", headers=admin)
    assert got.status_code == 200 and got.json() == made
    dup = await h.client.post("/v1/admin/tenants", json={"id": "acme"}, headers=admin)
    envelope(dup, 409, code="tenant_exists")
    assert (await h.client.get("/v1/admin/tenants/acme", headers=admin)).json() == made
    r = await h.client.get("/v1/admin/tenants/nobody", headers=admin)
    assert "nobody" in envelope(r, 404)["message"]
    off = await create_tenant(h, admin, "zed", disabled=True)
    assert off["disabled"] is True and off["disabled_at"] is not None

    names = ["acme", "ops", "zed"] + [f"t-{i:02d}" for i in range(5)]
    for n in names[3:]:
        await create_tenant(h, admin, n)
    seen: list[str] = []
    after: str | None = None
    while True:
        q = "/v1/admin/tenants?limit=2" + (f"&after={after}" if after else "")
        page = (await h.client.get(q, headers=admin)).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        ids = [t["id"] for t in page["data"]]
        seen += ids
        if ids:
            assert page["first_id"] == ids[0] and page["last_id"] == ids[-1]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == sorted(names)
    whole = (await h.client.get("/v1/admin/tenants", headers=admin)).json()
    assert [t["id"] for t in whole["data"]] == sorted(names) and whole["has_more"] is False
    bad_request(await h.client.get("/v1/admin/tenants?limit=many", headers=admin), "limit")


async def test_admin_patch(make: Make) -> None:
    h = await make(run_worker=False, limits={"tokens_per_day": 1000})
    admin = await key_for(h, "ops", admin=True)
    await create_tenant(h, admin, "acme")
    t = await patch(h, admin, "acme", weight=4)
    assert t["weight"] == 4.0 and t["limits"] == {}
    t = await patch(h, admin, "acme", limits={"tokens_per_day": 50, "requests_per_minute": 7})
    assert t["limits"] == {"tokens_per_day": 50, "requests_per_minute": 7}
    assert t["effective_limits"]["tokens_per_day"] == 50
    # only what is named changes
    t = await patch(h, admin, "acme", limits={"requests_per_minute": "default"})
    assert t["limits"] == {"tokens_per_day": 50} and t["weight"] == 4.0
    assert t["effective_limits"]["requests_per_minute"] is None
    t = await patch(h, admin, "acme", limits={"tokens_per_day": None})
    assert t["limits"] == {"tokens_per_day": None}
    assert t["effective_limits"]["tokens_per_day"] is None
    t = await patch(h, admin, "acme", limits={"tokens_per_day": "default"})
    assert t["limits"] == {} and t["effective_limits"]["tokens_per_day"] == 1000
    t = await patch(h, admin, "acme", disabled=True)
    assert t["disabled"] is True and t["disabled_at"] is not None
    t = await patch(h, admin, "acme", disabled=False)
    assert t["disabled"] is False and t["disabled_at"] is None
    assert (await patch(h, admin, "acme"))["weight"] == 4.0  # an empty body changes nothing
    r = await h.client.patch("/v1/admin/tenants/nobody", json={"weight": 2}, headers=admin)
    envelope(r, 404)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"weight": 0}, "weight"),
        ({"weight": 100.5}, "weight"),
        ({"weight": -1}, "weight"),
        ({"weight": "heavy"}, "weight"),
        ({"limits": {"requests_per_hour": 5}}, "limits.requests_per_hour"),
        ({"limits": {"tokens_per_day": -1}}, "limits.tokens_per_day"),
        ({"limits": {"max_queued_generations": "10"}}, "limits.max_queued_generations"),
        ({"limits": {"max_queued_generations": 1.5}}, "limits.max_queued_generations"),
        ({"limits": {"max_queued_generations": True}}, "limits.max_queued_generations"),
        ({"limits": {"requests_per_minute": "unlimited"}}, "limits.requests_per_minute"),
        ({"limits": [1]}, "limits"),
        ({"disabled": "yes"}, "disabled"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_admin_bad_bodies_change_nothing(
    harness_factory: Any, body: dict[str, Any], param: str
) -> None:
    h: AppHarness = await harness_factory(auth="required", run_worker=False)
    admin = await key_for(h, "ops", admin=True)
    before = await create_tenant(h, admin, "acme", weight=2, limits={"tokens_per_day": 9})
    bad_request(await h.client.patch("/v1/admin/tenants/acme", json=body, headers=admin), param)
    assert (await h.client.get("/v1/admin/tenants/acme", headers=admin)).json() == before
    bad_request(
        await h.client.post("/v1/admin/tenants", json={"id": "other", **body}, headers=admin),
        param,
    )
    r = await h.client.get("/v1/admin/tenants/other", headers=admin)
    envelope(r, 404)


@pytest.mark.parametrize(("tenant_id", "param"), [("bad name", "id"), ("", "id"), (7, "id")])
async def test_admin_create_needs_a_good_id(
    harness_factory: Any, tenant_id: Any, param: str
) -> None:
    h: AppHarness = await harness_factory(auth="required", run_worker=False)
    admin = await key_for(h, "ops", admin=True)
    r = await h.client.post("/v1/admin/tenants", json={"id": tenant_id}, headers=admin)
    bad_request(r, param)
    listed = (await h.client.get("/v1/admin/tenants", headers=admin)).json()["data"]
    assert [t["id"] for t in listed] == ["ops"]  # the admin key's own tenant


# ---------------------------------------------------------------- disable


async def _generation_ids(h: AppHarness, headers: Headers, gid: str) -> list[str]:
    r = await h.client.get(f"/v1/slow/group/{gid}/generations", headers=headers)
    return [str(x["id"]) for x in r.json()["generations"]]


async def test_disabled_tenant_is_refused_and_its_work_held(
    make: Make, db_url: str, tmp_path: Path
) -> None:
    h = await make(run_worker=False)
    acme, beta = await key_for(h, "acme"), await key_for(h, "beta")
    admin = await key_for(h, "ops", admin=True)
    ids = [await submit(h, acme, i) for i in range(2)]
    g = await h.client.post(GROUP, json=group(2), headers=acme)
    assert g.status_code == 200, g.text
    gid = g.json()["groupId"]
    ids += await _generation_ids(h, acme, gid)
    file_id = await upload(h, acme, 3)
    b = await h.client.post("/v1/batches", json=batch_body(file_id), headers=acme)
    assert b.status_code == 200, b.text
    bid = b.json()["id"]
    # the key was just used: cached as enabled
    assert (await h.client.get(f"/v1/generation/{ids[0]}", headers=acme)).status_code == 200

    t = await patch(h, admin, "acme", disabled=True)
    assert t["disabled"] is True and t["open_generations"] == 4
    refused = [
        await h.client.post(SLOW, json=chat(), headers=acme),
        await h.client.post(GROUP, json=group(2), headers=acme),
        await h.client.get(f"/v1/generation/{ids[0]}", headers=acme),
        await h.client.get(f"/v1/slow/group/{gid}", headers=acme),
        await h.client.post(REALTIME, json=chat(), headers=acme),
        await h.client.post(REALTIME, json={**chat(), "stream": True}, headers=acme),
        await h.client.get(f"/v1/batches/{bid}", headers=acme),
        await h.client.post("/v1/batches", json=batch_body(file_id), headers=acme),
        await h.client.get("/v1/usage", headers=acme),
    ]
    for r in refused:
        err = envelope(r, 403, code="tenant_disabled")
        assert "acme" in err["message"]
    assert await stored(h, "acme") == (4, 1, 1)
    beta_id = await submit(h, beta)

    engine = FakeBackend("fake")
    async with burst_services(db_url, tmp_path / "files", engine) as services:
        # the batch is loaded (its lines held), nothing of acme's runs
        await services.run_burst()
        assert [c[1]["messages"][0]["content"] for c in engine.calls] == ["q0"]  # beta's only
        for x in ids:
            assert (await h.state.store.generations.get("acme", x)).state.value == "Queued"
        assert await rows(h, "generations", "acme") == 7  # 4 + the batch's 3 lines
        beta_gen = (await h.client.get(f"/v1/generation/{beta_id}", headers=beta)).json()
        assert beta_gen["state"] == "Success"

        t = await patch(h, admin, "acme", disabled=False)
        assert t["disabled"] is False and t["disabled_at"] is None
        again = await h.client.get(f"/v1/generation/{ids[0]}", headers=acme)
        assert again.status_code == 200 and again.json()["state"] == "Queued"
        await services.run_burst()
        await services.run_burst()  # the batch finalizes once its lines are done
    assert len(engine.calls) == 1 + 4 + 3
    for x in ids:
        got = (await h.client.get(f"/v1/generation/{x}", headers=acme)).json()
        assert got["state"] == "Success"
    summary = (await h.client.get(f"/v1/slow/group/{gid}", headers=acme)).json()
    assert summary["status"] == "completed"
    batch = (await h.client.get(f"/v1/batches/{bid}", headers=acme)).json()
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    t = (await h.client.get("/v1/admin/tenants/acme", headers=admin)).json()
    assert t["open_generations"] == 0
    assert await stored(h, "acme") == (7, 1, 1)


# ---------------------------------------------------------------- usage


def _days() -> set[str]:
    today = datetime.now(UTC).date()
    return {today.isoformat(), (today - timedelta(days=1)).isoformat()}


async def _work(h: AppHarness, acme: Headers, beta: Headers) -> None:
    """acme: 2 slow, a group of 3, 2 realtime, a batch of 2; beta: 1 slow. Each answer 3 + 2
    tokens."""
    ids = [await submit(h, acme, i) for i in range(2)] + [await submit(h, beta)]
    g = await h.client.post(GROUP, json=group(3), headers=acme)
    assert g.status_code == 200, g.text
    b = await h.client.post("/v1/batches", json=batch_body(await upload(h, acme, 2)), headers=acme)
    assert b.status_code == 200, b.text
    for _ in range(2):
        assert (await h.client.post(REALTIME, json=chat(), headers=acme)).status_code == 200
    for gid in ids[:2]:
        await wait_done(h, acme, gid)
    await wait_done(h, beta, ids[2])

    async def finished() -> bool | None:
        s = (await h.client.get(f"/v1/slow/group/{g.json()['groupId']}", headers=acme)).json()
        bb = (await h.client.get(f"/v1/batches/{b.json()['id']}", headers=acme)).json()
        return True if s["status"] == "completed" and bb["status"] == "completed" else None

    await poll(finished, timeout=20)


def _row(lane: str | None, requests: int, **keys: Any) -> dict[str, Any]:
    return {
        "object": "usage",
        "day": None,
        "tenant": None,
        "model": None,
        "lane": lane,
        "requests": requests,
        "failed": 0,
        "prompt_tokens": 3 * requests,
        "completion_tokens": 2 * requests,
        "total_tokens": 5 * requests,
        **keys,
    }


async def test_usage_per_day_model_and_lane(make: Make) -> None:
    h = await make()
    acme, beta = await key_for(h, "acme"), await key_for(h, "beta")
    admin = await key_for(h, "ops", admin=True)
    await _work(h, acme, beta)

    async def flushed() -> dict[str, Any] | None:  # realtime usage is written every second
        u: dict[str, Any] = (await h.client.get("/v1/usage", headers=acme)).json()
        return u if u["total"]["requests"] == 9 else None

    report = await poll(flushed)
    assert report["object"] == "list" and report["group_by"] == ["day", "model", "lane"]
    assert report["end"] in _days()
    day = report["data"][0]["day"]
    assert day in _days()
    assert report["data"] == [
        _row("batch", 2, day=day, model=FAKE_MODEL),
        _row("group", 3, day=day, model=FAKE_MODEL),
        _row("realtime", 2, day=day, model=FAKE_MODEL),
        _row("slow", 2, day=day, model=FAKE_MODEL),
    ]
    assert report["total"] == _row(None, 9, tenant="acme")

    async def get(q: str, headers: Headers) -> list[dict[str, Any]]:
        r = await h.client.get(f"/v1/usage?{q}", headers=headers)
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data

    assert await get("group_by=lane", acme) == [
        _row("batch", 2),
        _row("group", 3),
        _row("realtime", 2),
        _row("slow", 2),
    ]
    assert await get("group_by=lane&lane=slow", acme) == [_row("slow", 2)]
    assert await get("group_by=model", acme) == [_row(None, 9, model=FAKE_MODEL)]
    assert await get("group_by=", acme) == [_row(None, 9)]
    assert await get("group_by=tenant,lane&lane=group", acme) == [_row("group", 3, tenant="acme")]
    assert await get("model=other-model", acme) == []
    assert await get("group_by=tenant&tenant=acme", acme) == [_row(None, 9, tenant="acme")]
    assert await get(f"start={day}&end={day}&group_by=day", beta) == [_row(None, 1, day=day)]
    # an admin key sees every tenant, or the one it names
    assert await get("group_by=tenant", admin) == [
        _row(None, 9, tenant="acme"),
        _row(None, 1, tenant="beta"),
    ]
    assert await get("group_by=tenant,lane&tenant=beta", admin) == [_row("slow", 1, tenant="beta")]
    everyone = (await h.client.get("/v1/usage?group_by=", headers=admin)).json()
    assert everyone["total"] == _row(None, 10)
    # a tenant key naming another tenant: not found
    r = await h.client.get("/v1/usage?tenant=beta", headers=acme)
    assert "beta" in envelope(r, 404)["message"]
    # days before the work: nothing
    assert await get("start=2020-01-01&end=2020-01-31", acme) == []


async def test_usage_counts_failures(make: Make, fake_backend: FakeBackend) -> None:
    h = await make()
    acme = await key_for(h, "acme")
    fake_backend.enqueue(BackendRejected("upstream HTTP 400: bad request", upstream_status=400))
    failed = await wait_done(h, acme, await submit(h, acme))
    assert failed["state"] == "Failed"
    fake_backend.enqueue(BackendRejected("upstream HTTP 400: bad request", upstream_status=400))
    r = await h.client.post(REALTIME, json=chat(), headers=acme)
    assert r.status_code == 400, r.text

    async def flushed() -> list[dict[str, Any]] | None:
        u = (await h.client.get("/v1/usage?group_by=lane", headers=acme)).json()
        data: list[dict[str, Any]] = u["data"]
        return data if len(data) == 2 else None

    expected = {"failed": 1, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert await poll(flushed) == [
        _row("realtime", 1, **expected),
        _row("slow", 1, **expected),
    ]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("start=2024-13-01", "start"),
        ("start=yesterday", "start"),
        ("end=2024-02-30", "end"),
        ("start=2024-03-02&end=2024-03-01", "start"),
        ("start=2020-01-01&end=2024-01-01", "start"),
        ("group_by=week", "group_by"),
        ("group_by=day,colour", "group_by"),
        ("lane=fast", "lane"),
    ],
)
async def test_usage_bad_parameters(harness_factory: Any, query: str, param: str) -> None:
    h: AppHarness = await harness_factory(auth="required", run_worker=False)
    acme = await key_for(h, "acme")
    bad_request(await h.client.get(f"/v1/usage?{query}", headers=acme), param)


async def test_usage_needs_a_key(harness_factory: Any) -> None:
    h: AppHarness = await harness_factory(auth="required", run_worker=False)
    await key_for(h, "acme")
    assert envelope(await h.client.get("/v1/usage"), 401)["type"] == "authentication_error"


# ---------------------------------------------------------------- metrics


async def _metric(h: AppHarness, name: str, want: dict[str, str], value: float) -> None:
    """Poll /metrics until ``name`` has the sample ``want`` at ``value`` (the worker counts just
    after its transaction commits)."""

    async def probe() -> bool | None:
        found = samples((await h.client.get("/metrics")).text, name)
        return True if found.get(tuple(sorted(want.items()))) == value else None

    await poll(probe)


async def test_usage_metrics_by_tenant_model_and_lane(make: Make) -> None:
    h = await make()
    acme, beta = await key_for(h, "acme"), await key_for(h, "beta")
    await _work(h, acme, beta)
    labels = {"tenant": "acme", "model": FAKE_MODEL}
    await _metric(h, "backburner_tokens_total", {**labels, "lane": "slow"}, 10.0)
    await _metric(h, "backburner_tokens_total", {**labels, "lane": "group"}, 15.0)
    await _metric(h, "backburner_tokens_total", {**labels, "lane": "realtime"}, 10.0)
    await _metric(h, "backburner_tokens_total", {**labels, "tenant": "beta", "lane": "slow"}, 5.0)
    await _metric(h, "backburner_tokens_total", {**labels, "lane": "batch"}, 10.0)
    await _metric(h, "backburner_usage_requests_total", {**labels, "lane": "group"}, 3.0)
    text = (await h.client.get("/metrics")).text
    for key in samples(text, "backburner_tokens_total"):
        assert {k for k, _ in key} == {"tenant", "model", "lane"}


async def test_usage_metrics_without_the_tenant_label(harness_factory: Any) -> None:
    h: AppHarness = await harness_factory(auth="required", metrics_tenant_label=False)
    acme, beta = await key_for(h, "acme"), await key_for(h, "beta")
    await _work(h, acme, beta)
    await _metric(h, "backburner_tokens_total", {"model": FAKE_MODEL, "lane": "slow"}, 15.0)
    await _metric(h, "backburner_tokens_total", {"model": FAKE_MODEL, "lane": "realtime"}, 10.0)
    await _metric(h, "backburner_usage_requests_total", {"model": FAKE_MODEL, "lane": "group"}, 3.0)
    text = (await h.client.get("/metrics")).text
    assert 'tenant="acme"' not in text and 'tenant="beta"' not in text
    found = samples(text, "backburner_tokens_total")
    assert found and all({k for k, _ in key} == {"model", "lane"} for key in found)


# ---------------------------------------------------------------- races


async def test_racing_submissions_take_exactly_the_places_left(make: Make) -> None:
    """30 submissions at once, through two apps on one database, with room for 5: exactly 5
    are stored."""
    h = await make(run_worker=False, limits={"max_queued_generations": 7})
    other = await make(run_worker=False, limits={"max_queued_generations": 7})
    acme = await key_for(h, "acme")
    for i in range(2):
        await submit(h, acme, i)
    apps = [h, other]
    answers = await asyncio.gather(
        *(apps[i % 2].client.post(SLOW, json=chat(i), headers=acme) for i in range(30))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 5 + [429] * 25, [r.text for r in answers if r.status_code >= 500]
    for r in answers:
        if r.status_code == 429:
            too_many(r, "max_queued_generations", 7, retry=True)
    assert await rows(h, "generations", "acme") == 7
    listed = {r.json()["id"] for r in answers if r.status_code == 200}
    for gid in listed:
        assert (await h.client.get(f"/v1/generation/{gid}", headers=acme)).status_code == 200


async def test_racing_groups_and_per_minute_limit(make: Make) -> None:
    """20 groups at once against requests_per_minute = 4: exactly 4 are stored."""
    h = await make(run_worker=False, limits={"requests_per_minute": 4})
    acme = await key_for(h, "acme")
    answers = await asyncio.gather(
        *(h.client.post(GROUP, json=group(2), headers=acme) for _ in range(20))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 4 + [429] * 16
    for r in answers:
        if r.status_code == 429:
            too_many(r, "requests_per_minute", 4, retry=True)
    assert await stored(h, "acme") == (8, 4, 0)
