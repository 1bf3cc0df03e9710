"""Settings: a TOML file (``--config PATH`` or ``BACKBURNER_CONFIG``) and ``BACKBURNER_*``
variables.

Environment variables win over the file. Nothing here is built at import time: call
:func:`load_settings`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from backburner.schemas.tenants import Limits

DEFAULT_LOCAL_MODEL = "smollm2-135m-instruct"

# The Standard Webhooks (Svix) schedule: attempts at once, then after 5 s, 5 min, 30 min, 2 h,
# 5 h, 10 h and 10 h: 8 attempts over about 28 hours.
WEBHOOK_RETRY_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
LEGACY_WEBHOOK_RETRY_KEYS = (
    "webhook_max_retries",
    "webhook_retry_base_seconds",
    "webhook_retry_cap_seconds",
)
# one delay of a retry schedule: seconds, finite, at most a week
RetryDelay = Annotated[float, Field(ge=0, le=7 * 24 * 3600, allow_inf_nan=False)]
# the longest retention that can be set (100 years); 0 keeps things forever
RETENTION_MAX_DAYS = 36500

log = logging.getLogger("backburner.config")


class BackendSettings(BaseModel):
    """One ``[[backends]]`` table."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    type: str = Field(min_length=1, description="openai | llamacpp, or a plugin's entry point name")
    base_url: str | None = None
    # several replicas of one engine (each its own server, probe and background window); work
    # with the same prompt prefix goes to the same replica (docs/scheduling.md)
    base_urls: list[str] = Field(default_factory=list, max_length=256)
    api_key: SecretStr | None = None
    # Public model names; a table maps a public name to the engine's own name.
    models: list[str] | dict[str, str] = Field(default_factory=list)
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    timeout_seconds: float = Field(default=600.0, gt=0)
    # Background admission (docs/scheduling.md): which load signals to read, and where.
    engine: Literal["vllm", "sglang", "llamacpp", "generic"] = "generic"
    # false: background runs up to max_concurrency whatever the engine's load (no admission)
    background_gate: bool = True
    metrics_url: str | None = None  # default: base_url without /v1, plus /metrics (/slots)
    probe_interval_seconds: float = Field(default=0.25, gt=0, le=60)
    probe_stale_seconds: float = Field(default=1.0, gt=0, le=600)
    idle_kv_threshold: float = Field(default=0.7, gt=0, le=1)
    realtime_quiet_seconds: float = Field(default=2.0, ge=0, le=3600)
    realtime_slowdown: float = Field(default=1.2, ge=1.0, le=100)
    background_shared_window: int = Field(default=0, ge=0, le=4096)
    # None: preempt (abort and requeue) on self-hosted engines, never on a generic API
    preempt: bool | None = None
    # sent as the body's "priority" with background work (vLLM: lower runs first, e.g. 10 with
    # --scheduling-policy priority; SGLang: higher runs first, e.g. -10)
    background_priority: int | None = None
    # llamacpp only
    model_path: str | None = None
    n_ctx: int = Field(default=2048, ge=128)
    n_threads: int | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        # Also accept a list mixing names and one-entry tables: ["a", {public = "engine"}].
        if isinstance(v, list) and any(isinstance(x, dict) for x in v):
            merged: dict[str, str] = {}
            for item in v:
                if isinstance(item, str):
                    merged[item] = item
                elif isinstance(item, dict):
                    merged.update({str(k): str(val) for k, val in item.items()})
                else:
                    raise ValueError("models entries must be names or {public = engine} tables")
            return merged
        return v

    @model_validator(mode="after")
    def _engine_needs_a_server(self) -> BackendSettings:
        if self.engine != "generic" and self.type == "llamacpp":
            raise ValueError(
                f"backend '{self.name}': engine = '{self.engine}' reads a server's load signals;"
                " the embedded llamacpp engine pauses background work itself (leave engine out)"
            )
        if self.engine != "generic" and not (self.base_url or self.base_urls or self.metrics_url):
            raise ValueError(
                f"backend '{self.name}': engine = '{self.engine}' needs base_url or metrics_url"
            )
        if self.base_urls:
            if len(set(self.base_urls)) != len(self.base_urls):
                raise ValueError(f"backend '{self.name}': base_urls lists a server twice")
            if self.base_url and self.base_url not in self.base_urls:
                raise ValueError(
                    f"backend '{self.name}': base_url must be one of base_urls, or left out"
                )
            if self.metrics_url and len(self.base_urls) > 1:
                raise ValueError(
                    f"backend '{self.name}': metrics_url names one server; with several"
                    " base_urls leave it out (each replica's is derived from its base_url)"
                )
            if self.type == "llamacpp":
                raise ValueError(
                    f"backend '{self.name}': base_urls are servers; the embedded llamacpp"
                    " engine has none"
                )
        return self

    def replicas(self) -> list[BackendSettings]:
        """One settings object per server: this one, or one per ``base_urls`` entry, named
        ``name[i]``, each with its own ``base_url``."""
        if not self.base_urls:
            return [self]
        if len(self.base_urls) == 1:
            return [self.model_copy(update={"base_url": self.base_urls[0], "base_urls": []})]
        return [
            self.model_copy(update={"name": f"{self.name}[{i}]", "base_url": url, "base_urls": []})
            for i, url in enumerate(self.base_urls)
        ]

    def model_map(self) -> dict[str, str]:
        """Public model name -> the name the engine knows it by."""
        if isinstance(self.models, dict):
            return dict(self.models)
        return {m: m for m in self.models}


def default_backends() -> list[BackendSettings]:
    return [
        BackendSettings(
            name="local", type="llamacpp", models=[DEFAULT_LOCAL_MODEL], max_concurrency=1
        )
    ]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BACKBURNER_", env_nested_delimiter="__", extra="forbid"
    )

    database_url: str = "sqlite:///./backburner.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    backends: list[BackendSettings] = Field(default_factory=default_backends)

    # auth: "auto" runs open as tenant "default" when no key exists and the server is loopback-only
    auth: Literal["auto", "required", "disabled"] = "auto"
    # open mode answers only these Host names besides loopback ones (DNS-rebinding guard)
    allowed_hosts: list[str] = Field(default_factory=list)

    # scheduler
    run_worker: bool = True
    max_attempts: int = Field(default=3, ge=1, le=100)
    # a generation whose worker dies on this many tries (e.g. it crashes the engine) fails
    max_lost_leases: int = Field(default=10, ge=1, le=1000)
    expiry_seconds: float = Field(default=72 * 3600, gt=0)
    lease_seconds: float = Field(default=30.0, gt=0)
    poll_interval_seconds: float = Field(default=0.2, gt=0)
    retry_base_seconds: float = Field(default=1.0, ge=0)
    retry_cap_seconds: float = Field(default=60.0, ge=0)
    maintenance_interval_seconds: float = Field(default=5.0, gt=0)
    # a lane claims up to this many more than it has free slots (at most its window, and about
    # 0.1 s of its recent starts) and starts them as slots free up, without a claim each; one
    # that waited claim_ahead_seconds is given back to the queue (0: claim only for free slots)
    claim_ahead: int = Field(default=32, ge=0, le=1024)
    claim_ahead_seconds: float = Field(default=2.0, gt=0, le=3600)
    # prefix runs (docs/scheduling.md): a lane takes queued work from a window of the fair order
    # in runs of one prompt prefix, so the engine's prefix cache stays warm; false: fair order
    prefix_runs: bool = True
    prefix_window: int = Field(default=256, ge=1, le=4096)
    # at most this many prefixes run side by side on one lane
    prefix_max_runs: int = Field(default=2, ge=1, le=64)
    # the head of the fair order is passed over at most this many times in a row
    prefix_fair_every: int = Field(default=16, ge=1, le=4096)
    # a new prefix's siblings wait for its first request this long at most
    prefix_warmup_seconds: float = Field(default=2.0, ge=0, le=600)
    # deadlines (docs/scheduling.md): estimates read the pace of the last pace_window_seconds;
    # while a group or batch is expected to miss its deadline, each lane keeps deadline_trickle
    # background slots open even when realtime traffic holds background work back
    pace_window_seconds: float = Field(default=300.0, ge=10, le=86400)
    # a tenant's work due within this many seconds runs before its later work (earliest first);
    # deadlines further out leave the order to fairness and prefix runs
    deadline_horizon_seconds: float = Field(default=3600.0, ge=0, le=30 * 86400)
    deadline_trickle: int = Field(default=1, ge=0, le=64)

    # webhooks
    # Seconds to wait after each failed attempt, in order (the first attempt is immediate): one
    # attempt more than there are delays. Each delay is jittered by +-webhook_retry_jitter.
    webhook_retry_schedule_seconds: list[RetryDelay] = Field(
        default_factory=lambda: list(WEBHOOK_RETRY_SCHEDULE), max_length=100
    )
    webhook_retry_jitter: float = Field(default=0.2, ge=0, le=0.5)
    # Deprecated: the exponential backoff these described becomes a schedule (see
    # _legacy_webhook_retries); they may not be combined with webhook_retry_schedule_seconds.
    webhook_max_retries: int | None = Field(default=None, ge=0, le=20)
    webhook_retry_base_seconds: float | None = Field(default=None, ge=0)
    webhook_retry_cap_seconds: float | None = Field(default=None, ge=0)
    webhook_timeout_seconds: float = Field(default=30.0, gt=0)
    webhook_poll_interval_seconds: float = Field(default=0.25, gt=0)
    # a dispatcher that dies mid-attempt holds its event this long before another takes it;
    # must exceed an attempt (OPTIONS and POST, each up to webhook_timeout_seconds)
    webhook_lease_seconds: float = Field(default=120.0, gt=0)
    webhook_concurrency: int = Field(default=16, ge=1, le=1024)
    # None: deny private and link-local targets unless the server listens on loopback only
    webhook_deny_private: bool | None = None
    # networks that may receive webhooks even when private targets are denied (CIDR, e.g.
    # "10.20.0.0/16" for an internal receiver)
    webhook_allow_private: list[str] = Field(default_factory=list)

    # files and batches
    # Uploaded files live here. With several API replicas on several machines this must be a
    # shared directory (NFS, EFS, a CSI volume); output files are rendered from the database.
    files_dir: str = "./backburner-files"
    # or object storage: "s3://bucket/prefix" (AWS S3, MinIO, R2, GCS's S3 interface;
    # credentials from the standard AWS variables), or "file:///path" (same as files_dir);
    # files_endpoint_url names another S3-compatible endpoint ("http://minio:9000")
    files_url: str | None = None
    files_endpoint_url: str | None = None
    files_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    batch_max_lines: int = Field(default=1_000_000, ge=1)
    # a longer input line is a line error (found in bounded memory; nothing holds it whole)
    batch_max_line_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    # retention (docs/retention.md): whole days that finished things are kept before the
    # worker's maintenance deletes them; 0 keeps them forever. Unfinished work is never deleted.
    retention_results_days: int = Field(
        default=30,
        ge=0,
        le=RETENTION_MAX_DAYS,
        description="finished generations, groups and batches (with their output and error"
        " files), counted from when they finished; 0 keeps them forever",
    )
    retention_events_days: int = Field(
        default=30,
        ge=0,
        le=RETENTION_MAX_DAYS,
        description="webhook events delivered or failed for good, and their delivery attempts,"
        " counted from the last attempt; 0 keeps them forever",
    )
    retention_files_days: int = Field(
        default=30,
        ge=0,
        le=RETENTION_MAX_DAYS,
        description="deleted or expired files (the row; the bytes too if any are left), counted"
        " from the deletion or the expiry; 0 keeps them forever",
    )

    # api
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    idempotency_ttl_seconds: float = Field(default=24 * 3600, gt=0)
    # /readyz and /metrics: a bearer token to require (unset: open), and how long their
    # database counts and backend checks are reused
    ops_token: SecretStr | None = None
    metrics_cache_seconds: float = Field(default=15.0, ge=0, le=3600)
    readyz_cache_seconds: float = Field(default=5.0, ge=0, le=3600)
    log_level: str = "info"
    # the web dashboard under /ui (backburner.dashboard), served by `backburner serve`
    dashboard: bool = True
    # limits every tenant gets unless it has its own (docs/tenants.md); none by default
    limits: Limits = Field(default_factory=Limits)
    # false: backburner_tokens_total and backburner_usage_requests_total without the tenant
    # label (very many tenants)
    metrics_tenant_label: bool = True

    config_file: str | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("BACKBURNER_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @model_validator(mode="after")
    def _unique_backends(self) -> Settings:
        names = [r.name for b in self.backends for r in b.replicas()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _legacy_webhook_retries(self) -> Settings:
        legacy = [k for k in LEGACY_WEBHOOK_RETRY_KEYS if getattr(self, k) is not None]
        if not legacy:
            return self
        if "webhook_retry_schedule_seconds" in self.model_fields_set:
            raise ValueError(
                f"{', '.join(legacy)} cannot be combined with webhook_retry_schedule_seconds,"
                " which replaces them: set only webhook_retry_schedule_seconds"
            )
        retries = 3 if self.webhook_max_retries is None else self.webhook_max_retries
        base = 1.0 if self.webhook_retry_base_seconds is None else self.webhook_retry_base_seconds
        cap = 300.0 if self.webhook_retry_cap_seconds is None else self.webhook_retry_cap_seconds
        self.webhook_retry_schedule_seconds = [min(cap, base * 2**n) for n in range(retries)]
        log.warning(
            "%s: deprecated, replaced by webhook_retry_schedule_seconds; using %s",
            ", ".join(legacy),
            self.webhook_retry_schedule_seconds,
        )
        return self

    @field_validator("files_url")
    @classmethod
    def _files_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if v.startswith("file://") and len(v) > len("file://"):
            return v
        if v.startswith("s3://") and len(v) > len("s3://") and not v[5:].startswith("/"):
            return v
        raise ValueError("files_url must be s3://bucket[/prefix] or file:///path")

    @field_validator("webhook_allow_private")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"webhook_allow_private: {item!r} is not a network: {exc}"
                ) from exc
        return value

    @property
    def deny_private_webhooks(self) -> bool:
        """Whether private targets are refused regardless of keys (None: decided at run time:
        refused unless the server runs open, on loopback with no API key ever created)."""
        if self.webhook_deny_private is not None:
            return self.webhook_deny_private
        return not self.loopback_only

    @property
    def loopback_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Read settings from ``config`` (or ``BACKBURNER_CONFIG``), the environment and overrides."""
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        old = os.environ.get("BACKBURNER_CONFIG")
        os.environ["BACKBURNER_CONFIG"] = str(path)
        try:
            return Settings(**overrides)
        finally:
            if old is None:
                del os.environ["BACKBURNER_CONFIG"]
            else:
                os.environ["BACKBURNER_CONFIG"] = old
    env_path = os.environ.get("BACKBURNER_CONFIG")
    if env_path and not Path(env_path).is_file():
        raise FileNotFoundError(f"config file not found: {env_path} (from BACKBURNER_CONFIG)")
    return Settings(**overrides)
