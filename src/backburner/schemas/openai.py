"""OpenAI request bodies, validated as a single route validates them.

Unknown extra fields are allowed and passed on untouched; the stored request is always the body
exactly as sent, never a re-serialisation of these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1)]
    metadata: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_webhook_id(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and "webhook_id" in v and not isinstance(v["webhook_id"], str):
            raise ValueError("metadata.webhook_id must be a string")
        return v


class _Sampling(_Body):
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("input must not be empty")
        if isinstance(v, str) and v == "":
            raise ValueError("input must not be an empty string")
        return v


class GenerationSubmitted(BaseModel):
    """The answer to a slow submission."""

    id: str
    object: Literal["generation"] = "generation"
    state: str = "Queued"
