"""Which backend serves which public model, and each backend's capacity gate."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from backburner.backends.base import JSON, Backend, upstream_body
from backburner.backends.capacity import CapacityGate
from backburner.config import BackendSettings
from backburner.core.states import Kind
from backburner.errors import InvalidRequest


@dataclass
class Route:
    backend: Backend
    gate: CapacityGate
    engine_model: str


class ModelRouter:
    def __init__(
        self, settings: Sequence[BackendSettings], backends: Mapping[str, Backend]
    ) -> None:
        self.backends = dict(backends)
        self.gates = {s.name: CapacityGate(s.max_concurrency) for s in settings}
        self.routes: dict[str, Route] = {}
        for s in settings:
            for public, engine in s.model_map().items():
                if public not in self.routes:  # the first backend listed for a model serves it
                    self.routes[public] = Route(self.backends[s.name], self.gates[s.name], engine)
        self.models_by_backend: dict[str, list[str]] = {
            s.name: [m for m, r in self.routes.items() if r.backend is self.backends[s.name]]
            for s in settings
        }

    @property
    def models(self) -> list[str]:
        return sorted(self.routes)

    def route(self, model: str) -> Route:
        r = self.routes.get(model)
        if r is None:
            served = ", ".join(self.models) or "none"
            raise InvalidRequest(
                f"model '{model}' is not served here; available models: {served}",
                param="model",
                code="model_not_found",
            )
        return r

    def check_model(self, model: str) -> None:
        self.route(model)

    async def start(self) -> None:
        for b in self.backends.values():
            await b.start()

    async def close(self) -> None:
        for b in self.backends.values():
            await b.close()

    @staticmethod
    def _public(resp: JSON, model: str) -> JSON:
        if "model" in resp:
            resp["model"] = model
        return resp

    async def run(self, kind: Kind, body: JSON) -> JSON:
        """Run without touching the gate (the caller holds a slot)."""
        model = str(body["model"])
        r = self.route(model)
        return self._public(await r.backend.run(kind, upstream_body(body, r.engine_model)), model)

    async def run_realtime(self, kind: Kind, body: JSON) -> JSON:
        r = self.route(str(body["model"]))
        await r.gate.acquire_realtime()
        try:
            return await self.run(kind, body)
        finally:
            r.gate.release()

    async def stream_realtime(self, kind: Kind, body: JSON) -> AsyncGenerator[JSON, None]:
        model = str(body["model"])
        r = self.route(model)
        await r.gate.acquire_realtime()
        try:
            async for chunk in r.backend.stream(kind, upstream_body(body, r.engine_model)):
                yield self._public(chunk, model)
        finally:
            r.gate.release()
