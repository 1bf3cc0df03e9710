"""Poison batches: a batch whose lines no database could store, whose file holds a line too long
to read, whose handling keeps failing, or whose engine answers cannot be stored, is isolated and
failed with a clear message, while the other tenants' batches run (issue "Nothing lost, nothing
poisoned"). Burst mode on SQLite and PostgreSQL; no sleeps, no timing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

import pytest

from backburner.core.ids import new_id
from backburner.core.retry import Backoff
from backburner.scheduler.batches import BatchRunner
from backburner.schemas.batch import BatchCreate, BatchRecord
from backburner.services import Services
from backburner.store import Store
from backburner.store.blobs import BlobSource
from tests.support.poison_engine import PoisonEngine
from tests.support.services import burst_services

MODEL = "fake-model"
CHAT: Final = "/v1/chat/completions"
MIB = 1024 * 1024


@pytest.fixture
async def services(store: Store, tmp_path: Any) -> AsyncIterator[Services]:
    async with burst_services(store.url, tmp_path / "files", PoisonEngine("fake")) as built:
        yield built


def runner(services: Services) -> BatchRunner:
    assert services.batches is not None
    return services.batches


def good(custom_id: str, prompt: str = "hello") -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}
    return json.dumps(line).encode()


def with_body(custom_id: str, body_json: str) -> bytes:
    start = json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT})[:-1]
    return f'{start}, "body": {body_json}}}'.encode()


async def make_batch(services: Services, tenant: str, parts: Iterable[bytes]) -> BatchRecord:
    """A batch over a file written from ``parts`` (streamed: a part may be one block of many)."""
    key = new_id()
    size = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal size
        for part in parts:
            size += len(part)
            yield part

    await services.blobs.write(key, chunks())
    await services.store.files.create(
        tenant,
        file_id=key,
        filename="in.jsonl",
        purpose="batch",
        bytes=size,
        lines=None,
        sha256=None,
        blob=key,
    )
    return await services.store.batches.create(
        tenant, BatchCreate(input_file_id=key, endpoint=CHAT, completion_window="24h")
    )


def lines(*items: bytes) -> list[bytes]:
    return [item + b"\n" for item in items]


async def result_lines(services: Services, batch_id: str, kind: str) -> list[dict[str, Any]]:
    data = b"".join([page async for page in services.store.batches.results(batch_id, kind)])
    return [json.loads(line) for line in data.splitlines()]


async def test_poison_lines_fail_their_batch_and_the_next_batch_runs(services: Services) -> None:
    runner(services).max_line_bytes = 16 * 1024
    poisoned = await make_batch(
        services,
        "acme",
        lines(
            good("a-1"),
            b'{"custom_id": "\\ud800", "method": "POST", "body": {}}',  # 2: lone surrogate
            good("a-3"),
            good("a\x00-4"),  # 4: NUL in custom_id
            with_body("a-5", '{"model": "fake-model", "x": ' + "[" * 100 + "]" * 100 + "}"),
            good("a" * 600),  # 6: custom_id too long for its column
            good("a-7", "x" * 20_000),  # 7: longer than the line bound
            good("a-8"),
            good("a-9", "\udc80"),  # 9: lone surrogate in the body
            with_body("a-10", "[" * 5000 + "]" * 5000),  # 10: deeper than the parser goes
        ),
    )
    later = await make_batch(services, "other", lines(good("b-1"), good("b-2")))
    await services.run_burst()

    failed = await services.store.batches.get("acme", poisoned.id)
    assert failed.status == "failed"
    assert failed.errors is not None
    assert sorted({e["line"] for e in failed.errors}) == [2, 4, 5, 6, 7, 9, 10]
    said = {e["line"]: e["message"] for e in failed.errors}
    assert "lone surrogate" in said[2] and "lone surrogate" in said[9]
    assert "NUL" in said[4]
    assert "nested more than 64 levels" in said[5] and "nested" in said[10]
    assert "512 characters" in said[6]
    assert "longer than 16384 bytes" in said[7]
    assert failed.total == 0

    done = await services.store.batches.get("other", later.id)
    assert (done.status, done.completed, done.failed) == ("completed", 2, 0)


async def test_a_huge_line_is_refused_without_holding_it(services: Services) -> None:
    runner(services).max_line_bytes = MIB
    block = b"x" * (64 * 1024)
    parts = [good("h-1") + b"\n", b'{"custom_id": "h-2", "pad": "', *[block] * (20 * 16)]
    parts += [b'"}\n', good("h-3") + b"\n"]
    batch = await make_batch(services, "acme", parts)
    await services.run_burst()

    failed = await services.store.batches.get("acme", batch.id)
    assert failed.status == "failed" and failed.errors is not None
    assert [(e["line"], e["message"]) for e in failed.errors] == [
        (2, f"line 2 is longer than {MIB} bytes, the most one line may hold")
    ]


async def test_a_batch_that_keeps_failing_is_failed_after_its_tries(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = runner(services)
    batches.max_tries = 3
    batches.retry_backoff = Backoff(base_seconds=0.0, cap_seconds=0.0)
    poisoned = await make_batch(services, "acme", lines(good("a-1")))
    later = await make_batch(services, "other", lines(good("b-1")))
    poisoned_blob = poisoned.input_file_id  # the blob key is the file id here
    opened: list[str] = []
    open_blob = services.blobs.open

    async def failing_open(key: str) -> BlobSource:
        opened.append(key)
        if key == poisoned_blob:
            raise OSError(5, "Input/output error")
        return await open_blob(key)

    monkeypatch.setattr(services.blobs, "open", failing_open)
    await services.run_burst()

    failed = await services.store.batches.get("acme", poisoned.id)
    assert failed.status == "failed"
    assert failed.errors is not None
    (error,) = failed.errors
    assert error["code"] == "batch_failed" and error["line"] is None
    assert "after 3 tries" in error["message"] and "Input/output error" in error["message"]
    assert opened.count(poisoned_blob) == 3

    done = await services.store.batches.get("other", later.id)
    assert (done.status, done.completed) == ("completed", 1)


async def test_a_failing_batch_waits_out_its_backoff_while_the_others_run(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = runner(services)
    batches.retry_backoff = Backoff(base_seconds=3600.0, cap_seconds=3600.0, jitter=0.0)
    poisoned = await make_batch(services, "acme", lines(good("a-1")))
    later = await make_batch(services, "other", lines(good("b-1")))
    opened: list[str] = []
    open_blob = services.blobs.open

    async def failing_open(key: str) -> BlobSource:
        opened.append(key)
        if key == poisoned.input_file_id:
            raise OSError(5, "Input/output error")
        return await open_blob(key)

    monkeypatch.setattr(services.blobs, "open", failing_open)
    await services.run_burst()

    assert opened.count(poisoned.input_file_id) == 1  # put back, not claimed first again
    waiting = await services.store.batches.get("acme", poisoned.id)
    assert waiting.status == "validating" and not waiting.errors
    assert await services.store.batch_runs.claim("someone-else", 60.0) is None
    done = await services.store.batches.get("other", later.id)
    assert (done.status, done.completed) == ("completed", 1)


async def test_a_batch_that_cannot_be_failed_is_tried_again_later_not_at_once(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the result files keeps failing; a finalizing batch cannot become failed, so it
    waits a lease before its next try (even with no backoff) instead of spinning."""
    batches = runner(services)
    batches.max_tries = 2
    batches.retry_backoff = Backoff(base_seconds=0.0, cap_seconds=0.0)
    batch = await make_batch(services, "acme", lines(good("a-1"), good("a-2")))
    writes: list[str] = []

    async def failing_write(key: str, chunks: AsyncIterator[bytes]) -> Any:
        writes.append(key)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(services.blobs, "write", failing_write)
    await services.run_burst()

    assert len(writes) == 2
    stuck = await services.store.batches.get("acme", batch.id)
    assert stuck.status == "finalizing" and stuck.completed == 2
    assert await services.store.batch_runs.claim("someone-else", 60.0) is None


async def test_answers_that_cannot_be_stored_fail_their_lines_only(services: Services) -> None:
    batch = await make_batch(
        services,
        "acme",
        lines(
            good("ok-1"),
            good("poison-1", "answer-surrogate"),
            good("nul-answer", "answer-nul"),
            good("poison-2", "error-nul"),
            good("ok-2"),
        ),
    )
    await services.run_burst()

    done = await services.store.batches.get("acme", batch.id)
    assert (done.status, done.completed, done.failed) == ("completed", 3, 2)
    errors = await result_lines(services, batch.id, "error")
    assert {e["custom_id"] for e in errors} == {"poison-1", "poison-2"}
    for e in errors:
        assert e["error"]["message"].startswith("Failed: the engine's answer could not be stored")
    output = await result_lines(services, batch.id, "output")
    assert {o["custom_id"] for o in output} == {"ok-1", "ok-2", "nul-answer"}
    states = await services.store.generations.count_by_state()
    assert set(states) <= {"Success", "Failed"}, states
