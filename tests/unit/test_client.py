"""The sync client over httpx.MockTransport (configuration, errors, waiting, the in-order merge of
batch results) and the request-file checks of ``backburner submit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from backburner.cli import app
from backburner.client import (
    APIConnectionError,
    BackburnerAPIError,
    Backoff,
    Client,
    WaitTimeout,
    inputs,
)
from backburner.core.states import Kind

FAST = Backoff(initial=0.001, factor=2.0, maximum=0.004)


def mock(handler: Any, **kw: Any) -> Client:
    return Client("http://bb.test", transport=httpx.MockTransport(handler), **kw)


def generation(state: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "g" * 21,
        "object": "generation",
        "state": state,
        "stateMessage": state,
        "request": {"model": "m", "messages": [], "metadata": {"custom_id": "c"}},
        "createdAt": "2026-01-01T00:00:00.000Z",
        "model": "m",
        "attempts": 1,
        **extra,
    }


def test_base_url_and_key_from_arguments_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKBURNER_BASE_URL", "http://env.test:9/v1/")
    monkeypatch.setenv("BACKBURNER_API_KEY", "bb-env")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"object": "list", "data": []})

    Client(transport=httpx.MockTransport(handler)).list_webhooks()
    assert str(seen[-1].url) == "http://env.test:9/v1/webhooks"
    assert seen[-1].headers["authorization"] == "Bearer bb-env"
    Client("other.test", "bb-arg", transport=httpx.MockTransport(handler)).list_webhooks()
    assert str(seen[-1].url) == "http://other.test/v1/webhooks"
    assert seen[-1].headers["authorization"] == "Bearer bb-arg"
    monkeypatch.delenv("BACKBURNER_BASE_URL")
    monkeypatch.delenv("BACKBURNER_API_KEY")
    Client(transport=httpx.MockTransport(handler)).list_webhooks()
    assert str(seen[-1].url) == "http://127.0.0.1:8000/v1/webhooks"
    assert "authorization" not in seen[-1].headers


def test_the_error_envelope_becomes_one_exception() -> None:
    envelope = {
        "error": {
            "message": "requests[0].model: is required",
            "type": "invalid_request_error",
            "param": "requests[0].model",
            "code": "invalid_request",
        }
    }
    bb = mock(lambda r: httpx.Response(400, json=envelope))
    with pytest.raises(BackburnerAPIError) as caught:
        bb.submit_group([{"model": "m", "messages": [{"role": "user", "content": "x"}]}])
    e = caught.value
    assert (e.status, e.param, e.code, e.type) == (
        400,
        "requests[0].model",
        "invalid_request",
        envelope["error"]["type"],
    )
    assert e.message == "requests[0].model: is required" and "HTTP 400" in str(e)

    with pytest.raises(BackburnerAPIError) as caught:
        mock(lambda r: httpx.Response(502, text="<html>bad gateway</html>")).get_batch("b")
    assert caught.value.status == 502 and "bad gateway" in caught.value.message


def test_no_answer_is_a_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(APIConnectionError) as caught:
        mock(refuse).get_generation("x")
    assert isinstance(caught.value, BackburnerAPIError) and caught.value.status == 0
    assert "cannot reach backburner at http://bb.test" in str(caught.value)


def test_backoff_grows_to_its_maximum() -> None:
    delays = Backoff(initial=1.0, factor=2.0, maximum=5.0).delays()
    assert [next(delays) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_wait_polls_until_terminal_and_times_out() -> None:
    states = iter(["Queued", "In Progress", "Success"])

    def handler(request: httpx.Request) -> httpx.Response:
        state = next(states)
        extra: dict[str, Any] = {"response": {"choices": []}} if state == "Success" else {}
        return httpx.Response(200, json=generation(state, **extra))

    seen: list[str] = []
    gen = mock(handler).wait(
        "g" * 21, "generation", backoff=FAST, on_update=lambda s: seen.append(s.status)
    )
    assert seen == ["Queued", "In Progress", "Success"] and gen.ok and gen.done

    stuck = mock(lambda r: httpx.Response(200, json=generation("Queued")))
    with pytest.raises(WaitTimeout) as caught:
        stuck.wait_generation("g" * 21, max_wait=0.02, backoff=FAST)
    assert caught.value.last.status == "Queued"


def test_resolve_tries_batch_then_group_then_generation() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.startswith("/v1/generation/"):
            return httpx.Response(200, json=generation("Queued"))
        return httpx.Response(404, json={"error": {"message": "no", "type": "t"}})

    assert mock(handler).resolve("abc") == "generation"
    assert asked == ["/v1/batches/abc", "/v1/slow/group/abc", "/v1/generation/abc"]


def _batch(**over: Any) -> dict[str, Any]:
    out = {
        "id": "B",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": "IN",
        "completion_window": "24h",
        "status": "completed",
        "output_file_id": "OUT",
        "error_file_id": "ERR",
        "created_at": 1,
        "request_counts": {"total": 6, "completed": 4, "failed": 2},
        "metadata": None,
        "webhook_url": None,
    }
    for key in ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at"):
        out[key] = None
    for key in ("expired_at", "cancelling_at", "cancelled_at"):
        out[key] = None
    out.update(over)
    return out


def test_batch_results_come_back_in_input_order() -> None:
    ids = [f"c{i}" for i in range(6)]
    failed = {"c1", "c4"}

    def lines(cids: list[str]) -> bytes:
        return b"".join(json.dumps({"custom_id": c}).encode() + b"\n" for c in cids)

    files = {
        "IN": lines(ids),
        "OUT": lines([c for c in ids if c not in failed]),
        "ERR": b"\n" + lines([c for c in ids if c in failed]),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/batches/B":
            return httpx.Response(200, json=_batch())
        file_id = request.url.path.split("/")[3]
        return httpx.Response(200, content=files[file_id])

    got = [json.loads(x)["custom_id"] for x in mock(handler).iter_results("B", "batch")]
    assert got == ids


# ---------------------------------------------------------------- request files


def write(tmp_path: Path, name: str, rows: list[Any]) -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(i: int, **md: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
    if md:
        body["metadata"] = md
    return body


def test_plain_bodies_and_batch_lines_both_read(tmp_path: Path) -> None:
    rows: list[Any] = [
        chat(0, custom_id="a"),
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": chat(1)},
        chat(2),
    ]
    path = write(tmp_path, "in.jsonl", rows)
    found = inputs.scan(path)
    assert (found.count, found.kind, found.problems) == (3, Kind.CHAT, [])
    assert inputs.choose(found, group=False, batch=False) == "group"
    assert inputs.choose(found, group=False, batch=True) == "batch"
    reqs = inputs.group_requests(path)
    assert [r["metadata"]["custom_id"] for r in reqs] == ["a", "b", "line-3"]
    with (tmp_path / "out.jsonl").open("wb") as out:
        assert inputs.write_batch_file(path, out) == 3
    written = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [w["custom_id"] for w in written] == ["a", "b", "line-3"]
    assert {w["url"] for w in written} == {"/v1/chat/completions"}


def test_every_bad_line_is_named(tmp_path: Path) -> None:
    rows: list[Any] = [
        chat(0, custom_id="a"),
        "{broken",
        {"model": "m", "messages": [], "stream": True},
        chat(3, custom_id="a"),
        {"model": "m", "input": "x"},
        [1, 2],
        {"model": "m"},
    ]
    problems = inputs.scan(write(tmp_path, "in.jsonl", rows)).problems
    assert [p.split(":")[0] for p in problems[:1]] == ["line 2"]
    joined = "\n".join(problems)
    assert "line 2: is not valid JSON" in joined
    assert "line 3: messages" in joined and "line 3: stream" in joined
    assert "line 4: custom_id 'a' is already used on line 1" in joined
    assert "line 5: is an embeddings request, but line 1 is a chat request" in joined
    assert "line 6: must be a JSON object" in joined
    assert "line 7: is not a request" in joined


def test_json_files_and_the_group_limits(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text(json.dumps({"requests": [chat(i) for i in range(51)]}))
    found = inputs.scan(path)
    assert found.count == 51 and not found.problems
    assert inputs.choose(found, group=False, batch=False) == "batch"
    with pytest.raises(inputs.InputError, match="at most 50"):
        inputs.choose(found, group=True, batch=False)
    emb = inputs.scan(write(tmp_path, "e.jsonl", [{"model": "m", "input": "x"}]))
    assert inputs.choose(emb, group=False, batch=False) == "batch"
    with pytest.raises(inputs.InputError):
        inputs.choose(emb, group=True, batch=False)
    path.write_text("{}")
    assert inputs.scan(path).problems == [
        'line 1: must be a list of requests (or {"requests": [...]})'
    ]


def test_the_cli_refuses_bad_input_before_any_request(tmp_path: Path) -> None:
    nowhere = {"BACKBURNER_BASE_URL": "http://127.0.0.1:9", "COLUMNS": "200"}
    runner = CliRunner()
    bad = write(tmp_path, "bad.jsonl", [chat(0), "{nope"])
    done = runner.invoke(app, ["submit", str(bad)], env=nowhere)
    assert done.exit_code == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"{bad}: line 2: is not valid JSON: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    ]
    done = runner.invoke(app, ["submit", str(tmp_path / "missing.jsonl")], env=nowhere)
    assert done.exit_code == 1
    assert done.stderr.strip() == f"error: {tmp_path / 'missing.jsonl'}: no such file"
