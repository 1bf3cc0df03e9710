"""Validation of request bodies, shared by single, group (and later batch) submission.

Returns every problem found (not just the first), each naming its field by path, e.g.
``messages[0].role`` or, inside a group, ``requests[3].messages``.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from backburner.core.states import Kind
from backburner.schemas.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

MAX_GROUP_SIZE = 50
GROUP_KEYS = ("requests", "webhook_id", "metadata")

MODELS: dict[Kind, type[BaseModel]] = {
    Kind.CHAT: ChatCompletionRequest,
    Kind.COMPLETION: CompletionRequest,
    Kind.EMBEDDING: EmbeddingRequest,
}
ROUTE_NAMES = {
    Kind.CHAT: "chat completions",
    Kind.COMPLETION: "completions",
    Kind.EMBEDDING: "embeddings",
}


@dataclass(frozen=True)
class Problem:
    param: str
    message: str

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


def join_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_type_tag(part: int | str) -> bool:
    """Union branches appear in pydantic locations as type names; they are not fields."""
    return isinstance(part, str) and (
        "[" in part or "-" in part or part in _TYPE_TAGS or part.startswith("function")
    )


def _pydantic_problems(exc: ValidationError, prefix: str) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not _is_type_tag(p))
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "literal_error":
            msg = f"must be one of {err.get('ctx', {}).get('expected', '')}"
        problems.append(Problem(join_path(prefix, loc), msg))
    # one problem per path (union types report each branch)
    seen: dict[str, Problem] = {}
    for p in problems:
        seen.setdefault(p.param, p)
    return list(seen.values())


def wrong_kind(kind: Kind, body: dict[str, Any], prefix: str) -> Problem | None:
    where = prefix or "body"
    if kind is Kind.CHAT and "prompt" in body:
        return Problem(
            where,
            "has 'prompt', which belongs to a completions request; chat"
            " completion requests need 'messages'",
        )
    if kind is Kind.COMPLETION and "messages" in body:
        return Problem(
            where,
            "has 'messages', which belongs to a chat completions request;"
            " completions requests need 'prompt'",
        )
    if (
        kind is not Kind.EMBEDDING
        and "input" in body
        and "messages" not in body
        and ("prompt" not in body)
    ):
        return Problem(where, "has 'input', which belongs to an embeddings request")
    return None


def validate_request(
    kind: Kind,
    body: Any,
    known_models: Collection[str],
    *,
    prefix: str = "",
    slow: bool = True,
) -> list[Problem]:
    """Every problem with one OpenAI request body for ``kind``."""
    if not isinstance(body, dict):
        return [Problem(prefix or "body", "must be a JSON object")]
    wk = wrong_kind(kind, body, prefix)
    if wk is not None:
        return [wk]
    problems: list[Problem] = []
    try:
        MODELS[kind].model_validate(body)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, prefix))
    model = body.get("model")
    if isinstance(model, str) and model and model not in known_models:
        served = ", ".join(sorted(known_models)) or "none"
        problems.append(
            Problem(
                join_path(prefix, ("model",)),
                f"model '{model}' is not served here; available models: {served}",
            )
        )
    if slow and body.get("stream") not in (None, False):
        problems.append(
            Problem(
                join_path(prefix, ("stream",)),
                "streaming is not supported on slow routes; omit 'stream' or set it to false",
            )
        )
    return problems


def validate_group(
    kind: Kind, body: Any, known_models: Collection[str]
) -> tuple[list[Problem], list[dict[str, Any]]]:
    """Every problem with a group submission body; and its requests when there are none."""
    if not isinstance(body, dict):
        return [Problem("body", "must be a JSON object with a 'requests' list")], []
    problems: list[Problem] = []
    for key in body:
        if key in GROUP_KEYS:
            continue
        if key == "webhook_url":
            problems.append(
                Problem(
                    "webhook_url",
                    "unknown field; use webhook_id (webhook_url is the Batch API's): register the"
                    " URL with POST /v1/webhooks and pass its id",
                )
            )
            continue
        near = difflib.get_close_matches(key, GROUP_KEYS, n=1, cutoff=0.75)
        hint = f"; did you mean {near[0]}?" if near else ""
        problems.append(
            Problem(key, f"unknown field{hint} allowed fields: {', '.join(GROUP_KEYS)}")
        )
    if (
        "metadata" in body
        and body["metadata"] is not None
        and not isinstance(body["metadata"], dict)
    ):
        problems.append(Problem("metadata", "must be a JSON object"))
    if (
        "webhook_id" in body
        and body["webhook_id"] is not None
        and not isinstance(body["webhook_id"], str)
    ):
        problems.append(Problem("webhook_id", "must be a string"))
    reqs = body.get("requests")
    limit_hint = (
        f"a group holds 1 to {MAX_GROUP_SIZE} requests; for more, use the Batch API"
        " (POST /v1/files, then POST /v1/batches)"
    )
    if "requests" not in body:
        problems.append(Problem("requests", f"is required: {limit_hint}"))
        return problems, []
    if not isinstance(reqs, list):
        problems.append(Problem("requests", f"must be a list; {limit_hint}"))
        return problems, []
    if not reqs:
        problems.append(Problem("requests", f"must not be empty; {limit_hint}"))
        return problems, []
    if len(reqs) > MAX_GROUP_SIZE:
        problems.append(Problem("requests", f"has {len(reqs)} requests; {limit_hint}"))
        return problems, []
    for i, r in enumerate(reqs):
        problems.extend(validate_request(kind, r, known_models, prefix=f"requests[{i}]"))
    return problems, reqs
