"""schemas.batch: input lines checked by BatchRequestInput (every problem, with its line number),
output lines written by BatchRequestOutput (SPEC section 4)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backburner.schemas.batch import BatchLine, BatchRequestOutput, LineError, parse_line

MODELS = frozenset({"m"})
CHAT = "/v1/chat/completions"


def line(**over: Any) -> bytes:
    obj: dict[str, Any] = {
        "custom_id": "r-1",
        "method": "POST",
        "url": CHAT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "x"}], "x_extra": 1},
    }
    obj.update(over)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def errors(raw: bytes, lineno: int = 7) -> dict[str | None, str]:
    parsed = parse_line(lineno, raw, CHAT, MODELS)
    assert isinstance(parsed, list), parsed
    assert all(isinstance(e, LineError) and e.line == lineno for e in parsed)
    assert all(e.message.startswith(f"line {lineno}") for e in parsed)
    return {e.param: e.message for e in parsed}


def test_a_good_line_keeps_its_body_as_sent() -> None:
    raw = line(url=...)  # url may be omitted: the body is a chat request
    parsed = parse_line(1, raw, CHAT, MODELS)
    assert parsed == BatchLine("r-1", json.loads(raw)["body"])


def test_every_problem_of_a_line_at_once() -> None:
    raw = line(
        custom_id="",
        method="GET",
        body={"model": "nope", "messages": [{"role": "robot"}], "stream": True},
        custm="x",
    )
    found = errors(raw)
    assert set(found) == {
        "custom_id",
        "method",
        "custm",
        "body.messages[0].role",
        "body.stream",
        "body.model",
    }
    assert "unique in the file" in found["custom_id"]
    assert "'POST'" in found["method"]
    assert "available models: m" in found["body.model"]


@pytest.mark.parametrize(
    ("raw", "param", "words"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"x": NaN}', None, "NaN"),
        (b'{"x": 1e400}', None, "1e400"),
        (b"[1]", None, "must be a JSON object"),
        (line(body=[1]), "body", "must be a JSON object"),
        (line(url="/v1/embeddings"), "url", "does not match"),
        (line(url=..., body={"model": "m", "input": "x"}), "url", "does not look like"),
        (line(body={"model": "m", "prompt": "p"}), "body", "'prompt'"),
    ],
)
def test_refusals(raw: bytes, param: str | None, words: str) -> None:
    found = errors(raw)
    assert param in found, found
    assert words in found[param]


def test_output_lines() -> None:
    ok = BatchRequestOutput.success("g1", "r-1", {"choices": [{"text": "é"}]}).to_line()
    assert ok.endswith(b"\n") and b"\n" not in ok[:-1]
    assert json.loads(ok) == {
        "id": "batch_req_g1",
        "custom_id": "r-1",
        "response": {"status_code": 200, "request_id": "g1", "body": {"choices": [{"text": "é"}]}},
        "error": None,
    }
    bad = json.loads(BatchRequestOutput.failure("g2", "r-2", "request_failed", "boom").to_line())
    assert bad["response"] is None and bad["error"] == {"code": "request_failed", "message": "boom"}
