"""Fuzzing files (issue #10), on SQLite and PostgreSQL: multipart uploads, and batch input files
with poison lines.

Uploads: odd forms (no file, two files, odd file names and purposes, extra fields, bodies cut
short or under another boundary) are refused with the envelope and leave no row and no blob; a
well-formed one is read back, listed and downloaded byte for byte.

Batch files: good lines mixed with poison (lone surrogates, NUL in ``custom_id``, deep nesting,
wrong types, duplicate ``custom_id``, lines over ``batch_max_line_bytes``, invalid JSON), blank
lines and CRLF; uploaded, made a batch and run in burst mode. A file with a bad line fails with an
error naming each bad line by number (and nothing runs); a file of good lines completes with an
output line for each. See ``test_fuzz.py`` for the other routes.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from backburner.schemas.batch import Batch, BatchRequestOutput
from backburner.schemas.files import FileList, FileObject
from tests.conftest import FAKE_MODEL
from tests.support.fuzz import FUZZ, Upload, examples, idempotency_keys, uploads
from tests.support.fuzz_world import World, chat_line, check_answer

MAX_LINE_BYTES = 2048


async def upload_example(world: World, upload: Upload, key: str | None) -> None:
    headers = {} if upload.content_type is None else {"content-type": upload.content_type}
    if key is not None:
        headers["idempotency-key"] = key
    before = await world.snapshot()
    r = await world.client.post("/v1/files", content=upload.body, headers=headers)
    said = f"POST /v1/files {upload!r}: {upload.what}"
    err = check_answer(r, said)
    if err is not None:
        assert r.status_code != 400 or err["param"], f"{said}: {err}"
        assert upload.content is None or err["param"] == "Idempotency-Key", f"{said}: {err}"
        assert await world.snapshot() == before, f"{said}: refused ({err}) but stored something"
        return
    assert r.status_code == 200, said
    file = FileObject.model_validate(r.json()).model_dump()
    got = await world.client.get(f"/v1/files/{file['id']}")
    assert got.status_code == 200 and got.json() == file, got.text
    listed = FileList.model_validate((await world.client.get("/v1/files")).json())
    assert file["id"] in {f.id for f in listed.data}
    assert file["filename"].isprintable() and 0 < len(file["filename"]) <= 255, file
    content = await world.client.get(f"/v1/files/{file['id']}/content")
    assert content.status_code == 200
    if upload.content is not None:
        assert content.content == upload.content and file["bytes"] == len(upload.content)


def test_uploads(db_url: str, tmp_path: Path) -> None:
    with asyncio.Runner() as runner:
        world = runner.run(World.start(db_url, tmp_path))
        try:

            @settings(FUZZ, max_examples=examples(40, db_url))
            @given(upload=uploads(), key=idempotency_keys())
            def fuzz(upload: Upload, key: str | None) -> None:
                runner.run(upload_example(world, upload, key))

            fuzz()
        finally:
            runner.run(world.close())


# ---------------------------------------------------------------------------- batch files


@dataclass(frozen=True)
class Line:
    """One line of an input file: its ``custom_id``, and why it is ``bad`` (a line with
    neither is blank: skipped)."""

    raw: bytes
    custom_id: str | None = None
    bad: str | None = None


def good_line(custom_id: str, text: str = "hi") -> bytes:
    return json.dumps(chat_line(custom_id, text)).encode()


def with_body(custom_id: str, body: str) -> bytes:
    start = json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"})
    return f'{start[:-1]}, "body": {body}}}'.encode()


CHAT = f'{{"model": "{FAKE_MODEL}", "messages": [{{"role": "user", "content": "hi"}}]'
POISON: dict[str, bytes] = {
    "lone surrogate in custom_id": b'{"custom_id": "\\ud800", "method": "POST", "body": {}}',
    "lone surrogate in the body": with_body("s", CHAT + ', "x": "\\udc80"}'),
    "NUL in custom_id": good_line("a\x00b"),
    "nested too deep": with_body("d", CHAT + ', "x": ' + "[" * 100 + "]" * 100 + "}"),
    "nested past the parser": with_body("p", "[" * 1000 + "]" * 1000),
    "custom_id not a string": b'{"custom_id": 5, "method": "POST", "body": {}}',
    "method not POST": good_line("m").replace(b'"POST"', b'"GET"'),
    "body a list": with_body("l", "[]"),
    "url of another endpoint": good_line("u").replace(b"/v1/chat/", b"/v1/"),
    "number too large": with_body("n", CHAT + ', "max_tokens": 1e400}'),
    "unknown model": good_line("k").replace(FAKE_MODEL.encode(), b"no-such-model"),
    "prompt in a chat batch": with_body("w", f'{{"model": "{FAKE_MODEL}", "prompt": "x"}}'),
    "unknown field": good_line("f")[:-1] + b', "extra": 1}',
    "invalid JSON": b'{"custom_id": "j", "method": ',
    "custom_id too long": good_line("c" * 600),
    "longer than the line limit": good_line("big", "x" * (MAX_LINE_BYTES + 10)),
    "not an object": b"[1, 2, 3]",
}


@st.composite
def batch_files(draw: st.DrawFn) -> list[Line]:
    """Good and blank lines, and in half of the files poison lines and duplicate custom_ids,
    in any order."""
    clean = ["good", "good", "good", "blank"]
    poisoned = draw(st.booleans())
    kinds = st.sampled_from([*clean, "poison", "duplicate"] if poisoned else clean)
    lines: list[Line] = []
    seen: list[str] = []
    for kind in draw(st.lists(kinds, min_size=1, max_size=10)):
        if kind == "good":
            custom_id = f"req-{len(lines)}-" + draw(st.text("abc é\\\"'", max_size=5))
            text = draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=20))
            lines.append(Line(good_line(custom_id, text), custom_id))
            seen.append(custom_id)
        elif kind == "blank":
            lines.append(Line(draw(st.sampled_from([b"", b"  ", b"\t"]))))
        elif kind == "duplicate" and seen:
            custom_id = draw(st.sampled_from(seen))
            lines.append(Line(good_line(custom_id), custom_id, bad="duplicate custom_id"))
        else:
            why = draw(st.sampled_from(sorted(POISON)))
            lines.append(Line(POISON[why], bad=why))
    return lines


def file_bytes(lines: list[Line], crlf: bool, last_newline: bool) -> bytes:
    end = b"\r\n" if crlf else b"\n"
    data = end.join(line.raw for line in lines)
    return data + end if last_newline else data


async def batch_example(world: World, lines: list[Line], crlf: bool, last_newline: bool) -> None:
    said = [(i, line.bad or line.custom_id) for i, line in enumerate(lines, 1)]
    file = await world.upload(file_bytes(lines, crlf, last_newline))
    body = {
        "input_file_id": file["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    r = await world.client.post("/v1/batches", json=body)
    assert r.status_code == 200, r.text
    batch_id = r.json()["id"]
    await world.drain()
    got = await world.client.get(f"/v1/batches/{batch_id}")
    check_answer(got, said)
    batch = Batch.model_validate(got.json())
    bad = {i for i, line in enumerate(lines, 1) if line.bad}
    good = [line.custom_id for line in lines if line.custom_id is not None and not line.bad]
    if bad or not good:
        assert batch.status == "failed", (said, batch)
        assert batch.errors is not None, (said, batch)
        errors = batch.errors.data
        if bad:
            assert {e.line for e in errors} == bad, (said, errors)
            for e in errors:
                assert f"line {e.line}" in e.message, e
                if e.code == "duplicate_custom_id":
                    line = lines[(e.line or 0) - 1]
                    assert line.bad == "duplicate custom_id" and f"'{line.custom_id}'" in e.message
        assert batch.request_counts.total == 0
        assert await world.batch_generations(batch_id) == 0, "a failed batch ran"
        return
    assert batch.status == "completed", (said, batch)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(good), 0)
    assert batch.output_file_id is not None and batch.error_file_id is None
    out = await world.client.get(f"/v1/files/{batch.output_file_id}/content")
    assert out.status_code == 200
    results = [BatchRequestOutput.model_validate_json(x) for x in out.content.splitlines()]
    assert sorted(str(o.custom_id) for o in results) == sorted(good), said
    assert all(o.response is not None and o.response.status_code == 200 for o in results)


def test_batch_files(db_url: str, tmp_path: Path) -> None:
    with asyncio.Runner() as runner:
        world = runner.run(World.start(db_url, tmp_path, batch_max_line_bytes=MAX_LINE_BYTES))
        try:

            @settings(FUZZ, max_examples=examples(30, db_url))
            @given(lines=batch_files(), crlf=st.booleans(), last_newline=st.booleans())
            def fuzz(lines: list[Line], crlf: bool, last_newline: bool) -> None:
                runner.run(batch_example(world, lines, crlf, last_newline))

            for i, why in enumerate(sorted(POISON)):  # each poison at least once, among good lines
                lines = [Line(good_line("a"), "a"), Line(POISON[why], bad=why), Line(b"")]
                lines.append(Line(good_line("b"), "b"))
                fuzz = example(lines=lines, crlf=i % 2 == 0, last_newline=i % 3 == 0)(fuzz)
            fuzz()
        finally:
            runner.run(world.close())
