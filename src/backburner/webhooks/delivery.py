"""One webhook delivery attempt, over an injected ``httpx.AsyncClient``.

An attempt is: check the URL (scheme, host, and optionally that it is not a private address),
serialise the payload, send an ``OPTIONS`` readiness request, then ``POST`` the signed JSON.
Redirects are never followed. The outcome is an :class:`Attempt`; whether to try again is
decided here (``retryable``), when is :func:`next_delay`'s job (a fixed schedule of delays, by
default the Standard Webhooks one: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h), and the outbox
records both.

    2xx                          delivered
    410                          failed, never retried, endpoint disabled
    3xx, other 4xx               failed, never retried
    5xx, 408, 429                retried on the schedule (Retry-After may push an attempt later)
    timeout, connection error    retried on the schedule
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore
import httpx

from backburner.config import WEBHOOK_RETRY_SCHEDULE
from backburner.errors import InvalidRequest
from backburner.schemas.events import headers_for
from backburner.webhooks.signing import signature_headers

MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
USER_AGENT = "backburner-webhooks/1"
REDIRECT_ERROR = "redirects are not followed"

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostUnresolvable(InvalidRequest):
    """The webhook URL's host name could not be resolved."""

    retryable = True  # DNS failures are usually transient


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (``getaddrinfo`` in the loop's thread pool)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_public(addr: IPAddress) -> bool:
    """False for loopback, private, link-local, reserved, multicast and unspecified addresses."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is not None and not is_public(embedded):
            return False
        if addr.teredo is not None and not all(is_public(a) for a in addr.teredo):
            return False
    return addr.is_global and not (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_reserved
        or addr.is_multicast
        or addr.is_unspecified
    )


DenyPrivate = Callable[[], Awaitable[bool]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetPolicy:
    """Which addresses a webhook may reach. Public addresses always; addresses in ``allow``
    (networks an operator lists for private receivers) always; any other address (loopback,
    private, link-local, ...) only while ``deny_private()`` says no. The answer is asked each
    time, so it can change when the server stops running open (an API key is created)."""

    def __init__(self, deny_private: bool | DenyPrivate, allow: Sequence[IPNetwork] = ()) -> None:
        self._deny = deny_private
        self.allow = tuple(allow)

    async def private_denied(self) -> bool:
        return self._deny if isinstance(self._deny, bool) else await self._deny()

    def listed(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.allow)

    async def allows(self, addr: IPAddress) -> bool:
        return is_public(addr) or self.listed(addr) or not await self.private_denied()


class PrivateAddressRefused(httpcore.ConnectError):
    """The connection reached an address the policy refuses (a name that resolved, or was
    rebound, to an internal address after the URL was checked)."""


class _PeerCheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects as usual, then checks the address actually connected to before a byte is
    sent: a DNS answer that changed since the URL was checked cannot reach inside."""

    def __init__(self, policy: TargetPolicy, inner: httpcore.AsyncNetworkBackend) -> None:
        self._policy = policy
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore names it so)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        peer = stream.get_extra_info("server_addr")
        try:
            addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except (TypeError, ValueError, IndexError):
            await stream.aclose()
            raise PrivateAddressRefused(f"cannot tell which address {host} connected to") from None
        if not await self._policy.allows(addr):
            await stream.aclose()
            raise PrivateAddressRefused(
                f"{host} connected to {addr}, a private or internal address"
            )
        return stream

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore names it so)
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise PrivateAddressRefused("webhooks are never sent to a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(policy: TargetPolicy, *, max_connections: int) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection is checked against ``policy`` once it is made
    (the address connected to, not the one a separate lookup returned)."""
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=max_connections))
    # httpx takes no network backend itself; its pool does. Same pool settings, checked backend.
    transport._pool = httpcore.AsyncConnectionPool(
        max_connections=max_connections,
        network_backend=_PeerCheckedBackend(policy, httpcore.AnyIOBackend()),
    )
    return transport


class UrlGuard:
    """Refuses URLs a webhook must not be sent to: not http(s), no host, or (by ``policy``) a
    host that resolves to an internal address. ``deny_private`` may be a plain bool."""

    def __init__(self, deny_private: bool | TargetPolicy, resolver: Resolver | None = None) -> None:
        self.policy = (
            deny_private if isinstance(deny_private, TargetPolicy) else TargetPolicy(deny_private)
        )
        self._resolve = resolver or resolve

    async def check(self, url: str) -> None:
        """Raise :class:`InvalidRequest` (``param="url"``) when ``url`` is not allowed."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidRequest(f"url is not a valid URL: {exc}", param="url") from exc
        if parsed.scheme not in ("http", "https"):
            raise InvalidRequest("url must start with http:// or https://", param="url")
        host = parsed.host
        if not host:
            raise InvalidRequest("url must name a host", param="url")
        if not await self.policy.private_denied():
            return
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        for addr in await self._addresses(host.rstrip("."), port):
            if not await self.policy.allows(addr):
                raise InvalidRequest(
                    f"url must not point to a private or internal address ({host} is {addr})",
                    param="url",
                )

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            found = await self._resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise HostUnresolvable(f"url host {host!r} cannot be resolved", param="url") from exc
        if not found:
            raise HostUnresolvable(f"url host {host!r} cannot be resolved", param="url")
        # Scoped IPv6 results look like "fe80::1%eth0"; the scope is irrelevant to the check.
        return [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]


@dataclass
class Attempt:
    """What one delivery attempt did; the outbox logs it and decides what happens next."""

    status_code: int | None
    duration_ms: int
    error: str | None = None
    delivered: bool = False
    retryable: bool = False
    retry_after: float | None = None
    disable_endpoint: bool = False


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None when unusable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN, infinities
        return None
    return max(0.0, seconds)


def next_delay(
    attempt: int,
    retry_after: float | None,
    schedule: Sequence[float] = WEBHOOK_RETRY_SCHEDULE,
    *,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait after the ``attempt``-th failed try (1-based); None once the schedule is
    spent (``len(schedule) + 1`` attempts in all).

    The schedule's delay for that attempt, scaled by a random factor in ``1 +- jitter``, but never
    sooner than the receiver's ``Retry-After``; ``Retry-After`` counts up to the schedule's longest
    delay, so a receiver can push an attempt later but cannot park it for days.
    """
    if attempt < 1 or attempt > len(schedule):
        return None
    r = rng.random() if rng is not None else random.random()
    delay = schedule[attempt - 1] * (1 + jitter * (2 * r - 1))
    if retry_after is not None:
        delay = max(delay, min(retry_after, max(schedule)))
    return float(max(0.0, delay))


def _classify(status: int, retry_after: float | None, ms: int) -> Attempt:
    if 200 <= status < 300:
        return Attempt(status, ms, delivered=True)
    if 300 <= status < 400:
        return Attempt(status, ms, error=REDIRECT_ERROR)
    if status == 410:
        return Attempt(status, ms, error="HTTP 410 Gone: endpoint disabled", disable_endpoint=True)
    retryable = status >= 500 or status in (408, 429) or status < 200
    return Attempt(status, ms, error=f"HTTP {status}", retryable=retryable, retry_after=retry_after)


class Deliverer:
    """Makes delivery attempts with a shared client; holds no state between attempts."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        guard: UrlGuard,
        timeout: float = 30.0,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        self.client = client
        self.guard = guard
        self.timeout = timeout
        self.max_payload_bytes = max_payload_bytes

    async def deliver(
        self,
        url: str,
        secret: str | None,
        message_id: str,
        payload: dict[str, Any],
        timestamp: datetime,
    ) -> Attempt:
        """One attempt: OPTIONS, then the signed POST. Never raises for delivery failures."""
        started = time.monotonic()

        def failed(error: str, retryable: bool, status: int | None = None) -> Attempt:
            return Attempt(status, _ms(started), error=error, retryable=retryable)

        try:
            await self.guard.check(url)
        except InvalidRequest as exc:
            return failed(exc.message, exc.retryable)
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(body) > self.max_payload_bytes:
            return failed(
                f"payload is {len(body)} bytes, over the {self.max_payload_bytes}-byte limit",
                False,
            )
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **headers_for(payload),
            # a batch's webhook_url has no registered secret: its deliveries carry the
            # message id and timestamp but no signature
            **(
                signature_headers(secret, message_id, timestamp, body)
                if secret
                else {
                    "webhook-id": message_id,
                    "webhook-timestamp": str(int(timestamp.timestamp())),
                }
            ),
        }
        try:
            # Readiness: any HTTP answer (even 404/405) lets the POST go ahead.
            await self._send("OPTIONS", url, {"User-Agent": USER_AGENT}, None)
        except (httpx.HTTPError, TimeoutError) as exc:
            if isinstance(exc.__cause__, PrivateAddressRefused):  # final: a retry reaches it too
                return failed(f"refused: {exc.__cause__}", False)
            return failed(f"OPTIONS readiness check failed: {_describe(exc, self.timeout)}", True)
        try:
            status, retry_after_header = await self._send("POST", url, headers, body)
        except (httpx.TransportError, TimeoutError) as exc:  # timeouts, connection errors
            return failed(_describe(exc, self.timeout), True)
        except httpx.HTTPError as exc:  # e.g. an invalid URL httpx refuses
            return failed(_describe(exc, self.timeout), False)
        return _classify(status, parse_retry_after(retry_after_header), _ms(started))

    async def _send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, str | None]:
        """Status and Retry-After of one request; the response body is never read."""
        async with (
            asyncio.timeout(self.timeout),
            self.client.stream(
                method,
                url,
                headers=headers,
                content=body,
                follow_redirects=False,
                timeout=self.timeout,
            ) as response,
        ):
            return response.status_code, response.headers.get("Retry-After")


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {exc or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
