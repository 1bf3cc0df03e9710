"""Webhook wire shapes: endpoints, the events sent to them, and delivery attempts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from backburner.core.clock import iso
from backburner.schemas.events import EventName
from backburner.schemas.openai import column_text

ALL_EVENTS: tuple[str, ...] = tuple(e.value for e in EventName)


class WebhookCreate(BaseModel):
    """``POST /v1/webhooks``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"url": "https://example.com/hooks/backburner"}]},
    )

    url: str = Field(min_length=1, max_length=2048)
    name: str | None = Field(default=None, max_length=200)
    events: list[EventName] | None = None
    enabled: bool = Field(default=True, strict=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return column_text(v)


class WebhookUpdate(BaseModel):
    """``PATCH /v1/webhooks/{id}``: only the keys sent change."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"events": ["slow-group.completed"], "enabled": True}]},
    )

    url: str | SkipJsonSchema[None] = Field(default=None, min_length=1, max_length=2048)
    name: str | None = Field(default=None, max_length=200)
    events: list[EventName] | None = None
    enabled: Annotated[bool, Field(strict=True)] | SkipJsonSchema[None] = None

    @field_validator("url", "enabled", mode="before")
    @classmethod
    def _not_null(cls, v: Any) -> Any:
        if v is None:  # only a value sent is checked: an absent key keeps its value
            raise ValueError("must not be null")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return column_text(v)


@dataclass(frozen=True, slots=True)
class WebhookRecord:
    id: str
    tenant: str
    url: str
    name: str | None
    secret: str
    events: list[str]
    enabled: bool
    created_at: datetime
    updated_at: datetime

    def subscribed(self, event: str) -> bool:
        return self.enabled and event in self.events

    def to_wire(self, *, with_secret: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "webhook",
            "url": self.url,
            "name": self.name,
            "events": list(self.events),
            "enabled": self.enabled,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
        }
        if with_secret:
            out["secret"] = self.secret
        return out


class Webhook(BaseModel):
    id: str
    object: Literal["webhook"]
    url: str
    name: str | None
    events: list[str]
    enabled: bool
    createdAt: str
    updatedAt: str


class WebhookCreated(Webhook):
    """A new webhook, with its signing secret: shown this once."""

    secret: str


class WebhookList(BaseModel):
    object: Literal["list"]
    data: list[Webhook]


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook"]
    deleted: bool


class DeliveryAttempt(BaseModel):
    """One try at delivering an event: its status code, time and error."""

    id: str
    object: Literal["webhook.delivery_attempt"]
    deliveryId: str
    webhookId: str | None
    event: str
    attempt: int
    statusCode: int | None
    durationMs: int
    error: str | None
    createdAt: str
    deliveryState: str


class DeliveryAttemptList(BaseModel):
    object: Literal["list"]
    data: list[DeliveryAttempt]


class DeliveryQueued(BaseModel):
    """An event queued for delivery (``webhook.test``, or a redelivery)."""

    id: str
    object: Literal["webhook.delivery"]
    state: Literal["pending"]
    event: str | SkipJsonSchema[None] = None
    webhookId: str | SkipJsonSchema[None] = None


@dataclass(frozen=True, slots=True)
class DueEvent:
    """An outbox row claimed for delivery, with its endpoint."""

    id: str
    tenant: str
    webhook_id: str | None
    url: str | None
    secret: str | None
    endpoint_enabled: bool
    event: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    id: str
    event_id: str
    webhook_id: str | None
    event: str
    attempt: int
    status_code: int | None
    duration_ms: int
    error: str | None
    created_at: datetime
    delivery_state: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "webhook.delivery_attempt",
            "deliveryId": self.event_id,
            "webhookId": self.webhook_id,
            "event": self.event,
            "attempt": self.attempt,
            "statusCode": self.status_code,
            "durationMs": self.duration_ms,
            "error": self.error,
            "createdAt": iso(self.created_at),
            "deliveryState": self.delivery_state,
        }
