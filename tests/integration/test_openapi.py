"""The OpenAPI document is the contract (SPEC section 7): every operation declares its request
body, its answer and its errors (the OpenAI envelope)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import AppHarness

METHODS = ("get", "post", "put", "patch", "delete")
# POSTs that act on the object in their path and take no body
NO_BODY = ("/cancel", "/retry", "/test", "/redeliver")
# no input and no key: nothing a client sends can be refused
NO_CLIENT_ERRORS = {"/healthz"}
# need the operations token (ops_token) when one is set
OPS_TOKEN = {"/readyz", "/metrics"}
STREAMS = {"text/event-stream", "application/jsonl", "application/octet-stream", "text/plain"}


@pytest.fixture
async def doc(harness: AppHarness) -> dict[str, Any]:
    r = await harness.client.get("/openapi.json")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    name = ref.removeprefix("#/components/schemas/")
    found: dict[str, Any] = doc["components"]["schemas"][name]
    return found


def is_envelope(doc: dict[str, Any], response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if not schema:
        return False
    envelope = resolve(doc, schema)
    error = resolve(doc, envelope.get("properties", {}).get("error", {}))
    return envelope.get("required") == ["error"] and set(error.get("properties", {})) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_every_operation_is_there(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    assert len(ops) >= 44
    assert len({op["operationId"] for _, _, op in ops}) == len(ops)


def test_every_operation_declares_its_answer(doc: dict[str, Any]) -> None:
    missing = []
    for method, path, op in operations(doc):
        ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
        declared = False
        for code, response in ok.items():
            content = response.get("content", {})
            if code == "204" and not content:
                declared = True
            for media, spec in content.items():
                schema = spec.get("schema") or spec.get("itemSchema")
                if schema and (media == "application/json" or media in STREAMS):
                    declared = True
        if not declared:
            missing.append(f"{method} {path}")
    assert missing == []


def test_every_body_is_declared(doc: dict[str, Any]) -> None:
    missing = []
    for method, path, op in operations(doc):
        if method not in ("POST", "PATCH", "PUT"):
            assert "requestBody" not in op, (method, path)
            continue
        if path.endswith(NO_BODY):
            assert "requestBody" not in op, (method, path)
            continue
        content = op.get("requestBody", {}).get("content", {})
        schemas = [spec.get("schema") for spec in content.values()]
        if not schemas or not all(s and (s.get("properties") or s.get("$ref")) for s in schemas):
            missing.append(f"{method} {path}")
    assert missing == []


def test_every_operation_declares_its_errors_as_the_envelope(doc: dict[str, Any]) -> None:
    missing = []
    for method, path, op in operations(doc):
        responses = op["responses"]
        assert "422" not in responses, (method, path)  # bad input is a 400 here
        assert is_envelope(doc, responses["default"]), (method, path)
        if path in NO_CLIENT_ERRORS:
            continue
        client = [r for code, r in responses.items() if code.startswith("4")]
        if not client or not all(is_envelope(doc, r) for r in client):
            missing.append(f"{method} {path}")
        if path.startswith("/v1/"):  # the tenant dependency: no key, or an open server's Host
            assert {"401", "403"} <= set(responses), (method, path)
        if path in OPS_TOKEN:
            assert "401" in responses, (method, path)
        if "application/json" in op.get("requestBody", {}).get("content", {}):
            assert "415" in responses, (method, path)  # a body that is not JSON
    assert missing == []


# the operations whose body the README's tour shows
TOUR = (
    "/v1/slow/chat/completions",
    "/v1/slow/group/chat/completions",
    "/v1/chat/completions",
    "/v1/webhooks",
)


def test_main_bodies_show_an_example(doc: dict[str, Any]) -> None:
    missing = []
    for method, path, op in operations(doc):
        submits = method == "POST" and path.startswith(("/v1/slow/", "/v1/async/"))
        for spec in op.get("requestBody", {}).get("content", {}).values():
            if submits and not resolve(doc, spec["schema"]).get("examples"):
                missing.append(f"{method} {path}")
    assert missing == []
    for path in TOUR:
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["examples"], path
    chat = doc["paths"]["/v1/slow/chat/completions"]["post"]["requestBody"]["content"]
    example = chat["application/json"]["schema"]["examples"][0]
    assert example["messages"] == [{"role": "user", "content": "Name three rivers."}]


def test_streams_are_declared(doc: dict[str, Any]) -> None:
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(chat)
    results = doc["paths"]["/v1/batches/{batch_id}/results"]["get"]["responses"]["200"]
    assert "application/jsonl" in results["content"]


def test_submit_bodies_and_answers_are_the_models(doc: dict[str, Any]) -> None:
    group = doc["paths"]["/v1/slow/group/chat/completions"]["post"]
    schema = group["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"requests", "webhook_id", "metadata"}
    assert schema["properties"]["requests"]["maxItems"] == 50
    assert schema["additionalProperties"] is False
    request = schema["properties"]["requests"]["items"]
    assert request["additionalProperties"] is True  # unknown fields go to the engine
    assert {"model", "messages"} <= set(request["required"])
    answer = group["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(resolve(doc, answer)["properties"]) == {"groupId", "groupSize"}
    slow = doc["paths"]["/v1/slow/chat/completions"]["post"]["responses"]["200"]
    submitted = resolve(doc, slow["content"]["application/json"]["schema"])
    assert set(submitted["properties"]) == {"id", "object", "state"}
    generation = doc["components"]["schemas"]["Generation"]
    assert {"stateMessage", "createdAt", "request"} <= set(generation["required"])
    assert "response" not in generation["required"]  # present only on Success


async def test_docs_page_answers(harness: AppHarness) -> None:
    r = await harness.client.get("/docs")
    assert r.status_code == 200
    assert "swagger" in r.text.lower()
    r = await harness.client.get("/redoc")
    assert r.status_code == 200
    assert "redoc" in r.text.lower()
