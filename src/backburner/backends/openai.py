"""Any OpenAI-compatible server: vLLM, SGLang, llama.cpp server, Ollama, OpenAI, inference.net.

The upstream client is aiohttp: its connection pool hands out a kept-alive connection without
scanning the pool on every request (httpx/httpcore checks each pooled connection's socket per
request, which was the largest single cost of a passthrough), and JSON goes through orjson.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from backburner.backends.base import JSON
from backburner.config import BackendSettings
from backburner.core.states import Kind
from backburner.errors import BackendError, BackendRejected, BackendRetryable

PATHS = {
    Kind.CHAT: "chat/completions",
    Kind.COMPLETION: "completions",
    Kind.EMBEDDING: "embeddings",
}
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
JSON_HEADERS = {"Content-Type": "application/json"}
# what a stream may still send after ``data: [DONE]`` and be read to its end (so the connection
# goes back to the pool); more than this, and the connection is closed instead
AFTER_DONE_BYTES = 64 * 1024
MAX_LINE_BYTES = 64 * 1024 * 1024


def loads(data: bytes | str) -> Any:
    """JSON text as Python values: orjson, or the standard library for what orjson refuses
    and JSON allows (an escaped lone surrogate such as ``"\\udc80"``, which the store then
    refuses to keep as it is, without retrying). ``ValueError`` when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _error_message(status: int, reason: str, text: str) -> str:
    try:
        body = loads(text)
    except ValueError:
        body = None
    msg = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):
            msg = err
        msg = msg or body.get("message") or body.get("detail")
    return f"upstream HTTP {status}: {msg or text[:500] or reason}"


def error_for(status: int, text: str, reason: str = "") -> BackendError:
    msg = _error_message(status, reason, text)
    try:
        body: Any = loads(text)
    except ValueError:
        body = None
    if status >= 500 or status in RETRYABLE_STATUS:
        return BackendRetryable(msg, upstream_status=status, body=body)
    return BackendRejected(msg, upstream_status=status, body=body)


def _transport_error(exc: BaseException) -> BackendRetryable:
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's timeouts derive from it
        return BackendRetryable(f"upstream timeout: {type(exc).__name__}")
    return BackendRetryable(f"upstream connection error: {exc!r}")


TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


async def _error_from(resp: aiohttp.ClientResponse) -> BackendError:
    text = (await resp.read()).decode("utf-8", "replace")
    return error_for(resp.status, text, resp.reason or "")


class OpenAIBackend:
    def __init__(self, settings: BackendSettings) -> None:
        if not settings.base_url:
            raise ValueError(f"backend '{settings.name}': type 'openai' needs base_url")
        self.name = settings.name
        self._settings = settings
        self._base = settings.base_url.rstrip("/") + "/"
        self._client: aiohttp.ClientSession | None = None
        self._background: aiohttp.ClientSession | None = None

    def _new_client(self) -> aiohttp.ClientSession:
        s = self._settings
        headers = {}
        if s.api_key is not None:
            headers["Authorization"] = f"Bearer {s.api_key.get_secret_value()}"
        return aiohttp.ClientSession(
            headers=headers,
            # ``timeout_seconds`` bounds each wait for the engine's next bytes, not the whole
            # answer (a long generation streams for minutes)
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=s.timeout_seconds),
            connector=aiohttp.TCPConnector(
                limit=s.max_concurrency, limit_per_host=0, keepalive_timeout=30.0
            ),
            auto_decompress=True,
            raise_for_status=False,
            trust_env=False,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )

    async def start(self) -> None:
        # Realtime and background have a connection pool each, so background work that fills
        # its pool never makes a realtime request wait for a connection.
        if self._client is None:
            self._client = self._new_client()
            self._background = self._new_client()

    @property
    def client(self) -> aiohttp.ClientSession:
        if self._client is None:
            raise RuntimeError(f"backend '{self.name}' is not started")
        return self._client

    def _pool(self, background: bool) -> aiohttp.ClientSession:
        if background and self._background is not None:
            return self._background
        return self.client

    async def close(self) -> None:
        for client in (self._client, self._background):
            if client is not None:
                await client.close()
        self._client = self._background = None

    async def check(self) -> None:
        try:
            async with self.client.get(
                self._base + "models", timeout=aiohttp.ClientTimeout(total=5.0)
            ) as resp:
                await resp.read()
        except TRANSPORT_ERRORS as exc:
            raise BackendRetryable(f"backend '{self.name}' unreachable: {exc!r}") from exc
        if resp.status >= 500:
            raise BackendRetryable(f"backend '{self.name}' answered {resp.status}")

    async def run(self, kind: Kind, body: JSON, *, background: bool = False) -> JSON:
        priority = self._settings.background_priority
        if background and priority is not None and kind is not Kind.EMBEDDING:
            body = {**body, "priority": priority}
        try:
            async with self._pool(background).post(
                self._base + PATHS[kind], data=orjson.dumps(body), headers=JSON_HEADERS
            ) as resp:
                if resp.status >= 400:
                    raise await _error_from(resp)
                content = await resp.read()
        except TRANSPORT_ERRORS as exc:
            raise _transport_error(exc) from exc
        try:
            data = loads(content)
        except ValueError as exc:
            raise BackendRetryable("upstream answered with invalid JSON") from exc
        if not isinstance(data, dict):
            raise BackendRetryable("upstream answered with a non-object JSON body")
        return data

    async def stream(self, kind: Kind, body: JSON) -> AsyncIterator[JSON]:
        async for data in self.stream_raw(kind, body):
            yield loads(data)

    async def stream_raw(self, kind: Kind, body: JSON) -> AsyncIterator[bytes]:
        """The ``data:`` payloads of the engine's event stream as sent (JSON text), up to
        ``[DONE]``; the rest of the body is then read so the connection can be kept."""
        try:
            async with self.client.post(
                self._base + PATHS[kind], data=orjson.dumps(body), headers=JSON_HEADERS
            ) as resp:
                if resp.status >= 400:
                    raise await _error_from(resp)
                async for line in _lines(resp):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        await _finish(resp)
                        return
                    if data:
                        yield data
        except TRANSPORT_ERRORS as exc:
            raise _transport_error(exc) from exc


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body's lines as they arrive (any length up to ``MAX_LINE_BYTES``)."""
    pending = bytearray()
    async for chunk in resp.content.iter_any():
        pending += chunk
        end = pending.rfind(b"\n")
        if end < 0:
            if len(pending) > MAX_LINE_BYTES:
                raise BackendRetryable(f"upstream sent an event over {MAX_LINE_BYTES} bytes")
            continue
        lines = bytes(pending[:end]).split(b"\n")
        del pending[: end + 1]
        for line in lines:
            yield line
    if pending:
        yield bytes(pending)


async def _finish(resp: aiohttp.ClientResponse) -> None:
    """Read what follows ``[DONE]`` (normally nothing) so the connection is reused."""
    left = AFTER_DONE_BYTES
    while left > 0:
        chunk = await resp.content.readany()
        if not chunk:
            return
        left -= len(chunk)
    resp.close()
