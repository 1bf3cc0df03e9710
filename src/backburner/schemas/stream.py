"""Folding a stream of OpenAI chunks back into the one response a non-streamed call returns."""

from __future__ import annotations

from typing import Any


def fold_chunks(chunks: list[dict[str, Any]], *, chat: bool) -> dict[str, Any]:
    """The ChatCompletion (``chat``) or Completion object that ``chunks`` add up to."""
    first = chunks[0] if chunks else {}
    texts: dict[int, list[str]] = {}
    roles: dict[int, str] = {}
    finish: dict[int, Any] = {}
    usage: Any = None
    for c in chunks:
        if c.get("usage"):
            usage = c["usage"]
        for choice in c.get("choices") or []:
            i = int(choice.get("index", 0))
            if chat:
                delta = choice.get("delta") or {}
                if delta.get("role"):
                    roles[i] = delta["role"]
                if delta.get("content"):
                    texts.setdefault(i, []).append(delta["content"])
            elif choice.get("text"):
                texts.setdefault(i, []).append(choice["text"])
            texts.setdefault(i, [])
            if choice.get("finish_reason") is not None:
                finish[i] = choice["finish_reason"]
    choices = []
    for i in sorted(texts):
        text = "".join(texts[i])
        if chat:
            choices.append(
                {
                    "index": i,
                    "finish_reason": finish.get(i),
                    "message": {"role": roles.get(i, "assistant"), "content": text},
                }
            )
        else:
            choices.append(
                {"index": i, "finish_reason": finish.get(i), "text": text, "logprobs": None}
            )
    out: dict[str, Any] = {
        "id": first.get("id"),
        "object": "chat.completion" if chat else "text_completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out


def unfold(response: dict[str, Any], *, chat: bool) -> list[dict[str, Any]]:
    """Chunks that fold back into ``response`` (what :func:`fold_chunks` made): one chunk with
    every choice whole, then one with the usage, if any. A stream replayed for an
    Idempotency-Key is sent as these."""
    head = {
        "id": response.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": response.get("created"),
        "model": response.get("model"),
    }
    choices = []
    for choice in response.get("choices") or []:
        if chat:
            message = choice.get("message") or {}
            delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
            choices.append(
                {
                    "index": choice.get("index", 0),
                    "delta": delta,
                    "finish_reason": choice.get("finish_reason"),
                }
            )
        else:
            choices.append(
                {
                    "index": choice.get("index", 0),
                    "text": choice.get("text", ""),
                    "finish_reason": choice.get("finish_reason"),
                    "logprobs": None,
                }
            )
    chunks = [{**head, "choices": choices}]
    if response.get("usage") is not None:
        chunks.append({**head, "choices": [], "usage": response["usage"]})
    return chunks
