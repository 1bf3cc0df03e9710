"""A scriptable fake engine for tests (after simonw/llm's MockModel): ``enqueue`` responses or
errors; with nothing enqueued it answers with an echo of the request."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from backburner.core.states import Kind

JSON = dict[str, Any]


def _last_user_text(body: JSON) -> str:
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return str(m["content"])
    p = body.get("prompt")
    return p if isinstance(p, str) else ""


def echo_response(kind: Kind, body: JSON) -> JSON:
    text = f"echo: {_last_user_text(body)}"
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if kind is Kind.CHAT:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    if kind is Kind.COMPLETION:
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 0,
            "model": body.get("model"),
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": usage,
        }
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return {
        "object": "list",
        "model": body.get("model"),
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i in range(len(inputs))
        ],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }


class FakeBackend:
    def __init__(self, name: str = "fake", delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.script: deque[Any] = deque()
        self.calls: list[tuple[Kind, JSON]] = []
        self.started = False
        self.concurrent = 0
        self.max_concurrent = 0

    def enqueue(self, *items: Any) -> None:
        """Each item is a response dict or an exception instance to raise, used in order."""
        self.script.extend(items)

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    async def check(self) -> None:
        return None

    async def run(self, kind: Kind, body: JSON, *, background: bool = False) -> JSON:
        self.calls.append((kind, body))
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.script:
                item = self.script.popleft()
                if isinstance(item, BaseException):
                    raise item
                return dict(item)
            return echo_response(kind, body)
        finally:
            self.concurrent -= 1

    async def stream(self, kind: Kind, body: JSON) -> AsyncIterator[JSON]:
        self.calls.append((kind, body))
        for i, word in enumerate(["Hello", " there", "!"]):
            yield {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": word} if i else {"role": "assistant", "content": word},
                        "finish_reason": None,
                    }
                ],
            }
        yield {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": body.get("model"),
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
