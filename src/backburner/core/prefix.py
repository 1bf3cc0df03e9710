"""The prefix key: which requests an engine's prefix cache can serve together.

An engine caches the key/value state of prompt tokens it has computed and reuses it for a later
prompt that starts with the same tokens (vLLM's and SGLang's prefix caches, llama.cpp's reuse of
the previous prompt). Requests that share a long system prompt, a tool list or a template are
therefore far cheaper run back to back than interleaved with others. The prefix key names that
shared beginning: a hash of the model and the leading part of the prompt as the engine sees it.

What counts as the beginning: the tools, then every message but the last (the system prompt,
few-shot examples, earlier turns), bounded to :data:`PREFIX_CHARS` characters. When that part is
short (a request with one message, or a one-line system prompt), the leading characters of the
whole prompt are used instead, so a batch of one long template still shares a key. Rendering
stops at the bound: a request of any size costs the same to key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: characters of the prompt's beginning that decide its key
PREFIX_CHARS = 1024
#: a stable part (all but the last message) shorter than this is not worth a key of its own
MIN_STABLE_CHARS = 256


def _text(value: Any, budget: int) -> str:
    """``value`` as the engine reads it (a string, or the text of content parts), at most
    ``budget`` characters."""
    if isinstance(value, str):
        return value[:budget]
    if isinstance(value, list):
        out: list[str] = []
        used = 0
        for part in value:
            if used >= budget:
                break
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                piece = part["text"]
            else:
                piece = json.dumps(part, sort_keys=True, default=str)[: budget - used]
            piece = piece[: budget - used]
            out.append(piece)
            used += len(piece)
        return "".join(out)
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True, default=str)[:budget]


def _messages(messages: list[Any], budget: int) -> Iterator[str]:
    for m in messages:
        if budget <= 0:
            return
        if not isinstance(m, dict):
            piece = _text(m, budget)
        else:
            piece = f"<{m.get('role')}>" + _text(m.get("content"), budget)
        budget -= len(piece)
        yield piece


def prompt_head(body: dict[str, Any], limit: int = PREFIX_CHARS) -> str:
    """The first ``limit`` characters of the prompt's stable beginning (see the module)."""
    tools = body.get("tools")
    lead = _text(tools, limit) if tools else ""
    messages = body.get("messages")
    if isinstance(messages, list):
        stable = lead + "".join(_messages(messages[:-1], limit - len(lead)))
        if len(stable) >= min(MIN_STABLE_CHARS, limit):
            return stable[:limit]
        return (lead + "".join(_messages(messages, limit - len(lead))))[:limit]
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return (lead + _text(prompt, limit))[:limit]


def prefix_key(model: str, body: dict[str, Any], limit: int = PREFIX_CHARS) -> str:
    """A 24-character key shared by requests to ``model`` whose prompts begin alike."""
    h = hashlib.blake2b(digest_size=12)
    h.update(model.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(prompt_head(body, limit).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A queued generation as a claim's chooser sees it."""

    id: str
    prefix_key: str | None
    fair_key: int
    tenant: str = ""
    deadline: datetime | None = None
