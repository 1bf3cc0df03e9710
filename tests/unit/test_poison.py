"""Poison work, one unit at a time: a batch line that no database could store, a line too long to
hold, and an engine's answer the store refuses. Each is isolated and failed with a clear message;
nothing else waits on it (issue "Nothing lost, nothing poisoned").

The writer tests drive the worker in burst mode on SQLite and PostgreSQL, with an engine whose
answers are poison on request (:mod:`tests.support.poison_engine`).
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from backburner.core.outcome import Outcome
from backburner.core.states import Kind, State
from backburner.errors import ServiceUnavailable
from backburner.scheduler.batches import iter_lines
from backburner.schemas.batch import BatchLine, LineError, parse_line
from backburner.schemas.generation import NewGeneration
from backburner.services import Services
from backburner.store import Store, codec
from tests.support.poison_engine import POISON, PoisonEngine
from tests.support.services import burst_services

MODEL = "fake-model"
TENANT = "default"
CHAT = "/v1/chat/completions"
MIB = 1024 * 1024


# ---------------------------------------------------------------- lines of any length


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _expected(data: bytes, bound: int) -> list[tuple[int, bytes | None]]:
    out: list[tuple[int, bytes | None]] = []
    for lineno, part in enumerate(data.split(b"\n"), 1):
        if len(part) > bound:
            out.append((lineno, None))
        elif part.strip():
            out.append((lineno, part))
    return out


SAMPLE = (
    b'{"a": 1}\n'
    b"\n"
    b"   \r\n"
    b'{"b": 2}\r\n'
    + b"x" * 16  # exactly the bound
    + b"\n"
    + b"y" * 17  # one byte over
    + b"\n"
    + b"z" * 40
    + b'\n{"c": 3}\n'
    + b"w" * 50  # too long, and the last line has no newline
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 17, 64, 10_000])
async def test_lines_are_split_and_numbered_whatever_the_chunks(size: int) -> None:
    got = [item async for item in iter_lines(_chunks(SAMPLE, size), 16)]
    assert got == _expected(SAMPLE, 16)
    assert [lineno for lineno, raw in got if raw is None] == [6, 7, 9]


@pytest.mark.parametrize("tail", [b'{"d": 4}', b'{"d": 4}\n', b"\n\n"])
async def test_the_last_line_with_or_without_its_newline(tail: bytes) -> None:
    data = b'{"a": 1}\n' + tail
    got = [item async for item in iter_lines(_chunks(data, 3), 16)]
    assert got == _expected(data, 16)


async def test_a_huge_line_is_dropped_as_it_streams() -> None:
    """20 MiB without a newline, a 1 MiB bound: the line is reported, never held."""
    block = b"x" * (64 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"a": 1}\n'
        for _ in range(20 * 16):
            yield block
        yield b'\n{"b": 2}\n'

    tracemalloc.start()
    try:
        got = [item async for item in iter_lines(chunks(), MIB)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == [(1, b'{"a": 1}'), (2, None), (3, b'{"b": 2}')]
    assert peak < 3 * MIB, f"peak {peak} bytes"


# ---------------------------------------------------------------- lines no column can hold


def line(custom_id: Any = "r-1", body: Any = None, raw_body: str | None = None) -> bytes:
    body = body or {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    text = json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})
    if raw_body is not None:
        text = text[: text.index('"body": ') + len('"body": ')] + raw_body + "}"
    return text.encode()


def refused(raw: bytes, lineno: int = 3) -> list[LineError]:
    parsed = parse_line(lineno, raw, CHAT, {MODEL})
    assert isinstance(parsed, list), parsed
    assert parsed and all(e.line == lineno for e in parsed)
    assert all(e.message.startswith(f"line {lineno}") for e in parsed)
    for e in parsed:  # the errors themselves are storable
        codec.checked_text(e.message, "the message")
    return parsed


@pytest.mark.parametrize(
    ("raw", "param", "words"),
    [
        (b'{"custom_id": "\\ud800", "method": "POST", "body": {}}', "custom_id", "lone surrogate"),
        (line("a\x00b"), "custom_id", "NUL"),
        (line("x" * 513), "custom_id", "at most 512 characters"),
        (
            line(body={"model": MODEL, "messages": [{"role": "user", "content": "\udc80"}]}),
            "body.messages[0].content",
            "lone surrogate",
        ),
        (line(body={"model": MODEL, "\ud800": 1}), "body", "lone surrogate"),
        (
            line(raw_body='{"model": "fake-model", "x": ' + "[" * 100 + "]" * 100 + "}"),
            None,
            "nested more than 64 levels",
        ),
        (line(raw_body="[" * 5000 + "]" * 5000), None, "nested more than 64 levels"),
        (line(raw_body="{" + '"a": {' * 3000 + "}" * 3000 + "}"), None, "nested"),
    ],
)
def test_a_line_no_column_could_hold_is_a_line_error(
    raw: bytes, param: str | None, words: str
) -> None:
    errors = refused(raw)
    if param is not None:
        assert param in {e.param for e in errors}, errors
    assert any(words in e.message for e in errors), errors


def test_the_path_of_a_bad_value_is_named() -> None:
    raw = line(body={"model": MODEL, "messages": [{"role": "user", "content": "\udc80"}]})
    (error,) = refused(raw)
    assert error.param == "body.messages[0].content"
    assert "lone surrogate" in error.message
    (deep,) = refused(line(raw_body='{"model": "m", "x": ' + "[" * 100 + "]" * 100 + "}"))
    assert deep.param is not None and deep.param.startswith("body.x[0][0]")


def test_what_fits_is_kept() -> None:
    """512 characters fill the custom_id column; a NUL inside a body is stored escaped."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a\x00b"}]}
    parsed = parse_line(1, line("é" * 512, body), CHAT, {MODEL})
    assert parsed == BatchLine("é" * 512, body)
    stored = codec.dumps(parsed.body)
    assert "\x00" not in stored and json.loads(stored) == body


# ---------------------------------------------------------------- what a column can hold


def test_codec_refuses_what_no_column_holds() -> None:
    assert codec.checked_text("fine é", "x") == "fine é"
    for bad, words in (("a\x00", "NUL"), ("a\ud800", "lone surrogate")):
        with pytest.raises(codec.Unstorable, match=words):
            codec.checked_text(bad, "the message")
    assert json.loads(codec.answer({"t": "a\x00b"})) == {"t": "a\x00b"}
    for answer, words in (
        ({"t": "\udfff"}, "lone surrogate"),
        ({"n": float("inf")}, "NaN or Infinity"),
        ({"o": object()}, "not JSON"),
    ):
        with pytest.raises(codec.Unstorable, match=words):
            codec.answer(answer)
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(codec.Unstorable, match="nested too deeply"):
        codec.answer(deep)
    said = codec.printable("x\x00y\ud800" + "z" * 500, 50)
    assert len(said) <= 60 and "\\x00" in said and "\\ud800" in said
    codec.checked_text(said, "x")


# ---------------------------------------------------------------- the result writer


@pytest.fixture
def engine() -> PoisonEngine:
    return PoisonEngine("fake")


@pytest.fixture
async def services(store: Store, engine: PoisonEngine, tmp_path: Any) -> AsyncIterator[Services]:
    async with burst_services(store.url, tmp_path / "files", engine) as built:
        yield built


def chat(prompt: str) -> NewGeneration:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    return NewGeneration(kind=Kind.CHAT, model=MODEL, request=body, custom_id=prompt)


async def drain(services: Services) -> None:
    assert services.worker is not None
    await services.worker.run(burst=True)


async def submit(services: Services, prompts: Sequence[str]) -> dict[str, str]:
    ids: dict[str, str] = {}
    for prompt in prompts:
        rec = await services.store.generations.submit(TENANT, chat(prompt), expiry_seconds=3600)
        ids[prompt] = rec.id
    return ids


async def assert_nothing_left_running(services: Services) -> None:
    states = await services.store.generations.count_by_state()
    assert set(states) <= {State.SUCCESS.value, State.FAILED.value}, states
    assert services.worker is not None and not services.worker._held


async def test_an_answer_the_store_refuses_fails_alone(services: Services) -> None:
    prompts = ["ok-0", *POISON, "ok-1", "answer-nul", "ok-2"]
    group = await services.store.groups.submit(
        TENANT, Kind.CHAT, [chat(p) for p in prompts], expiry_seconds=3600
    )
    await drain(services)

    record, generations = await services.store.groups.get(TENANT, group.id, with_generations=True)
    by_prompt = {g.custom_id: g for g in generations}
    for prompt in POISON:
        g = by_prompt[prompt]
        assert g.state is State.FAILED, (prompt, g.state_message)
        assert g.state_message.startswith("Failed: the engine's answer could not be stored: ")
        assert g.response is None
        codec.checked_text(g.state_message, "the message")  # nothing of the poison is kept
    assert "NUL" in by_prompt["error-nul"].state_message
    assert "lone surrogate" in by_prompt["answer-surrogate"].state_message
    for prompt in ("ok-0", "ok-1", "ok-2", "answer-nul"):
        assert by_prompt[prompt].state is State.SUCCESS, by_prompt[prompt].state_message
    nul = by_prompt["answer-nul"].response
    assert nul is not None and nul["choices"][0]["message"]["content"] == "a\x00b"
    # the group's bookkeeping ran for every one of them
    assert record.status == "completed"
    assert (record.counts.success, record.counts.failed) == (4, len(POISON))
    assert services.metrics.groups_completed._value.get() == 1
    await assert_nothing_left_running(services)


async def test_a_refused_write_is_split_until_the_refused_outcome_is_alone(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await submit(services, [f"ok-{i}" for i in range(9)])
    bad = ids["ok-4"]
    finish = services.store.work.finish
    calls: list[int] = []

    async def refusing(leases: Mapping[str, str], outcomes: Sequence[Outcome]) -> list[str]:
        calls.append(len(outcomes))
        if any(o.generation_id == bad and o.state is State.SUCCESS for o in outcomes):
            raise ValueError("value refused by the database\n[parameters: the poison itself]")
        return await finish(leases, outcomes)

    monkeypatch.setattr(services.store.work, "finish", refusing)
    await drain(services)

    g = await services.store.generations.get(TENANT, bad)
    assert g.state is State.FAILED and g.response is None
    assert g.state_message == (
        "Failed: the engine's answer could not be stored: value refused by the database"
    )
    for gid in ids.values():
        if gid != bad:
            assert (await services.store.generations.get(TENANT, gid)).state is State.SUCCESS
    assert len(calls) < 60  # split in halves, not retried forever
    await assert_nothing_left_running(services)


async def test_a_database_that_is_down_is_waited_for_and_nothing_is_lost(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await submit(services, [f"ok-{i}" for i in range(5)])
    finish = services.store.work.finish
    down = [3]

    async def flaky(leases: Mapping[str, str], outcomes: Sequence[Outcome]) -> list[str]:
        if down[0] > 0:
            down[0] -= 1
            raise ServiceUnavailable("the database could not be reached: connection refused")
        return await finish(leases, outcomes)

    monkeypatch.setattr(services.store.work, "finish", flaky)
    await drain(services)

    assert down == [0]
    for gid in ids.values():
        g = await services.store.generations.get(TENANT, gid)
        assert g.state is State.SUCCESS and g.attempts == 1
    await assert_nothing_left_running(services)


async def test_an_outcome_that_cannot_be_written_at_all_is_let_go(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not even its Failed outcome is taken: the writer lets it go (its lease runs out and
    maintenance takes it back) and writes the rest."""
    ids = await submit(services, [f"ok-{i}" for i in range(4)])
    bad = ids["ok-2"]
    finish = services.store.work.finish

    async def refusing(leases: Mapping[str, str], outcomes: Sequence[Outcome]) -> list[str]:
        if any(o.generation_id == bad for o in outcomes):
            raise ValueError("refused")
        return await finish(leases, outcomes)

    monkeypatch.setattr(services.store.work, "finish", refusing)
    await drain(services)

    assert (await services.store.generations.get(TENANT, bad)).state is State.IN_PROGRESS
    for gid in ids.values():
        if gid != bad:
            assert (await services.store.generations.get(TENANT, gid)).state is State.SUCCESS
    assert services.worker is not None and bad not in services.worker._held
