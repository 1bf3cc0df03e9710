"""Tenants on the wire: limits, weights, the admin API's bodies and answers, and usage.

A limit left ``None`` means no limit. A tenant's own limits override the defaults (the
``[limits]`` table) one by one: a name absent from its overrides takes the default, a name set to
``null`` there means no limit for that tenant.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LIMIT_NAMES = (
    "max_queued_generations",
    "max_batch_lines_in_flight",
    "requests_per_minute",
    "realtime_requests_per_minute",
    "tokens_per_day",
)
LimitName = Literal[
    "max_queued_generations",
    "max_batch_lines_in_flight",
    "requests_per_minute",
    "realtime_requests_per_minute",
    "tokens_per_day",
]
#: the smallest and largest weight a tenant may have (shares of background capacity)
MIN_WEIGHT = 0.01
MAX_WEIGHT = 100.0
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"

Limit = int | None


class Limits(BaseModel):
    """Limits per tenant; ``None``: none."""

    model_config = ConfigDict(extra="forbid")

    #: slow and group generations accepted and not yet finished (Queued or In Progress)
    max_queued_generations: Limit = Field(default=None, ge=0, le=10**12)
    #: lines of the tenant's batches not yet finished, this batch's included
    max_batch_lines_in_flight: Limit = Field(default=None, ge=0, le=10**12)
    #: submissions per minute: slow requests, groups and batches (each one request)
    requests_per_minute: Limit = Field(default=None, ge=0, le=10**9)
    #: realtime requests per minute
    realtime_requests_per_minute: Limit = Field(default=None, ge=0, le=10**9)
    #: prompt plus completion tokens per UTC day, every lane together
    tokens_per_day: Limit = Field(default=None, ge=0, le=10**15)

    def merged(self, overrides: dict[str, Limit]) -> Limits:
        """These limits with a tenant's ``overrides`` laid over them."""
        return self.model_copy(update={k: v for k, v in overrides.items() if k in LIMIT_NAMES})


class Tenant(BaseModel):
    """A tenant as the admin API shows it."""

    object: Literal["tenant"] = "tenant"
    id: str
    weight: float
    disabled: bool
    disabled_at: datetime | None = None
    created_at: datetime | None = None
    #: the tenant's own limits (what is absent takes the default)
    limits: dict[str, Limit] = Field(default_factory=dict)
    #: what applies now: the defaults with the tenant's own limits laid over them
    effective_limits: Limits = Field(default_factory=Limits)
    #: slow and group generations Queued or In Progress now
    open_generations: int = 0


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Tenant]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


def _weight(v: float | None) -> float | None:
    if v is not None and not MIN_WEIGHT <= v <= MAX_WEIGHT:
        raise ValueError(f"must be between {MIN_WEIGHT} and {MAX_WEIGHT}")
    return v


class TenantCreate(BaseModel):
    """``POST /v1/admin/tenants``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(pattern=TENANT_PATTERN, description="the tenant's name, as API keys carry it")
    weight: float = 1.0
    limits: dict[LimitName, Limit] = Field(default_factory=dict)
    disabled: bool = False

    _w = field_validator("weight")(_weight)

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: dict[LimitName, Limit]) -> dict[LimitName, Limit]:
        return check_limits(v)


class TenantUpdate(BaseModel):
    """``PATCH /v1/admin/tenants/{id}``: what is given changes. In ``limits`` a number sets the
    tenant's own limit, ``null`` means no limit for it, ``"default"`` drops its own limit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    weight: float | None = None
    limits: dict[LimitName, int | Literal["default"] | None] = Field(default_factory=dict)
    disabled: bool | None = None

    _w = field_validator("weight")(_weight)

    @field_validator("limits")
    @classmethod
    def _limits(
        cls, v: dict[LimitName, int | Literal["default"] | None]
    ) -> dict[LimitName, int | Literal["default"] | None]:
        check_limits({k: x for k, x in v.items() if x != "default"})
        return v


def check_limits(values: dict[LimitName, Limit]) -> dict[LimitName, Limit]:
    """Each value within its field's bounds (the same checks as :class:`Limits`)."""
    Limits.model_validate(values, strict=True)
    return values


UsageLane = Literal["realtime", "slow", "group", "batch"]
UsageKey = Literal["day", "tenant", "model", "lane"]
USAGE_KEYS: tuple[UsageKey, ...] = ("day", "tenant", "model", "lane")


class UsageRow(BaseModel):
    """Totals for one combination of the ``group_by`` keys (the others are null)."""

    object: Literal["usage"] = "usage"
    day: date | None = None
    tenant: str | None = None
    model: str | None = None
    lane: UsageLane | None = None
    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class UsageReport(BaseModel):
    """``GET /v1/usage``."""

    object: Literal["list"] = "list"
    start: date
    end: date
    group_by: list[UsageKey]
    data: list[UsageRow]
    total: UsageRow
