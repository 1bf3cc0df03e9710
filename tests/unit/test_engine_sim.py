"""The simulated vLLM-like engine (tests/support/engine_sim.py): HTTP shapes, the batch cap, the
prefix cache, priority preemption and aborts. No test asserts a duration: the engine runs with a
small time scale and the tests check orders and counters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.engine_sim import (
    SimConfig,
    SimEngine,
    SimRequest,
    block_keys,
    running_sim,
    tokenize_chat,
    tokenize_text,
)

SCALE = 0.05  # 12 ms ITL -> 0.6 ms per step


def _root(base: str) -> str:
    return base.removesuffix("/v1")


async def _stats(client: httpx.AsyncClient, base: str) -> dict[str, Any]:
    r = await client.get(_root(base) + "/stats")
    assert r.status_code == 200
    data: dict[str, Any] = r.json()
    return data


async def _until(pred: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await pred():
            await asyncio.sleep(0.005)


async def _metrics(client: httpx.AsyncClient, base: str) -> dict[str, float]:
    r = await client.get(_root(base) + "/metrics")
    assert r.status_code == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[sample.name] = sample.value
    return out


def _chat(text: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": text},
        ],
        "max_tokens": max_tokens,
        **extra,
    }


def _sse(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


# -- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_blocks_chain() -> None:
    assert tokenize_text("a b  c") == tokenize_text("a b c")
    assert len(tokenize_text("a b c")) == 4  # BOS + 3 words
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    # BOS, <|system|> be brief <|end|>, <|user|> hi there <|end|>, <|assistant|>
    assert len(tokenize_chat(msgs)) == 1 + 4 + 4 + 1
    a = [1] * 16 + [2] * 16 + [3] * 16
    b = [1] * 16 + [9] * 16 + [3] * 16
    ka, kb = block_keys(a, 16), block_keys(b, 16)
    assert len(ka) == 3 and len(block_keys(a + [4] * 15, 16)) == 3
    assert ka[0] == kb[0] and ka[1] != kb[1] and ka[2] != kb[2]  # same third block, other chain


# -- engine without HTTP ----------------------------------------------------------------------


async def _finish_all(reqs: list[SimRequest], order: list[int]) -> None:
    async def one(r: SimRequest) -> None:
        while not r.done:
            await r.wait_change()
        order.append(r.request_id)

    async with asyncio.timeout(10):
        await asyncio.gather(*(one(r) for r in reqs))


async def test_engine_priority_orders_the_queue() -> None:
    engine = SimEngine(SimConfig(max_num_seqs=1, scheduling_policy="priority", time_scale=0))
    try:
        low = [engine.submit([1, 2, 3], 3, priority=5) for _ in range(3)]
        high = engine.submit([4, 5, 6], 3, priority=-1)
        order: list[int] = []
        await _finish_all([*low, high], order)
        assert order == [high.request_id, *(r.request_id for r in low)]
        assert engine.num_preemptions == 0
    finally:
        await engine.stop()


async def test_engine_preempts_for_kv_growth_and_recomputes() -> None:
    # three 20-token prompts fit at admission (3 * 21 <= 64) but cannot all grow to 30 tokens
    engine = SimEngine(SimConfig(kv_tokens=64, time_scale=0))
    try:
        reqs = [engine.submit(list(range(i * 100, i * 100 + 20)), 10) for i in range(3)]
        await _finish_all(reqs, [])
        s = engine.stats()
        assert s["requests_finished"] == 3 and all(r.generated == 10 for r in reqs)
        assert s["num_preemptions"] >= 1 and s["preempted_tokens"] >= 1
        assert s["kv_tokens_used"] == 0 and s["running"] == 0 and s["waiting"] == 0
        assert s["generation_tokens"] == 30 and s["prompt_tokens"] == 60
        assert s["prefill_tokens_computed"] > 60  # recomputation after preemption
    finally:
        await engine.stop()


async def test_engine_preempts_running_for_lower_priority_value() -> None:
    engine = SimEngine(SimConfig(max_num_seqs=1, scheduling_policy="priority", time_scale=0))
    try:
        a = engine.submit([1, 2, 3], 200, priority=5, stream=True)
        await a.wait_change()  # a produced its first token
        c = engine.submit([7, 8, 9], 3, priority=0)
        order: list[int] = []
        await _finish_all([a, c], order)
        assert order == [c.request_id, a.request_id]
        assert a.preemptions == 1 and engine.preempted_tokens >= 1
        assert a.generated == 200  # it resumed where it stopped
    finally:
        await engine.stop()


# -- HTTP -------------------------------------------------------------------------------------


async def test_chat_non_streamed_is_openai_shaped_and_deterministic() -> None:
    async with running_sim(SimConfig(time_scale=SCALE)) as base, httpx.AsyncClient() as client:
        body = _chat("tell me a story", max_tokens=6)
        r = await client.post(f"{base}/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert set(data) == {"id", "object", "created", "model", "choices", "usage"}
        assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
        assert data["model"] == "sim-model"
        (choice,) = data["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] == "length"
        assert choice["message"]["role"] == "assistant"
        text = choice["message"]["content"]
        assert len(text.split()) == 6
        prompt_tokens = len(tokenize_chat(body["messages"]))
        usage = data["usage"]
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["completion_tokens"] == 6 and usage["total_tokens"] == prompt_tokens + 6

        again = await client.post(f"{base}/chat/completions", json=body)
        assert again.json()["choices"][0]["message"]["content"] == text
        longer = await client.post(f"{base}/chat/completions", json=_chat("tell me a story", 9))
        assert longer.json()["choices"][0]["message"]["content"].startswith(text)
        other = await client.post(f"{base}/chat/completions", json=_chat("something else", 6))
        assert other.json()["choices"][0]["message"]["content"] != text

        body2 = {"model": "sim-model", "prompt": "once upon a time", "max_completion_tokens": 4}
        r = await client.post(f"{base}/completions", json=body2)
        data = r.json()
        assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
        assert len(data["choices"][0]["text"].split()) == 4
        assert data["usage"]["prompt_tokens"] == 5 and data["usage"]["completion_tokens"] == 4


async def test_streaming_one_chunk_per_token_then_done() -> None:
    async with running_sim(SimConfig(time_scale=SCALE)) as base, httpx.AsyncClient() as client:
        body = _chat("stream please", max_tokens=7)
        full = (await client.post(f"{base}/chat/completions", json=body)).json()
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        r = await client.post(f"{base}/chat/completions", json=stream_body)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        tokens, usage_chunk = chunks[:-1], chunks[-1]
        assert len(tokens) == 7
        for c in tokens:
            assert c["object"] == "chat.completion.chunk" and c["id"] == tokens[0]["id"]
            assert len(c["choices"]) == 1
        assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 6 + ["length"]
        text = "".join(c["choices"][0]["delta"]["content"] for c in tokens)
        assert text == full["choices"][0]["message"]["content"]
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]

        comp = {"prompt": "count with me", "max_tokens": 3, "stream": True}
        r = await client.post(f"{base}/completions", json=comp)
        events = _sse(r.text)
        assert events[-1] == "[DONE]" and len(events) == 4  # no usage chunk unless asked
        parts = [json.loads(e) for e in events[:-1]]
        assert all(p["object"] == "text_completion" for p in parts)
        assert parts[-1]["choices"][0]["finish_reason"] == "length"


async def test_models_health_errors() -> None:
    config = SimConfig(model="m1", served_model_names=("m2",), time_scale=SCALE)
    async with running_sim(config) as base, httpx.AsyncClient() as client:
        models = (await client.get(f"{base}/models")).json()
        assert [m["id"] for m in models["data"]] == ["m1", "m2"]
        assert (await client.get(_root(base) + "/health")).status_code == 200

        r = await client.post(f"{base}/chat/completions", json={**_chat("x"), "model": "m2"})
        assert r.status_code == 200 and r.json()["model"] == "m2"
        r = await client.post(f"{base}/chat/completions", json={**_chat("x"), "model": "nope"})
        assert r.status_code == 404
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = await client.post(
            f"{base}/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "error" in r.json()
        r = await client.post(f"{base}/chat/completions", json={"model": "m1"})
        assert r.status_code == 400 and "error" in r.json()
        # fcfs rejects a non-zero priority, as vLLM does; zero is fine
        r = await client.post(f"{base}/chat/completions", json=_chat("x", model="m1", priority=1))
        assert r.status_code == 400 and "priority" in r.json()["error"]["message"].lower()
        r = await client.post(f"{base}/chat/completions", json=_chat("x", model="m1", priority=0))
        assert r.status_code == 200
        r = await client.post(f"{base}/chat/completions", json=_chat("x", 10**6, model="m1"))
        assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


async def test_metrics_have_vllm_names() -> None:
    async with running_sim(SimConfig(time_scale=SCALE)) as base, httpx.AsyncClient() as client:
        await client.post(f"{base}/chat/completions", json=_chat("hello", 5))
        r = await client.get(_root(base) + "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:num_preemptions",
            "vllm:prefix_cache_queries",
            "vllm:prefix_cache_hits",
            "vllm:prompt_tokens",
            "vllm:generation_tokens",
            "sim_aborted_tokens",
            "sim_preempted_tokens",
            "sim_requests_finished",
        ):
            assert name in families, name
            for sample in families[name].samples:
                assert sample.labels.get("model_name") == "sim-model"
        assert "vllm:gpu_cache_usage_perc" not in families
        values = await _metrics(client, base)
        assert values["vllm:generation_tokens_total"] == 5
        assert values["vllm:num_preemptions_total"] == 0
        assert values["sim_requests_finished_total"] == 1
        assert values["vllm:kv_cache_usage_perc"] == 0.0

    legacy = SimConfig(time_scale=SCALE, legacy_metric_names=True)
    async with running_sim(legacy) as base, httpx.AsyncClient() as client:
        values = await _metrics(client, base)
        assert "vllm:gpu_cache_usage_perc" in values and "vllm:kv_cache_usage_perc" not in values


async def test_running_cap_holds_and_others_wait() -> None:
    config = SimConfig(max_num_seqs=4, time_scale=SCALE)
    async with running_sim(config) as base, httpx.AsyncClient() as client:
        tasks = [
            asyncio.create_task(client.post(f"{base}/chat/completions", json=_chat(f"q{i}", 100)))
            for i in range(12)
        ]
        seen: list[tuple[float, float]] = []

        async def waiting_seen() -> bool:
            m = await _metrics(client, base)
            seen.append((m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]))
            return m["vllm:num_requests_waiting"] > 0

        await _until(waiting_seen)
        responses = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 for r in responses)
        assert all(running <= 4 for running, _ in seen)
        s = await _stats(client, base)
        assert s["peak_running"] == 4 and s["peak_waiting"] > 0
        assert s["requests_finished"] == 12 and s["running"] == 0 and s["waiting"] == 0
        assert s["kv_tokens_used"] == 0


async def test_prefix_cache_hits_a_repeated_system_prompt() -> None:
    system = " ".join(f"rule{i}" for i in range(100))  # BOS + marker + 100 words + end = 103

    def body(question: str) -> dict[str, Any]:
        return {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            "max_tokens": 2,
        }

    async with running_sim(SimConfig(time_scale=SCALE)) as base, httpx.AsyncClient() as client:
        first = (await client.post(f"{base}/chat/completions", json=body("what is 1+1"))).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        s = await _stats(client, base)
        assert s["prefix_cache_hits"] == 0
        assert s["prefix_cache_queries"] == first["usage"]["prompt_tokens"]

        second = (await client.post(f"{base}/chat/completions", json=body("and 2+2"))).json()
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 96  # 6 full blocks
        values = await _metrics(client, base)
        assert values["vllm:prefix_cache_hits_total"] == 96
        assert values["vllm:prefix_cache_queries_total"] == (
            first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
        )


async def test_priority_request_overtakes_queued_and_preempts_running() -> None:
    config = SimConfig(max_num_seqs=1, scheduling_policy="priority", time_scale=SCALE)
    async with running_sim(config) as base, httpx.AsyncClient() as client:
        order: list[str] = []

        async def send(name: str, priority: int, max_tokens: int) -> None:
            body = _chat(f"request {name}", max_tokens, priority=priority)
            r = await client.post(f"{base}/chat/completions", json=body)
            assert r.status_code == 200, r.text
            order.append(name)

        a = asyncio.create_task(send("A", 5, 1000))

        async def a_generating() -> bool:
            s = await _stats(client, base)
            return bool(s["running"] == 1 and s["generation_tokens"] >= 1)

        await _until(a_generating)
        bs = [asyncio.create_task(send(f"B{i}", 5, 10)) for i in range(3)]

        async def bs_queued() -> bool:
            return bool((await _stats(client, base))["waiting"] == 3)

        await _until(bs_queued)
        await send("C", 0, 10)
        assert order == ["C"]  # A was preempted, the Bs were overtaken
        await asyncio.gather(a, *bs)
        assert order[:2] == ["C", "A"]  # A resumes first: same priority, earliest arrival
        assert set(order[2:]) == {"B0", "B1", "B2"}
        s = await _stats(client, base)
        assert s["num_preemptions"] >= 1 and s["preempted_tokens"] >= 1
        values = await _metrics(client, base)
        assert values["vllm:num_preemptions_total"] == s["num_preemptions"]


async def test_disconnect_mid_stream_aborts_the_sequence() -> None:
    async with running_sim(SimConfig(time_scale=SCALE)) as base, httpx.AsyncClient() as client:
        body = _chat("never ending", 30000, stream=True)
        received = 0
        async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    received += 1
                    if received == 5:
                        break
        # leaving the block without reading the body closes the connection

        async def aborted() -> bool:
            s = await _stats(client, base)
            return bool(s["running"] == 0 and s["requests_aborted"] == 1)

        await _until(aborted)
        s = await _stats(client, base)
        assert s["aborted_tokens"] >= 5 and s["kv_tokens_used"] == 0
        assert s["requests_finished"] == 0
        values = await _metrics(client, base)
        assert values["vllm:num_requests_running"] == 0
        assert values["sim_aborted_tokens_total"] == s["aborted_tokens"]


async def test_disconnect_aborts_running_and_waiting_non_streamed() -> None:
    config = SimConfig(max_num_seqs=1, time_scale=SCALE)
    async with running_sim(config) as base, httpx.AsyncClient() as client:
        running = asyncio.create_task(
            client.post(f"{base}/chat/completions", json=_chat("long one", 30000))
        )

        async def one_running() -> bool:
            s = await _stats(client, base)
            return bool(s["running"] == 1 and s["generation_tokens"] >= 1)

        await _until(one_running)
        waiting = asyncio.create_task(
            client.post(f"{base}/chat/completions", json=_chat("queued", 5))
        )

        async def one_waiting() -> bool:
            return bool((await _stats(client, base))["waiting"] == 1)

        await _until(one_waiting)
        waiting.cancel()

        async def none_waiting() -> bool:
            s = await _stats(client, base)
            return bool(s["waiting"] == 0 and s["requests_aborted"] == 1)

        await _until(none_waiting)
        assert (await _stats(client, base))["running"] == 1
        running.cancel()

        async def none_running() -> bool:
            s = await _stats(client, base)
            return bool(s["running"] == 0 and s["requests_aborted"] == 2)

        await _until(none_running)
        s = await _stats(client, base)
        assert s["aborted_tokens"] >= 1 and s["requests_finished"] == 0
        assert s["kv_tokens_used"] == 0
