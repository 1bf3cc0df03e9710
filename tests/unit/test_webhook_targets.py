"""Which addresses webhooks may reach: the policy, the URL check, and the connected peer."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from backburner.config import Settings
from backburner.errors import InvalidRequest
from backburner.services import webhook_targets
from backburner.store import Store
from backburner.webhooks.delivery import (
    PrivateAddressRefused,
    TargetPolicy,
    UrlGuard,
    guarded_transport,
)

LOOPBACK = ipaddress.ip_address("127.0.0.1")
PUBLIC = ipaddress.ip_address("93.184.216.34")
INTERNAL = ipaddress.ip_address("10.20.3.4")


async def test_policy_allows_public_listed_and_open_mode_private() -> None:
    closed = TargetPolicy(True, [ipaddress.ip_network("10.20.0.0/16")])
    assert await closed.allows(PUBLIC)
    assert await closed.allows(INTERNAL)  # listed
    assert not await closed.allows(LOOPBACK)
    assert await TargetPolicy(False).allows(LOOPBACK)


async def test_open_mode_ends_when_a_key_is_created(sqlite_store: Store, tmp_path: Path) -> None:
    settings = Settings(database_url=sqlite_store.url, host="127.0.0.1")
    policy = webhook_targets(settings, sqlite_store)
    assert not await policy.private_denied()  # a laptop with its receiver on localhost
    await sqlite_store.keys.create("acme")
    policy = webhook_targets(settings, sqlite_store)
    assert await policy.private_denied()  # keys in use: behind a proxy, loopback means nothing
    listed = Settings(database_url=sqlite_store.url, webhook_allow_private=["127.0.0.0/8"])
    assert await webhook_targets(listed, sqlite_store).allows(LOOPBACK)


def test_allow_list_must_be_networks() -> None:
    with pytest.raises(ValueError, match="not a network"):
        Settings(webhook_allow_private=["intranet"])


async def test_url_check_uses_the_policy() -> None:
    async def resolves_inside(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    guard = UrlGuard(TargetPolicy(True), resolver=resolves_inside)
    with pytest.raises(InvalidRequest, match="private"):
        await guard.check("https://rebind.example.test/hook")
    open_guard = UrlGuard(TargetPolicy(False), resolver=resolves_inside)
    await open_guard.check("https://rebind.example.test/hook")


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP listener on 127.0.0.1 that records what it receives and answers 200."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        received.append(data)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, family=socket.AF_INET)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, received


async def test_a_connection_to_a_refused_address_sends_nothing(
    listener: tuple[int, list[bytes]],
) -> None:
    """The check runs on the address connected to, after DNS: whatever a name resolved to when
    the URL was checked, nothing is sent to an address the policy refuses."""
    port, received = listener
    async with httpx.AsyncClient(
        transport=guarded_transport(TargetPolicy(True), max_connections=4)
    ) as client:
        with pytest.raises(httpx.ConnectError, match="private or internal"):
            await client.post(f"http://127.0.0.1:{port}/hook", content=b"secret payload")
    await asyncio.sleep(0.05)
    assert all(b"secret payload" not in data for data in received)


async def test_an_allowed_peer_is_reached(listener: tuple[int, list[bytes]]) -> None:
    port, received = listener
    policy = TargetPolicy(True, [ipaddress.ip_network("127.0.0.0/8")])
    async with httpx.AsyncClient(transport=guarded_transport(policy, max_connections=4)) as client:
        r = await client.post(f"http://127.0.0.1:{port}/hook", content=b"payload")
    assert r.status_code == 200
    assert any(b"payload" in data for data in received)


def test_refusal_is_a_connect_error() -> None:
    assert issubclass(PrivateAddressRefused, Exception)


async def test_delivery_to_a_refused_peer_fails_for_good(
    listener: tuple[int, list[bytes]],
) -> None:
    from datetime import UTC, datetime

    from backburner.webhooks.delivery import Deliverer

    port, received = listener
    policy = TargetPolicy(True)

    async def no_check(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]  # the name looked public when the URL was checked

    async with httpx.AsyncClient(transport=guarded_transport(policy, max_connections=4)) as client:
        deliverer = Deliverer(client, UrlGuard(policy, resolver=no_check), timeout=5.0)
        attempt = await deliverer.deliver(
            f"http://localhost:{port}/hook",  # the lookup here says public; the connection is not
            None,
            "msg_1",
            {"event": "webhook.test"},
            datetime.now(UTC),
        )
    assert not attempt.delivered and not attempt.retryable
    assert attempt.error is not None and attempt.error.startswith("refused:")
    assert "private or internal" in attempt.error
    assert all(b"webhook.test" not in data for data in received)
