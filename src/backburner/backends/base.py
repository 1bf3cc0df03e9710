"""The backend protocol every inference engine implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from backburner.core.states import Kind

JSON = dict[str, Any]


@runtime_checkable
class Backend(Protocol):
    """An inference engine. ``run`` raises :class:`backburner.errors.BackendError` subclasses."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self) -> None:
        """Raise if the engine cannot serve now (used by /readyz)."""

    async def run(self, kind: Kind, body: JSON, *, background: bool = False) -> JSON:
        """One request, answered with the OpenAI response object. ``background`` marks slow
        work: an engine may run it at a lower priority or pause it for realtime requests."""

    def stream(self, kind: Kind, body: JSON) -> AsyncIterator[JSON]:
        """One request with ``stream: true``: yields the OpenAI chunk objects."""


def upstream_body(body: JSON, engine_model: str) -> JSON:
    """The body an engine receives: the client's, with the engine's model name and without
    backburner's own ``metadata`` (which is stored and echoed, not an engine parameter)."""
    out = {k: v for k, v in body.items() if k != "metadata"}
    out["model"] = engine_model
    return out
