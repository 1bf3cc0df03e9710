"""A fake engine whose answers no database can store as they are, chosen by the prompt: for the
tests of poison work (an engine's answer that the result writer must isolate, not retry forever).

The last user message picks the answer: ``answer-surrogate`` (a lone surrogate in the text),
``answer-nan`` (a number JSON cannot carry), ``answer-nul`` (a NUL in the text: storable, JSON
escapes it), ``error-nul`` and ``error-surrogate`` (a refusal whose message holds one); anything
else is echoed as :class:`~tests.support.fake_backend.FakeBackend` does.
"""

from __future__ import annotations

from typing import Any

from backburner.core.states import Kind
from backburner.errors import BackendRejected
from tests.support.fake_backend import FakeBackend, echo_response

JSON = dict[str, Any]
POISON = ("answer-surrogate", "answer-nan", "error-nul", "error-surrogate")


def _asked(body: JSON) -> str:
    messages = body.get("messages") or []
    content = messages[-1].get("content") if messages else body.get("prompt")
    return content if isinstance(content, str) else ""


def _saying(kind: Kind, body: JSON, text: str) -> JSON:
    answer = echo_response(kind, body)
    answer["choices"][0]["message"]["content"] = text
    return answer


class PoisonEngine(FakeBackend):
    async def run(self, kind: Kind, body: JSON, *, background: bool = False) -> JSON:
        asked = _asked(body)
        if "answer-surrogate" in asked:
            self.calls.append((kind, body))
            return _saying(kind, body, "half a pair: \ud800 here")
        if "answer-nan" in asked:
            self.calls.append((kind, body))
            return {**echo_response(kind, body), "score": float("nan")}
        if "answer-nul" in asked:
            self.calls.append((kind, body))
            return _saying(kind, body, "a\x00b")
        if "error-nul" in asked:
            self.calls.append((kind, body))
            raise BackendRejected("upstream HTTP 400: bad \x00 byte")
        if "error-surrogate" in asked:
            self.calls.append((kind, body))
            raise BackendRejected("upstream HTTP 400: bad \udc80 text")
        return await super().run(kind, body, background=background)
