"""Which backend serves which public model, and each backend's lane (admission and preemption).

A backend with several ``base_urls`` is a group of replicas, each with its own backend object
and lane (probe, background window) named ``name[i]``. Work with the same prefix key goes to the
same replica: its *owner* by rendezvous hashing of the prefix key over the replicas' URLs (the
same answer in every process, and only 1/n of the keys move when a replica is added), unless the
owner is overloaded: more than ``AFFINITY_LOAD_FACTOR`` times the group's mean load, plus one
(consistent hashing with bounded loads), or holding background work back while it runs none. A
hot prefix thus spills to the other replicas instead of piling on one while they idle.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
import orjson

from backburner.backends.admission import AdmissionController, AdmissionOptions
from backburner.backends.base import JSON, Backend, upstream_body
from backburner.backends.lane import Lane, RealtimeTicket
from backburner.backends.probe import HttpProbe, Probe, default_metrics_url
from backburner.config import BackendSettings
from backburner.core.prefix import prefix_key
from backburner.core.states import Kind
from backburner.errors import BackendError, InvalidRequest

_T = TypeVar("_T")

#: an owner more loaded than this times its group's mean (plus one) lets others take its work
AFFINITY_LOAD_FACTOR = 1.25


@dataclass(frozen=True)
class Replica:
    backend: Backend
    lane: Lane
    url: str  # what the owner hash reads: stable across processes and restarts

    def load(self) -> int:
        c = self.lane.controller
        return c.background_inflight + c.realtime_inflight


@dataclass
class Route:
    replicas: tuple[Replica, ...]
    engine_model: str
    by_lane: dict[str, Replica] = field(init=False)

    def __post_init__(self) -> None:
        self.by_lane = {r.lane.name: r for r in self.replicas}

    @property
    def backend(self) -> Backend:
        """The first replica's backend (the only one, mostly)."""
        return self.replicas[0].backend

    @property
    def lane(self) -> Lane:
        return self.replicas[0].lane

    def owner(self, key: str) -> Replica:
        """The replica ``key`` belongs to (highest rendezvous hash)."""
        return max(self.replicas, key=lambda r: _score(key, r.url))

    def overloaded(self, replica: Replica) -> bool:
        loads = [r.load() for r in self.replicas]
        mean = sum(loads) / len(loads)
        if replica.load() > AFFINITY_LOAD_FACTOR * mean + 1:
            return True
        # holding background back (realtime busy, engine saturated or down) and running none
        return (
            replica.lane.free_for_background() == 0
            and replica.lane.controller.background_inflight == 0
        )

    def pick(self, key: str | None) -> Replica:
        """Where a realtime request goes: its prefix's owner, else the least loaded."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        if key is not None:
            owner = self.owner(key)
            loads = [r.load() for r in self.replicas]
            if owner.load() <= AFFINITY_LOAD_FACTOR * (sum(loads) / len(loads)) + 1:
                return owner
        return min(self.replicas, key=lambda r: r.load())


def _score(key: str, url: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


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
    """``settings`` are the configured backends; ``backends`` the built backend objects by
    replica name (``BackendSettings.replicas``)."""

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
        groups: dict[str, tuple[Replica, ...]] = {}
        self.lanes: dict[str, Lane] = {}
        for s in settings:
            replicas = []
            for rs in s.replicas():
                lane = self.lanes[rs.name] = build_lane(rs, self._probe_client)
                replicas.append(Replica(self.backends[rs.name], lane, rs.base_url or rs.name))
            groups[s.name] = tuple(replicas)
        self.routes: dict[str, Route] = {}
        self._route_of_lane: dict[str, Route] = {}
        for s in settings:
            for public, engine in s.model_map().items():
                if public not in self.routes:  # the first backend listed for a model serves it
                    route = self.routes[public] = Route(groups[s.name], engine)
                    for replica in route.replicas:
                        self._route_of_lane.setdefault(replica.lane.name, route)
        self.models_by_backend: dict[str, list[str]] = {
            lane: [m for m, route in self.routes.items() if lane in route.by_lane]
            for lane in self.lanes
        }

    def affinity(self, lane: str) -> Callable[[str | None], bool] | None:
        """For a claim on ``lane``: whether work with a prefix key may run there now (its own
        prefixes, and those of an overloaded replica); None when the lane has no siblings."""
        route = self._route_of_lane.get(lane)
        if route is None or len(route.replicas) < 2:
            return None
        me = route.by_lane[lane]
        spill: dict[str, bool] = {}

        def allowed(key: str | None) -> bool:
            if key is None:
                return True
            owner = route.owner(key)
            if owner is me:
                return True
            name = owner.lane.name
            if name not in spill:  # loads read once per claim and owner
                spill[name] = route.overloaded(owner)
            return spill[name]

        return allowed

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

    async def run_background(self, kind: Kind, body: JSON, lane: str | None = None) -> JSON:
        """Run background work on ``lane`` (a replica of the model's backend; default its
        first), whose slot the caller holds. Raises :class:`~backburner.errors.Preempted` when
        realtime traffic took the engine back."""
        model = str(body["model"])
        route = self.route(model)
        r = route.by_lane[lane] if lane is not None else route.replicas[0]
        resp = await r.lane.run_background(
            lambda: r.backend.run(kind, upstream_body(body, route.engine_model), background=True)
        )
        return self._public(resp, model)

    def pick(self, body: JSON) -> tuple[Replica, str]:
        """The replica a realtime request goes to, and the engine's name of its model."""
        model = str(body["model"])
        route = self.route(model)
        if len(route.replicas) == 1:
            return route.replicas[0], route.engine_model
        return route.pick(prefix_key(model, body)), route.engine_model

    async def run_realtime(self, kind: Kind, body: JSON) -> JSON:
        """Run now; never gated by background work."""
        model = str(body["model"])
        r, engine_model = self.pick(body)
        ticket = r.lane.realtime_started()
        try:
            resp = await r.backend.run(kind, upstream_body(body, engine_model))
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
        """The engine's chunks, each naming the model as the client did."""
        model = str(body["model"])
        r, engine_model = self.pick(body)
        chunks = r.backend.stream(kind, upstream_body(body, engine_model))
        async for chunk in _observed(r.lane, chunks):
            yield self._public(chunk, model)

    async def stream_realtime_raw(self, kind: Kind, body: JSON) -> AsyncGenerator[bytes, None]:
        """The engine's chunks as JSON text. Passed through as the engine sent them where it
        can stream them so and knows the model by the client's name (nothing to rewrite);
        otherwise parsed, renamed and encoded again."""
        model = str(body["model"])
        r, engine_model = self.pick(body)
        raw: RawStream | None = getattr(r.backend, "stream_raw", None)
        if raw is None or engine_model != model:
            chunks = r.backend.stream(kind, upstream_body(body, engine_model))
            async for chunk in _observed(r.lane, chunks):
                yield orjson.dumps(self._public(chunk, model))
            return
        async for data in _observed(r.lane, raw(kind, upstream_body(body, engine_model))):
            yield data


RawStream = Callable[[Kind, JSON], AsyncIterator[bytes]]


async def _observed(lane: Lane, source: AsyncIterator[_T]) -> AsyncGenerator[_T, None]:
    """``source`` counted as a realtime request on ``lane``, its first chunk timed (TTFT)."""
    ticket: RealtimeTicket = lane.realtime_started()
    first = True
    try:
        async for item in source:
            if first:
                first = False
                lane.observe_realtime(ticket, "ttft", time.monotonic() - ticket.started)
            yield item
    except BackendError as exc:
        lane.observe_error(exc)
        raise
    finally:
        lane.realtime_finished()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
