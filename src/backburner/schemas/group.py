"""The Group API's submission body: strict at the top, each request as its single
slow route validates it. What needs the server (served models, known webhooks) is checked beside
these models, in :mod:`backburner.schemas.validation` and the route."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backburner.core.states import Kind
from backburner.schemas.openai import (
    MAX_WEBHOOK_ID,
    TOUR_MODEL,
    SlowChatCompletionRequest,
    SlowCompletionRequest,
    column_text,
)

MAX_GROUP_SIZE = 50
SIZE_HINT = (
    f"a group holds 1 to {MAX_GROUP_SIZE} requests; for more, use the Batch API"
    " (POST /v1/files, then POST /v1/batches)"
)


class _GroupBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
    kind: ClassVar[Kind]
    hints: ClassVar[dict[str, str]] = {
        "": 'send {"requests": [<request>, ...], "webhook_id"?, "metadata"?}',
        "requests": SIZE_HINT,
        "webhook_url": (
            "use webhook_id (webhook_url is the Batch API's): register the URL with"
            " POST /v1/webhooks and pass its id"
        ),
    }
    """Said after a problem at these top-level keys ("" is the body itself)."""

    @field_validator("requests", mode="before", check_fields=False)
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        if isinstance(v, list) and len(v) > MAX_GROUP_SIZE:
            raise ValueError(f"has {len(v)} requests")
        return v

    @field_validator("webhook_id", check_fields=False)
    @classmethod
    def _webhook_id(cls, v: str | None) -> str | None:
        return column_text(v, MAX_WEBHOOK_ID)


def _tour(key: str, first: Any, second: Any) -> dict[str, Any]:
    """The README's two-request group, as ``key`` (``messages`` or ``prompt``) requests."""
    return {
        "requests": [
            {"model": TOUR_MODEL, key: first, "metadata": {"custom_id": "a"}},
            {"model": TOUR_MODEL, key: second, "metadata": {"custom_id": "b"}},
        ]
    }


class GroupChatRequest(_GroupBody):
    """``POST /v1/slow/group/chat/completions``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                _tour(
                    "messages",
                    [{"role": "user", "content": "Hi"}],
                    [{"role": "user", "content": "Bye"}],
                )
            ]
        }
    )

    kind = Kind.CHAT

    requests: Annotated[
        list[SlowChatCompletionRequest], Field(min_length=1, max_length=MAX_GROUP_SIZE)
    ]
    webhook_id: str | None = None
    """A webhook of yours, sent ``slow-group.completed`` when every generation is finished."""
    metadata: dict[str, Any] | None = None
    """Stored with the group and echoed back exactly as sent."""


class GroupCompletionRequest(_GroupBody):
    """``POST /v1/slow/group/completions``."""

    model_config = ConfigDict(json_schema_extra={"examples": [_tour("prompt", "Hi", "Bye")]})

    kind = Kind.COMPLETION

    requests: Annotated[list[SlowCompletionRequest], Field(min_length=1, max_length=MAX_GROUP_SIZE)]
    webhook_id: str | None = None
    """A webhook of yours, sent ``slow-group.completed`` when every generation is finished."""
    metadata: dict[str, Any] | None = None
    """Stored with the group and echoed back exactly as sent."""


GROUP_REQUESTS: dict[Kind, type[_GroupBody]] = {
    Kind.CHAT: GroupChatRequest,
    Kind.COMPLETION: GroupCompletionRequest,
}
