"""The dashboard over HTTP, in-process: sign-in, CSRF, tenant scoping and every action."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_MODEL
from tests.integration.test_api_batches import MarkerBackend, jsonl, line

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def browser(h: Any) -> httpx.AsyncClient:
    """A client with its own cookie jar, as one browser."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app), base_url="http://testserver")


async def csrf(c: httpx.AsyncClient, page: str = "/ui/") -> str:
    r = await c.get(page)
    found = CSRF.search(r.text)
    assert found, r.text[:500]
    return found.group(1)


async def sign_in(c: httpx.AsyncClient, key: str) -> None:
    token = await csrf(c, "/ui/login")
    r = await c.post("/ui/login", data={"key": key, "csrf": token})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/ui/"


async def post(
    c: httpx.AsyncClient, path: str, page: str, *, own_form: bool = True, **data: str
) -> httpx.Response:
    """Send the form for ``path`` as ``page`` renders it: its own CSRF field, as a browser
    would. ``own_form=False``: the page has no such form (a forged request from a signed-in
    browser), so any valid token is used."""
    html = (await c.get(page)).text
    if own_form:
        found = re.search(
            rf'<form method="post" action="{re.escape(path)}"[^>]*>\s*'
            r'<input type="hidden" name="csrf" value="([^"]+)">',
            html,
        )
        assert found, f"no form for {path} on {page}"
        token = found.group(1)
    else:
        token = await csrf(c, page)
    return await c.post(path, data={"csrf": token, **data})


@pytest.fixture
async def keyed(harness_factory: Any, tmp_path: Any) -> Any:
    h = await harness_factory(
        auth="required",
        backend=MarkerBackend("fake", delay=0.02),
        files_dir=str(tmp_path / "f"),
        webhook_retry_schedule_seconds=[0.05, 0.1],
        webhook_poll_interval_seconds=0.02,
        webhook_allow_private=["127.0.0.0/8"],
    )
    _, h.key_a = await h.state.store.keys.create("team-a")
    _, h.key_b = await h.state.store.keys.create("team-b")
    _, h.key_admin = await h.state.store.keys.create("ops", admin=True)
    return h


async def wait_status(h: Any, batch_id: str, *statuses: str, timeout: float = 30) -> Any:
    tenant = await h.state.store.views.owner("batch", batch_id)
    async with asyncio.timeout(timeout):
        while True:
            b = await h.state.store.batches.get(tenant, batch_id)
            if b.status in statuses:
                return b.to_wire()
            await asyncio.sleep(0.02)


async def make_batch(h: Any, key: str, n: int) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    r = await h.client.post(
        "/v1/files",
        data={"purpose": "batch"},
        headers=auth,
        files={"file": ("in.jsonl", jsonl([line(i) for i in range(n)]), "application/jsonl")},
    )
    r = await h.client.post(
        "/v1/batches",
        headers=auth,
        json={
            "input_file_id": r.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


async def test_open_mode_on_loopback(harness_factory: Any) -> None:
    h = await harness_factory()
    r = await h.client.get("/ui/")
    assert r.status_code == 200
    assert "Overview" in r.text and FAKE_MODEL in r.text and "open (no keys)" in r.text
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    cookie = r.headers["set-cookie"].lower()
    assert "bb_csrf" in cookie and "samesite=strict" in cookie and "httponly" in cookie
    assert (await h.client.get("/ui/live")).status_code == 200
    js = await h.client.get("/ui/static/htmx.min.js")
    assert js.status_code == 200 and "htmx" in js.text[:2000]
    assert (await h.client.get("/ui", follow_redirects=False)).status_code == 307
    # a name that is not loopback is refused in open mode, as the API does
    other = httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app), base_url="http://evil.x")
    async with other:
        assert (await other.get("/ui/")).status_code == 403


async def test_sign_in_cookie_and_refusals(keyed: Any) -> None:
    h = keyed
    async with browser(h) as c:
        r = await c.get("/ui/batches")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/batches"
        token = await csrf(c, "/ui/login")
        # no CSRF token: refused before the key is even looked at
        r = await c.post("/ui/login", data={"key": h.key_a})
        assert r.status_code == 403 and "bb_key" not in r.headers.get("set-cookie", "")
        r = await c.post("/ui/login", data={"key": "sk-wrong", "csrf": token})
        assert r.status_code == 401 and "not valid" in r.text
        r = await c.post("/ui/login?next=//evil.x/", data={"key": h.key_a, "csrf": token})
        assert r.status_code == 303 and r.headers["location"] == "/ui/"
        cookie = r.headers["set-cookie"].lower()
        assert "bb_key=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        assert "path=/ui" in cookie
        r = await c.get("/ui/")
        assert r.status_code == 200 and "team-a" in r.text and "Keys" not in r.text
        assert (await c.get("/ui/keys")).status_code == 404  # not an admin
        # the API never reads the cookie
        assert (await c.get("/v1/batches")).status_code == 401
        r = await post(c, "/ui/logout", "/ui/")
        assert r.status_code == 303
        assert (await c.get("/ui/")).status_code == 303


async def test_tenants_never_see_each_other(keyed: Any) -> None:
    h = keyed
    bid_a = await make_batch(h, h.key_a, 3)
    bid_b = await make_batch(h, h.key_b, 2)
    r = await h.client.post(
        "/v1/slow/group/chat/completions",
        headers={"Authorization": f"Bearer {h.key_b}"},
        json={"requests": [{"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}]}]},
    )
    group_b = r.json()["groupId"]
    await wait_status(h, bid_a, "completed")
    b_batch = (
        await h.client.get(f"/v1/batches/{bid_b}", headers={"Authorization": f"Bearer {h.key_b}"})
    ).json()
    async with browser(h) as a, browser(h) as admin:
        await sign_in(a, h.key_a)
        await sign_in(admin, h.key_admin)
        page = (await a.get("/ui/batches")).text
        assert bid_a in page and bid_b not in page
        assert group_b not in (await a.get("/ui/groups")).text
        for path in (f"/ui/batches/{bid_b}", f"/ui/groups/{group_b}", f"/ui/find?q={bid_b}"):
            assert (await a.get(path)).status_code == 404
        r = await post(a, f"/ui/batches/{bid_b}/cancel", "/ui/", own_form=False)
        assert r.status_code == 404
        r = await a.get(f"/ui/files/{b_batch['input_file_id']}/content")
        assert r.status_code == 404
        # the admin sees both tenants, and narrows to one with ?tenant=
        page = (await admin.get("/ui/batches")).text
        assert bid_a in page and bid_b in page
        page = (await admin.get("/ui/batches?tenant=team-b")).text
        assert bid_a not in page and bid_b in page
        assert (await admin.get(f"/ui/groups/{group_b}")).status_code == 200
        r = await admin.get(f"/ui/find?q={bid_a}")
        assert r.status_code == 303 and r.headers["location"] == f"/ui/batches/{bid_a}"


async def test_batch_page_cancel_and_retry(keyed: Any) -> None:
    h = keyed
    bid = await make_batch(h, h.key_a, 120)
    await wait_status(h, bid, "in_progress")
    async with browser(h) as c:
        await sign_in(c, h.key_a)
        first = await c.get(f"/ui/batches/{bid}")
        assert first.status_code == 200 and "Cancel batch" in first.text
        assert 'hx-get="/ui/batches/' in first.text  # refreshes itself while it runs
        # a form sent from another site is refused and changes nothing
        token = await csrf(c, f"/ui/batches/{bid}")
        r = await c.post(
            f"/ui/batches/{bid}/cancel", data={"csrf": token}, headers={"Origin": "http://evil.x"}
        )
        assert r.status_code == 403
        r = await c.post(f"/ui/batches/{bid}/cancel", data={"csrf": "forged"})
        assert r.status_code == 403
        assert (await wait_status(h, bid, "in_progress", "finalizing"))["status"] != "cancelled"
        r = await post(c, f"/ui/batches/{bid}/cancel", f"/ui/batches/{bid}")
        assert r.status_code == 303 and r.headers["location"].startswith(f"/ui/batches/{bid}?")
        b = await wait_status(h, bid, "cancelled")
        page = (await c.get(f"/ui/batches/{bid}")).text
        assert "Retry failed requests" in page and "Download errors" in page
        err = await c.get(f"/ui/files/{b['error_file_id']}/content")
        assert err.status_code == 200 and "batch_cancelled" in err.text
        # a second cancel (from a page opened before the first) is a conflict, shown as a page
        assert "Cancel batch" not in page
        r = await post(c, f"/ui/batches/{bid}/cancel", f"/ui/batches/{bid}", own_form=False)
        assert r.status_code == 409 and "cancelled" in r.text
        r = await post(c, f"/ui/batches/{bid}/retry", f"/ui/batches/{bid}")
        assert r.status_code == 303
        b = await wait_status(h, bid, "completed")
        assert b["request_counts"]["completed"] == 120
        # the live part stops htmx polling once the batch is over (286)
        assert (await c.get(f"/ui/batches/{bid}/live")).status_code == 286
        page = (await c.get(f"/ui/batches/{bid}?start=100")).text
        assert "lines 101\u2013120 of 120" in page and "req-100" in page and "req-99<" not in page
        page = (await c.get(f"/ui/batches/{bid}?state=Failed")).text
        assert "No lines here." in page
        out = await c.get(f"/ui/files/{b['output_file_id']}/content")
        assert out.status_code == 200 and len(out.text.splitlines()) == 120


async def test_generation_page_and_redeliver(keyed: Any) -> None:
    h = keyed
    auth = {"Authorization": f"Bearer {h.key_a}"}
    # a receiver that is down: every attempt fails
    r = await h.client.post(
        "/v1/webhooks",
        headers=auth,
        json={"url": "http://127.0.0.1:9/hook", "name": "down"},
    )
    assert r.status_code in (200, 201), r.text
    hook = r.json()["id"]
    r = await h.client.post(
        "/v1/slow/chat/completions",
        headers=auth,
        json={
            "model": FAKE_MODEL,
            "messages": [{"role": "user", "content": "hello dashboard"}],
            "metadata": {"webhook_id": hook},
        },
    )
    gid = r.json()["id"]
    async with asyncio.timeout(20):
        while True:
            d = await h.state.store.views.deliveries("team-a", gid)
            if d and d[0].state == "failed":
                break
            await asyncio.sleep(0.05)
    async with browser(h) as c, browser(h) as b:
        await sign_in(c, h.key_a)
        await sign_in(b, h.key_b)
        page = (await c.get(f"/ui/generations/{gid}")).text
        assert "hello dashboard" in page and "State history" in page
        assert "generation.completed" in page and "Redeliver" in page
        assert (await b.get(f"/ui/generations/{gid}")).status_code == 404
        assert (await b.get(f"/ui/webhooks/{hook}")).status_code == 404
        event_id = d[0].id
        r = await post(b, f"/ui/deliveries/{event_id}/redeliver", "/ui/", own_form=False)
        assert r.status_code == 404
        r = await post(
            c,
            f"/ui/deliveries/{event_id}/redeliver",
            f"/ui/generations/{gid}",
            next=f"/ui/generations/{gid}",
        )
        assert r.status_code == 303 and r.headers["location"].startswith(f"/ui/generations/{gid}")
        async with asyncio.timeout(20):
            while True:
                d = await h.state.store.views.deliveries("team-a", gid)
                if len(d[0].attempts) > 2 and d[0].state == "failed":
                    break
                await asyncio.sleep(0.05)
        page = (await c.get(f"/ui/webhooks/{hook}")).text
        assert "Delivery log" in page and "generation.completed" in page
        r = await post(c, f"/ui/webhooks/{hook}/enable", f"/ui/webhooks/{hook}", enabled="false")
        assert r.status_code == 303
        assert (await h.state.store.webhooks.get("team-a", hook)).enabled is False
        r = await post(c, f"/ui/webhooks/{hook}/enable", f"/ui/webhooks/{hook}", enabled="true")
        assert (await h.state.store.webhooks.get("team-a", hook)).enabled is True
        r = await post(c, f"/ui/webhooks/{hook}/test", f"/ui/webhooks/{hook}")
        assert r.status_code == 303 and "Test+event" in r.headers["location"]


async def test_webhook_created_from_the_page(keyed: Any) -> None:
    h = keyed
    async with browser(h) as c, browser(h) as admin:
        await sign_in(c, h.key_a)
        await sign_in(admin, h.key_admin)
        r = await post(c, "/ui/webhooks/create", "/ui/webhooks", url="ftp://x")
        assert r.status_code == 400 and "url" in r.text
        assert await h.state.store.webhooks.list("team-a") == []
        r = await c.post(
            "/ui/webhooks/create",
            data={
                "csrf": await csrf(c, "/ui/webhooks"),
                "url": "http://127.0.0.1:9/a",
                "name": "mine",
                "events": ["slow-group.completed"],
            },
        )
        assert r.status_code == 200, r.text
        (hook,) = await h.state.store.webhooks.list("team-a")
        assert hook.name == "mine" and hook.events == ["slow-group.completed"]
        assert hook.secret in r.text  # shown once, on this answer
        assert hook.secret not in (await c.get("/ui/webhooks")).text
        assert hook.secret not in (await c.get(f"/ui/webhooks/{hook.id}")).text
        # an admin may create one in another tenant's name; a tenant key may not
        url = "http://127.0.0.1:9/b"
        r = await post(admin, "/ui/webhooks/create", "/ui/webhooks", url=url, tenant="team-b")
        assert r.status_code == 200
        assert len(await h.state.store.webhooks.list("team-b")) == 1
        r = await post(
            c, "/ui/webhooks/create", "/ui/webhooks", url="http://127.0.0.1:9/c", tenant="team-b"
        )
        assert len(await h.state.store.webhooks.list("team-b")) == 1
        page = (await admin.get("/ui/batches?tenant=team-b")).text
        assert "tenant team-b" in page and "status=completed&amp;tenant=team-b" in page


async def test_keys_page_creates_and_revokes(keyed: Any) -> None:
    h = keyed
    async with browser(h) as admin, browser(h) as c:
        await sign_in(admin, h.key_admin)
        page = (await admin.get("/ui/keys")).text
        assert "team-a" in page and "team-b" in page and "ops" in page
        r = await post(admin, "/ui/keys/create", "/ui/keys", tenant="team-c", name="ci")
        assert r.status_code == 200
        key = re.search(r'<div class="secret">([^<]+)</div>', r.text)
        assert key, r.text
        r = await post(admin, "/ui/keys/create", "/ui/keys", tenant="bad tenant!")
        assert r.status_code == 400 and "tenant" in r.text
        await sign_in(c, key.group(1))
        assert "team-c" in (await c.get("/ui/")).text
        kid = next(k["id"] for k in await h.state.store.keys.list() if k["tenant"] == "team-c")
        r = await post(admin, f"/ui/keys/{kid}/revoke", "/ui/keys")
        assert r.status_code == 303
        # revoked: signed out at once, in the dashboard and the API
        assert (await c.get("/ui/")).status_code == 303
        api = await h.client.get("/v1/batches", headers={"Authorization": f"Bearer {key.group(1)}"})
        assert api.status_code == 401


async def test_keys_page_disables_and_enables_a_tenant(keyed: Any) -> None:
    """Disable from the tenants table: the tenant's keys stop at once (dashboard and API), its
    queued work stays Queued; enable: the keys work again."""
    h = keyed
    auth = {"Authorization": f"Bearer {h.key_a}"}
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "held"}]}
    async with browser(h) as admin, browser(h) as c:
        await sign_in(admin, h.key_admin)
        await sign_in(c, h.key_a)
        page = (await admin.get("/ui/keys")).text
        assert 'action="/ui/tenants/team-a/enable"' in page and "Disable" in page
        r = await post(admin, "/ui/tenants/team-a/enable", "/ui/keys", enabled="false")
        assert r.status_code == 303
        assert (await h.state.store.tenants.get("team-a")).disabled
        assert (await c.get("/ui/")).status_code == 303  # signed out
        r = await h.client.post("/v1/slow/chat/completions", json=body, headers=auth)
        assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_disabled"
        page = (await admin.get("/ui/keys")).text
        assert "Enable" in page
        r = await post(admin, "/ui/tenants/team-a/enable", "/ui/keys", enabled="true")
        assert r.status_code == 303
        r = await h.client.post("/v1/slow/chat/completions", json=body, headers=auth)
        assert r.status_code == 200, r.text


async def test_overview_counts_open_work(harness_factory: Any, tmp_path: Any) -> None:
    h = await harness_factory(run_worker=False)
    for i in range(3):
        r = await h.client.post(
            "/v1/slow/chat/completions",
            json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": f"q{i}"}]},
        )
        assert r.status_code == 200
    r = await h.client.get("/ui/live")
    assert r.status_code == 200
    assert re.search(r'id="stat-queued">3<', r.text), r.text[:800]
    assert "<svg" in r.text and "Finished per minute" in r.text


async def test_every_page_on_both_stores(harness_factory: Any, db_url: str, tmp_path: Any) -> None:
    """Each page renders on SQLite and PostgreSQL with data in it, scoped to its tenant."""
    h = await harness_factory(
        db=db_url,
        auth="required",
        files_dir=str(tmp_path / "f"),
        webhook_allow_private=["127.0.0.0/8"],
    )
    _, key = await h.state.store.keys.create("solo")
    _, other = await h.state.store.keys.create("other")
    auth = {"Authorization": f"Bearer {key}"}
    bid = await make_batch(h, key, 5)
    r = await h.client.post(
        "/v1/slow/group/chat/completions",
        headers=auth,
        json={"requests": [{"model": FAKE_MODEL, "messages": [{"role": "user", "content": "g"}]}]},
    )
    group = r.json()["groupId"]
    hook = (
        await h.client.post("/v1/webhooks", headers=auth, json={"url": "http://127.0.0.1:9/h"})
    ).json()["id"]
    gid = (await h.state.store.views.lines(group_id=group))[0].id
    await wait_status(h, bid, "completed")
    pages = [
        "/ui/",
        "/ui/live",
        "/ui/groups",
        f"/ui/groups/{group}",
        "/ui/batches",
        f"/ui/batches/{bid}",
        f"/ui/batches/{bid}?state=Success&start=2",
        f"/ui/generations/{gid}",
        "/ui/webhooks",
        f"/ui/webhooks/{hook}",
    ]
    async with browser(h) as c, browser(h) as o:
        await sign_in(c, key)
        await sign_in(o, other)
        for page in pages:
            r = await c.get(page)
            assert r.status_code == 200, (page, r.text[:300])
            assert "Server-Timing" in r.headers
        assert bid in (await c.get("/ui/batches")).text
        assert group in (await c.get("/ui/groups")).text
        for page in pages[3:4] + pages[5:6] + pages[7:8] + pages[9:]:
            assert (await o.get(page)).status_code == 404, page
        for page in ("/ui/batches", "/ui/groups", "/ui/webhooks"):
            text = (await o.get(page)).text
            assert bid not in text and group not in text and hook not in text
