"""Any OpenAI-compatible server: vLLM, SGLang, llama.cpp server, Ollama, OpenAI, inference.net."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

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


def _error_message(resp: httpx.Response, text: str) -> str:
    try:
        body = json.loads(text)
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
    return f"upstream HTTP {resp.status_code}: {msg or text[:500] or resp.reason_phrase}"


def error_for(resp: httpx.Response, text: str) -> BackendError:
    msg = _error_message(resp, text)
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = None
    if resp.status_code >= 500 or resp.status_code in RETRYABLE_STATUS:
        return BackendRetryable(msg, upstream_status=resp.status_code, body=body)
    return BackendRejected(msg, upstream_status=resp.status_code, body=body)


class OpenAIBackend:
    def __init__(
        self, settings: BackendSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        if not settings.base_url:
            raise ValueError(f"backend '{settings.name}': type 'openai' needs base_url")
        self.name = settings.name
        self._settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._background: httpx.AsyncClient | None = None

    def _new_client(self) -> httpx.AsyncClient:
        s = self._settings
        headers = {}
        if s.api_key is not None:
            headers["Authorization"] = f"Bearer {s.api_key.get_secret_value()}"
        return httpx.AsyncClient(
            base_url=(s.base_url or "").rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(s.timeout_seconds, connect=10.0),
            limits=httpx.Limits(
                # a larger pool only costs time (httpcore scans it on every request)
                max_connections=s.max_concurrency,
                max_keepalive_connections=s.max_concurrency,
            ),
            transport=self._transport,
            follow_redirects=False,
        )

    async def start(self) -> None:
        # Realtime and background have a connection pool each, so background work that fills
        # its pool never makes a realtime request wait for a connection.
        if self._client is None:
            self._client = self._new_client()
            self._background = self._new_client()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError(f"backend '{self.name}' is not started")
        return self._client

    def _pool(self, background: bool) -> httpx.AsyncClient:
        if background and self._background is not None:
            return self._background
        return self.client

    async def close(self) -> None:
        for client in (self._client, self._background):
            if client is not None:
                await client.aclose()
        self._client = self._background = None

    async def check(self) -> None:
        try:
            resp = await self.client.get("models", timeout=5.0)
        except httpx.HTTPError as exc:
            raise BackendRetryable(f"backend '{self.name}' unreachable: {exc!r}") from exc
        if resp.status_code >= 500:
            raise BackendRetryable(f"backend '{self.name}' answered {resp.status_code}")

    async def run(self, kind: Kind, body: JSON, *, background: bool = False) -> JSON:
        priority = self._settings.background_priority
        if background and priority is not None and kind is not Kind.EMBEDDING:
            body = {**body, "priority": priority}
        try:
            resp = await self._pool(background).post(PATHS[kind], json=body)
        except httpx.TimeoutException as exc:
            raise BackendRetryable(f"upstream timeout: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise BackendRetryable(f"upstream connection error: {exc!r}") from exc
        if resp.status_code >= 400:
            raise error_for(resp, resp.text)
        try:
            data = resp.json()
        except ValueError as exc:
            raise BackendRetryable("upstream answered with invalid JSON") from exc
        if not isinstance(data, dict):
            raise BackendRetryable("upstream answered with a non-object JSON body")
        return data

    async def stream(self, kind: Kind, body: JSON) -> AsyncIterator[JSON]:
        try:
            async with self.client.stream("POST", PATHS[kind], json=body) as resp:
                if resp.status_code >= 400:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    raise error_for(resp, text)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    if data:
                        yield json.loads(data)
        except httpx.TimeoutException as exc:
            raise BackendRetryable(f"upstream timeout: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise BackendRetryable(f"upstream connection error: {exc!r}") from exc
