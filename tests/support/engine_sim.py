"""A simulated continuous-batching LLM engine (vLLM-like) behind an OpenAI-compatible HTTP API.

It lets a scheduler in front of an engine be measured without a GPU, on a small machine: one
asyncio event loop, **one step task** that advances every running sequence per step (never a
task per token), a raw ASGI app served by uvicorn (no framework, no access log).

Run it standalone::

    python -m tests.support.engine_sim --port 8100 [--max-num-seqs 32] \\
        [--scheduling-policy priority] [--time-scale 1.0] [--model NAME ...]

Once the socket listens it prints ``READY <port>`` (``--port 0`` picks a free port).

Model of the engine
-------------------
- **Batch.** At most ``max_num_seqs`` sequences run; the rest wait in a queue. A sequence holds
  ``prompt + generated`` tokens of KV cache out of ``kv_tokens``; it is admitted only if it fits
  (with room for the token its step produces). When the running sequences cannot grow by one
  token, the engine preempts one (fcfs: the last admitted; priority: the highest priority value,
  youngest first), as vLLM does.
- **Steps.** Each step, every running sequence produces one token. A step lasts the decode time
  of the batch that was already decoding plus the prefill time of the sequences admitted in it
  (so a large prefill delays every running sequence's next token, as with chunked prefill)::

      decode_ms  = itl_ms * (1 + (batch_factor - 1) * (n_decoding - 1) / (max_num_seqs - 1))
      prefill_ms = prefill_overhead_ms + prefill_ms_per_token * uncached_tokens_admitted

  and both are multiplied by ``time_scale`` (tests use e.g. 0.05). An idle engine does not step.
- **Prefix cache.** Prompt tokens are grouped into blocks of ``block_size``; each full block is
  keyed by a chained hash (previous key + the block's tokens) and kept in an LRU of
  ``prefix_cache_blocks`` keys. On admission the leading blocks found are hits (at most
  ``prompt - 1`` tokens, as vLLM must compute the last one) and are not prefilled; after the
  prefill all the prompt's full blocks are inserted.
- **Priority.** ``scheduling_policy="priority"``: the body's integer ``priority`` (default 0,
  lower runs first, ties by arrival) orders the queue; when the batch is full (slots or KV) and
  the head of the queue has a lower value than some running sequence, the running sequence with
  the highest value (youngest first) is preempted. A preempted sequence frees its KV and goes
  back to the queue; on readmission it recomputes (prefills) prompt + generated tokens, minus
  prefix-cache hits, and then continues where it stopped (the client sees no gap or repeat).
  Its generated tokens are counted as thrown away (``sim_preempted_tokens_total``). With
  ``"fcfs"`` a non-zero ``priority`` is answered 400, as vLLM does.
- **Abort.** When the HTTP client disconnects the sequence leaves the engine at once (running
  or waiting); its generated tokens are counted in ``sim_aborted_tokens_total``.
- **Tokens and text.** A deterministic whitespace tokenizer (each word is CRC32-hashed; a BOS
  token first; chat messages flattened in order with role markers and a final assistant marker,
  like a chat template). The output text is a sequence of words chosen from the prompt hash and
  the position, so the same request always gives the same text; ``finish_reason`` is
  ``"length"`` (``max_completion_tokens`` / ``max_tokens``, default ``default_max_tokens``).

Default timings
---------------
The defaults mimic an 8B-class model on one H100 (FP16/BF16), from the llm-d-inference-sim
documentation (``docs/latency-profiles.md``, "Profile 1: 8B-class model on H100", per-token
calculator, and ``docs/latency-simulation.md``): TTFT 60-120 ms for a 256-token prompt, ITL
10-15 ms; ``prefill-overhead: 30ms``, ``prefill-time-per-token: 250us``,
``inter-token-latency: 12ms``; ``time-factor-under-load`` "2.5-3.5: realistic for
throughput-optimized deployments near max-num-seqs", scaled linearly from 1.0 at one request
to the factor at ``max_num_seqs`` (here ``batch_factor=2.5``). So a 256-token prompt alone
gets its first token after 30 + 256 * 0.25 = 94 ms. ``kv_tokens=32768`` is far below a real
H100's (~450k tokens for Llama-3-8B) so that KV pressure shows at moderate load
(32 sequences of 1k tokens).

Routes
------
``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` with one SSE chunk per
token, ``stream_options.include_usage``), ``GET /v1/models``, ``GET /metrics`` (Prometheus text,
vLLM names with a ``model_name`` label), ``GET /health``, ``GET /stats`` (JSON counters),
``GET /arrivals`` (the requests in the order they reached the engine, the last
``record_arrivals`` of them: ``{"arrivals": [{"id", "head", "prompt_tokens", "cached_tokens"}]}``,
where ``head`` is the key of the prompt's first full block, or of the whole prompt when it is
shorter, so requests that share a system prompt share a head, and ``cached_tokens`` is the prompt
tokens served from the prefix cache at the first admission, -1 before it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import os
import socket
import sys
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WAITING: Literal["waiting"] = "waiting"
RUNNING: Literal["running"] = "running"
FINISHED: Literal["finished"] = "finished"
ABORTED: Literal["aborted"] = "aborted"
State = Literal["waiting", "running", "finished", "aborted"]


@dataclass
class SimConfig:
    """Engine and server settings; see the module docstring for where the defaults come from."""

    model: str = "sim-model"
    #: further names the server answers to (vLLM's ``--served-model-name`` with several names)
    served_model_names: tuple[str, ...] = ()
    max_num_seqs: int = 32
    kv_tokens: int = 32768
    prefill_overhead_ms: float = 30.0
    prefill_ms_per_token: float = 0.25
    itl_ms: float = 12.0
    batch_factor: float = 2.5
    prefix_cache_blocks: int = 2048
    block_size: int = 16
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    legacy_metric_names: bool = False
    time_scale: float = 1.0
    default_max_tokens: int = 64
    #: how many of the latest arrivals ``GET /arrivals`` keeps (0: none)
    record_arrivals: int = 100_000

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be fcfs or priority: {self.scheduling_policy}"
            )
        if self.max_num_seqs < 1 or self.kv_tokens < 2 or self.block_size < 1:
            raise ValueError("max_num_seqs >= 1, kv_tokens >= 2 and block_size >= 1 are required")
        if self.time_scale < 0 or self.batch_factor < 1 or self.prefix_cache_blocks < 0:
            raise ValueError("time_scale >= 0, batch_factor >= 1, prefix_cache_blocks >= 0")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.record_arrivals < 0:
            raise ValueError("record_arrivals must be >= 0")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model, *(n for n in self.served_model_names if n != self.model))


# --------------------------------------------------------------------------------------------
# Tokenizer and output text


@lru_cache(maxsize=65536)
def _word_token(word: str) -> int:
    return zlib.crc32(word.encode())


BOS = _word_token("<s>")
END = _word_token("<|end|>")
ASSISTANT = _word_token("<|assistant|>")


def tokenize_text(text: str, *, bos: bool = True) -> list[int]:
    """Whitespace tokenizer: one token per word (its CRC32), with a leading BOS token."""
    tokens = [BOS] if bos else []
    tokens.extend(_word_token(w) for w in text.split())
    return tokens


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts; only text parts count
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def tokenize_chat(messages: list[dict[str, Any]]) -> list[int]:
    """Flatten chat messages the way a chat template does, in order, then tokenize.

    ``<s> <|role|> words... <|end|> ... <|assistant|>``: a shared leading system prompt thus
    gives a shared token prefix (which the prefix cache can hit).
    """
    tokens = [BOS]
    for m in messages:
        tokens.append(_word_token(f"<|{m.get('role', 'user')}|>"))
        tokens.extend(_word_token(w) for w in _content_text(m.get("content")).split())
        tokens.append(END)
    tokens.append(ASSISTANT)
    return tokens


def block_keys(tokens: list[int], block_size: int) -> list[int]:
    """Chained hash keys of the full blocks of ``tokens`` (key_i = hash(key_{i-1}, block_i))."""
    keys: list[int] = []
    prev = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        prev = hash((prev, tuple(tokens[start : start + block_size])))
        keys.append(prev)
    return keys


_MASK64 = (1 << 64) - 1
_VOCAB_TEXT = (
    "the of and to in is that it for was on are as with be at by this have from or one had not "
    "but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time "
    "could no make than first been its who now people my made over did down only way find use "
    "may water long little very after words called just where most know get through back much "
    "before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say "
    "small every found still between name should home big give air line set own under read "
    "last never us left end along while might next sound below saw something thought both few "
    "those always looked show large often together asked house world going want school important "
    "until form food keep children feet land side without boy once animals life enough took "
    "sometimes "
    "four head above kind began almost live page got earth need far hand high year mother light "
    "parts country father let night following picture being study second eyes soon times story"
)
_VOCAB = _VOCAB_TEXT.split()


def _mix(x: int) -> int:
    """splitmix64 finaliser."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def token_text(seed: int, position: int) -> str:
    """The text of output token ``position`` (0-based) for a prompt whose hash is ``seed``."""
    word = _VOCAB[_mix(seed ^ (position * 0xD1B54A32D192ED03 & _MASK64)) % len(_VOCAB)]
    return word if position == 0 else " " + word


def output_text(seed: int, start: int, stop: int) -> str:
    return "".join(token_text(seed, i) for i in range(start, stop))


# --------------------------------------------------------------------------------------------
# Engine


@dataclass(slots=True)
class Arrival:
    """One request as it reached the engine (``GET /arrivals``)."""

    request_id: int
    #: the key of the prompt's first full block, or a hash of the whole prompt when shorter
    head: int
    prompt_tokens: int
    #: prompt tokens served from the prefix cache at the first admission; -1 before it
    cached_tokens: int = -1

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "head": f"{self.head & _MASK64:016x}",
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
        }


@dataclass(eq=False)
class SimRequest:
    """One sequence in the engine. ``generated`` only grows (preemption keeps the tokens)."""

    request_id: int
    prompt_tokens: list[int]
    max_tokens: int
    priority: int
    arrival: int
    stream: bool
    block_keys: list[int]
    seed: int
    state: State = WAITING
    generated: int = 0
    #: prompt tokens served from the prefix cache at the first admission
    cached_tokens: int = 0
    preemptions: int = 0
    admitted_once: bool = False
    arrival_record: Arrival | None = field(default=None, repr=False)
    _waiter: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_tokens)

    @property
    def kv_held(self) -> int:
        return len(self.prompt_tokens) + self.generated

    @property
    def done(self) -> bool:
        return self.state == FINISHED or self.state == ABORTED

    async def wait_change(self) -> None:
        """Wait until the engine reports progress (a token if streaming), the end, or an abort."""
        if self.done:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = fut
        await fut

    def text(self, start: int = 0, stop: int | None = None) -> str:
        return output_text(self.seed, start, self.generated if stop is None else stop)


class SimEngine:
    """The continuous-batching engine: a waiting queue, a running batch and one step task."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._priority = config.scheduling_policy == "priority"
        self._running: list[SimRequest] = []
        self._fcfs: deque[SimRequest] = deque()
        self._heap: list[tuple[int, int, SimRequest]] = []
        self._num_waiting = 0
        self._kv_used = 0
        self._cache: OrderedDict[int, None] = OrderedDict()
        self._next_id = 0
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        # counters
        self.requests_received = 0
        self.requests_finished = 0
        self.requests_aborted = 0
        self.aborted_tokens = 0
        self.num_preemptions = 0
        self.preempted_tokens = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefill_tokens_computed = 0
        self.steps = 0
        self.peak_running = 0
        self.peak_waiting = 0
        #: the latest requests in the order they arrived (``config.record_arrivals`` of them)
        self.arrivals: deque[Arrival] = deque(maxlen=config.record_arrivals)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the step task in the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._error = None
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        """Stop the step task and abort every sequence (their waiters wake up)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for req in [*self._running, *self._iter_waiting()]:
            self.abort(req)

    # -- public API ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the step task is alive (False before start, after stop or a crash)."""
        return self._task is not None and not self._task.done()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def kv_usage(self) -> float:
        return self._kv_used / self.config.kv_tokens

    def submit(
        self, prompt_tokens: list[int], max_tokens: int, priority: int = 0, stream: bool = False
    ) -> SimRequest:
        """Queue a sequence; the caller awaits ``req.wait_change()`` until ``req.done``."""
        if self._error is not None:
            raise RuntimeError(f"engine step loop failed: {self._error!r}")
        if not prompt_tokens or max_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token and max_tokens >= 1")
        if len(prompt_tokens) + max_tokens > self.config.kv_tokens:
            raise ValueError("prompt + max_tokens exceed the KV capacity")
        self.start()
        self._next_id += 1
        req = SimRequest(
            request_id=self._next_id,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            priority=priority,
            arrival=self._next_id,
            stream=stream,
            block_keys=block_keys(prompt_tokens, self.config.block_size),
            seed=_mix(hash(tuple(prompt_tokens)) & _MASK64),
        )
        self.requests_received += 1
        if self.config.record_arrivals:
            head = req.block_keys[0] if req.block_keys else hash(tuple(prompt_tokens))
            req.arrival_record = Arrival(req.request_id, head, len(prompt_tokens))
            self.arrivals.append(req.arrival_record)
        self._push_waiting(req, front=False)
        self._work.set()
        return req

    def abort(self, req: SimRequest) -> None:
        """Remove a sequence from the engine at once (client gone); no-op once it is done."""
        if req.state == RUNNING:
            self._running.remove(req)
            self._kv_used -= req.kv_held
        elif req.state == WAITING:
            self._num_waiting -= 1  # lazily dropped from the queue structure
        else:
            return
        req.state = ABORTED
        self.requests_aborted += 1
        self.aborted_tokens += req.generated
        self._wake(req)

    def stats(self) -> dict[str, float]:
        """Gauges and counters, the same as /metrics (without the ``vllm:`` names)."""
        return {
            "running": len(self._running),
            "waiting": self._num_waiting,
            "kv_cache_usage": self.kv_usage,
            "kv_tokens_used": self._kv_used,
            "kv_tokens": self.config.kv_tokens,
            "max_num_seqs": self.config.max_num_seqs,
            "peak_running": self.peak_running,
            "peak_waiting": self.peak_waiting,
            "requests_received": self.requests_received,
            "requests_finished": self.requests_finished,
            "requests_aborted": self.requests_aborted,
            "aborted_tokens": self.aborted_tokens,
            "num_preemptions": self.num_preemptions,
            "preempted_tokens": self.preempted_tokens,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_blocks_used": len(self._cache),
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "prefill_tokens_computed": self.prefill_tokens_computed,
            "steps": self.steps,
        }

    # -- queue --------------------------------------------------------------------------------

    def _push_waiting(self, req: SimRequest, *, front: bool) -> None:
        req.state = WAITING
        if self._priority:
            heapq.heappush(self._heap, (req.priority, req.arrival, req))
        elif front:
            self._fcfs.appendleft(req)
        else:
            self._fcfs.append(req)
        self._num_waiting += 1
        self.peak_waiting = max(self.peak_waiting, self._num_waiting)

    def _peek_waiting(self) -> SimRequest | None:
        if self._priority:
            while self._heap and self._heap[0][2].state != WAITING:
                heapq.heappop(self._heap)
            return self._heap[0][2] if self._heap else None
        while self._fcfs and self._fcfs[0].state != WAITING:
            self._fcfs.popleft()
        return self._fcfs[0] if self._fcfs else None

    def _pop_waiting(self) -> None:
        if self._priority:
            heapq.heappop(self._heap)
        else:
            self._fcfs.popleft()
        self._num_waiting -= 1

    def _iter_waiting(self) -> Iterable[SimRequest]:
        items = [e[2] for e in self._heap] if self._priority else list(self._fcfs)
        return [r for r in items if r.state == WAITING]

    # -- scheduling ---------------------------------------------------------------------------

    def _victim(self) -> SimRequest:
        if self._priority:
            return max(self._running, key=lambda r: (r.priority, r.arrival))
        return self._running[-1]

    def _preempt(self, req: SimRequest) -> None:
        self._running.remove(req)
        self._kv_used -= req.kv_held
        req.preemptions += 1
        self.num_preemptions += 1
        self.preempted_tokens += req.generated
        self._push_waiting(req, front=True)

    def _admit(self, req: SimRequest) -> int:
        """Move the head of the queue into the batch; returns the tokens it must prefill."""
        self._pop_waiting()
        hit_blocks = 0
        cache = self._cache
        for key in req.block_keys:
            if key not in cache:
                break
            cache.move_to_end(key)
            hit_blocks += 1
        cached = min(hit_blocks * self.config.block_size, req.num_prompt_tokens - 1)
        self.prefix_cache_queries += req.num_prompt_tokens
        self.prefix_cache_hits += cached
        if not req.admitted_once:
            req.cached_tokens = cached
            req.admitted_once = True
            if req.arrival_record is not None:
                req.arrival_record.cached_tokens = cached
        req.state = RUNNING
        self._running.append(req)
        self._kv_used += req.kv_held
        self.peak_running = max(self.peak_running, len(self._running))
        uncached = req.kv_held - cached
        self.prefill_tokens_computed += uncached
        return uncached

    def _schedule(self) -> tuple[list[SimRequest], int]:
        """Preempt for KV growth, admit from the queue; returns (admitted, tokens to prefill)."""
        cap = self.config.kv_tokens
        # every running sequence grows by one token this step
        while self._running and self._kv_used + len(self._running) > cap:
            self._preempt(self._victim())
        admitted: list[SimRequest] = []
        prefill = 0
        while self._num_waiting:
            cand = self._peek_waiting()
            if cand is None:
                break
            if (
                len(self._running) < self.config.max_num_seqs
                and self._kv_used + len(self._running) + cand.kv_held + 1 <= cap
            ):
                prefill += self._admit(cand)
                admitted.append(cand)
                continue
            if self._priority and self._running:
                victim = self._victim()
                if victim.priority > cand.priority:
                    self._preempt(victim)
                    continue
            break
        return admitted, prefill

    def _step_ms(self, n_decoding: int, admitted: int, prefill_tokens: int) -> float:
        c = self.config
        ms = 0.0
        if n_decoding:
            load = (n_decoding - 1) / (c.max_num_seqs - 1) if c.max_num_seqs > 1 else 0.0
            ms += c.itl_ms * (1.0 + (c.batch_factor - 1.0) * min(load, 1.0))
        if admitted:
            ms += c.prefill_overhead_ms + c.prefill_ms_per_token * prefill_tokens
        return ms

    def _advance(self, admitted: list[SimRequest]) -> None:
        """End of a step: prefills land in the prefix cache, every running sequence gets a token."""
        cache = self._cache
        capacity = self.config.prefix_cache_blocks
        for req in admitted:
            if req.state != RUNNING:
                continue  # aborted or preempted during the step
            if req.generated == 0:
                self.prompt_tokens += req.num_prompt_tokens
            for key in req.block_keys:
                cache[key] = None
                cache.move_to_end(key)
            while len(cache) > capacity:
                cache.popitem(last=False)
        still: list[SimRequest] = []
        for req in self._running:
            req.generated += 1
            if req.generated >= req.max_tokens:
                req.state = FINISHED
                self._kv_used -= req.kv_held - 1
                self.requests_finished += 1
                self._wake(req)
            else:
                still.append(req)
                if req.stream:
                    self._wake(req)
        self._kv_used += len(still)
        self.generation_tokens += len(self._running)
        self._running = still

    @staticmethod
    def _wake(req: SimRequest) -> None:
        fut = req._waiter
        if fut is not None:
            req._waiter = None
            if not fut.done():
                fut.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        scale = self.config.time_scale / 1000.0
        deadline = loop.time()
        try:
            while True:
                if not self._running and not self._num_waiting:
                    self._work.clear()
                    await self._work.wait()
                    deadline = loop.time()
                    continue
                admitted, prefill = self._schedule()
                if not self._running:
                    raise RuntimeError("nothing schedulable although requests wait")
                decoding = len(self._running) - len(admitted)
                duration = self._step_ms(decoding, len(admitted), prefill) * scale
                now = loop.time()
                # sleep to a deadline so that timer overshoot does not accumulate over steps
                deadline = max(deadline + duration, now)
                await asyncio.sleep(deadline - now)
                self.steps += 1
                self._advance(admitted)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # fail every request rather than leave them hanging
            self._error = exc
            for req in [*self._running, *self._iter_waiting()]:
                self.abort(req)
            raise


# --------------------------------------------------------------------------------------------
# Metrics


_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("vllm:num_requests_running", "running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("vllm:num_preemptions", "num_preemptions", "Cumulative number of preemptions."),
    ("vllm:prefix_cache_queries", "prefix_cache_queries", "Prefix cache queries, in tokens."),
    ("vllm:prefix_cache_hits", "prefix_cache_hits", "Prefix cache hits, in tokens."),
    ("vllm:prompt_tokens", "prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "generation_tokens", "Number of generation tokens processed."),
    ("sim_requests_received", "requests_received", "Requests submitted to the engine."),
    ("sim_requests_finished", "requests_finished", "Requests that generated all their tokens."),
    ("sim_requests_aborted", "requests_aborted", "Requests aborted: the client went away."),
    ("sim_aborted_tokens", "aborted_tokens", "Generated tokens thrown away by aborts."),
    ("sim_preempted_tokens", "preempted_tokens", "Generated tokens recomputed after preemption."),
    ("sim_prefill_tokens_computed", "prefill_tokens_computed", "Tokens prefilled, hits excluded."),
    ("sim_steps", "steps", "Engine steps taken."),
)


class _EngineCollector(Collector):
    """Reads the engine's counters at scrape time (no global registry, no ``_created``)."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        config = self.engine.config
        stats = self.engine.stats()
        label = [config.model]
        for name, key, doc in _GAUGES:
            if key == "kv_cache_usage" and config.legacy_metric_names:
                name = "vllm:gpu_cache_usage_perc"
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(label, stats[key])
            yield gauge
        for name, key, doc in _COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(label, stats[key])
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        success.add_metric([config.model, "length"], stats["requests_finished"])
        yield success


# --------------------------------------------------------------------------------------------
# HTTP


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_body(status: int, message: str, param: str | None = None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "model_not_found" if status == 404 and param == "model" else None
    return _dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def _int_field(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(400, f"'{name}' must be an integer", name)
    return v


def _chat_tokens(body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "'messages' must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRequest(400, "each message must be an object", "messages")
    return tokenize_chat(messages)


def _prompt_tokens(body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return tokenize_text(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return list(prompt)
    raise BadRequest(400, "'prompt' must be a string or a list of token ids (one prompt)", "prompt")


class SimApp:
    """The raw ASGI application in front of a :class:`SimEngine`."""

    def __init__(self, config: SimConfig, engine: SimEngine) -> None:
        self.config = config
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine))
        self._prefix = os.urandom(4).hex()
        self._n = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    self.engine.start()
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await self.engine.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "GET":
            if path == "/metrics":
                await self._respond(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
            elif path == "/health":
                await self._respond(send, 200, b"", "text/plain")
            elif path == "/stats":
                await self._respond(send, 200, _dumps(self.engine.stats()))
            elif path == "/arrivals":
                arrivals = [a.as_json() for a in self.engine.arrivals]
                await self._respond(send, 200, _dumps({"arrivals": arrivals}))
            elif path in ("/v1/models", "/models"):
                await self._respond(send, 200, _dumps(self._models()))
            else:
                await self._respond(send, 404, _error_body(404, f"no route GET {path}"))
            return
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._generate(scope, receive, send, chat=path == "/v1/chat/completions")
            return
        await self._respond(send, 404, _error_body(404, f"no route {method} {path}"))

    def _models(self) -> dict[str, Any]:
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "vllm",
                "root": self.config.model,
                "parent": None,
                "max_model_len": self.config.kv_tokens,
            }
            for name in self.config.model_names
        ]
        return {"object": "list", "data": data}

    # -- generation ---------------------------------------------------------------------------

    def _parse(self, raw: bytes, chat: bool) -> tuple[dict[str, Any], list[int]]:
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "body is not a JSON object")
        model = body.get("model")
        if model is not None and model not in self.config.model_names:
            raise BadRequest(404, f"The model `{model}` does not exist.", "model")
        tokens = _chat_tokens(body) if chat else _prompt_tokens(body)
        n = _int_field(body, "n")
        if n is not None and n != 1:
            raise BadRequest(400, "the simulator supports n=1 only", "n")
        max_tokens = _int_field(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens")
        if max_tokens is None:
            max_tokens = self.config.default_max_tokens
        if max_tokens < 1:
            raise BadRequest(400, "max_tokens must be at least 1", "max_tokens")
        priority = _int_field(body, "priority") or 0
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise BadRequest(
                400, f"Got priority {priority} but Priority scheduling is not enabled.", "priority"
            )
        body["priority"] = priority
        body["max_tokens"] = max_tokens
        limit = self.config.kv_tokens
        if len(tokens) + max_tokens > limit:
            raise BadRequest(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(tokens) + max_tokens} tokens ({len(tokens)} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                "completion.",
                "max_tokens",
            )
        return body, tokens

    async def _generate(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        raw = await self._body(receive)
        try:
            body, tokens = self._parse(raw, chat)
        except BadRequest as exc:
            await self._respond(send, exc.status, _error_body(exc.status, exc.message, exc.param))
            return
        stream = body.get("stream") is True
        try:
            req = self.engine.submit(tokens, body["max_tokens"], body["priority"], stream=stream)
        except (RuntimeError, ValueError) as exc:
            await self._respond(send, 503, _error_body(503, str(exc)))
            return
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, req))
        try:
            self._n += 1
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{self._prefix}{self._n}"
            model = body.get("model") or self.config.model
            if stream:
                opts = body.get("stream_options")
                usage = isinstance(opts, dict) and opts.get("include_usage") is True
                await self._stream(send, req, chat, rid, str(model), usage)
            else:
                while not req.done:
                    await req.wait_change()
                if req.state == FINISHED:
                    await self._respond(send, 200, _dumps(self._full(req, chat, rid, str(model))))
                elif not self.engine.running:
                    await self._respond(send, 503, _error_body(503, "engine stopped"))
        finally:
            watcher.cancel()
            self.engine.abort(req)  # no-op unless the handler itself failed

    async def _watch(self, receive: Receive, req: SimRequest) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                self.engine.abort(req)
                return

    @staticmethod
    def _usage(req: SimRequest) -> dict[str, Any]:
        p, c = req.num_prompt_tokens, req.generated
        return {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
        }

    def _full(self, req: SimRequest, chat: bool, rid: str, model: str) -> dict[str, Any]:
        text = req.text()
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "length",
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": self._usage(req),
        }

    async def _stream(
        self, send: Send, req: SimRequest, chat: bool, rid: str, model: str, include_usage: bool
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = _dumps({"id": rid, "object": obj, "created": int(time.time()), "model": model})
        # every chunk is head[:-1] + ',"choices":[...]}' built from these fixed pieces
        pre = b"data: " + head[:-1] + b',"choices":[{"index":0,'
        key = b'"delta":{"content":' if chat else b'"text":'
        close = b"}" if chat else b""
        sent = 0
        try:
            while True:
                if req.state == ABORTED:
                    if not self.engine.running:  # engine stopped: end the body, without [DONE]
                        await send({"type": "http.response.body", "body": b""})
                    return  # client gone
                if req.generated > sent:
                    parts: list[bytes] = []
                    for i in range(sent, req.generated):
                        word = json.dumps(token_text(req.seed, i)).encode()
                        last = req.state == FINISHED and i == req.generated - 1
                        if chat and i == 0:
                            piece = b'"delta":{"role":"assistant","content":' + word
                        else:
                            piece = key + word
                        finish = b'"length"' if last else b"null"
                        parts.append(
                            pre
                            + piece
                            + close
                            + b',"logprobs":null,"finish_reason":'
                            + finish
                            + b"}]}\n\n"
                        )
                    sent = req.generated
                    await send(
                        {"type": "http.response.body", "body": b"".join(parts), "more_body": True}
                    )
                if req.state == FINISHED:
                    tail = b""
                    if include_usage:
                        usage = _dumps({"usage": self._usage(req)})
                        tail = b"data: " + head[:-1] + b',"choices":[],' + usage[1:] + b"\n\n"
                    await send(
                        {
                            "type": "http.response.body",
                            "body": tail + b"data: [DONE]\n\n",
                            "more_body": False,
                        }
                    )
                    return
                await req.wait_change()
        except OSError:  # the transport broke while sending: the client is gone
            self.engine.abort(req)

    # -- plumbing -----------------------------------------------------------------------------

    @staticmethod
    async def _body(receive: Receive) -> bytes:
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return b"".join(chunks)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    async def _respond(
        send: Send, status: int, payload: bytes, content_type: str = "application/json"
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def build_app(config: SimConfig) -> tuple[ASGIApp, SimEngine]:
    """The ASGI app and its engine. The engine's step task starts with the app's lifespan (or
    lazily on the first request when the server runs no lifespan)."""
    engine = SimEngine(config)
    return SimApp(config, engine), engine


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running_sim(config: SimConfig) -> AsyncIterator[str]:
    """Serve a simulator in the current event loop on 127.0.0.1 (a free port); yields the base
    URL ending in ``/v1``. On exit the engine aborts every sequence and the server stops."""
    import uvicorn

    app, engine = build_app(config)
    sock = _listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",
            backlog=1024,
            timeout_keep_alive=60,
            timeout_graceful_shutdown=5,
        )
    )
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises the startup error
                raise RuntimeError("the simulator server exited during startup")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await engine.stop()  # wakes every handler so that the server can close connections
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=10)
        finally:
            sock.close()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="python -m tests.support.engine_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument(
        "--model",
        nargs="+",
        default=[d.model],
        metavar="NAME",
        help="served model name(s); the first labels the metrics",
    )
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--kv-tokens", type=int, default=d.kv_tokens)
    p.add_argument("--prefill-overhead-ms", type=float, default=d.prefill_overhead_ms)
    p.add_argument("--prefill-ms-per-token", type=float, default=d.prefill_ms_per_token)
    p.add_argument("--itl-ms", type=float, default=d.itl_ms)
    p.add_argument("--batch-factor", type=float, default=d.batch_factor)
    p.add_argument("--prefix-cache-blocks", type=int, default=d.prefix_cache_blocks)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    p.add_argument(
        "--legacy-metric-names",
        action="store_true",
        help="vllm:gpu_cache_usage_perc instead of vllm:kv_cache_usage_perc",
    )
    p.add_argument(
        "--time-scale", type=float, default=d.time_scale, help="multiplies every simulated duration"
    )
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument(
        "--record-arrivals",
        type=int,
        default=d.record_arrivals,
        metavar="N",
        help="GET /arrivals lists the latest N requests in arrival order (0: none)",
    )
    args = p.parse_args(argv)

    config = SimConfig(
        model=args.model[0],
        served_model_names=tuple(args.model[1:]),
        max_num_seqs=args.max_num_seqs,
        kv_tokens=args.kv_tokens,
        prefill_overhead_ms=args.prefill_overhead_ms,
        prefill_ms_per_token=args.prefill_ms_per_token,
        itl_ms=args.itl_ms,
        batch_factor=args.batch_factor,
        prefix_cache_blocks=args.prefix_cache_blocks,
        block_size=args.block_size,
        scheduling_policy=args.scheduling_policy,
        legacy_metric_names=args.legacy_metric_names,
        time_scale=args.time_scale,
        default_max_tokens=args.default_max_tokens,
        record_arrivals=args.record_arrivals,
    )
    app, _ = build_app(config)
    sock = _listen(args.host, args.port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",
            backlog=1024,
            timeout_keep_alive=60,
            timeout_graceful_shutdown=5,
        )
    )
    # The socket already listens, so connections made from now on wait in its backlog.
    print(f"READY {port}", flush=True)
    sys.stdout.flush()
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
