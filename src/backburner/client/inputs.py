"""Request files for ``backburner submit``: read, checked locally with the server's own request
models, and turned into a group body or a batch input file.

A file is JSONL (one request a line) or JSON (a list of requests, or ``{"requests": [...]}``).
Each request is either an OpenAI request body (its custom id in ``metadata.custom_id``) or an
OpenAI batch line ``{"custom_id", "method", "url", "body"}``. A request without a custom id gets
``line-<N>`` (its line number), so every result can be matched to its request. All requests of a
file are of one kind (chat, completion or embeddings).

JSONL files are read a line at a time, twice (once to check, once to write what is sent), so a
file of a million lines never sits in memory; only the custom ids seen are kept, to refuse
duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from backburner.core.states import Kind
from backburner.schemas.batch import ENDPOINTS, BatchRequestInput
from backburner.schemas.group import MAX_GROUP_SIZE
from backburner.schemas.openai import SLOW_REQUESTS
from backburner.schemas.validation import JsonValueError, check, load_json

KIND_WORDS = {Kind.CHAT: "a chat", Kind.COMPLETION: "a completion", Kind.EMBEDDING: "an embeddings"}


class InputError(Exception):
    """A request file that cannot be submitted: each problem names its line."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Item:
    """One request of a file: where it is, its custom id, its kind and its body."""

    lineno: int
    custom_id: str
    kind: Kind
    body: dict[str, Any]

    def group_request(self) -> dict[str, Any]:
        """The body with ``metadata.custom_id`` set (as a group request carries it)."""
        md = self.body.get("metadata")
        if isinstance(md, dict) and md.get("custom_id") == self.custom_id:
            return self.body
        metadata = dict(md) if isinstance(md, dict) else {}
        metadata["custom_id"] = self.custom_id
        return {**self.body, "metadata": metadata}

    def batch_line(self) -> bytes:
        line = {
            "custom_id": self.custom_id,
            "method": "POST",
            "url": next(u for u, k in ENDPOINTS.items() if k is self.kind),
            "body": self.body,
        }
        return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@dataclass(slots=True)
class Scan:
    """What a first pass over a file found."""

    path: Path
    count: int = 0
    kind: Kind | None = None
    problems: list[str] = field(default_factory=list)


def _raw_items(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value or the JsonValueError/ValueError)`` for each request."""
    if path.suffix.lower() == ".json":
        try:
            doc = load_json(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            yield 1, ValueError(f"is not valid JSON: {exc}")
            return
        if isinstance(doc, dict) and isinstance(doc.get("requests"), list):
            doc = doc["requests"]
        if not isinstance(doc, list):
            yield 1, ValueError('must be a list of requests (or {"requests": [...]})')
            return
        # a JSON file's requests are numbered from 1 by their position in the list
        yield from enumerate(doc, start=1)
        return
    with path.open("rb") as fh:
        yield from _jsonl(fh)


def _jsonl(fh: IO[bytes]) -> Iterator[tuple[int, Any]]:
    for lineno, raw in enumerate(fh, start=1):
        if not raw.strip():
            continue
        try:
            yield lineno, load_json(raw)
        except JsonValueError as exc:
            yield lineno, exc
        except (ValueError, UnicodeDecodeError) as exc:
            yield lineno, ValueError(f"is not valid JSON: {exc}")


def _kind_of(body: dict[str, Any], url: Any) -> Kind | None:
    if isinstance(url, str) and url in ENDPOINTS:
        return ENDPOINTS[url]
    keys = (("messages", Kind.CHAT), ("prompt", Kind.COMPLETION), ("input", Kind.EMBEDDING))
    return next((kind for key, kind in keys if key in body), None)


def parse_item(lineno: int, value: Any) -> Item | list[str]:
    """One request checked as the server would check it (served models aside): the item, or
    every problem with it."""
    if isinstance(value, Exception):
        return [str(value)]
    if not isinstance(value, dict):
        return ["must be a JSON object (a request body or a batch line)"]
    batch_style = "body" in value and bool({"custom_id", "method", "url"} & set(value))
    problems: list[str] = []
    if batch_style:
        line, found = check(BatchRequestInput, value, root="line")
        problems += [str(p) for p in found]
        body = value.get("body")
        if not isinstance(body, dict):
            return problems or ["body: must be a JSON object"]
        custom_id = line.custom_id if line is not None else None
        prefix = "body"
    else:
        body = value
        md = body.get("metadata")
        cid = md.get("custom_id") if isinstance(md, dict) else None
        custom_id = cid if isinstance(cid, str) and cid else None
        prefix = ""
    kind = _kind_of(body, value.get("url") if batch_style else None)
    if kind is None:
        return [*problems, "is not a request: it has none of 'messages', 'prompt' or 'input'"]
    _, found = check(SLOW_REQUESTS[kind], body, prefix=prefix, root=prefix or "request")
    problems += [str(p) for p in found]
    if problems:
        return problems
    return Item(lineno, custom_id or f"line-{lineno}", kind, body)


def items(path: Path) -> Iterator[Item | tuple[int, list[str]]]:
    """Every request of the file, or ``(line number, problems)`` for one that is bad."""
    for lineno, value in _raw_items(path):
        got = parse_item(lineno, value)
        yield got if isinstance(got, Item) else (lineno, got)


def scan(path: Path) -> Scan:
    """Check the whole file: counts, the one kind, and every problem with its line number.
    Raises ``OSError`` for a file that cannot be read."""
    out = Scan(path)
    seen: dict[str, int] = {}
    first_line = 0
    for got in items(path):
        out.count += 1
        if not isinstance(got, Item):
            lineno, problems = got
            out.problems += [f"line {lineno}: {p}" for p in problems]
            continue
        if out.kind is None:
            out.kind, first_line = got.kind, got.lineno
        elif got.kind is not out.kind:
            out.problems.append(
                f"line {got.lineno}: is {KIND_WORDS[got.kind]} request, but line {first_line}"
                f" is {KIND_WORDS[out.kind]} request; a file holds one kind"
            )
        if got.custom_id in seen:
            out.problems.append(
                f"line {got.lineno}: custom_id '{got.custom_id}' is already used on line"
                f" {seen[got.custom_id]}; custom ids must be unique"
            )
        else:
            seen[got.custom_id] = got.lineno
    if out.count == 0:
        out.problems.append("the file holds no requests")
    return out


def choose(found: Scan, *, group: bool, batch: bool) -> str:
    """``"group"`` or ``"batch"``: up to 50 chat or completion requests make a group unless
    ``batch``; more (or embeddings) make a batch unless ``group``, which is then refused."""
    if group and batch:
        raise InputError(found.path, ["--group and --batch exclude each other"])
    groupable = found.kind in (Kind.CHAT, Kind.COMPLETION)
    if group:
        if not groupable:
            raise InputError(found.path, ["embeddings requests cannot be a group; use --batch"])
        if found.count > MAX_GROUP_SIZE:
            raise InputError(
                found.path,
                [f"a group holds at most {MAX_GROUP_SIZE} requests; this file has {found.count}"],
            )
        return "group"
    if batch or not groupable or found.count > MAX_GROUP_SIZE:
        return "batch"
    return "group"


def group_requests(path: Path) -> list[dict[str, Any]]:
    """The requests of a checked file, each with its ``metadata.custom_id``."""
    return [got.group_request() for got in items(path) if isinstance(got, Item)]


def write_batch_file(path: Path, out: IO[bytes]) -> int:
    """Write a checked file as OpenAI batch lines; returns the number of lines."""
    n = 0
    for got in items(path):
        if isinstance(got, Item):
            out.write(got.batch_line())
            n += 1
    return n
