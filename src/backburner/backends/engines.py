"""Which backend serves which public model, and each backend's lane (admission and preemption)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

import httpx

from backburner.backends.admission import AdmissionController, AdmissionOptions
from backburner.backends.base import JSON, Backend, upstream_body
from backburner.backends.lane import Lane, RealtimeTicket
from backburner.backends.probe import HttpProbe, Probe, default_metrics_url
from backburner.config import BackendSettings
from backburner.core.states import Kind
from backburner.errors import BackendError, InvalidRequest


@dataclass
class Route:
    backend: Backend
    lane: Lane
    engine_model: str


def admission_options(s: BackendSettings) -> AdmissionOptions:
    return AdmissionOptions(
        max_window=s.max_concurrency,
        gated=s.background_gate,
        initial_window=min(float(s.max_concurrency), 2.0),
        shared_window=float(min(s.max_concurrency, s.background_shared_window)),
        idle_kv=s.idle_kv_threshold,
        stale_seconds=s.probe_stale_seconds,
        quiet_seconds=s.realtime_quiet_seconds,
        slowdown=s.realtime_slowdown,
        grow_interval=s.probe_interval_seconds,
    )


def build_lane(s: BackendSettings, probe_client: httpx.AsyncClient | None) -> Lane:
    probe: Probe | None = None
    if s.engine != "generic" and s.base_url and probe_client is not None:
        url = s.metrics_url or default_metrics_url(s.engine, s.base_url)
        probe = HttpProbe(s.engine, url, probe_client, timeout=max(0.5, s.probe_stale_seconds))
    preempt = (
        s.preempt if s.preempt is not None else (s.engine != "generic" and s.type != "llamacpp")
    )
    return Lane(
        s.name,
        AdmissionController(admission_options(s)),
        probe=probe,
        max_concurrency=s.max_concurrency,
        preempt=preempt,
        probe_interval=s.probe_interval_seconds,
    )


def _completion_tokens(resp: JSON) -> int:
    usage = resp.get("usage")
    if isinstance(usage, dict):
        n = usage.get("completion_tokens")
        if isinstance(n, int) and n > 0:
            return n
    return 1


class Engines:
    def __init__(
        self,
        settings: Sequence[BackendSettings],
        backends: Mapping[str, Backend],
        *,
        probe_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.backends = dict(backends)
        self._probe_client = probe_client
        self._own_client = False
        if probe_client is None and any(s.engine != "generic" for s in settings):
            self._probe_client = httpx.AsyncClient(follow_redirects=False)
            self._own_client = True
        self.lanes = {s.name: build_lane(s, self._probe_client) for s in settings}
        self.routes: dict[str, Route] = {}
        for s in settings:
            for public, engine in s.model_map().items():
                if public not in self.routes:  # the first backend listed for a model serves it
                    self.routes[public] = Route(self.backends[s.name], self.lanes[s.name], engine)
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
        for lane in self.lanes.values():
            await lane.start()

    async def close(self) -> None:
        for lane in self.lanes.values():
            await lane.close()
        for b in self.backends.values():
            await b.close()
        if self._own_client and self._probe_client is not None:
            await self._probe_client.aclose()

    @staticmethod
    def _public(resp: JSON, model: str) -> JSON:
        if "model" in resp:
            resp["model"] = model
        return resp

    async def run_background(self, kind: Kind, body: JSON) -> JSON:
        """Run background work (the caller holds a slot of the model's lane). Raises
        :class:`~backburner.errors.Preempted` when realtime traffic took the engine back."""
        model = str(body["model"])
        r = self.route(model)
        resp = await r.lane.run_background(
            lambda: r.backend.run(kind, upstream_body(body, r.engine_model), background=True)
        )
        return self._public(resp, model)

    async def run_realtime(self, kind: Kind, body: JSON) -> JSON:
        """Run now; never gated by background work."""
        model = str(body["model"])
        r = self.route(model)
        ticket = r.lane.realtime_started()
        try:
            resp = await r.backend.run(kind, upstream_body(body, r.engine_model))
            if kind is not Kind.EMBEDDING:
                elapsed = time.monotonic() - ticket.started
                r.lane.observe_realtime(ticket, "tpot", elapsed / _completion_tokens(resp))
            return self._public(resp, model)
        except BackendError as exc:
            r.lane.observe_error(exc)
            raise
        finally:
            r.lane.realtime_finished()

    async def stream_realtime(self, kind: Kind, body: JSON) -> AsyncGenerator[JSON, None]:
        model = str(body["model"])
        r = self.route(model)
        ticket: RealtimeTicket = r.lane.realtime_started()
        first = True
        try:
            async for chunk in r.backend.stream(kind, upstream_body(body, r.engine_model)):
                if first:
                    first = False
                    r.lane.observe_realtime(ticket, "ttft", time.monotonic() - ticket.started)
                yield self._public(chunk, model)
        except BackendError as exc:
            r.lane.observe_error(exc)
            raise
        finally:
            r.lane.realtime_finished()
