"""Prometheus metrics, built on a registry the composition root owns (nothing at import time)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
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
