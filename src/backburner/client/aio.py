"""The asynchronous client (httpx.AsyncClient): the calls of
:class:`~backburner.client.Client`, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
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
from backburner.client.webhooks import AsyncWebhooks
from backburner.core.states import Kind
from backburner.schemas.batch import Batch, BatchList
from backburner.schemas.files import FileDeleted, FileObject
from backburner.schemas.generation import Generation, Group, GroupSubmitted, GroupWithGenerations
from backburner.schemas.openai import GenerationSubmitted
from backburner.schemas.tenants import UsageReport

OnUpdate = Callable[[Snapshot], None]


class AsyncClient(AsyncWebhooks):
    """A backburner client. ``base_url`` and ``api_key`` default to ``BACKBURNER_BASE_URL`` and
    ``BACKBURNER_API_KEY``; ``transport`` replaces the network (tests). Every failure raises
    :class:`~backburner.client.BackburnerAPIError`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.resolve(base_url, api_key)
        self._http = httpx.AsyncClient(
            base_url=self.config.base_url,
            headers=self.config.headers(),
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ plumbing

    async def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise connection_error(exc, self.config.base_url) from None

    async def _call(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        return parse(model, await self._send(method, path, **kw))

    @asynccontextmanager
    async def _stream(self, path: str, **kw: Any) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream("GET", path, **kw) as response:
                if response.is_error:
                    raise error_from(response, await response.aread())
                yield response
        except httpx.TransportError as exc:
            raise connection_error(exc, self.config.base_url) from None

    # ------------------------------------------------------------ slow requests, generations

    async def submit(
        self,
        body: Mapping[str, Any],
        *,
        kind: Kind | None = None,
        idempotency_key: str | None = None,
    ) -> GenerationSubmitted:
        """Submit one slow request (its kind read from the body unless given)."""
        path = SLOW_PATHS[kind or infer_kind(body)]
        return await self._call(
            GenerationSubmitted, "POST", path, json=body, headers=idempotency(idempotency_key)
        )

    async def get_generation(self, generation_id: str) -> Generation:
        return await self._call(Generation, "GET", f"/v1/generation/{generation_id}")

    async def cancel_generation(self, generation_id: str) -> Generation:
        return await self._call(Generation, "POST", f"/v1/generation/{generation_id}/cancel")

    # ------------------------------------------------------------ groups

    async def submit_group(
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
        return await self._call(
            GroupSubmitted, "POST", path, json=body, headers=idempotency(idempotency_key)
        )

    async def get_group(self, group_id: str) -> Group:
        return await self._call(Group, "GET", f"/v1/slow/group/{group_id}")

    async def group_generations(self, group_id: str) -> GroupWithGenerations:
        return await self._call(
            GroupWithGenerations, "GET", f"/v1/slow/group/{group_id}/generations"
        )

    async def cancel_group(self, group_id: str) -> Group:
        return await self._call(Group, "POST", f"/v1/slow/group/{group_id}/cancel")

    # ------------------------------------------------------------ files

    async def upload_file(
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
            with path.open("rb") as fh:  # noqa: ASYNC230 - httpx reads it in chunks as it sends
                return await self.upload_file(
                    fh, filename=filename or path.name, purpose=purpose,
                    idempotency_key=idempotency_key,
                )  # fmt: skip
        name = filename or "input.jsonl"
        return await self._call(
            FileObject,
            "POST",
            "/v1/files",
            data={"purpose": purpose},
            files={"file": (name, file, "application/jsonl")},
            headers=idempotency(idempotency_key),
        )

    async def get_file(self, file_id: str) -> FileObject:
        return await self._call(FileObject, "GET", f"/v1/files/{file_id}")

    async def delete_file(self, file_id: str) -> FileDeleted:
        return await self._call(FileDeleted, "DELETE", f"/v1/files/{file_id}")

    async def iter_file_lines(self, file_id: str) -> AsyncIterator[bytes]:
        """A file's lines as they stream in (with their newline); never the whole file."""
        async with self._stream(f"/v1/files/{file_id}/content") as response:
            async for line in response.aiter_lines():
                yield line.encode() + b"\n"

    async def download_file(self, file_id: str, dest: Path | str) -> int:
        """Stream a file's content to ``dest``; returns the bytes written."""
        written = 0
        async with self._stream(f"/v1/files/{file_id}/content") as response:
            with open(dest, "wb") as out:  # noqa: ASYNC230 - buffered writes of streamed chunks
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        return written

    # ------------------------------------------------------------ batches

    async def create_batch(
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
        return await self._call(
            Batch, "POST", "/v1/batches", json=body, headers=idempotency(idempotency_key)
        )

    async def get_batch(self, batch_id: str) -> Batch:
        return await self._call(Batch, "GET", f"/v1/batches/{batch_id}")

    async def list_batches(self, *, after: str | None = None, limit: int = 20) -> BatchList:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return await self._call(BatchList, "GET", "/v1/batches", params=params)

    async def iter_batches(self, *, page_size: int = 100) -> AsyncIterator[Batch]:
        """Every batch, newest first, a page at a time."""
        after: str | None = None
        while True:
            page = await self.list_batches(after=after, limit=page_size)
            for batch in page.data:
                yield batch
            if not page.has_more or page.last_id is None:
                return
            after = page.last_id

    async def cancel_batch(self, batch_id: str) -> Batch:
        return await self._call(Batch, "POST", f"/v1/batches/{batch_id}/cancel")

    async def _batch_stream(self, batch: Batch, which: str) -> AsyncIterator[bytes]:
        file_id = batch.output_file_id if which == "output" else batch.error_file_id
        if file_id is not None:
            async for line in self.iter_file_lines(file_id):
                if line.strip():
                    yield line
            return
        # no file yet (still running, or cancelled early): the results so far
        path = f"/v1/batches/{batch.id}/results"
        async with self._stream(path, params={"type": which}) as response:
            async for text in response.aiter_lines():
                if text.strip():
                    yield text.encode() + b"\n"

    async def iter_batch_results(self, batch: Batch | str) -> AsyncIterator[bytes]:
        """A batch's output and error lines (JSONL, each with its ``custom_id``) merged back into
        input order as they stream: the input, output and error files are read side by side."""
        if isinstance(batch, str):
            batch = await self.get_batch(batch)
        streams = [self._batch_stream(batch, "output"), self._batch_stream(batch, "error")]
        merge = InOrderMerge()
        async for raw in self.iter_file_lines(batch.input_file_id):
            cid = custom_id_of(raw)
            if cid is None:
                continue
            for which in (0, 1):
                if merge.want(which):
                    merge.feed(which, await anext(streams[which], None))
            line = merge.take(cid)
            if line is not None:
                yield line
        for line in merge.rest():
            yield line
        for stream in streams:
            async for line in stream:
                yield line

    async def iter_results(
        self, object_id: str, kind: ObjectKind | None = None
    ) -> AsyncIterator[bytes]:
        """Results of a batch, group or generation as JSONL lines in submission order (the
        batch output/error line shape: ``id``, ``custom_id``, ``response``, ``error``)."""
        kind = kind or await self.resolve(object_id)
        if kind == "batch":
            async for line in self.iter_batch_results(object_id):
                yield line
        elif kind == "group":
            for gen in (await self.group_generations(object_id)).generations:
                yield generation_line(gen).to_line()
        else:
            yield generation_line(await self.get_generation(object_id)).to_line()

    # ------------------------------------------------------------ usage

    async def usage(
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
        return await self._call(UsageReport, "GET", "/v1/usage", params=params)

    # ------------------------------------------------------------ any of the three

    async def resolve(self, object_id: str) -> ObjectKind:
        """Whether an id names a batch, a group or a generation (ids carry no prefix: each is
        looked up in turn; a 404 moves on)."""
        lookups: list[tuple[ObjectKind, str]] = [
            ("batch", f"/v1/batches/{object_id}"),
            ("group", f"/v1/slow/group/{object_id}"),
            ("generation", f"/v1/generation/{object_id}"),
        ]
        for kind, path in lookups:
            response = await self._send("GET", path)
            if response.status_code != 404:
                if response.is_error:
                    raise error_from(response)
                return kind
        raise BackburnerAPIError(
            404, f"no batch, group or generation with id '{object_id}'", code="not_found"
        )

    async def snapshot(self, object_id: str, kind: ObjectKind | None = None) -> Snapshot:
        kind = kind or await self.resolve(object_id)
        if kind == "batch":
            return Snapshot.of(await self.get_batch(object_id))
        if kind == "group":
            return Snapshot.of(await self.get_group(object_id))
        return Snapshot.of(await self.get_generation(object_id))

    async def cancel(self, object_id: str, kind: ObjectKind | None = None) -> Snapshot:
        kind = kind or await self.resolve(object_id)
        if kind == "batch":
            return Snapshot.of(await self.cancel_batch(object_id))
        if kind == "group":
            return Snapshot.of(await self.cancel_group(object_id))
        return Snapshot.of(await self.cancel_generation(object_id))

    async def wait(
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
        kind = kind or await self.resolve(object_id)
        deadline = None if max_wait is None else time.monotonic() + max_wait
        for delay in backoff.delays():
            snap = await self.snapshot(object_id, kind)
            if on_update is not None:
                on_update(snap)
            if snap.done:
                return snap
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(snap, max_wait or 0.0)
                delay = min(delay, left)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def wait_generation(self, generation_id: str, **kw: Any) -> Generation:
        obj = (await self.wait(generation_id, "generation", **kw)).obj
        assert isinstance(obj, Generation)
        return obj

    async def wait_group(self, group_id: str, **kw: Any) -> Group:
        obj = (await self.wait(group_id, "group", **kw)).obj
        assert isinstance(obj, Group)
        return obj

    async def wait_batch(self, batch_id: str, **kw: Any) -> Batch:
        obj = (await self.wait(batch_id, "batch", **kw)).obj
        assert isinstance(obj, Batch)
        return obj
