"""schemas.validation: every problem, each named by its path (SPEC section 3)."""

from __future__ import annotations

from typing import Any

import pytest

from backburner.core.states import Kind
from backburner.schemas.validation import (
    MAX_GROUP_SIZE,
    JsonValueError,
    Problem,
    load_json,
    validate_group,
    validate_request,
)

MODELS = frozenset({"m-small", "m-large"})


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m-small", "messages": [{"role": "user", "content": "hi"}], **extra}


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "m-small", "prompt": "Once upon a time", **extra}


def params(problems: list[Problem]) -> list[str]:
    return [p.param for p in problems]


def by_param(problems: list[Problem]) -> dict[str, str]:
    return {p.param: p.message for p in problems}


# ---------------------------------------------------------------------------- single requests


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.CHAT, chat()),
        (Kind.CHAT, chat(metadata={"custom_id": "r-1", "webhook_id": "wh"}, x_vendor={"a": 1})),
        (Kind.COMPLETION, completion(max_tokens=5, stop=["\n"])),
        (Kind.COMPLETION, completion(prompt=[1, 2, 3])),
        (Kind.EMBEDDING, {"model": "m-large", "input": ["a", "b"]}),
    ],
)
def test_valid_requests(kind: Kind, body: dict[str, Any]) -> None:
    assert validate_request(kind, body, MODELS) == []


def test_body_must_be_an_object() -> None:
    (p,) = validate_request(Kind.CHAT, ["not", "a", "dict"], MODELS)
    assert p.param == "body"
    assert "JSON object" in p.message


def test_every_problem_is_reported_with_its_path() -> None:
    body = {
        "messages": [{"role": "user", "content": "ok"}, {"role": "wizard", "content": "x"}],
        "temperature": 3,
        "max_tokens": 0,
        "stream": True,
    }
    problems = validate_request(Kind.CHAT, body, MODELS)
    found = by_param(problems)
    assert found["model"] == "is required"
    assert "messages[1].role" in found
    assert "user" in found["messages[1].role"]  # says what is allowed
    assert "temperature" in found
    assert "max_tokens" in found
    assert "stream" in found
    assert len(params(problems)) == len(set(params(problems)))  # one problem per path


def test_unknown_model_names_the_served_ones() -> None:
    (p,) = validate_request(Kind.CHAT, chat(model="gpt-9"), MODELS)
    assert p.param == "model"
    assert "gpt-9" in p.message
    assert "m-large, m-small" in p.message


def test_stream_refused_on_slow_routes_only() -> None:
    (p,) = validate_request(Kind.CHAT, chat(stream=True), MODELS)
    assert p.param == "stream"
    assert "not supported" in p.message
    assert validate_request(Kind.CHAT, chat(stream=True), MODELS, slow=False) == []
    assert validate_request(Kind.CHAT, chat(stream=False), MODELS) == []


@pytest.mark.parametrize("value", ["true", 1])
def test_truthy_stream_refused_on_slow_routes(value: object) -> None:
    assert params(validate_request(Kind.CHAT, chat(stream=value), MODELS)) == ["stream"]


def test_prompt_on_chat_is_the_wrong_kind() -> None:
    (p,) = validate_request(Kind.CHAT, completion(), MODELS)
    assert p.param == "body"
    assert "'prompt'" in p.message and "'messages'" in p.message


def test_messages_on_completion_is_the_wrong_kind() -> None:
    (p,) = validate_request(Kind.COMPLETION, chat(), MODELS)
    assert p.param == "body"
    assert "'messages'" in p.message and "'prompt'" in p.message


def test_input_on_chat_is_the_wrong_kind() -> None:
    (p,) = validate_request(Kind.CHAT, {"model": "m-small", "input": "x"}, MODELS)
    assert "embeddings" in p.message


def test_metadata_webhook_id_must_be_a_string() -> None:
    problems = validate_request(Kind.CHAT, chat(metadata={"webhook_id": 7}), MODELS)
    assert params(problems) == ["metadata.webhook_id"]
    assert "must be a string" in problems[0].message


@pytest.mark.parametrize(
    ("metadata", "param", "words"),
    [
        ({"custom_id": 123}, "metadata.custom_id", "must be a string"),
        ({"custom_id": ["a"]}, "metadata.custom_id", "must be a string"),
        ({"custom_id": "x" * 513}, "metadata.custom_id", "at most 512"),
        ({"custom_id": "a\x00b"}, "metadata.custom_id", "NUL"),
        ({"webhook_id": "w" * 33}, "metadata.webhook_id", "at most 32"),
        ({"webhook_id": "w\x00"}, "metadata.webhook_id", "NUL"),
    ],
)
def test_metadata_ids_must_be_storable_strings(
    metadata: dict[str, object], param: str, words: str
) -> None:
    problems = validate_request(Kind.CHAT, chat(metadata=metadata), MODELS)
    assert params(problems) == [param]
    assert words in problems[0].message


def test_metadata_keeps_other_keys_free_form() -> None:
    body = chat(metadata={"custom_id": "c-1", "job": {"nested": [1, 2]}, "n": 3})
    assert validate_request(Kind.CHAT, body, MODELS) == []


@pytest.mark.parametrize(
    ("raw", "path", "words"),
    [
        (b'{"messages": [{"content": "\\ud800"}]}', "messages[0].content", "lone surrogate"),
        (b'{"\\udfff": 1}', "", "key"),
        (b"[" * 70 + b"]" * 70, "", "nested more than 64"),
        (b"[" * 100_000 + b"]" * 100_000, "", "nested more than 64"),
    ],
)
def test_json_that_could_not_be_stored_is_refused(raw: bytes, path: str, words: str) -> None:
    with pytest.raises(JsonValueError) as info:
        load_json(raw)
    assert info.value.path.startswith(path)
    assert words in str(info.value)


def test_json_at_the_depth_limit_is_accepted() -> None:
    assert load_json(b"[" * 64 + b"]" * 64) is not None


def test_empty_embedding_input_refused() -> None:
    problems = validate_request(Kind.EMBEDDING, {"model": "m-small", "input": []}, MODELS)
    assert params(problems) == ["input"]


# ---------------------------------------------------------------------------- groups


def test_valid_group_returns_its_requests() -> None:
    reqs = [chat(metadata={"custom_id": f"r-{i}"}) for i in range(3)]
    body = {"requests": reqs, "webhook_id": "wh_1", "metadata": {"job": "x"}}
    problems, out = validate_group(Kind.CHAT, body, MODELS)
    assert problems == []
    assert out == reqs


def test_group_problems_name_requests_by_index() -> None:
    body = {
        "requests": [
            chat(),
            {"messages": [{"role": "user", "content": "no model"}]},
            chat(model="nope", temperature=-1),
            chat(messages=[{"role": "robot"}]),
        ]
    }
    problems, _ = validate_group(Kind.CHAT, body, MODELS)
    found = by_param(problems)
    assert found["requests[1].model"] == "is required"
    assert "nope" in found["requests[2].model"]
    assert "requests[2].temperature" in found
    assert "requests[3].messages[0].role" in found
    assert not any(p.startswith("requests[0]") for p in found)
    assert all(str(p).startswith(p.param + ": ") for p in problems)


def test_prompt_in_chat_group_names_the_request() -> None:
    problems, _ = validate_group(Kind.CHAT, {"requests": [chat(), completion()]}, MODELS)
    assert params(problems) == ["requests[1]"]
    assert "'prompt'" in problems[0].message


def test_messages_in_completion_group_names_the_request() -> None:
    problems, _ = validate_group(
        Kind.COMPLETION, {"requests": [completion(), completion(), chat()]}, MODELS
    )
    assert params(problems) == ["requests[2]"]
    assert "'messages'" in problems[0].message


def test_stream_refused_inside_a_group() -> None:
    problems, _ = validate_group(Kind.CHAT, {"requests": [chat(stream=True)]}, MODELS)
    assert params(problems) == ["requests[0].stream"]


def test_more_than_50_points_to_the_batch_api() -> None:
    problems, _ = validate_group(
        Kind.CHAT, {"requests": [chat() for _ in range(MAX_GROUP_SIZE + 1)]}, MODELS
    )
    (p,) = problems
    assert p.param == "requests"
    assert "50" in p.message
    assert "Batch API" in p.message
    ok, _ = validate_group(Kind.CHAT, {"requests": [chat() for _ in range(50)]}, MODELS)
    assert ok == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "is required"),
        ({"requests": {"a": 1}}, "must be a list"),
        ({"requests": []}, "must not be empty"),
    ],
)
def test_requests_missing_not_a_list_or_empty(body: dict[str, Any], words: str) -> None:
    (p,) = validate_group(Kind.CHAT, body, MODELS)[0]
    assert p.param == "requests"
    assert words in p.message
    assert "Batch API" in p.message


def test_group_body_must_be_an_object() -> None:
    (p,) = validate_group(Kind.CHAT, [chat()], MODELS)[0]
    assert p.param == "body"


def test_webhook_url_says_use_webhook_id() -> None:
    problems, _ = validate_group(
        Kind.CHAT, {"requests": [chat()], "webhook_url": "https://example.com/hook"}, MODELS
    )
    (p,) = problems
    assert p.param == "webhook_url"
    assert "use webhook_id (webhook_url is the Batch API's)" in p.message


def test_near_miss_key_gets_did_you_mean() -> None:
    problems, _ = validate_group(Kind.CHAT, {"requests": [chat()], "webhook_idd": "x"}, MODELS)
    (p,) = problems
    assert p.param == "webhook_idd"
    assert "did you mean webhook_id?" in p.message


def test_unknown_key_without_a_near_miss_lists_allowed_fields() -> None:
    problems, _ = validate_group(Kind.CHAT, {"requests": [chat()], "zzz": 1}, MODELS)
    (p,) = problems
    assert p.param == "zzz"
    assert "did you mean" not in p.message
    assert "requests, webhook_id, metadata" in p.message


def test_top_level_and_request_problems_are_all_reported() -> None:
    body = {
        "requests": [chat(model="nope")],
        "webhook_url": "https://x",
        "metadata": "not an object",
        "webhook_id": 5,
    }
    problems, _ = validate_group(Kind.CHAT, body, MODELS)
    assert set(params(problems)) == {"webhook_url", "metadata", "webhook_id", "requests[0].model"}
