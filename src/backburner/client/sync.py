"""The synchronous client (httpx.Client): what the OpenAI SDK does not cover."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import IO, Any

import httpx

from backburner.client._core import (
    BATCH_ENDPOINTS,
    DEFAULT_TIMEOUT,
    GROUP_PATHS,
    SLOW_PATHS,
    BackburnerAPIError,
    Backoff,
    ClientConfig,
    InOrderMerge,
    M,
    ObjectKind,
    Snapshot,
    WaitTimeout,
    connection_error,
    custom_id_of,
    error_from,
    generation_line,
    idempotency,
    infer_kind,
    parse,
    usage_params,
)
from backburner.client.webhooks import SyncWebhooks
from backburner.core.states import Kind
from backburner.schemas.batch import Batch, BatchList
from backburner.schemas.files import FileDeleted, FileObject
from backburner.schemas.generation import Generation, Group, GroupSubmitted, GroupWithGenerations
from backburner.schemas.openai import GenerationSubmitted
from backburner.schemas.tenants import UsageReport

OnUpdate = Callable[[Snapshot], None]


class Client(SyncWebhooks):
    """A backburner client. ``base_url`` and ``api_key`` default to ``BACKBURNER_BASE_URL`` and
    ``BACKBURNER_API_KEY``; ``transport`` replaces the network (tests). Every failure raises
    :class:`~backburner.client.BackburnerAPIError`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.resolve(base_url, api_key)
        self._http = httpx.Client(
            base_url=self.config.base_url,
            headers=self.config.headers(),
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise connection_error(exc, self.config.base_url) from None

    def _call(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        return parse(model, self._send(method, path, **kw))

    @contextmanager
    def _stream(self, path: str, **kw: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream("GET", path, **kw) as response:
                if response.is_error:
                    raise error_from(response, response.read())
                yield response
        except httpx.TransportError as exc:
            raise connection_error(exc, self.config.base_url) from None

    # ------------------------------------------------------------ slow requests, generations

    def submit(
        self,
        body: Mapping[str, Any],
        *,
        kind: Kind | None = None,
        idempotency_key: str | None = None,
    ) -> GenerationSubmitted:
        """Submit one slow request (its kind read from the body unless given)."""
        path = SLOW_PATHS[kind or infer_kind(body)]
        return self._call(
            GenerationSubmitted, "POST", path, json=body, headers=idempotency(idempotency_key)
        )

    def get_generation(self, generation_id: str) -> Generation:
        return self._call(Generation, "GET", f"/v1/generation/{generation_id}")

    def cancel_generation(self, generation_id: str) -> Generation:
        return self._call(Generation, "POST", f"/v1/generation/{generation_id}/cancel")

    # ------------------------------------------------------------ groups

    def submit_group(
        self,
        requests: Sequence[Mapping[str, Any]],
        *,
        kind: Kind | None = None,
        webhook_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> GroupSubmitted:
        """Submit 1 to 50 chat or completion requests as one group."""
        kind = kind or (infer_kind(requests[0]) if requests else Kind.CHAT)
        body: dict[str, Any] = {"requests": list(requests)}
        if webhook_id is not None:
            body["webhook_id"] = webhook_id
        if metadata is not None:
            body["metadata"] = dict(metadata)
        path = GROUP_PATHS.get(kind)
        if path is None:
            raise ValueError(f"a group holds chat or completion requests, not {kind.value}")
        return self._call(
            GroupSubmitted, "POST", path, json=body, headers=idempotency(idempotency_key)
        )

    def get_group(self, group_id: str) -> Group:
        return self._call(Group, "GET", f"/v1/slow/group/{group_id}")

    def group_generations(self, group_id: str) -> GroupWithGenerations:
        return self._call(GroupWithGenerations, "GET", f"/v1/slow/group/{group_id}/generations")

    def cancel_group(self, group_id: str) -> Group:
        return self._call(Group, "POST", f"/v1/slow/group/{group_id}/cancel")

    # ------------------------------------------------------------ files

    def upload_file(
        self,
        file: Path | str | IO[bytes],
        *,
        filename: str | None = None,
        purpose: str = "batch",
        idempotency_key: str | None = None,
    ) -> FileObject:
        """Upload a file; a path or a binary file object is streamed, not read whole."""
        if isinstance(file, Path | str):
            path = Path(file)
            with path.open("rb") as fh:
                return self.upload_file(
                    fh, filename=filename or path.name, purpose=purpose,
                    idempotency_key=idempotency_key,
                )  # fmt: skip
        name = filename or "input.jsonl"
        return self._call(
            FileObject,
            "POST",
            "/v1/files",
            data={"purpose": purpose},
            files={"file": (name, file, "application/jsonl")},
            headers=idempotency(idempotency_key),
        )

    def get_file(self, file_id: str) -> FileObject:
        return self._call(FileObject, "GET", f"/v1/files/{file_id}")

    def delete_file(self, file_id: str) -> FileDeleted:
        return self._call(FileDeleted, "DELETE", f"/v1/files/{file_id}")

    def iter_file_lines(self, file_id: str) -> Iterator[bytes]:
        """A file's lines as they stream in (with their newline); never the whole file."""
        with self._stream(f"/v1/files/{file_id}/content") as response:
            for line in response.iter_lines():
                yield line.encode() + b"\n"

    def download_file(self, file_id: str, dest: Path | str) -> int:
        """Stream a file's content to ``dest``; returns the bytes written."""
        written = 0
        with self._stream(f"/v1/files/{file_id}/content") as response, open(dest, "wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
                written += len(chunk)
        return written

    # ------------------------------------------------------------ batches

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str | Kind = "/v1/chat/completions",
        *,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": BATCH_ENDPOINTS[endpoint] if isinstance(endpoint, Kind) else endpoint,
            "completion_window": completion_window,
        }
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        return self._call(
            Batch, "POST", "/v1/batches", json=body, headers=idempotency(idempotency_key)
        )

    def get_batch(self, batch_id: str) -> Batch:
        return self._call(Batch, "GET", f"/v1/batches/{batch_id}")

    def list_batches(self, *, after: str | None = None, limit: int = 20) -> BatchList:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._call(BatchList, "GET", "/v1/batches", params=params)

    def iter_batches(self, *, page_size: int = 100) -> Iterator[Batch]:
        """Every batch, newest first, a page at a time."""
        after: str | None = None
        while True:
            page = self.list_batches(after=after, limit=page_size)
            yield from page.data
            if not page.has_more or page.last_id is None:
                return
            after = page.last_id

    def cancel_batch(self, batch_id: str) -> Batch:
        return self._call(Batch, "POST", f"/v1/batches/{batch_id}/cancel")

    def _batch_stream(self, batch: Batch, which: str) -> Iterator[bytes]:
        file_id = batch.output_file_id if which == "output" else batch.error_file_id
        if file_id is not None:
            yield from self.iter_file_lines(file_id)
            return
        # no file yet (still running, or cancelled early): the results so far
        with self._stream(f"/v1/batches/{batch.id}/results", params={"type": which}) as response:
            for line in response.iter_lines():
                yield line.encode() + b"\n"

    def iter_batch_results(self, batch: Batch | str) -> Iterator[bytes]:
        """A batch's output and error lines (JSONL, each with its ``custom_id``) merged back into
        input order as they stream: the input, output and error files are read side by side."""
        if isinstance(batch, str):
            batch = self.get_batch(batch)
        streams = [
            (line for line in self._batch_stream(batch, which) if line.strip())
            for which in ("output", "error")
        ]
        merge = InOrderMerge()
        for raw in self.iter_file_lines(batch.input_file_id):
            cid = custom_id_of(raw)
            if cid is None:
                continue
            for which in (0, 1):
                if merge.want(which):
                    merge.feed(which, next(streams[which], None))
            line = merge.take(cid)
            if line is not None:
                yield line
        yield from merge.rest()
        for stream in streams:
            yield from stream

    def iter_results(self, object_id: str, kind: ObjectKind | None = None) -> Iterator[bytes]:
        """Results of a batch, group or generation as JSONL lines in submission order (the
        batch output/error line shape: ``id``, ``custom_id``, ``response``, ``error``)."""
        kind = kind or self.resolve(object_id)
        if kind == "batch":
            yield from self.iter_batch_results(object_id)
        elif kind == "group":
            for gen in self.group_generations(object_id).generations:
                yield generation_line(gen).to_line()
        else:
            yield generation_line(self.get_generation(object_id)).to_line()

    # ------------------------------------------------------------ usage

    def usage(
        self,
        *,
        start: date | str | None = None,
        end: date | str | None = None,
        group_by: Sequence[str] | str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        lane: str | None = None,
    ) -> UsageReport:
        """Requests and tokens from ``start`` to ``end`` (UTC days, both included; default the
        last 7 days) per combination of ``group_by`` (``day``, ``tenant``, ``model``, ``lane``;
        default day, model and lane). A tenant's key sees its own usage; an admin key every
        tenant's, or ``tenant``'s."""
        params = usage_params(
            start=start, end=end, group_by=group_by, tenant=tenant, model=model, lane=lane
        )
        return self._call(UsageReport, "GET", "/v1/usage", params=params)

    # ------------------------------------------------------------ any of the three

    def resolve(self, object_id: str) -> ObjectKind:
        """Whether an id names a batch, a group or a generation (ids carry no prefix: each is
        looked up in turn; a 404 moves on)."""
        lookups: list[tuple[ObjectKind, str]] = [
            ("batch", f"/v1/batches/{object_id}"),
            ("group", f"/v1/slow/group/{object_id}"),
            ("generation", f"/v1/generation/{object_id}"),
        ]
        for kind, path in lookups:
            response = self._send("GET", path)
            if response.status_code != 404:
                if response.is_error:
                    raise error_from(response)
                return kind
        raise BackburnerAPIError(
            404, f"no batch, group or generation with id '{object_id}'", code="not_found"
        )

    def snapshot(self, object_id: str, kind: ObjectKind | None = None) -> Snapshot:
        kind = kind or self.resolve(object_id)
        if kind == "batch":
            return Snapshot.of(self.get_batch(object_id))
        if kind == "group":
            return Snapshot.of(self.get_group(object_id))
        return Snapshot.of(self.get_generation(object_id))

    def cancel(self, object_id: str, kind: ObjectKind | None = None) -> Snapshot:
        kind = kind or self.resolve(object_id)
        if kind == "batch":
            return Snapshot.of(self.cancel_batch(object_id))
        if kind == "group":
            return Snapshot.of(self.cancel_group(object_id))
        return Snapshot.of(self.cancel_generation(object_id))

    def wait(
        self,
        object_id: str,
        kind: ObjectKind | None = None,
        *,
        max_wait: float | None = None,
        backoff: Backoff = Backoff(),
        on_update: OnUpdate | None = None,
    ) -> Snapshot:
        """Poll until the batch, group or generation is finished, waiting longer between polls
        (``backoff``); ``on_update`` sees every snapshot. After ``max_wait`` seconds it raises
        :class:`WaitTimeout`."""
        kind = kind or self.resolve(object_id)
        deadline = None if max_wait is None else time.monotonic() + max_wait
        for delay in backoff.delays():
            snap = self.snapshot(object_id, kind)
            if on_update is not None:
                on_update(snap)
            if snap.done:
                return snap
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(snap, max_wait or 0.0)
                delay = min(delay, left)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def wait_generation(self, generation_id: str, **kw: Any) -> Generation:
        obj = self.wait(generation_id, "generation", **kw).obj
        assert isinstance(obj, Generation)
        return obj

    def wait_group(self, group_id: str, **kw: Any) -> Group:
        obj = self.wait(group_id, "group", **kw).obj
        assert isinstance(obj, Group)
        return obj

    def wait_batch(self, batch_id: str, **kw: Any) -> Batch:
        obj = self.wait(batch_id, "batch", **kw).obj
        assert isinstance(obj, Batch)
        return obj
