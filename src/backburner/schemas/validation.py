"""Validation of request bodies, shared by single, group and batch submission.

Returns every problem found (not just the first), each naming its field by path, e.g.
``messages[0].role`` or, inside a group, ``requests[3].messages``. :func:`problems_from` is the
one translation of pydantic's errors into problems, whoever raised them: a model here, a batch
line, or FastAPI checking a route's parameters.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from backburner.core.states import Kind
from backburner.schemas.group import GROUP_REQUESTS
from backburner.schemas.group import MAX_GROUP_SIZE as MAX_GROUP_SIZE
from backburner.schemas.openai import REQUESTS, SLOW_REQUESTS

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    param: str
    message: str

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


def quoted(value: object, limit: int = 100) -> str:
    """``value`` in quotes for a message, cut to ``limit`` characters: a problem with a huge
    value is still a readable message."""
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"'{text}'"


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


# ---------------------------------------------------------------------------- JSON


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


MAX_JSON_DEPTH = 64


class JsonValueError(ValueError):
    """JSON that parses but could not be stored or sent back; ``path`` names the value."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_json_value(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse what parses but cannot be stored, read back and announced: nesting deeper than
    ``max_depth``, and strings or keys that are not valid Unicode (a lone surrogate such as
    ``"\\ud800"``). Iterative, so a deep value cannot exhaust the stack."""
    stack: list[tuple[Any, tuple[int | str, ...]]] = [(value, ())]
    while stack:
        item, loc = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                raise JsonValueError(join_path("", loc), "is not valid Unicode (a lone surrogate)")
            continue
        if not isinstance(item, dict | list):
            continue
        if len(loc) >= max_depth:
            raise JsonValueError(join_path("", loc), f"is nested more than {max_depth} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                if not _storable(key):
                    raise JsonValueError(
                        join_path("", loc), "has a key that is not valid Unicode (a lone surrogate)"
                    )
                stack.append((child, (*loc, key)))
        else:
            stack.extend((child, (*loc, i)) for i, child in enumerate(item))


def load_json(raw: bytes | str) -> Any:
    """JSON as RFC 8259 has it, and nothing that could not be stored or sent back: NaN,
    Infinity and numbers too large for a float, invalid Unicode and very deep nesting are
    refused (``ValueError``; :class:`JsonValueError` names the value)."""
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise JsonValueError("", f"is nested more than {MAX_JSON_DEPTH} levels deep") from None
    check_json_value(value)
    return value


# ---------------------------------------------------------------------------- pydantic errors

_WORDS = {
    "missing": "is required",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


def _words(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind in _WORDS:
        return _WORDS[kind]
    if kind == "literal_error":
        return f"must be one of {err.get('ctx', {}).get('expected', '')}"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _unknown(key: str, allowed: list[str], hint: str | None) -> str:
    if hint:
        return f"unknown field; {hint}"
    near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
    said = f"; did you mean {near[0]}?" if near else ";"
    return f"unknown field{said} allowed fields: {', '.join(allowed)}"


def problems_from(
    errors: Iterable[Mapping[str, Any]],
    *,
    model: type[BaseModel] | None = None,
    prefix: str = "",
    root: str = "body",
) -> list[Problem]:
    """Pydantic's errors (``ValidationError.errors()``) as problems, one per path.

    A path is written ``requests[3].messages``, under ``prefix``; an error about the value as a
    whole is named ``prefix``, or ``root`` without one. ``model`` (the model that was validated)
    adds the allowed fields to an unknown top-level key, a "did you mean" for a near miss, and the
    model's ``hints`` (a ``{top-level key: words}`` class attribute) after a problem at that key.
    """
    hints: Mapping[str, str] = getattr(model, "hints", {}) if model is not None else {}
    allowed = list(model.model_fields) if model is not None else []
    seen: dict[str, Problem] = {}
    for err in errors:
        loc = tuple(p for p in err["loc"] if not _is_type_tag(p))
        key = str(loc[0]) if loc else ""
        if err["type"] == "extra_forbidden":
            words = _unknown(key, allowed, hints.get(key)) if len(loc) == 1 else "unknown field"
        else:
            words = _words(err)
            if len(loc) <= 1 and key in hints:
                words = f"{words}; {hints[key]}"
        param = join_path(prefix, loc) or root
        seen.setdefault(param, Problem(param, words))  # a union reports each branch: keep one
    return list(seen.values())


def check(
    model: type[M], data: Any, *, prefix: str = "", root: str = "body"
) -> tuple[M | None, list[Problem]]:
    """``data`` validated by ``model``, or every problem with it."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, problems_from(
            exc.errors(include_url=False), model=model, prefix=prefix, root=root
        )


# ---------------------------------------------------------------------------- requests


def _unserved(body: dict[str, Any], known_models: Collection[str], prefix: str) -> list[Problem]:
    model = body.get("model")
    if isinstance(model, str) and model and model not in known_models:
        served = ", ".join(sorted(known_models)) or "none"
        return [
            Problem(
                join_path(prefix, ("model",)),
                f"model {quoted(model)} is not served here; available models: {served}",
            )
        ]
    return []


def validate_request(
    kind: Kind,
    body: Any,
    known_models: Collection[str],
    *,
    prefix: str = "",
    slow: bool = True,
) -> list[Problem]:
    """Every problem with one OpenAI request body for ``kind`` (``slow``: ``stream`` refused)."""
    _, problems = check((SLOW_REQUESTS if slow else REQUESTS)[kind], body, prefix=prefix)
    whole = prefix or "body"
    if isinstance(body, dict) and not any(p.param == whole for p in problems):
        problems.extend(_unserved(body, known_models, prefix))
    return problems


def validate_group(
    kind: Kind, body: Any, known_models: Collection[str]
) -> tuple[list[Problem], list[dict[str, Any]]]:
    """Every problem with a group submission body; and its requests when there are none."""
    _, problems = check(GROUP_REQUESTS[kind], body)
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not 0 < len(requests) <= MAX_GROUP_SIZE:
        return problems, []
    for i, request in enumerate(requests):
        where = f"requests[{i}]"
        if isinstance(request, dict) and not any(p.param == where for p in problems):
            problems.extend(_unserved(request, known_models, where))
    return problems, requests
