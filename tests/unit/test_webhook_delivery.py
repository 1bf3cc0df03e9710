"""webhooks.delivery against a real HTTP receiver on 127.0.0.1 (uvicorn, in-process).

Network rule: traffic only ever goes to 127.0.0.1. URL guard tests use IP literals and
"localhost" only, and the guard resolves names without connecting anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook

from backburner.errors import InvalidRequest
from backburner.schemas import events
from backburner.webhooks.delivery import (
    Attempt,
    Deliverer,
    HostUnresolvable,
    UrlGuard,
    next_delay,
    parse_retry_after,
)
from backburner.webhooks.signing import new_secret

WAIT = 10.0  # upper bound on any wait in this module


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A scriptable webhook endpoint. Paths: /status/<code>, /slow, /retry-after-date."""

    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    base: str = ""

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        self.seen.append(Seen(method, path, headers, body))

        status, extra = 200, []
        if method == "OPTIONS":
            status = 405 if path.startswith("/status/") else 204
        elif path.startswith("/status/"):
            status = int(path.removeprefix("/status/"))
            if status in (301, 302, 307, 308):
                extra.append((b"location", f"{self.base}/ok".encode()))
            if status in (429, 503):
                extra.append((b"retry-after", b"7"))
        elif path == "/retry-after-date":
            status = 429
            when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
            extra.append((b"retry-after", when.encode()))
        elif path == "/slow":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), WAIT)
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": b"ok"})

    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = Receiver()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    app.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    # The socket already listens: connections made before uvicorn accepts wait in its backlog.
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield app
    finally:
        app.release.set()
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)
        sock.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


@pytest.fixture
def deliverer(client: httpx.AsyncClient) -> Deliverer:
    return Deliverer(client, UrlGuard(deny_private=False), timeout=5.0)


SECRET = new_secret()
NOW = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
PAYLOAD = events.webhook_test("WH_test", NOW)


async def send(d: Deliverer, url: str, payload: dict[str, Any] | None = None) -> Attempt:
    return await d.deliver(url, SECRET, "evt_1", payload or PAYLOAD, datetime.now(UTC))


# --------------------------------------------------------------------------- delivery


async def test_delivered_options_first_headers_and_signature(
    receiver: Receiver, deliverer: Deliverer
) -> None:
    payload = {
        "event": "generation.completed",
        "timestamp": "2026-01-20T12:00:00.000Z",
        "webhook_id": "WH1",
        "webhookId": "WH1",
        "generation_id": "GEN1",
        "generationId": "GEN1",
        "data": {"state": "Success", "stateMessage": "Completed", "text": "héllo ✓"},
    }
    attempt = await send(deliverer, f"{receiver.base}/hook", payload)
    assert attempt.delivered and attempt.status_code == 200
    assert attempt.error is None and not attempt.retryable and not attempt.disable_endpoint
    assert attempt.duration_ms >= 0

    assert [(s.method, s.path) for s in receiver.seen] == [("OPTIONS", "/hook"), ("POST", "/hook")]
    post = receiver.seen[1]
    assert post.headers["content-type"] == "application/json"
    assert post.headers["x-inference-event"] == "generation.completed"
    assert post.headers["x-inference-webhook-id"] == "WH1"
    assert post.headers["x-inference-generation-id"] == "GEN1"
    assert post.headers["webhook-id"] == "evt_1"
    assert post.headers["webhook-signature"].startswith("v1,")
    assert json.loads(post.body) == payload
    assert "✓".encode() in post.body  # UTF-8, not \u escapes
    assert b", " not in post.body and b": " not in post.body  # compact
    assert Webhook(SECRET).verify(post.body, post.headers) == payload


async def test_group_headers(receiver: Receiver, deliverer: Deliverer) -> None:
    payload = {"event": "slow-group.completed", "webhook_id": "WH2", "group_id": "GRP", "data": {}}
    assert (await send(deliverer, f"{receiver.base}/g", payload)).delivered
    post = receiver.posts()[0]
    assert post.headers["x-inference-group-id"] == "GRP"
    assert "x-inference-generation-id" not in post.headers


async def test_options_refusal_still_posts(receiver: Receiver, deliverer: Deliverer) -> None:
    # /status/202 answers OPTIONS with 405; the POST must still go.
    attempt = await send(deliverer, f"{receiver.base}/status/202")
    assert attempt.delivered and attempt.status_code == 202
    assert [s.method for s in receiver.seen] == ["OPTIONS", "POST"]


@pytest.mark.parametrize(
    ("code", "retryable", "disable"),
    [
        (500, True, False),
        (502, True, False),
        (503, True, False),
        (408, True, False),
        (429, True, False),
        (400, False, False),
        (401, False, False),
        (404, False, False),
        (422, False, False),
        (410, False, True),
    ],
)
async def test_status_outcomes(
    receiver: Receiver, deliverer: Deliverer, code: int, retryable: bool, disable: bool
) -> None:
    attempt = await send(deliverer, f"{receiver.base}/status/{code}")
    assert attempt.status_code == code
    assert not attempt.delivered
    assert attempt.retryable is retryable
    assert attempt.disable_endpoint is disable
    assert attempt.error


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_redirects_are_not_followed(
    receiver: Receiver, deliverer: Deliverer, code: int
) -> None:
    attempt = await send(deliverer, f"{receiver.base}/status/{code}")
    assert attempt.status_code == code
    assert not attempt.delivered and not attempt.retryable
    assert attempt.error == "redirects are not followed"
    assert all(s.path != "/ok" for s in receiver.seen)


async def test_retry_after_seconds(receiver: Receiver, deliverer: Deliverer) -> None:
    attempt = await send(deliverer, f"{receiver.base}/status/503")
    assert attempt.retryable and attempt.retry_after == 7.0


async def test_retry_after_http_date(receiver: Receiver, deliverer: Deliverer) -> None:
    attempt = await send(deliverer, f"{receiver.base}/retry-after-date")
    assert attempt.retryable and attempt.status_code == 429
    assert attempt.retry_after is not None and 100 < attempt.retry_after <= 121


async def test_timeout_is_retryable(receiver: Receiver, client: httpx.AsyncClient) -> None:
    d = Deliverer(client, UrlGuard(deny_private=False), timeout=0.3)
    async with asyncio.timeout(WAIT):
        attempt = await send(d, f"{receiver.base}/slow")
    assert not attempt.delivered and attempt.retryable
    assert attempt.status_code is None
    assert attempt.error is not None and "timed out" in attempt.error
    assert 250 <= attempt.duration_ms < 5000
    assert [s.method for s in receiver.seen] == ["OPTIONS", "POST"]


async def test_connection_refused_is_retryable(deliverer: Deliverer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before we connect: nothing listens
    async with asyncio.timeout(WAIT):
        attempt = await send(deliverer, f"http://127.0.0.1:{port}/hook")
    assert not attempt.delivered and attempt.retryable
    assert attempt.status_code is None
    assert attempt.error is not None and "OPTIONS" in attempt.error


async def test_payload_over_limit_is_refused(receiver: Receiver, client: httpx.AsyncClient) -> None:
    d = Deliverer(client, UrlGuard(deny_private=False), max_payload_bytes=1000)
    payload = {"event": "webhook.test", "data": {"x": "é" * 600}}  # 1200 bytes of UTF-8
    attempt = await send(d, f"{receiver.base}/hook", payload)
    assert not attempt.delivered and not attempt.retryable
    assert attempt.error is not None and "limit" in attempt.error
    assert receiver.seen == []


async def test_guard_refusal_sends_nothing(receiver: Receiver, client: httpx.AsyncClient) -> None:
    d = Deliverer(client, UrlGuard(deny_private=True))
    attempt = await send(d, f"{receiver.base}/hook")
    assert not attempt.delivered and not attempt.retryable and attempt.status_code is None
    assert attempt.error is not None and "private" in attempt.error
    bad = await send(d, "ftp://127.0.0.1/hook")
    assert not bad.retryable and bad.error is not None and "http" in bad.error
    assert receiver.seen == []


async def test_unresolvable_host_is_retryable(client: httpx.AsyncClient) -> None:
    async def no_dns(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    d = Deliverer(client, UrlGuard(deny_private=True, resolver=no_dns))
    attempt = await send(d, "https://hooks.example.test/x")
    assert not attempt.delivered and attempt.retryable and attempt.status_code is None


# --------------------------------------------------------------------------- URL guard


async def numeric_only(host: str, port: int) -> list[str]:
    """Resolve numeric host forms only (AI_NUMERICHOST): never a DNS query."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    return [str(i[4][0]) for i in infos]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "gopher://8.8.8.8/",
        "http:///nohost",
        "not a url",
        "",
    ],
)
@pytest.mark.parametrize("deny_private", [True, False])
async def test_guard_refuses_bad_urls(url: str, deny_private: bool) -> None:
    with pytest.raises(InvalidRequest) as info:
        await UrlGuard(deny_private, resolver=numeric_only).check(url)
    assert info.value.param == "url"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:8000/",
        "http://127.1.2.3/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",  # carrier-grade NAT
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://255.255.255.255/",
        "http://[::1]/",
        "http://[::]/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "http://[ff02::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[2002:a00:1::]/",  # 6to4 wrapping 10.0.0.1
        "https://2130706433/",  # 127.0.0.1 written as one number
        "https://0x7f.1/",
    ],
)
async def test_guard_refuses_private_addresses(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await UrlGuard(deny_private=True, resolver=numeric_only).check(url)
    assert info.value.param == "url"
    assert not isinstance(info.value, HostUnresolvable)


async def test_guard_refuses_localhost_by_name() -> None:
    # The real resolver: "localhost" comes from the hosts file, no connection is made.
    with pytest.raises(InvalidRequest) as info:
        await UrlGuard(deny_private=True).check("http://localhost:8080/hook")
    assert info.value.param == "url"
    assert "private" in info.value.message


async def test_guard_refuses_names_resolving_inside() -> None:
    async def rebinding(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.1.2.3"]  # one internal address is enough to refuse

    with pytest.raises(InvalidRequest):
        await UrlGuard(deny_private=True, resolver=rebinding).check("https://hooks.example.test/")


async def test_guard_unresolvable_name() -> None:
    async def nothing(host: str, port: int) -> list[str]:
        return []

    with pytest.raises(HostUnresolvable) as info:
        await UrlGuard(deny_private=True, resolver=nothing).check("https://nowhere.example.test/")
    assert info.value.retryable and info.value.param == "url"


@pytest.mark.parametrize(
    "url",
    [
        "https://8.8.8.8/hook",
        "http://93.184.216.34:8080/x?y=1",
        "https://[2001:4860:4860::8888]/hook",
    ],
)
async def test_guard_accepts_public_addresses(url: str) -> None:
    await UrlGuard(deny_private=True, resolver=numeric_only).check(url)  # no connection made


async def test_guard_accepts_public_names() -> None:
    seen: list[tuple[str, int]] = []

    async def public(host: str, port: int) -> list[str]:
        seen.append((host, port))
        return ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]

    await UrlGuard(deny_private=True, resolver=public).check("https://Hooks.Example.test/x")
    assert seen == [("hooks.example.test", 443)]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/hook", "http://localhost/hook", "http://[::1]:9/", "http://10.0.0.1/"],
)
async def test_guard_allows_private_when_not_denied(url: str) -> None:
    await UrlGuard(deny_private=False).check(url)


# --------------------------------------------------------------------------- backoff


def test_next_delay_grows_with_jitter_and_cap() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        raw = min(300.0, 2.0 ** (attempt - 1))
        d = next_delay(attempt, None, rng=rng)
        assert raw * 0.5 <= d <= raw
    assert next_delay(30, None) <= 300.0
    assert next_delay(3, None, base=0.0) == 0.0
    assert len({next_delay(5, None) for _ in range(20)}) > 1  # jittered


def test_next_delay_honours_retry_after_within_cap() -> None:
    assert next_delay(1, 42.0) == 42.0
    assert next_delay(1, 10_000.0) == 300.0
    assert next_delay(1, 10_000.0, cap=60.0) == 60.0
    assert next_delay(10, 0.5, rng=random.Random(1)) >= 0.5 * 2**9 * 0.5


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 3 ", now) == 3.0
    assert parse_retry_after("Tue, 20 Jan 2026 12:01:30 GMT", now) == 90.0
    assert parse_retry_after("Tue, 20 Jan 2026 11:00:00 GMT", now) == 0.0  # past: now
    assert parse_retry_after("-5", now) == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk, now) is None
