"""webhooks.delivery over an ``httpx.MockTransport`` that plays the receiver.

The transport's handler records every request the Deliverer sends and answers per path, or raises
the transport error a real connection would (``httpx.ReadTimeout``, ``httpx.ConnectError``), so
the Deliverer's classification is checked without a server. One test connects for real, to a
closed port on 127.0.0.1, because "connection refused" is what the operating system says.

Network rule: traffic only ever goes to 127.0.0.1 (MockTransport contacts nothing). URL guard
tests use IP literals and "localhost" only, and the guard resolves names without connecting.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from backburner.errors import InvalidRequest
from backburner.schemas import events
from backburner.webhooks.delivery import (
    USER_AGENT,
    Attempt,
    Deliverer,
    HostUnresolvable,
    UrlGuard,
    parse_retry_after,
)
from backburner.webhooks.signing import new_secret

WAIT = 10.0  # upper bound on any wait in this module
BASE = "http://127.0.0.1:9"  # never contacted: the mock transport answers


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """The handler of an ``httpx.MockTransport``: a scriptable webhook endpoint.

    Paths: ``/status/<code>`` answers that code (OPTIONS gets 405), with a Location for redirects
    and ``Retry-After: 7`` for 429 and 503; ``/retry-after-date`` is 429 with an HTTP-date
    Retry-After two minutes ahead; ``/hang`` never answers a POST; anything else is 200 (OPTIONS
    204). ``failures`` maps a method to the transport error its requests raise instead.
    """

    seen: list[Seen] = field(default_factory=list)
    failures: dict[str, httpx.TransportError] = field(default_factory=dict)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        self.seen.append(Seen(method, path, dict(request.headers), request.content))
        if method in self.failures:
            raise self.failures[method]
        if method == "OPTIONS":
            return httpx.Response(405 if path.startswith("/status/") else 204)
        headers: dict[str, str] = {}
        status = 200
        if path.startswith("/status/"):
            status = int(path.removeprefix("/status/"))
            if status in (301, 302, 307, 308):
                headers["Location"] = f"{BASE}/ok"
            if status in (429, 503):
                headers["Retry-After"] = "7"
        elif path == "/retry-after-date":
            status = 429
            when = datetime.now(UTC) + timedelta(seconds=120)
            headers["Retry-After"] = format_datetime(when, usegmt=True)
        elif path == "/hang":
            await asyncio.Event().wait()  # only the Deliverer's own deadline ends this
        return httpx.Response(status, headers=headers, content=b"ok")

    def methods(self) -> list[str]:
        return [s.method for s in self.seen]

    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
async def client(receiver: Receiver) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as c:
        yield c


@pytest.fixture
def deliverer(client: httpx.AsyncClient) -> Deliverer:
    return Deliverer(client, UrlGuard(deny_private=False), timeout=5.0)


SECRET = new_secret()
NOW = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
PAYLOAD = events.webhook_test("WH_test", NOW)


async def send(
    d: Deliverer, url: str, payload: dict[str, Any] | None = None, secret: str | None = SECRET
) -> Attempt:
    async with asyncio.timeout(WAIT):
        return await d.deliver(url, secret, "evt_1", payload or PAYLOAD, datetime.now(UTC))


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
    attempt = await send(deliverer, f"{BASE}/hook", payload)
    assert attempt.delivered and attempt.status_code == 200
    assert attempt.error is None and not attempt.retryable and not attempt.disable_endpoint
    assert attempt.duration_ms >= 0

    assert [(s.method, s.path) for s in receiver.seen] == [("OPTIONS", "/hook"), ("POST", "/hook")]
    options, post = receiver.seen
    assert options.body == b"" and options.headers["user-agent"] == USER_AGENT
    assert "webhook-signature" not in options.headers
    assert post.headers["content-type"] == "application/json"
    assert post.headers["user-agent"] == USER_AGENT
    assert post.headers["x-inference-event"] == "generation.completed"
    assert post.headers["x-inference-webhook-id"] == "WH1"
    assert post.headers["x-inference-generation-id"] == "GEN1"
    assert post.headers["webhook-id"] == "evt_1"
    assert post.headers["webhook-signature"].startswith("v1,")
    assert json.loads(post.body) == payload
    assert "✓".encode() in post.body  # UTF-8, not \u escapes
    assert b", " not in post.body and b": " not in post.body  # compact
    assert Webhook(SECRET).verify(post.body, post.headers) == payload


async def test_without_secret_carries_id_and_timestamp_but_no_signature(
    receiver: Receiver, deliverer: Deliverer
) -> None:
    before = int(datetime.now(UTC).timestamp())
    assert (await send(deliverer, f"{BASE}/batch-hook", secret=None)).delivered
    post = receiver.posts()[0]
    assert post.headers["webhook-id"] == "evt_1"
    assert before <= int(post.headers["webhook-timestamp"]) <= before + int(WAIT)
    assert "webhook-signature" not in post.headers


async def test_group_headers(receiver: Receiver, deliverer: Deliverer) -> None:
    payload = {"event": "slow-group.completed", "webhook_id": "WH2", "group_id": "GRP", "data": {}}
    assert (await send(deliverer, f"{BASE}/g", payload)).delivered
    post = receiver.posts()[0]
    assert post.headers["x-inference-group-id"] == "GRP"
    assert "x-inference-generation-id" not in post.headers


async def test_options_refusal_still_posts(receiver: Receiver, deliverer: Deliverer) -> None:
    # /status/202 answers OPTIONS with 405; the POST must still go.
    attempt = await send(deliverer, f"{BASE}/status/202")
    assert attempt.delivered and attempt.status_code == 202
    assert receiver.methods() == ["OPTIONS", "POST"]


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
    attempt = await send(deliverer, f"{BASE}/status/{code}")
    assert attempt.status_code == code
    assert not attempt.delivered
    assert attempt.retryable is retryable
    assert attempt.disable_endpoint is disable
    assert attempt.error
    assert receiver.methods() == ["OPTIONS", "POST"]


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_redirects_are_not_followed(
    receiver: Receiver, deliverer: Deliverer, code: int
) -> None:
    attempt = await send(deliverer, f"{BASE}/status/{code}")
    assert attempt.status_code == code
    assert not attempt.delivered and not attempt.retryable
    assert attempt.error == "redirects are not followed"
    assert [s.path for s in receiver.seen] == [f"/status/{code}"] * 2  # never /ok


async def test_retry_after_seconds(deliverer: Deliverer) -> None:
    attempt = await send(deliverer, f"{BASE}/status/503")
    assert attempt.retryable and attempt.retry_after == 7.0


async def test_retry_after_http_date(deliverer: Deliverer) -> None:
    attempt = await send(deliverer, f"{BASE}/retry-after-date")
    assert attempt.retryable and attempt.status_code == 429
    assert attempt.retry_after is not None and 100 < attempt.retry_after <= 121


async def test_timeout_is_retryable(receiver: Receiver, client: httpx.AsyncClient) -> None:
    receiver.failures["POST"] = httpx.ReadTimeout("timed out")
    d = Deliverer(client, UrlGuard(deny_private=False), timeout=0.3)
    attempt = await send(d, f"{BASE}/hook")
    assert not attempt.delivered and attempt.retryable
    assert attempt.status_code is None
    assert attempt.error == "timed out after 0.3s"
    assert receiver.methods() == ["OPTIONS", "POST"]


async def test_receiver_that_never_answers_meets_the_deadline(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    # The transport applies no timeout of its own: the Deliverer's deadline must end the wait.
    d = Deliverer(client, UrlGuard(deny_private=False), timeout=0.05)
    attempt = await send(d, f"{BASE}/hang")
    assert not attempt.delivered and attempt.retryable
    assert attempt.status_code is None
    assert attempt.error == "timed out after 0.05s"
    assert 40 <= attempt.duration_ms < WAIT * 1000
    assert receiver.methods() == ["OPTIONS", "POST"]


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (httpx.ReadTimeout("timed out"), "timed out after 5s"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "connection failed: [Errno 111]"),
    ],
)
async def test_options_transport_failure_is_retryable_and_posts_nothing(
    receiver: Receiver, deliverer: Deliverer, failure: httpx.TransportError, error: str
) -> None:
    receiver.failures["OPTIONS"] = failure
    attempt = await send(deliverer, f"{BASE}/hook")
    assert not attempt.delivered and attempt.retryable and attempt.status_code is None
    assert attempt.error is not None
    assert attempt.error.startswith(f"OPTIONS readiness check failed: {error}")
    assert receiver.methods() == ["OPTIONS"]


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), "connection failed: [Errno 111]"),
        (httpx.RemoteProtocolError("peer closed connection"), "RemoteProtocolError: peer"),
    ],
)
async def test_post_transport_failure_is_retryable(
    receiver: Receiver, deliverer: Deliverer, failure: httpx.TransportError, error: str
) -> None:
    receiver.failures["POST"] = failure
    attempt = await send(deliverer, f"{BASE}/hook")
    assert not attempt.delivered and attempt.retryable and attempt.status_code is None
    assert attempt.error is not None and attempt.error.startswith(error)
    assert receiver.methods() == ["OPTIONS", "POST"]


async def test_connection_refused_is_retryable() -> None:
    # A real connection: the refusal comes from the operating system, on 127.0.0.1 only.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before we connect: nothing listens
    async with httpx.AsyncClient() as real:
        d = Deliverer(real, UrlGuard(deny_private=False), timeout=5.0)
        attempt = await send(d, f"http://127.0.0.1:{port}/hook")
    assert not attempt.delivered and attempt.retryable
    assert attempt.status_code is None
    assert attempt.error is not None and "OPTIONS" in attempt.error
    assert "connection failed" in attempt.error


async def test_payload_over_limit_is_refused(receiver: Receiver, client: httpx.AsyncClient) -> None:
    d = Deliverer(client, UrlGuard(deny_private=False), max_payload_bytes=1000)
    payload = {"event": "webhook.test", "data": {"x": "é" * 600}}  # 1200 bytes of UTF-8
    attempt = await send(d, f"{BASE}/hook", payload)
    assert not attempt.delivered and not attempt.retryable
    assert attempt.error is not None and "limit" in attempt.error
    assert receiver.seen == []


async def test_guard_refusal_sends_nothing(receiver: Receiver, client: httpx.AsyncClient) -> None:
    d = Deliverer(client, UrlGuard(deny_private=True))
    attempt = await send(d, f"{BASE}/hook")
    assert not attempt.delivered and not attempt.retryable and attempt.status_code is None
    assert attempt.error is not None and "private" in attempt.error
    bad = await send(d, "ftp://127.0.0.1/hook")
    assert not bad.retryable and bad.error is not None and "http" in bad.error
    assert receiver.seen == []


async def test_unresolvable_host_is_retryable(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    async def no_dns(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    d = Deliverer(client, UrlGuard(deny_private=True, resolver=no_dns))
    attempt = await send(d, "https://hooks.example.test/x")
    assert not attempt.delivered and attempt.retryable and attempt.status_code is None
    assert attempt.error is not None and "cannot be resolved" in attempt.error
    assert receiver.seen == []


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


# --------------------------------------------------------------------------- Retry-After
# (next_delay, the retry schedule, is tested in test_webhook_schedule.py)


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 3 ", now) == 3.0
    assert parse_retry_after("Tue, 20 Jan 2026 12:01:30 GMT", now) == 90.0
    assert parse_retry_after("Tue, 20 Jan 2026 11:00:00 GMT", now) == 0.0  # past: now
    assert parse_retry_after("-5", now) == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk, now) is None
