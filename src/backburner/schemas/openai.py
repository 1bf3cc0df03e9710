"""OpenAI request bodies, validated as a single route validates them, and the answers.

Unknown extra fields are allowed and passed on untouched; the stored request is always the body
exactly as sent, never a re-serialisation of these models. The ``Slow*`` variants are the bodies of
the slow lane (and of groups and batch lines): the same, except that ``stream`` must be false.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backburner.core.states import Kind


def wrong_kind(kind: Kind, body: dict[str, Any]) -> str | None:
    """Why ``body`` is a request of another kind than ``kind``, or None."""
    if kind is Kind.CHAT and "prompt" in body:
        return (
            "has 'prompt', which belongs to a completions request; chat"
            " completion requests need 'messages'"
        )
    if kind is Kind.COMPLETION and "messages" in body:
        return (
            "has 'messages', which belongs to a chat completions request;"
            " completions requests need 'prompt'"
        )
    if kind is not Kind.EMBEDDING and "input" in body and not {"messages", "prompt"} & set(body):
        return "has 'input', which belongs to an embeddings request"
    return None


MAX_CUSTOM_ID = 512
MAX_WEBHOOK_ID = 32

# Examples shown in /docs and /redoc (and sent by the contract tests): the README's tour.
TOUR_MODEL = "smollm2-135m-instruct"
CHAT_EXAMPLE: dict[str, Any] = {
    "model": TOUR_MODEL,
    "messages": [{"role": "user", "content": "Name three rivers."}],
    "max_tokens": 64,
    "metadata": {"custom_id": "rivers-1"},
}
COMPLETION_EXAMPLE: dict[str, Any] = {
    "model": TOUR_MODEL,
    "prompt": "Three rivers:",
    "max_tokens": 64,
    "metadata": {"custom_id": "rivers-2"},
}
EMBEDDING_EXAMPLE: dict[str, Any] = {
    "model": TOUR_MODEL,
    "input": "Name three rivers.",
    "metadata": {"custom_id": "rivers-3"},
}


def column_text(value: str | None, limit: int | None = None) -> str | None:
    """``value`` when the store can keep it in a text column, or look it up by it, as it is: no
    NUL (PostgreSQL refuses it in any text, a query included) and at most ``limit`` characters.
    A field validator of every string that the store does not keep inside JSON."""
    if value is not None:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        if limit is not None and len(value) > limit:
            raise ValueError(f"must be at most {limit} characters")
    return value


class RequestMetadata(BaseModel):
    """backburner's own part of a request: stored and echoed, never sent to the engine. Free
    form, but the two keys backburner reads are stored in columns: strings that fit."""

    model_config = ConfigDict(extra="allow", strict=True)

    custom_id: str | None = None
    """Your id for this request; echoed in results and events."""
    webhook_id: str | None = None
    """A webhook of yours, sent ``generation.completed`` when this request finishes."""

    @field_validator("custom_id")
    @classmethod
    def _custom_id(cls, value: str | None) -> str | None:
        return column_text(value, MAX_CUSTOM_ID)

    @field_validator("webhook_id")
    @classmethod
    def _webhook_id(cls, value: str | None) -> str | None:
        return column_text(value, MAX_WEBHOOK_ID)


class _Body(BaseModel):
    # strict: a value of another JSON type than declared is refused, never coerced (``false`` is
    # not a number, ``0`` not a boolean); the body is stored and sent on exactly as sent
    model_config = ConfigDict(extra="allow", strict=True)
    kind: ClassVar[Kind]

    model: Annotated[str, Field(min_length=1)]
    metadata: RequestMetadata | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _right_kind(cls, data: Any) -> Any:
        """A body of another kind gets that one problem, not a list of what it lacks."""
        why = wrong_kind(cls.kind, data) if isinstance(data, dict) else None
        if why is not None:
            raise ValueError(why)
        return data


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
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [CHAT_EXAMPLE]})
    kind = Kind.CHAT

    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [COMPLETION_EXAMPLE]})
    kind = Kind.COMPLETION

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class EmbeddingRequest(_Body):
    model_config = ConfigDict(json_schema_extra={"examples": [EMBEDDING_EXAMPLE]})
    kind = Kind.EMBEDDING

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


NO_STREAM = "streaming is not supported on slow routes; omit 'stream' or set it to false"


def _no_stream(v: Any) -> Any:
    if v is not None and v is not False:  # identity: 0 == False, and 0 is not a boolean
        raise ValueError(NO_STREAM)
    return v


class SlowChatCompletionRequest(ChatCompletionRequest):
    stream: Literal[False] | None = None

    _stream = field_validator("stream", mode="before")(_no_stream)


class SlowCompletionRequest(CompletionRequest):
    stream: Literal[False] | None = None

    _stream = field_validator("stream", mode="before")(_no_stream)


class SlowEmbeddingRequest(EmbeddingRequest):
    stream: Literal[False] | None = None

    _stream = field_validator("stream", mode="before")(_no_stream)


REQUESTS: dict[Kind, type[_Body]] = {
    Kind.CHAT: ChatCompletionRequest,
    Kind.COMPLETION: CompletionRequest,
    Kind.EMBEDDING: EmbeddingRequest,
}
SLOW_REQUESTS: dict[Kind, type[_Body]] = {
    Kind.CHAT: SlowChatCompletionRequest,
    Kind.COMPLETION: SlowCompletionRequest,
    Kind.EMBEDDING: SlowEmbeddingRequest,
}


class GenerationSubmitted(BaseModel):
    """The answer to a slow submission *(compat)*."""

    id: str
    object: Literal["generation"] = "generation"
    state: Literal["Queued"] = "Queued"


# ---------------------------------------------------------------- realtime answers


class _Answer(BaseModel):
    """An engine's answer, passed through unchanged: only the fields clients rely on are named."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    created: int | None = None
    model: str
    usage: dict[str, Any] | None = None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"]
    choices: list[dict[str, Any]]


class Completion(_Answer):
    object: Literal["text_completion"]
    choices: list[dict[str, Any]]


class EmbeddingList(_Answer):
    object: Literal["list"]
    data: list[dict[str, Any]]


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]
