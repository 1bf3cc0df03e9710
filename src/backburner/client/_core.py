"""What the sync and async clients share: configuration, the error, paths, answers, backoff,
progress snapshots and the in-order merge of a batch's output and error lines.

Nothing here does I/O; :mod:`backburner.client.sync` and :mod:`backburner.client.aio` send the
requests. Answers are parsed with the models of :mod:`backburner.schemas`, the one definition of
every wire shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from backburner.core.states import Kind
from backburner.schemas.batch import TERMINAL as BATCH_TERMINAL
from backburner.schemas.batch import Batch, BatchRequestOutput
from backburner.schemas.error import ErrorEnvelope
from backburner.schemas.generation import Generation, Group

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "BACKBURNER_BASE_URL"
API_KEY_ENV = "BACKBURNER_API_KEY"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)

ObjectKind = Literal["batch", "group", "generation"]
M = TypeVar("M", bound=BaseModel)

SLOW_PATHS: dict[Kind, str] = {
    Kind.CHAT: "/v1/slow/chat/completions",
    Kind.COMPLETION: "/v1/slow/completions",
    Kind.EMBEDDING: "/v1/slow/embeddings",
}
GROUP_PATHS: dict[Kind, str] = {
    Kind.CHAT: "/v1/slow/group/chat/completions",
    Kind.COMPLETION: "/v1/slow/group/completions",
}
BATCH_ENDPOINTS: dict[Kind, str] = {
    Kind.CHAT: "/v1/chat/completions",
    Kind.COMPLETION: "/v1/completions",
    Kind.EMBEDDING: "/v1/embeddings",
}


class BackburnerAPIError(Exception):
    """An answer that is not a success, as the OpenAI error envelope describes it.

    ``status`` is the HTTP status (0 when no answer came: see :class:`APIConnectionError`);
    ``message``, ``type``, ``param`` and ``code`` are the envelope's fields.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status else "no answer"
        return f"{self.message} ({where})"


class APIConnectionError(BackburnerAPIError):
    """The server could not be reached (refused, unknown host, timed out): no answer at all."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message, type="connection_error", code="connection_error")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    base_url: str
    api_key: str | None

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None) -> ClientConfig:
        """Arguments win over ``BACKBURNER_BASE_URL`` / ``BACKBURNER_API_KEY``. A base URL that
        ends in ``/v1`` (as the OpenAI SDK takes it) is accepted: the paths add ``/v1``."""
        url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip().rstrip("/")
        url = url.removesuffix("/v1")
        if "://" not in url:
            url = "http://" + url
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        return cls(base_url=url, api_key=key or None)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def error_from(response: httpx.Response, body: bytes | None = None) -> BackburnerAPIError:
    """The error an answer carries; a body that is not the envelope still gives a message."""
    raw = response.content if body is None else body
    try:
        env = ErrorEnvelope.model_validate_json(raw)
    except ValidationError:
        text = raw.decode("utf-8", "replace").strip()[:300] or response.reason_phrase
        return BackburnerAPIError(response.status_code, text or f"HTTP {response.status_code}")
    e = env.error
    return BackburnerAPIError(
        response.status_code, e.message, type=e.type, param=e.param, code=e.code
    )


def connection_error(exc: httpx.TransportError, base_url: str) -> APIConnectionError:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        reason = f"timed out ({type(exc).__name__})"
    return APIConnectionError(f"cannot reach backburner at {base_url}: {reason}")


def parse(model: type[M], response: httpx.Response) -> M:
    """A success answer as ``model``; anything else raises :class:`BackburnerAPIError`."""
    if response.is_error:
        raise error_from(response)
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise BackburnerAPIError(
            response.status_code,
            f"the answer to {response.request.method} {response.request.url.path} is not a"
            f" {model.__name__}: {exc.errors(include_url=False)[:1]}",
            code="unexpected_answer",
        ) from None


def infer_kind(body: Mapping[str, Any]) -> Kind:
    """The kind of an OpenAI request body: ``messages`` chat, ``prompt`` completion, ``input``
    embeddings."""
    if "messages" in body:
        return Kind.CHAT
    if "prompt" in body:
        return Kind.COMPLETION
    if "input" in body:
        return Kind.EMBEDDING
    raise ValueError("the body has none of 'messages', 'prompt' or 'input'")


def idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def usage_params(
    *,
    start: date | str | None,
    end: date | str | None,
    group_by: Sequence[str] | str | None,
    tenant: str | None,
    model: str | None,
    lane: str | None,
) -> dict[str, str]:
    """The query of ``GET /v1/usage``: what is None is left to the server's default (the last
    7 days, by day, model and lane); ``group_by=[]`` asks for one row of totals."""
    params: dict[str, str] = {}
    for name, day in (("start", start), ("end", end)):
        if day is not None:
            params[name] = day.isoformat() if isinstance(day, date) else day
    if group_by is not None:
        params["group_by"] = group_by if isinstance(group_by, str) else ",".join(group_by)
    for name, value in (("tenant", tenant), ("model", model), ("lane", lane)):
        if value is not None:
            params[name] = value
    return params


# ---------------------------------------------------------------- waiting


@dataclass(frozen=True, slots=True)
class Backoff:
    """Poll delays: ``initial`` seconds, times ``factor`` after each poll, at most ``maximum``."""

    initial: float = 0.25
    factor: float = 1.5
    maximum: float = 5.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay
            delay = min(self.maximum, delay * self.factor)


class WaitTimeout(TimeoutError):
    """``wait`` gave up before the object finished; ``last`` is the last snapshot seen."""

    def __init__(self, last: Snapshot, timeout: float) -> None:
        super().__init__(f"{last.kind} {last.id} is still {last.status} after {timeout:g}s")
        self.last = last


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where a generation, group or batch stands, the same way for all three."""

    kind: ObjectKind
    id: str
    status: str
    total: int
    succeeded: int
    failed: int
    queued: int | None  # None: the API does not tell queued from running (batches)
    running: int | None
    done: bool
    obj: Batch | Group | Generation

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def ok(self) -> bool:
        """Finished with every request a success (a batch: ``completed`` and none failed)."""
        if not self.done or self.failed:
            return False
        return self.status in ("completed", "Success") and self.succeeded == self.total

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "status": self.status,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "queued": self.queued,
            "running": self.running,
            "done": self.done,
            "ok": self.ok,
        }

    @classmethod
    def of(cls, obj: Batch | Group | Generation) -> Snapshot:
        if isinstance(obj, Batch):
            c = obj.request_counts
            return cls(
                "batch",
                obj.id,
                str(obj.status.value),
                c.total,
                c.completed,
                c.failed,
                None,
                None,
                obj.status.value in BATCH_TERMINAL,
                obj,
            )
        if isinstance(obj, Group):
            n = obj.counts
            return cls(
                "group",
                obj.groupId,
                obj.status,
                obj.groupSize,
                n.success,
                n.failed,
                n.queued,
                n.inProgress,
                obj.status != "in_progress",
                obj,
            )
        state = obj.state
        return cls(
            "generation",
            obj.id,
            state,
            1,
            int(state == "Success"),
            int(state == "Failed"),
            int(state == "Queued"),
            int(state == "In Progress"),
            state in ("Success", "Failed"),
            obj,
        )


# ---------------------------------------------------------------- results


def generation_line(gen: Generation) -> BatchRequestOutput:
    """A generation as a batch output line (success) or error line (failure, or unfinished)."""
    md = gen.request.get("metadata")
    custom = md.get("custom_id") if isinstance(md, dict) else None
    custom_id = str(custom) if custom is not None else None
    if gen.state == "Success" and gen.response is not None:
        return BatchRequestOutput.success(gen.id, custom_id, gen.response)
    code = "failed" if gen.state == "Failed" else "not_finished"
    return BatchRequestOutput.failure(gen.id, custom_id, code, gen.stateMessage)


def custom_id_of(line: bytes) -> str | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


class InOrderMerge:
    """Puts a batch's output and error lines back in input order, one line at a time.

    Both files list their lines in input order (each a subsequence of the input), and custom ids
    are unique in the input, so for each input custom id the next line of one of the two files
    is its result, or neither holds it (not finished). :meth:`take` is fed the input's custom
    ids in order; the heads of the two streams are the only lines ever held.
    """

    def __init__(self) -> None:
        self.heads: list[tuple[str | None, bytes] | None] = [None, None]
        self.ended = [False, False]

    def want(self, which: int) -> bool:
        """Whether stream ``which`` (0 output, 1 error) needs its next line read."""
        return self.heads[which] is None and not self.ended[which]

    def feed(self, which: int, line: bytes | None) -> None:
        if line is None:
            self.ended[which] = True
        elif line.strip():
            self.heads[which] = (custom_id_of(line), line.rstrip(b"\r\n") + b"\n")

    def take(self, custom_id: str) -> bytes | None:
        for which in (0, 1):
            head = self.heads[which]
            if head is not None and head[0] == custom_id:
                self.heads[which] = None
                return head[1]
        return None

    def rest(self) -> Iterator[bytes]:
        """Lines whose custom id was not in the input (never, with a well-formed batch)."""
        for which in (0, 1):
            head = self.heads[which]
            if head is not None:
                self.heads[which] = None
                yield head[1]
