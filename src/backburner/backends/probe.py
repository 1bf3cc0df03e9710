"""Engine load probes: read an engine's own load signals over HTTP.

A probe only reads; the :class:`~backburner.backends.lane.Lane` polls it (about every 250 ms) and
hands the result to the admission controller, which treats a failed or stale probe as busy.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from backburner.backends.signals import EngineLoad, parse_signals

ENGINES = ("vllm", "sglang", "llamacpp", "generic")


class Probe(Protocol):
    url: str

    async def read(self) -> EngineLoad: ...


def default_metrics_url(engine: str, base_url: str) -> str:
    """``base_url`` without its ``/v1``, plus ``/metrics`` (``/slots`` for a llama.cpp server,
    which serves it without extra flags)."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root + ("/slots" if engine == "llamacpp" else "/metrics")


class HttpProbe:
    """GET one URL and parse it with the engine's parser."""

    def __init__(
        self, engine: str, url: str, client: httpx.AsyncClient, *, timeout: float = 1.0
    ) -> None:
        if engine not in ENGINES or engine == "generic":
            raise ValueError(f"no HTTP probe for engine '{engine}'")
        self.engine = engine
        self.url = url
        self._client = client
        self._timeout = timeout

    async def read(self) -> EngineLoad:
        resp = await self._client.get(self.url, timeout=self._timeout)
        if resp.status_code != 200:
            raise ValueError(f"{self.url} answered HTTP {resp.status_code}")
        return parse_signals(self.engine, resp.text)
