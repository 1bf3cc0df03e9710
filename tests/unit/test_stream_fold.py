"""fold_chunks: a stream adds up to the response a non-streamed call returns."""

from __future__ import annotations

from typing import Any

from backburner.schemas.stream import fold_chunks


def test_chat_chunks_fold_per_choice() -> None:
    chunks: list[dict[str, Any]] = [
        {
            "id": "c1",
            "created": 5,
            "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}],
        },
        {
            "id": "c1",
            "choices": [
                {"index": 0, "delta": {"content": "lo"}},
                {"index": 1, "delta": {"content": "Yo"}},
            ],
        },
        {
            "id": "c1",
            "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"},
                {"index": 1, "delta": {}, "finish_reason": "length"},
            ],
        },
        {
            "id": "c1",
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        },
    ]
    out = fold_chunks(chunks, chat=True)
    assert out["object"] == "chat.completion" and out["id"] == "c1" and out["model"] == "m"
    assert out["choices"] == [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello"}},
        {"index": 1, "finish_reason": "length", "message": {"role": "assistant", "content": "Yo"}},
    ]
    assert out["usage"]["total_tokens"] == 4


def test_completion_chunks_fold_text() -> None:
    chunks: list[dict[str, Any]] = [
        {"id": "x", "choices": [{"index": 0, "text": "a"}]},
        {"id": "x", "choices": [{"index": 0, "text": "b", "finish_reason": "stop"}]},
    ]
    out = fold_chunks(chunks, chat=False)
    assert out["object"] == "text_completion"
    assert out["choices"] == [{"index": 0, "finish_reason": "stop", "text": "ab", "logprobs": None}]
    assert "usage" not in out


def test_no_chunks() -> None:
    assert fold_chunks([], chat=True)["choices"] == []
