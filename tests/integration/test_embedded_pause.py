"""The embedded engine pauses background generations for realtime and resumes them unchanged."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator

import pytest

from backburner.backends.llamacpp import LlamaCppBackend
from backburner.config import BackendSettings
from backburner.core.states import Kind

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None, reason="needs the 'local' extra"
    ),
]

SLOW = {
    "model": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Write a short poem about the sea and ships."}],
    "max_tokens": 96,
    "temperature": 0,
}
QUICK = {
    "model": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture
async def engine() -> AsyncIterator[LlamaCppBackend]:
    backend = LlamaCppBackend(
        BackendSettings(name="local", type="llamacpp", models=["smollm2-135m-instruct"])
    )
    await backend.start()
    yield backend
    await backend.close()


def _text(resp: dict[str, object]) -> str:
    choices = resp["choices"]
    assert isinstance(choices, list)
    return str(choices[0]["message"]["content"])


async def test_paused_background_generation_gives_the_same_text(engine: LlamaCppBackend) -> None:
    # llama.cpp's logits for a prompt differ in the last bits between a fresh context and one
    # that reuses a cached prefix (batch shapes differ), so compare like with like: the prompt
    # is cached in both the unpaused and the paused run
    await engine.run(Kind.CHAT, SLOW, background=True)
    unpaused = _text(await engine.run(Kind.CHAT, SLOW, background=True))
    assert engine.pauses == 0

    slow = asyncio.create_task(engine.run(Kind.CHAT, SLOW, background=True))
    realtime_answers = []
    for _ in range(3):  # realtime calls while the background generation runs
        await asyncio.sleep(0.05)
        realtime_answers.append(_text(await engine.run(Kind.CHAT, QUICK)))
    stream = [c async for c in engine.stream(Kind.CHAT, QUICK)]
    paused = _text(await slow)

    assert engine.pauses >= 1, "the background generation never paused for realtime"
    assert paused == unpaused
    assert all(realtime_answers) and stream
