"""Parse one scrape of an inference engine's own load signals into an :class:`EngineLoad`.

Pure functions, no I/O: a probe fetches the text and hands it here (about every 250 ms).

vLLM ``/metrics`` (always on; 0.6 to 0.12)
    ``vllm:num_requests_waiting`` and ``vllm:num_requests_running`` (gauges);
    ``vllm:kv_cache_usage_perc`` (a fraction, despite the name), or ``vllm:gpu_cache_usage_perc``
    (the only name up to 0.8, deprecated in 0.9 and no longer printed by default by 0.11/0.12;
    when a server prints both, the new name wins); the counter ``vllm:num_preemptions_total``
    (V1 declares the family ``vllm:num_preemptions``, V0 declared ``vllm:num_preemptions_total``;
    both print the sample ``vllm:num_preemptions_total``); the prefix-cache counters
    ``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (0.9 and later), or
    their V1 predecessors ``vllm:gpu_prefix_cache_queries_total`` /
    ``vllm:gpu_prefix_cache_hits_total`` (0.8 to 0.10). The V0 engine (0.6, 0.7) has no
    prefix-cache counters, only a ``vllm:gpu_prefix_cache_hit_rate`` gauge, not read here.
    Series carry ``model_name`` (and, since V1, ``engine``, the data-parallel engine index):
    waiting, running, preemptions and the prefix counters are summed over series, ``kv_usage``
    is the largest.

SGLang ``/metrics`` (``--enable-metrics``; SGLang 0.4 and 0.5)
    ``sglang:num_queue_reqs`` (waiting), ``sglang:num_running_reqs`` (running),
    ``sglang:token_usage`` (kv_usage); preemptions from the counter
    ``sglang:num_retracted_requests_total`` (0.5), or the older cumulative gauge
    ``sglang:total_retracted_reqs``. ``sglang:num_retracted_reqs`` is *not* used: it is a gauge of
    the requests retracted in the last scheduling step, not a running total.
    ``sglang:cache_hit_rate`` is ignored. Each scheduler (one per data-parallel rank, labels
    ``model_name``, ``engine_type``, ``tp_rank``, ``pp_rank``, ``moe_ep_rank``, optional
    ``dp_rank``, ``pid`` on some gauges) reports its own series; series that differ only in
    ``tp_rank``/``pp_rank``/``moe_ep_rank``/``pid`` describe one replica
    (``--enable-metrics-for-all-schedulers``) and count once (their largest value); distinct
    replicas are summed, ``kv_usage`` is the largest.

llama.cpp server ``/metrics`` (``--metrics``)
    ``llamacpp:requests_deferred`` (waiting), ``llamacpp:requests_processing`` (running),
    ``llamacpp:kv_cache_usage_ratio`` (kv_usage) on builds before ggml-org/llama.cpp#13660
    (May 2025), which removed it; newer builds leave kv_usage unknown.

llama.cpp server ``/slots`` (on by default in current builds)
    A JSON list with one object per slot (``id``, ``n_ctx``, ``is_processing``, ...). A slot is
    busy when ``is_processing`` is true; older builds (2024) carried ``state`` instead
    (``0`` idle, anything else busy). ``idle_slots`` and ``running`` count them; the queue of
    deferred requests is not shown, so ``waiting`` is unknown.

A metric the scrape lacks, or whose every value is NaN (or infinite), reads as ``None``, never
``0``. A scrape with none of the engine's metrics raises :class:`ValueError`, so a probe pointed at
the wrong server counts as failed; so does text that is not Prometheus exposition format.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "ENGINES",
    "EngineLoad",
    "parse_llamacpp_metrics",
    "parse_llamacpp_slots",
    "parse_sglang",
    "parse_signals",
    "parse_vllm",
]

ENGINES = ("vllm", "sglang", "llamacpp")


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One reading of an engine's load; ``None`` means the engine did not say."""

    waiting: int | None = None  # requests queued in the engine, not yet running
    running: int | None = None  # requests being decoded
    kv_usage: float | None = None  # fraction 0..1 of KV cache in use
    preemptions: float | None = None  # cumulative count of preemptions (a counter)
    idle_slots: int | None = None  # llama.cpp server: slots free right now
    prefix_cache_queries: float | None = None  # cumulative tokens queried (vLLM counters)
    prefix_cache_hits: float | None = None


# ---------------------------------------------------------------------------- Prometheus text

_Labels = Mapping[str, str]
_Series = list[tuple[_Labels, float]]


class _Scrape:
    """Every sample of one Prometheus text scrape, by sample name.

    Samples are keyed by the name printed on the sample line (``vllm:num_preemptions_total``),
    not by family: prometheus_client strips ``_total`` from counter family names and files a
    sample that does not match the preceding ``# TYPE`` as a family of its own, so sample names
    are the stable handle whichever way a server declared its metrics.
    """

    def __init__(self, text: str, engine: str) -> None:
        self.engine = engine
        self.names: set[str] = set()  # every sample name seen, NaN values included
        self.values: dict[str, _Series] = {}  # finite values only
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    self.names.add(sample.name)
                    value = float(sample.value)
                    if math.isfinite(value):
                        self.values.setdefault(sample.name, []).append((sample.labels, value))
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise ValueError(
                f"{engine} scrape is not Prometheus text exposition format: {exc or repr(exc)}"
            ) from exc

    def series(self, *names: str) -> _Series | None:
        """The finite series of the first of ``names`` that has any."""
        for name in names:
            found = self.values.get(name)
            if found:
                return found
        return None

    def require_any(self, *groups: Sequence[str]) -> None:
        """Raise unless at least one of the names in ``groups`` appeared (NaN or not)."""
        if all(self.names.isdisjoint(group) for group in groups):
            wanted = ", ".join(group[0] for group in groups)
            raise ValueError(
                f"no {self.engine} metrics in scrape (none of {wanted} or their older names "
                f"among {len(self.names)} sample names){_looks_like(self.names)}"
            )


def _looks_like(names: Iterable[str]) -> str:
    prefixes = {name.split(":", 1)[0] for name in names if ":" in name}
    known = {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama.cpp"}
    seen = sorted(known[p] for p in prefixes if p in known)
    return f"; it looks like {' and '.join(seen)}" if seen else ""


def _sum(series: _Series | None) -> float | None:
    return None if series is None else math.fsum(v for _, v in series)


def _max(series: _Series | None) -> float | None:
    return None if series is None else max(v for _, v in series)


def _count(value: float | None) -> int | None:
    return None if value is None else round(value)


def _replicas(ignored: frozenset[str]) -> Callable[[_Series | None], float | None]:
    """Sum over replicas, where series differing only in ``ignored`` labels are one replica
    (counted once, at their largest value)."""

    def aggregate(series: _Series | None) -> float | None:
        if series is None:
            return None
        per_replica: dict[tuple[tuple[str, str], ...], float] = {}
        for labels, value in series:
            key = tuple(sorted((k, v) for k, v in labels.items() if k not in ignored))
            per_replica[key] = max(value, per_replica.get(key, value))
        return math.fsum(per_replica.values())

    return aggregate


# ----------------------------------------------------------------------------------- vLLM

_VLLM_WAITING = ("vllm:num_requests_waiting",)
_VLLM_RUNNING = ("vllm:num_requests_running",)
_VLLM_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_VLLM_PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")
_VLLM_QUERIES = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_queries",
    "vllm:gpu_prefix_cache_queries_total",
    "vllm:gpu_prefix_cache_queries",
)
_VLLM_HITS = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_hits",
    "vllm:gpu_prefix_cache_hits_total",
    "vllm:gpu_prefix_cache_hits",
)


def parse_vllm(text: str) -> EngineLoad:
    """A vLLM ``/metrics`` scrape (any version from 0.6 on)."""
    s = _Scrape(text, "vLLM")
    s.require_any(
        _VLLM_WAITING, _VLLM_RUNNING, _VLLM_KV, _VLLM_PREEMPTIONS, _VLLM_QUERIES, _VLLM_HITS
    )
    return EngineLoad(
        waiting=_count(_sum(s.series(*_VLLM_WAITING))),
        running=_count(_sum(s.series(*_VLLM_RUNNING))),
        kv_usage=_max(s.series(*_VLLM_KV)),
        preemptions=_sum(s.series(*_VLLM_PREEMPTIONS)),
        prefix_cache_queries=_sum(s.series(*_VLLM_QUERIES)),
        prefix_cache_hits=_sum(s.series(*_VLLM_HITS)),
    )


# --------------------------------------------------------------------------------- SGLang

_SGLANG_WAITING = ("sglang:num_queue_reqs",)
_SGLANG_RUNNING = ("sglang:num_running_reqs",)
_SGLANG_KV = ("sglang:token_usage",)
_SGLANG_PREEMPTIONS = ("sglang:num_retracted_requests_total", "sglang:total_retracted_reqs")
_SGLANG_RANK_LABELS = frozenset({"tp_rank", "pp_rank", "moe_ep_rank", "pid"})


def parse_sglang(text: str) -> EngineLoad:
    """An SGLang ``/metrics`` scrape (server started with ``--enable-metrics``)."""
    s = _Scrape(text, "SGLang")
    s.require_any(_SGLANG_WAITING, _SGLANG_RUNNING, _SGLANG_KV, _SGLANG_PREEMPTIONS)
    total = _replicas(_SGLANG_RANK_LABELS)
    return EngineLoad(
        waiting=_count(total(s.series(*_SGLANG_WAITING))),
        running=_count(total(s.series(*_SGLANG_RUNNING))),
        kv_usage=_max(s.series(*_SGLANG_KV)),
        preemptions=total(s.series(*_SGLANG_PREEMPTIONS)),
    )


# ------------------------------------------------------------------------------ llama.cpp

_LLAMACPP_WAITING = ("llamacpp:requests_deferred",)
_LLAMACPP_RUNNING = ("llamacpp:requests_processing",)
_LLAMACPP_KV = ("llamacpp:kv_cache_usage_ratio",)


def parse_llamacpp_metrics(text: str) -> EngineLoad:
    """A llama.cpp server ``/metrics`` scrape (server started with ``--metrics``)."""
    s = _Scrape(text, "llama.cpp")
    s.require_any(_LLAMACPP_WAITING, _LLAMACPP_RUNNING, _LLAMACPP_KV)
    return EngineLoad(
        waiting=_count(_sum(s.series(*_LLAMACPP_WAITING))),
        running=_count(_sum(s.series(*_LLAMACPP_RUNNING))),
        kv_usage=_max(s.series(*_LLAMACPP_KV)),
    )


def _slot_busy(slot: Mapping[str, object], index: int) -> bool:
    if "is_processing" in slot:
        flag = slot["is_processing"]
        if isinstance(flag, bool):
            return flag
        raise ValueError(f"llama.cpp slot {index}: is_processing is {flag!r}, not a boolean")
    if "state" in slot:
        state = slot["state"]
        if isinstance(state, bool):
            return state
        if isinstance(state, int):
            return state != 0
        if isinstance(state, str):
            return state.strip().upper() not in ("IDLE", "0")
        raise ValueError(f"llama.cpp slot {index}: state is {state!r}")
    raise ValueError(f"llama.cpp slot {index} has neither is_processing nor state")


def parse_llamacpp_slots(data: object) -> EngineLoad:
    """The decoded JSON of a llama.cpp server's ``GET /slots``."""
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping):
            raise ValueError(f"llama.cpp /slots answered an error: {error.get('message', error)}")
        raise ValueError("llama.cpp /slots answer is a JSON object, not a list of slots")
    if not isinstance(data, Sequence) or isinstance(data, str | bytes | bytearray):
        raise ValueError(f"llama.cpp /slots answer is {type(data).__name__}, not a list of slots")
    if not data:
        raise ValueError("llama.cpp /slots answer lists no slots")
    busy = 0
    for index, slot in enumerate(data):
        if not isinstance(slot, Mapping):
            raise ValueError(f"llama.cpp slot {index} is {type(slot).__name__}, not an object")
        busy += _slot_busy(slot, index)
    return EngineLoad(waiting=None, running=busy, idle_slots=len(data) - busy)


# -------------------------------------------------------------------------------- dispatch


def parse_signals(engine: str, text: str) -> EngineLoad:
    """Parse ``text`` fetched from ``engine`` (one of :data:`ENGINES`).

    For ``llamacpp`` the text is either a ``/slots`` JSON document (it starts with ``[``) or
    ``/metrics`` Prometheus text.
    """
    if engine == "vllm":
        return parse_vllm(text)
    if engine == "sglang":
        return parse_sglang(text)
    if engine == "llamacpp":
        body = text.lstrip("\ufeff \t\r\n")
        if body.startswith(("[", "{")):
            try:
                data: object = json.loads(body)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(f"llama.cpp /slots answer is not valid JSON: {exc!s}") from exc
            return parse_llamacpp_slots(data)
        return parse_llamacpp_metrics(text)
    raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
