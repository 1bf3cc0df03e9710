"""OpenAI Batch objects and batch input lines, as OpenAI's Batch API defines them."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backburner.core.clock import epoch
from backburner.core.states import Kind
from backburner.schemas.validation import validate_request

ENDPOINTS: dict[str, Kind] = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETION,
    "/v1/embeddings": Kind.EMBEDDING,
}
BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
WINDOWS = {"24h": 24 * 3600}
MAX_REPORTED_ERRORS = 100


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: str
    metadata: dict[str, str] | None = None
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2048)

    @field_validator("completion_window")
    @classmethod
    def _window(cls, v: str) -> str:
        if v not in WINDOWS:
            raise ValueError(f"'{v}' is not supported; the only completion_window is '24h'")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and len(v) > 16:
            raise ValueError("at most 16 metadata keys are allowed")
        return v


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    tenant: str
    input_file_id: str
    endpoint: str
    completion_window: str
    status: str
    metadata: dict[str, str] | None
    webhook_url: str | None
    errors: list[dict[str, Any]] | None
    total: int
    completed: int
    failed: int
    pending: int
    loaded: int
    output_file_id: str | None
    error_file_id: str | None
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    fair_start: int | None = None

    @property
    def kind(self) -> Kind:
        return ENDPOINTS[self.endpoint]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_wire(self) -> dict[str, Any]:
        def ts(v: datetime | None) -> int | None:
            return None if v is None else epoch(v)

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None if not self.errors else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": epoch(self.created_at),
            "in_progress_at": ts(self.in_progress_at),
            "expires_at": ts(self.expires_at),
            "finalizing_at": ts(self.finalizing_at),
            "completed_at": ts(self.completed_at),
            "failed_at": ts(self.failed_at),
            "expired_at": ts(self.expired_at),
            "cancelling_at": ts(self.cancelling_at),
            "cancelled_at": ts(self.cancelled_at),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
            "webhook_url": self.webhook_url,
        }


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    message: str
    param: str | None = None
    code: str = "invalid_request"

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class BatchLine:
    custom_id: str
    body: dict[str, Any]


def _infer_kind(body: dict[str, Any]) -> Kind | None:
    if "messages" in body:
        return Kind.CHAT
    if "prompt" in body:
        return Kind.COMPLETION
    if "input" in body:
        return Kind.EMBEDDING
    return None


def parse_line(
    lineno: int, raw: bytes, endpoint: str, known_models: Collection[str]
) -> BatchLine | list[LineError]:
    """One input line: ``{"custom_id", "method": "POST", "url"?, "body"}``, checked completely."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return [LineError(lineno, f"line {lineno} is not valid JSON: {exc}")]
    if not isinstance(obj, dict):
        return [LineError(lineno, f"line {lineno} must be a JSON object")]
    errs: list[LineError] = []
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        errs.append(
            LineError(
                lineno,
                f"line {lineno}: custom_id is required (a non-empty string, unique in the file)",
                "custom_id",
            )
        )
    elif len(custom_id) > 512:
        errs.append(
            LineError(
                lineno, f"line {lineno}: custom_id is longer than 512 characters", "custom_id"
            )
        )
    if obj.get("method") != "POST":
        errs.append(LineError(lineno, f'line {lineno}: method must be "POST"', "method"))
    body = obj.get("body")
    if not isinstance(body, dict):
        errs.append(LineError(lineno, f"line {lineno}: body must be a JSON object", "body"))
        return errs
    url = obj.get("url")
    want = ENDPOINTS[endpoint]
    if url is not None:
        if url != endpoint:
            errs.append(
                LineError(
                    lineno,
                    f"line {lineno}: url '{url}' does not match the batch's endpoint '{endpoint}'",
                    "url",
                )
            )
    else:
        inferred = _infer_kind(body)
        if inferred is not want:
            errs.append(
                LineError(
                    lineno,
                    f"line {lineno}: url is omitted and the body does not"
                    f" look like a request for '{endpoint}'",
                    "url",
                )
            )
    for p in validate_request(want, body, known_models, prefix="body"):
        errs.append(LineError(lineno, f"line {lineno}: {p}", p.param))
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        errs.append(
            LineError(
                lineno,
                f"line {lineno}: unknown keys {sorted(extra)}; allowed:"
                " custom_id, method, url, body",
            )
        )
    if errs:
        return errs
    assert isinstance(custom_id, str)
    return BatchLine(custom_id, body)
