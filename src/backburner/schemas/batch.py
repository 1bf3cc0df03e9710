"""OpenAI Batch objects and batch input and output lines, as OpenAI's Batch API defines them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backburner.core.clock import epoch
from backburner.core.states import BATCH_FINISHED, BatchStatus, Kind
from backburner.schemas.openai import MAX_CUSTOM_ID, column_text
from backburner.schemas.validation import (
    JsonValueError,
    Problem,
    check,
    load_json,
    quoted,
    validate_request,
)

ENDPOINTS: dict[str, Kind] = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETION,
    "/v1/embeddings": Kind.EMBEDDING,
}
BATCH_STATUSES: tuple[str, ...] = tuple(s.value for s in BatchStatus)
TERMINAL = frozenset(s.value for s in BATCH_FINISHED)
WINDOWS = {"24h": 24 * 3600}
MAX_REPORTED_ERRORS = 100


class BatchCreate(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "input_file_id": "file-abc123",
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                }
            ]
        },
    )

    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: str
    metadata: dict[str, str] | None = None
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2048)

    @field_validator("input_file_id")
    @classmethod
    def _input_file_id(cls, v: str) -> str:
        return str(column_text(v))

    @field_validator("completion_window")
    @classmethod
    def _window(cls, v: str) -> str:
        if v not in WINDOWS:
            raise ValueError(f"{quoted(v)} is not supported; the only completion_window is '24h'")
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

    def to_wire(self, expected: datetime | None = None) -> dict[str, Any]:
        """The Batch object; ``expected`` is its expected completion (an extra field)."""

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
            "expected_completion_at": ts(expected),
        }


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchLineError(BaseModel):
    """A problem found while validating the input file (``line`` is 1-based; null: the file)."""

    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchLineError]


class Batch(BaseModel):
    """OpenAI's Batch object (timestamps in epoch seconds)."""

    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None
    webhook_url: str | None
    # extra: when its remaining work should be done at its tenant's recent pace (null: unknown
    # or finished); docs/scheduling.md
    expected_completion_at: int | None = None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---------------------------------------------------------------- input and output lines


class BatchRequestInput(BaseModel):
    """One line of a batch input file. ``body`` is checked as a request of the batch's endpoint
    (its kind is the batch's, not the line's): see :func:`parse_line`. ``custom_id`` is stored
    in a text column of :data:`MAX_CUSTOM_ID` characters, so it must fit and hold no NUL
    (PostgreSQL refuses it); invalid Unicode and deep nesting are refused for the whole line by
    :func:`~backburner.schemas.validation.load_json`."""

    model_config = ConfigDict(extra="forbid")
    hints: ClassVar[dict[str, str]] = {
        "custom_id": f"a non-empty string of at most {MAX_CUSTOM_ID} characters, unique in the"
        " file",
    }

    custom_id: Annotated[str, Field(min_length=1, max_length=MAX_CUSTOM_ID)]
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] | None = None
    """May be omitted: the kind is then read from the body (messages, prompt or input)."""
    body: dict[str, Any]

    @field_validator("custom_id")
    @classmethod
    def _storable_custom_id(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class BatchResponseData(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]
    """The engine's answer, as the realtime route would have answered it."""


class BatchRequestError(BaseModel):
    code: str
    message: str


class BatchRequestOutput(BaseModel):
    """One line of a batch's output file (``response`` set, ``error`` null) or error file
    (``response`` null, ``error`` set)."""

    id: str
    custom_id: str | None
    response: BatchResponseData | None
    error: BatchRequestError | None

    @classmethod
    def success(
        cls, generation_id: str, custom_id: str | None, body: dict[str, Any]
    ) -> BatchRequestOutput:
        return cls(
            id=f"batch_req_{generation_id}",
            custom_id=custom_id,
            response=BatchResponseData(status_code=200, request_id=generation_id, body=body),
            error=None,
        )

    @classmethod
    def failure(
        cls, generation_id: str, custom_id: str | None, code: str, message: str
    ) -> BatchRequestOutput:
        return cls(
            id=f"batch_req_{generation_id}",
            custom_id=custom_id,
            response=None,
            error=BatchRequestError(code=code, message=message),
        )

    def to_line(self) -> bytes:
        """The JSONL line: compact, UTF-8, newline-terminated."""
        return self.model_dump_json().encode() + b"\n"


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
    """One input line (:class:`BatchRequestInput`), checked completely: every problem of the line,
    its body checked as the batch's endpoint would check it."""
    try:
        obj = load_json(raw)
    except JsonValueError as exc:  # parses, but could not be stored or sent back
        what = f"{exc.path}: {exc.message}" if exc.path else f"the line {exc.message}"
        return [LineError(lineno, f"line {lineno}: {what}", exc.path or None)]
    except RecursionError:  # load_json catches it; a line must never raise whatever it holds
        return [LineError(lineno, f"line {lineno}: the line is nested too deeply")]
    except (ValueError, UnicodeDecodeError) as exc:
        return [LineError(lineno, f"line {lineno} is not valid JSON: {exc}")]
    line, problems = check(BatchRequestInput, obj, root="")
    body = obj.get("body") if isinstance(obj, dict) else None
    if isinstance(body, dict):
        want = ENDPOINTS[endpoint]
        url = obj.get("url")
        if url is None and _infer_kind(body) is not want:
            problems.append(
                Problem(
                    "url",
                    f"is omitted and the body does not look like a request for '{endpoint}'",
                )
            )
        elif isinstance(url, str) and url in ENDPOINTS and url != endpoint:
            problems.append(
                Problem("url", f"'{url}' does not match the batch's endpoint '{endpoint}'")
            )
        problems.extend(validate_request(want, body, known_models, prefix="body"))
    if problems or line is None:
        return [LineError(lineno, f"line {lineno}: {p}", p.param or None) for p in problems]
    return BatchLine(line.custom_id, body if isinstance(body, dict) else line.body)
