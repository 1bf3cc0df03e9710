"""Prometheus metrics, built on a registry the composition root owns (nothing at import time)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from backburner.backends.admission import Held
from backburner.backends.lane import Lane
from backburner.core.series import MinuteSeries
from backburner.store.usage import Tally


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, tenant_label: bool = True
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._tenant_label = tenant_label
        usage_labels = ["tenant", "model", "lane"] if tenant_label else ["model", "lane"]
        self.tokens = Counter(
            "backburner_tokens",
            "Prompt plus completion tokens used, by tenant, model and lane (this process's:"
            " the worker counts background work, the API realtime requests)",
            usage_labels,
            registry=r,
        )
        self.usage_requests = Counter(
            "backburner_usage_requests",
            "Requests counted in usage, by tenant, model and lane",
            usage_labels,
            registry=r,
        )
        self.submitted = Counter(
            "backburner_generations_submitted", "Slow generations accepted", ["kind"], registry=r
        )
        self.finished = Counter(
            "backburner_generations_finished",
            "Generations that reached a terminal state",
            ["state"],
            registry=r,
        )
        self.retried = Counter(
            "backburner_generation_retries", "Retryable backend failures", registry=r
        )
        self.backend_seconds = Histogram(
            "backburner_backend_request_seconds",
            "Backend call latency",
            ["backend", "lane"],
            registry=r,
        )
        self.groups_completed = Counter(
            "backburner_groups_completed", "Groups whose last generation finished", registry=r
        )
        self.preempted = Counter(
            "backburner_generations_preempted",
            "Background generations preempted for realtime traffic and queued again",
            registry=r,
        )
        self.inflight = Gauge(
            "backburner_slow_inflight", "Slow generations running in this process", registry=r
        )
        self.webhook_attempts = Counter(
            "backburner_webhook_attempts",
            "Webhook delivery attempts by event and outcome (delivered, retry, failed)",
            ["event", "outcome"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "backburner_webhook_attempt_seconds", "Webhook delivery attempt latency", registry=r
        )
        self.generations = Gauge(
            "backburner_generations",
            "Generations in the store by state (read when /metrics is scraped)",
            ["state"],
            registry=r,
        )
        self.realtime = Counter(
            "backburner_realtime_requests", "Realtime requests", ["kind", "status"], registry=r
        )
        # the dashboard's last-hour chart of realtime latency (this process's requests)
        self.realtime_recent = MinuteSeries()
        self.at_risk = Gauge(
            "backburner_deadline_at_risk",
            "Open groups and batches expected to finish after their deadline (worker"
            " maintenance; unknown pace counts as at risk)",
            ["kind"],
            registry=r,
        )
        self.at_risk_work = Gauge(
            "backburner_deadline_at_risk_work",
            "Seconds by which each at-risk group or batch is expected to miss its deadline"
            " (the 50 due soonest; +Inf when no pace is measured)",
            ["kind", "id"],
            registry=r,
        )

    def count_usage(self, tally: Tally) -> None:
        """What was just written to the usage table (or tallied for a realtime request)."""
        for (tenant, _day, model, lane), (
            requests,
            _failed,
            prompt,
            completion,
        ) in tally.counts.items():
            labels = (tenant, model, lane) if self._tenant_label else (model, lane)
            self.usage_requests.labels(*labels).inc(requests)
            if prompt + completion:
                self.tokens.labels(*labels).inc(prompt + completion)


class LaneCollector:
    """The scheduler's state per backend, read from the lanes when /metrics is scraped."""

    def __init__(self, lanes: Mapping[str, Lane]) -> None:
        self._lanes = lanes

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["backend", *labels])

        window = gauge("backburner_background_window", "Background requests the lane admits")
        bg = gauge("backburner_background_inflight", "Background requests in flight")
        rt = gauge("backburner_realtime_inflight", "Realtime requests in flight")
        held = gauge(
            "backburner_background_held",
            "1 for the reason background work is held back now (none: it may start)",
            "reason",
        )
        regime = gauge("backburner_lane_shared", "1 while realtime traffic shares the engine")
        waiting = gauge("backburner_engine_waiting", "Requests queued in the engine (probe)")
        running = gauge("backburner_engine_running", "Requests running in the engine (probe)")
        kv = gauge("backburner_engine_kv_usage", "Engine KV cache use, 0 to 1 (probe)")
        age = gauge("backburner_probe_age_seconds", "Age of the last good probe")
        ok = gauge("backburner_probe_ok", "1 when the last probe succeeded")
        base = gauge(
            "backburner_realtime_baseline_seconds",
            "Realtime latency with no background beside it (ttft, or tpot per token)",
            "metric",
        )
        preempted = CounterMetricFamily(
            "backburner_lane_preempted", "Background requests preempted", labels=["backend"]
        )
        lost = CounterMetricFamily(
            "backburner_lane_preempted_seconds",
            "Engine seconds of background work thrown away by preemption",
            labels=["backend"],
        )
        probe_fail = CounterMetricFamily(
            "backburner_probe_failures", "Probe cycles that failed", labels=["backend"]
        )
        for name, lane in self._lanes.items():
            snap = lane.snapshot()
            window.add_metric([name], snap.window)
            bg.add_metric([name], snap.background_inflight)
            rt.add_metric([name], snap.realtime_inflight)
            for reason in Held:
                held.add_metric([name, reason.value], 1.0 if snap.held is reason else 0.0)
            regime.add_metric([name], 1.0 if snap.regime == "shared" else 0.0)
            load = snap.load
            if load is not None:
                if load.waiting is not None:
                    waiting.add_metric([name], load.waiting)
                if load.running is not None:
                    running.add_metric([name], load.running)
                if load.kv_usage is not None:
                    kv.add_metric([name], load.kv_usage)
            if snap.probe_age is not None:
                age.add_metric([name], snap.probe_age)
            ok.add_metric([name], 0.0 if snap.probe_error else 1.0)
            for metric, value in (("ttft", snap.baseline_ttft), ("tpot", snap.baseline_tpot)):
                if value is not None:
                    base.add_metric([name, metric], value)
            preempted.add_metric([name], lane.counters.preempted)
            lost.add_metric([name], lane.counters.seconds_lost)
            probe_fail.add_metric([name], lane.counters.probe_failures)
        yield from (window, bg, rt, held, regime, waiting, running, kv, age, ok, base)
        yield from (preempted, lost, probe_fail)
