"""Acceptance: the dashboard in a real headless Chromium against a real ``backburner serve``
(SQLite) and the upstream stub: sign-in, the overview refreshing itself while a batch drains,
cancelling a batch, redelivering a failed webhook, tenant isolation and the admin's view, with a
full-page screenshot of every page and no console error (a CSP violation is one) anywhere."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Error,
    Page,
    Response,
    ViewportSize,
    expect,
    sync_playwright,
)

from tests.support import procs

pytestmark = pytest.mark.acceptance

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1360, "height": 900}
MODEL = procs.UPSTREAM_MODEL
BATCH_LINES = 1500  # ~30 ms each, 4 at a time upstream: several seconds to drain


# ---------------------------------------------------------------------- the server
@dataclass
class Server:
    base_url: str
    team_a: str
    team_b: str
    admin: str
    shots: Path

    def api(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30.0
        )


def _key(cfg: Path, tenant: str, *extra: str) -> str:
    out = procs.run_cli("keys", "create", "--tenant", tenant, *extra, "--config", str(cfg))
    return out.strip().splitlines()[-1].strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("dashboard")
    shots = Path(os.environ.get("BB_SCREENSHOT_DIR") or work / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    started: list[procs.Proc] = []
    try:
        up = procs.start_upstream(work, latency_ms=30)
        started.append(up)
        cfg = procs.write_config(
            work / "backburner.toml",
            f"sqlite:///{work}/bb.db",
            upstream_url=up.base_url,
            max_concurrency=4,
            poll_interval_seconds=0.05,
            files_dir=str(work / "files"),
            webhook_retry_schedule_seconds=[0.2, 0.5],
            webhook_poll_interval_seconds=0.05,
            webhook_allow_private=["127.0.0.0/8"],
        )
        team_a = _key(cfg, "team-a")
        team_b = _key(cfg, "team-b")
        admin = _key(cfg, "ops", "--admin")
        srv = procs.start_serve(cfg, work)
        started.append(srv)
        yield Server(srv.base_url, team_a, team_b, admin, shots)
    finally:
        for p in reversed(started):
            procs.kill(p)


def chat(text: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}]}


def submit_batch(api: httpx.Client, n: int, tag: str) -> str:
    lines = [
        {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions"}
        | {"body": chat(f"{tag} {i}")}
        for i in range(n)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    r = api.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", data, "application/jsonl")},
    )
    assert r.status_code == 200, r.text
    r = api.post(
        "/v1/batches",
        json={
            "input_file_id": r.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"description": f"{tag}: {n} lines"},
        },
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def poll(what: str, check: Callable[[], Any], timeout: float = 20.0, every: float = 0.1) -> Any:
    """Call ``check`` until it returns something truthy; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def draining(server: Server) -> str:
    """team-a's big batch, submitted when a test first asks for it (it drains for a while)."""
    with server.api(server.team_a) as api:
        return submit_batch(api, BATCH_LINES, "drain")


# ---------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        msg = f"{CHROMIUM} is not installed: the dashboard's browser tests cannot run"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class UI:
    """Browser contexts (each its own cookie jar, as one person) and what their pages logged."""

    browser: Browser
    server: Server
    contexts: list[BrowserContext] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def page(self, key: str | None = None) -> Page:
        ctx = self.browser.new_context(viewport=VIEWPORT, base_url=self.server.base_url)
        ctx.set_default_timeout(15_000)
        self.contexts.append(ctx)
        page = ctx.new_page()
        page.on("console", lambda msg: self._console(page, msg))
        page.on("pageerror", lambda exc: self.errors.append(f"{page.url}: uncaught {exc}"))
        # cancel and revoke ask first (data-confirm): this person says yes, and it is recorded
        page.on("dialog", self._dialog)
        if key is not None:
            sign_in(page, key)
        return page

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept()

    def _console(self, page: Page, msg: ConsoleMessage) -> None:
        if msg.type == "error" and not any(p.search(msg.text) for p in self.allowed):
            self.errors.append(f"{page.url}: {msg.text}")

    def allow(self, pattern: str) -> None:
        """A console error a test expects (an error page's own status)."""
        self.allowed.append(re.compile(pattern))

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=str(self.server.shots / f"{name}.png"), full_page=True)

    def assert_clean(self) -> None:
        assert self.errors == [], "console errors:\n" + "\n".join(self.errors)


@pytest.fixture
def ui(chromium: Browser, server: Server) -> Iterator[UI]:
    u = UI(chromium, server)
    try:
        yield u
    finally:
        for ctx in u.contexts:
            with contextlib.suppress(Error):
                ctx.close()


def sign_in(page: Page, key: str) -> None:
    page.goto("/ui/login")
    page.locator('input[name="key"]').fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/ui/$"))


def heading(page: Page) -> str:
    return page.locator("main h1").inner_text()


# ---------------------------------------------------------------------- the tests
@pytest.mark.timeout(60)
def test_sign_in_with_a_key(ui: UI, server: Server) -> None:
    ui.allow(r"status of 401")  # the wrong key's answer is a 401 page
    page = ui.page()
    page.goto("/ui/batches")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui/batches$"))
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    ui.shot(page, "login")

    page.locator('input[name="key"]').fill("bb-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("That key is not valid")
    assert page.context.cookies() and all(c["name"] != "bb_key" for c in page.context.cookies())

    page.locator('input[name="key"]').fill(server.team_a)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/ui/batches$"))  # back where sign-in was asked for
    expect(page.locator("header .who")).to_contain_text("team-a")
    expect(page.locator("header nav")).not_to_contain_text("Keys")
    key_cookie = next(c for c in page.context.cookies() if c["name"] == "bb_key")
    assert key_cookie["httpOnly"] and key_cookie["sameSite"] == "Strict"

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/ui/login"))
    page.goto("/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui/$"))
    ui.assert_clean()


@pytest.mark.timeout(90)
def test_overview_refreshes_itself_while_a_batch_drains(
    ui: UI, server: Server, draining: str
) -> None:
    page = ui.page(server.team_a)
    navigations: list[str] = []
    live: list[Response] = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    page.on("response", lambda r: live.append(r) if "/ui/live" in r.url else None)
    page.goto("/ui/")
    expect(page.locator("#queue")).to_contain_text(MODEL)
    queued = page.locator("#stat-queued")
    finished = page.locator("#stat-finished")
    first = (queued.inner_text(), finished.inner_text())

    # no reload: only htmx's 2-second refresh of #live can change what is shown
    def shown() -> tuple[str, str]:
        page.wait_for_timeout(250)
        return queued.inner_text(), finished.inner_text()

    poll("the overview's numbers to move", lambda: shown() != first, timeout=20)
    assert navigations == [page.url], navigations
    assert live and all(r.status == 200 for r in live)
    # the queue drains: the finished count keeps rising
    done = finished.inner_text()
    poll("the finished count to rise again", lambda: shown()[1] != done, timeout=20)
    assert int(re.sub(r"\D", "", finished.inner_text()) or 0) > 0
    ui.shot(page, "overview")
    ui.assert_clean()


@pytest.mark.timeout(90)
def test_cancel_a_running_batch_from_its_page(ui: UI, server: Server, draining: str) -> None:
    with server.api(server.team_a) as api:

        def started() -> str:
            status = str(api.get(f"/v1/batches/{draining}").json()["status"])
            return "" if status == "validating" else status

        status = poll("the batch to start", started)
        assert status == "in_progress", f"the batch is {status}: it drained too fast to cancel"
        page = ui.page(server.team_a)
        page.goto("/ui/batches")
        row = page.locator("#batches tr", has_text=draining)
        expect(row).to_contain_text("in_progress")
        ui.shot(page, "batches")
        row.get_by_role("link", name=draining).click()
        expect(page).to_have_url(re.compile(f"/ui/batches/{draining}$"))
        expect(page.locator("#batch-status")).to_have_text("in_progress")
        expect(page.locator("#batch-counts")).to_contain_text(f"{BATCH_LINES:,} total")
        ui.shot(page, "batch")

        page.get_by_role("button", name="Cancel batch").click()
        assert any("Cancel this batch?" in d for d in ui.dialogs), ui.dialogs
        expect(page.get_by_role("status")).to_have_text(
            re.compile(r"Batch (cancelling|cancelled)\.")
        )
        expect(page.locator("#batch-status")).to_have_text(re.compile(r"cancell(ing|ed)"))
        assert api.get(f"/v1/batches/{draining}").json()["status"] in ("cancelling", "cancelled")
        # the page follows the batch to its end by itself, and offers a retry of what never ran
        expect(page.locator("#batch-status")).to_have_text("cancelled", timeout=20_000)
        expect(page.get_by_role("button", name="Retry failed requests")).to_be_visible()
        expect(page.get_by_role("button", name="Cancel batch")).to_have_count(0)
        b = api.get(f"/v1/batches/{draining}").json()
        assert b["status"] == "cancelled"
        assert 0 < b["request_counts"]["completed"] < BATCH_LINES
    ui.assert_clean()


class _Hooks(BaseHTTPRequestHandler):
    """A webhook receiver: answers OPTIONS and POST with 200 and keeps each POST's body."""

    bodies: list[bytes]
    arrived: threading.Event

    def do_OPTIONS(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        self._answer()
        self.arrived.set()

    def _answer(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.timeout(90)
def test_redeliver_a_failed_webhook(ui: UI, server: Server) -> None:
    port = procs.free_port()  # nothing listens here yet: every attempt fails
    with server.api(server.team_a) as api:
        r = api.post(
            "/v1/webhooks",
            json={"url": f"http://127.0.0.1:{port}/hook", "name": "down, then up"},
        )
        assert r.status_code in (200, 201), r.text
        hook = str(r.json()["id"])
        r = api.post(
            "/v1/slow/chat/completions",
            json=chat("hello dashboard") | {"metadata": {"webhook_id": hook}},
        )
        assert r.status_code == 200, r.text
        gid = str(r.json()["id"])

        def failed() -> list[dict[str, Any]]:
            log: list[dict[str, Any]] = api.get(f"/v1/webhooks/{hook}/deliveries").json()["data"]
            return log if any(a["deliveryState"] == "failed" for a in log) else []

        log = poll("the delivery to fail", failed, timeout=30)
        assert all(a["statusCode"] is None for a in log)

    page = ui.page(server.team_a)
    page.goto(f"/ui/webhooks/{hook}")
    attempts = page.locator("#attempts")
    expect(attempts).to_contain_text("generation.completed")
    expect(attempts.locator(".pill", has_text="failed").first).to_be_visible()

    _Hooks.bodies, _Hooks.arrived = [], threading.Event()
    receiver = ThreadingHTTPServer(("127.0.0.1", port), _Hooks)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        page.get_by_role("button", name="Redeliver").first.click()
        expect(page).to_have_url(re.compile(f"/ui/webhooks/{hook}\\?notice="))
        expect(page.get_by_role("status")).to_contain_text("queued for delivery again")
        assert _Hooks.arrived.wait(20), "the receiver got no POST"
        event = json.loads(_Hooks.bodies[0])
        assert "generation.completed" in json.dumps(event) and gid in json.dumps(event)
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(5)

    def delivered() -> bool:
        page.reload()
        return attempts.locator(".pill.ok", has_text="200").count() > 0

    poll("the delivery log to show the 200", delivered, timeout=15, every=0.3)
    expect(attempts.locator(".pill", has_text="delivered").first).to_be_visible()
    ui.shot(page, "webhook")

    page.get_by_role("link", name="Webhooks", exact=True).click()
    expect(page.locator("#webhooks")).to_contain_text(hook)
    expect(page.locator("#webhooks")).to_contain_text("down, then up")
    ui.shot(page, "webhooks")

    page.goto(f"/ui/generations/{gid}")
    expect(page.locator("main h1")).to_contain_text("Success")
    expect(page.locator("#history")).to_contain_text("Success")
    expect(page.locator("main")).to_contain_text("hello dashboard")
    expect(page.locator("main")).to_contain_text("generation.completed")
    expect(page.get_by_role("link", name=hook).first).to_be_visible()
    ui.shot(page, "generation")
    ui.assert_clean()


@pytest.mark.timeout(60)
def test_group_pages(ui: UI, server: Server) -> None:
    with server.api(server.team_a) as api:
        r = api.post(
            "/v1/slow/group/chat/completions",
            json={"requests": [chat(f"group line {i}") for i in range(8)]},
        )
        assert r.status_code == 200, r.text
        group = str(r.json()["groupId"])
    page = ui.page(server.team_a)
    page.goto("/ui/groups")
    row = page.locator("#groups tr", has_text=group)
    expect(row).to_be_visible()

    def complete() -> bool:
        page.reload()
        return "completed" in row.inner_text()

    poll("the group to complete", complete, timeout=20, every=0.3)
    expect(row).to_contain_text("8/8")
    ui.shot(page, "groups")
    row.get_by_role("link", name=group).click()
    expect(page).to_have_url(re.compile(f"/ui/groups/{group}$"))
    expect(page.locator("main h1")).to_contain_text("completed")
    expect(page.locator("main")).to_contain_text("8 succeeded")
    expect(page.locator("main table a.mono")).to_have_count(8)
    ui.shot(page, "group")
    ui.assert_clean()


@pytest.mark.timeout(90)
def test_tenants_see_only_their_own_and_the_admin_sees_all(
    ui: UI, server: Server, draining: str
) -> None:
    ui.allow(r"status of 404")  # the not-found pages are 404s, on purpose
    with server.api(server.team_b) as api:
        bid_b = submit_batch(api, 3, "team-b")

    a = ui.page(server.team_a)
    a.goto(f"/ui/batches/{draining}")
    gen_link = a.locator("main table a.mono").first
    gen_a = gen_link.inner_text()
    gen_link.click()
    expect(a).to_have_url(re.compile(f"/ui/generations/{gen_a}$"))
    expect(a.locator("main h1")).to_contain_text(gen_a)
    a.goto("/ui/keys")
    assert heading(a) == "Not found"
    expect(a.locator("header nav")).not_to_contain_text("Keys")

    b = ui.page(server.team_b)
    for path in (
        f"/ui/batches/{draining}",
        f"/ui/generations/{gen_a}",
        f"/ui/find?q={draining}",
        "/ui/keys",
    ):
        r = b.goto(path)
        assert r is not None and r.status == 404, path
        assert heading(b) == "Not found", path
        expect(b.get_by_role("alert")).to_be_visible()
    b.goto("/ui/batches")
    expect(b.locator("#batches")).to_contain_text(bid_b)
    assert draining not in b.locator("main").inner_text()
    b.goto("/ui/")
    expect(b.locator("header .who")).to_contain_text("team-b")

    admin = ui.page(server.admin)
    expect(admin.locator("header .who")).to_contain_text("all tenants · admin")
    admin.get_by_role("link", name="Batches", exact=True).click()
    table = admin.locator("#batches")
    expect(table).to_contain_text(draining)
    expect(table).to_contain_text(bid_b)
    expect(table.locator("tr", has_text=draining)).to_contain_text("team-a")
    expect(table.locator("tr", has_text=bid_b)).to_contain_text("team-b")
    admin.goto(f"/ui/batches/{bid_b}")
    expect(admin.locator("main h1")).to_contain_text(bid_b)
    admin.get_by_role("link", name="Keys", exact=True).click()
    expect(admin).to_have_url(re.compile(r"/ui/keys$"))
    tenants = admin.locator("#tenants")
    for tenant in ("team-a", "team-b", "ops"):
        expect(tenants).to_contain_text(tenant)
    expect(admin.locator("#keys tr")).to_have_count(4)  # a header row and three keys
    ui.shot(admin, "keys")
    ui.assert_clean()
