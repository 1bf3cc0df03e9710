"""Scenario 5: poison batch lines and poison engine answers inside a normal drain."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.faults import common
from tests.support.faults.common import (
    ECHO,
    Report,
    answered,
    asked,
    chat,
    prompt,
    span,
    until,
)
from tests.support.faults.peek import Peek

POISON_ANSWERS = {
    # marker -> what its generation says (None: it is storable, Success)
    "answer-surrogate": "the response holds invalid Unicode (a lone surrogate)",
    "error-nul": "the message holds a NUL character",
    "error-surrogate": "the message holds invalid Unicode (a lone surrogate)",
    "answer-nul": None,
}
NOT_STORED = "Failed: the engine's answer could not be stored: "


def _line(custom_id: str, text: str) -> dict[str, Any]:
    body = {"model": common.MODEL, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _jsonl(items: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def poison_batch_file(tag: str, good: int) -> tuple[bytes, dict[int, str]]:
    """A batch file of ``good`` good lines (prompts ``{tag} line {i}``) with poison lines among
    them; returns the file and, for each poison line (1-based), a phrase its error must say."""
    lines: list[bytes] = [
        json.dumps(_line(f"g{i}", f"{tag} line {i}")).encode() for i in range(good)
    ]
    start = json.dumps({"custom_id": "p", "method": "POST", "url": "/v1/chat/completions"})[:-1]
    poison = [
        (b'{"custom_id": "\\ud800", "method": "POST", "body": {}}', "lone surrogate"),
        (json.dumps(_line("nul\x00id", "x")).encode(), "NUL"),
        (f'{start}, "body": {"[" * 5000}{"]" * 5000}}}'.encode(), "nested"),
        (json.dumps(_line("long", "x" * 20_000)).encode(), "longer than"),
        (json.dumps(_line("c" * 600, "x")).encode(), "512 characters"),
        (b'{"custom_id": "half", "method": "POST", "bo', "not valid JSON"),
    ]
    said: dict[int, str] = {}
    step = max(1, good // (len(poison) + 1))
    for k, (raw, phrase) in enumerate(poison):
        at = min(len(lines), (k + 1) * step + k)
        lines.insert(at, raw)
        said[at + 1] = phrase
    return b"".join(line + b"\n" for line in lines), said


async def poison_mix(
    work: Path, database_url: str, store: str, *, n: int, every: int = 10
) -> Report:
    """``backburner serve`` drains ``n`` slow generations of which every ``every``-th asks for
    a poison answer (a lone surrogate or a NUL, in the answer or in a 400's message), a batch
    whose lines are fine but some answers poison, and a batch file with poison lines (a lone
    surrogate, a NUL, nesting too deep, a line too long, a custom_id too long, broken JSON).
    Promises: the rest completes; a poison answer fails its generation (or batch line) with a
    message saying what could not be stored, a storable one (NUL in the text) succeeds; the
    poison file fails its batch with an error naming each poison line."""
    report = Report("poison lines and answers in a drain", store)
    started = time.monotonic()
    tag = f"poison-{int(time.time() * 1000)}"
    markers = list(POISON_ANSWERS)
    texts = [
        f"{tag} {i} {markers[(i // every) % len(markers)]}" if i % every == every - 1
        else prompt(tag, i)
        for i in range(n)
    ]  # fmt: skip
    async with common.rig(work, database_url) as rig:
        up = await rig.upstream(poison=True)
        cfg = rig.config(up, max_concurrency=32, batch_max_line_bytes=16 * 1024)
        srv = await rig.serve(cfg)
        bad_file, bad_lines = poison_batch_file(tag, 40)
        answers = [_line(f"b{i}", f"{tag} b{i} {markers[i % len(markers)]}") for i in range(8)]
        answers += [_line(f"ok{i}", f"{tag} ok{i}") for i in range(32)]
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60.0) as c:
            bad_batch = await _create_batch(c, bad_file)
            answers_batch = await _create_batch(c, _jsonl(answers))
            group_ids = await common.submit_groups(
                srv.base_url, [chat(t, f"c{i}") for i, t in enumerate(texts)]
            )
            finished: dict[str, dict[str, Any]] = {}

            async def batches_done() -> bool:
                for bid in (bad_batch, answers_batch):
                    b = (await c.get(f"/v1/batches/{bid}")).json()
                    if b["status"] in ("completed", "failed", "expired", "cancelled"):
                        finished[bid] = b
                return len(finished) == 2

            await until(batches_done, 120.0, "both batches finished", alive=[srv])
            peek = Peek(database_url)
            try:

                async def drained() -> bool:
                    states = await peek.states()
                    return states["Queued"] + states["In Progress"] == 0

                drain_s = await until(drained, 120.0, "every generation terminal", alive=[srv])
            finally:
                await peek.close()
            gens = await common.fetch_groups(srv.base_url, group_ids)
            bad = finished[bad_batch]
            good = finished[answers_batch]
            errors = await _file_lines(c, good.get("error_file_id"))
            output = await _file_lines(c, good.get("output_file_id"))
        seen = await common.upstream_seen(up)

    poison_expected = {
        i: POISON_ANSWERS[next(m for m in markers if texts[i].endswith(m))]
        for i in range(n)
        if i % every == every - 1
    }
    wrong: list[str] = []
    for i, g in enumerate(gens):
        reason = poison_expected.get(i)
        if reason is not None:
            ok = g["state"] == "Failed" and g["stateMessage"] == NOT_STORED + reason
        elif i in poison_expected:  # storable: the NUL came back as it was
            ok = g["state"] == "Success" and answered(g) == "a\x00b"
        else:
            ok = g["state"] == "Success" and answered(g) == ECHO + asked(g)
        if not ok:
            wrong.append(f"{i}: {g['state']} {g['stateMessage']!r}")
    bad_errors: dict[int, str] = {}
    for e in (bad.get("errors") or {}).get("data", []):
        said = bad_errors.get(e.get("line"), "")
        bad_errors[e.get("line")] = f"{said} | {e.get('message')}" if said else e.get("message")
    error_ids = {e["custom_id"]: e["error"]["message"] for e in errors}
    failed_poison = sum(1 for r in poison_expected.values() if r is not None)
    report.figures.update(
        {
            "generations": n,
            "poison answers": len(poison_expected),
            "Failed (not storable)": sum(1 for g in gens if g["state"] == "Failed"),
            "Success": sum(1 for g in gens if g["state"] == "Success"),
            "poison file": f"{bad['status']}, {len(bad_errors)} line errors",
            "answers batch": (
                f"{good['status']}, {good['request_counts']['completed']} completed,"
                f" {good['request_counts']['failed']} failed"
            ),
            "upstream requests per poison answer": span(
                len(seen.get(t, [])) for t in [texts[i] for i in poison_expected]
            ),
            "drain s": round(drain_s, 1),
        }
    )
    report.check(len(gens) == n, f"{len(gens)} generations listed, {n} sent")
    report.check(not wrong, f"{len(wrong)} generations ended wrongly: {wrong[:5]}")
    report.check(
        sum(1 for g in gens if g["state"] == "Failed") == failed_poison,
        "the Failed generations are not exactly the unstorable poison answers",
    )
    report.check(bad["status"] == "failed", f"the poison file's batch is {bad['status']}")
    report.check(
        sorted(bad_errors) == sorted(bad_lines),
        f"poison lines {sorted(bad_lines)}, errors name lines {sorted(bad_errors)}",
    )
    for number, phrase in bad_lines.items():
        report.check(
            phrase in bad_errors.get(number, ""),
            f"line {number}'s error does not say {phrase!r}: {bad_errors.get(number)!r}",
        )
    unstorable = {f"b{i}" for i in range(8) if POISON_ANSWERS[markers[i % len(markers)]]}
    report.check(good["status"] == "completed", f"the answers batch is {good['status']}")
    report.check(set(error_ids) == unstorable, f"error lines {sorted(error_ids)}")
    report.check(
        all(m.startswith(NOT_STORED) for m in error_ids.values()),
        f"error lines say {sorted(set(error_ids.values()))[:3]}",
    )
    report.check(len(output) == 40 - len(unstorable), f"{len(output)} output lines")
    ran = [t for t in seen if t.startswith(f"{tag} line ")]
    report.check(not ran, f"{len(ran)} lines of the failed batch ran")
    poison_prompts = [texts[i] for i in poison_expected]
    poison_prompts += [a["body"]["messages"][0]["content"] for a in answers[:8]]
    again = [t for t in poison_prompts if len(seen.get(t, [])) != 1]
    report.check(not again, f"poison answers not asked exactly once: {again[:5]}")
    report.seconds = time.monotonic() - started
    return report


async def _create_batch(c: httpx.AsyncClient, data: bytes) -> str:
    r = await c.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", data, "application/jsonl")},
    )
    assert r.status_code == 200, r.text
    r = await c.post(
        "/v1/batches",
        json={
            "input_file_id": r.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert r.status_code == 200, r.text
    batch_id: str = r.json()["id"]
    return batch_id


async def _file_lines(c: httpx.AsyncClient, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    r = await c.get(f"/v1/files/{file_id}/content")
    r.raise_for_status()
    return [json.loads(x) for x in r.text.splitlines() if x.strip()]
