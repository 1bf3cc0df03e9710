"""OpenAI's Files API: upload, list, retrieve, download, delete.

Uploads stream: the multipart body is parsed as it arrives (python-multipart's push parser) and
the ``file`` part goes straight into the blob store in chunks while its bytes, lines and sha256
are counted, so a file of any size never sits in memory. Over ``files_max_bytes`` the upload
stops with a 413 and leaves nothing behind. Downloads stream from the blob store in 1 MiB chunks;
batch output and error files (no blob) are rendered from the database by the store.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from backburner.api import idempotency
from backburner.api.auth import tenant
from backburner.api.bodies import body_hash, json_body
from backburner.api.errors import DEFAULT_RESPONSES, responses
from backburner.api.state import AppState, app_state
from backburner.core.clock import utcnow
from backburner.core.ids import new_id
from backburner.core.states import FileStatus
from backburner.errors import BackburnerError, InvalidRequest, PayloadTooLarge
from backburner.schemas.files import (
    UPLOAD_PURPOSES,
    FileDeleted,
    FileList,
    FileObject,
    FileRecord,
    FileUpload,
)
from backburner.store import IdempotencyRace
from backburner.store.blobs import BlobNotFound, BlobSink, BlobSource, BlobStore

log = logging.getLogger("backburner.api")

MAX_LIST = 10000
FIELD_MAX_BYTES = 64 * 1024  # any one non-file form field
FORM_OVERHEAD = 1024 * 1024  # room for the form's other fields and part headers
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def blob_store(ctx: AppState) -> BlobStore:
    """The blob store of this app (``files_url`` or ``files_dir``, built by the services)."""
    return ctx.blobs


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"file: is larger than the limit of {max_bytes} bytes", param="file", code="file_too_large"
    )


def _clean_filename(raw: str | None) -> str:
    name = _CONTROL.sub("", (raw or "").replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[:255] or "file"


def _check_purpose(purpose: str | None) -> str:
    allowed = " or ".join(f"'{p}'" for p in UPLOAD_PURPOSES)
    if purpose is None:
        raise InvalidRequest(f"purpose: is required; send {allowed}", param="purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"purpose: must be {allowed}, not '{purpose[:100]}'",
            param="purpose",
            code="invalid_purpose",
        )
    return purpose


class _Form:
    """Turns python-multipart's callbacks into a queue of file events plus the plain fields.

    Events are ``("start", filename)``, ``("data", chunk)`` and ``("end", b"")`` for the ``file``
    part; the caller drains them after each :meth:`feed`, so at most one request chunk's worth
    of file data is ever queued.
    """

    def __init__(self, boundary: bytes) -> None:
        self.events: deque[tuple[str, bytes]] = deque()
        self.fields: dict[str, str] = {}
        self.saw_file = False
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._headers: dict[str, str] = {}
        self._part: str | None = None
        self._value = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._hname.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._hvalue.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise InvalidRequest(
                f"the multipart body is malformed: {exc}", param="file", code="invalid_multipart"
            ) from exc

    def finish(self) -> None:
        self._parser.finalize()
        if self._parser.state != MultipartState.END:
            raise InvalidRequest(
                "the multipart body ended early (no closing boundary)",
                param="file",
                code="invalid_multipart",
            )

    def _part_begin(self) -> None:
        self._headers = {}
        self._part = None
        self._value.clear()

    def _header_end(self) -> None:
        name = self._hname.decode("latin-1").strip().lower()
        self._headers[name] = self._hvalue.decode("latin-1").strip()
        self._hname.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get("content-disposition"))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self.saw_file:
                raise InvalidRequest("file: send exactly one file", param="file")
            self.saw_file = True
            filename = opts.get(b"filename", b"")
            self.events.append(("start", filename))
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.events.append(("data", data[start:end]))
            return
        self._value.extend(data[start:end])
        if len(self._value) > FIELD_MAX_BYTES:
            raise InvalidRequest(
                f"{self._part or 'a form field'}: is longer than {FIELD_MAX_BYTES} bytes",
                param=self._part or None,
            )

    def _part_end(self) -> None:
        if self._part == "file":
            self.events.append(("end", b""))
        elif self._part:
            self.fields.setdefault(self._part, self._value.decode("utf-8", "replace"))
        self._part = None
        self._value.clear()


class _Upload:
    """One upload in progress: the form, and the blob writer once the ``file`` part begins."""

    def __init__(self, form: _Form, blobs: BlobStore, key: str, max_bytes: int) -> None:
        self.form = form
        self.blobs = blobs
        self.key = key
        self.max_bytes = max_bytes
        self.writer: BlobSink | None = None
        self.filename: str | None = None

    async def drain(self) -> None:
        events = self.form.events
        while events:
            kind, data = events.popleft()
            if kind == "start":
                if "purpose" in self.form.fields:  # refuse before storing anything
                    _check_purpose(self.form.fields["purpose"])
                self.filename = _clean_filename(data.decode("utf-8", "replace"))
                self.writer = await self.blobs.writer(self.key)
            elif kind == "data":
                assert self.writer is not None
                if self.writer.bytes + len(data) > self.max_bytes:
                    raise _too_large(self.max_bytes)
                await self.writer.write(data)

    async def abort(self) -> None:
        if self.writer is not None:
            await self.writer.abort()


async def _receive(request: Request, ctx: AppState, file_id: str) -> tuple[_Upload, str]:
    """Read the whole form, storing the file under ``file_id``; returns it and the purpose.

    The caller commits (or aborts) the upload's writer.
    """
    ctype, opts = parse_options_header(request.headers.get("content-type"))
    boundary = opts.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "send the upload as multipart/form-data with the fields 'file' and 'purpose'",
            param="file",
        )
    max_bytes = ctx.settings.files_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD:
        raise _too_large(max_bytes)
    try:
        form = _Form(boundary)
    except (FormParserError, ValueError) as exc:
        raise InvalidRequest(f"bad multipart boundary: {exc}", param="file") from exc
    up = _Upload(form, blob_store(ctx), file_id, max_bytes)
    try:
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > max_bytes + FORM_OVERHEAD:
                    raise _too_large(max_bytes)
                form.feed(chunk)
                await up.drain()
        except ClientDisconnect:
            raise InvalidRequest(
                "the upload was interrupted before the body ended",
                param="file",
                code="upload_interrupted",
            ) from None
        form.finish()
        await up.drain()
        if up.writer is None:
            raise InvalidRequest(
                "file: is required; send the JSONL file as the multipart field 'file'",
                param="file",
            )
        purpose = _check_purpose(form.fields.get("purpose"))
    except BaseException:
        await up.abort()
        raise
    return up, purpose


def _disposition(filename: str) -> str:
    plain = filename.encode("ascii", "ignore").decode().replace('"', "").replace("\\", "")
    if plain == filename:
        return f'attachment; filename="{filename}"'
    quoted = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{plain or 'file'}\"; filename*=UTF-8''{quoted}"


async def _stream(reader: BlobSource) -> AsyncIterator[bytes]:
    try:
        async for chunk in reader:
            yield chunk
    finally:
        await reader.aclose()


CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file's bytes, streamed (a batch's output and error files: JSONL,"
        " one BatchRequestOutput a line)",
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("application/jsonl", "application/octet-stream")
        },
    }
}


def files_router() -> APIRouter:
    r = APIRouter(
        prefix="/v1/files",
        tags=["files"],
        responses={**responses(401), **DEFAULT_RESPONSES},
    )

    @r.post(
        "",
        summary="Upload a file (multipart: 'file', and 'purpose' = 'batch')",
        response_model=FileObject,
        responses=responses(400, 409, 413),
        openapi_extra=json_body(FileUpload, "multipart/form-data"),
    )
    async def upload(
        request: Request, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> JSONResponse:
        header = request.headers.get(idempotency.HEADER)
        if header is not None and not 0 < len(header) <= 255:
            raise InvalidRequest(
                "Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key"
            )
        file_id = new_id()
        up, purpose = await _receive(request, ctx, file_id)
        assert up.writer is not None and up.filename is not None
        info = await up.writer.commit()
        blobs = up.blobs
        try:
            key = None
            if header is not None:
                digest = f"{purpose}\0{up.filename}\0{info.sha256}".encode()
                key = idempotency.IdemKey(header, body_hash(request.url.path, digest))
                replayed = await idempotency.replay(ctx, tenant_id, key)
                if replayed is not None:
                    await blobs.delete(file_id)
                    return replayed
            now = utcnow()
            answer = FileRecord(
                id=file_id,
                tenant=tenant_id,
                filename=up.filename,
                purpose=purpose,
                bytes=info.bytes,
                lines=info.lines,
                sha256=info.sha256,
                blob=file_id,
                batch_id=None,
                status=FileStatus.PROCESSED,
                created_at=now,
                expires_at=None,
                deleted_at=None,
            ).to_wire()
            try:
                rec = await ctx.store.files.create(
                    tenant_id,
                    file_id=file_id,
                    filename=up.filename,
                    purpose=purpose,
                    bytes=info.bytes,
                    lines=info.lines,
                    sha256=info.sha256,
                    blob=file_id,
                    created_at=now,
                    idempotency=key.with_answer(answer) if key else None,
                    idempotency_ttl=ctx.settings.idempotency_ttl_seconds,
                )
            except IdempotencyRace:
                assert key is not None
                await blobs.delete(file_id)
                replayed = await idempotency.replay(ctx, tenant_id, key)
                assert replayed is not None
                return replayed
        except BaseException:
            await blobs.delete(file_id)
            raise
        return JSONResponse(rec.to_wire())

    @r.get(
        "",
        summary="List files, newest first (cursor: 'after' = the last id of a page)",
        response_model=FileList,
        responses=responses(400),
    )
    async def list_(
        purpose: str | None = None,
        limit: int = Query(MAX_LIST, ge=1, le=MAX_LIST),
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        tenant_id: str = Depends(tenant),
        ctx: AppState = Depends(app_state),
    ) -> dict[str, Any]:
        recs = await ctx.store.files.list(
            tenant_id, purpose=purpose, after=after, limit=limit + 1, order=order
        )
        page = recs[:limit]
        return {
            "object": "list",
            "data": [f.to_wire() for f in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(recs) > limit,
        }

    @r.get(
        "/{file_id}",
        summary="Retrieve a file's metadata",
        response_model=FileObject,
        responses=responses(404),
    )
    async def get(
        file_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> dict[str, Any]:
        return (await ctx.store.files.get(tenant_id, file_id)).to_wire()

    @r.get(
        "/{file_id}/content",
        summary="Download a file's content (streamed)",
        response_class=StreamingResponse,
        responses={**CONTENT, **responses(404)},
    )
    async def content(
        file_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> StreamingResponse:
        return await file_content(ctx, tenant_id, file_id)

    @r.delete(
        "/{file_id}",
        summary="Delete a file and its content",
        response_model=FileDeleted,
        responses=responses(404),
    )
    async def delete(
        file_id: str, tenant_id: str = Depends(tenant), ctx: AppState = Depends(app_state)
    ) -> dict[str, Any]:
        rec = await ctx.store.files.delete(tenant_id, file_id)
        if rec.blob is not None:
            await blob_store(ctx).delete(rec.blob)
        return {"id": rec.id, "object": "file", "deleted": True}

    return r


async def file_content(ctx: AppState, tenant_id: str, file_id: str) -> StreamingResponse:
    """A file's content streamed (the API's download, and the dashboard's)."""
    rec = await ctx.store.files.get(tenant_id, file_id)
    media = "application/jsonl" if rec.filename.lower().endswith(".jsonl") else None
    headers = {"Content-Disposition": _disposition(rec.filename)}
    body: AsyncIterator[bytes]
    if rec.blob is not None:
        try:
            reader = await blob_store(ctx).open(rec.blob)
        except BlobNotFound:
            where = ctx.settings.files_url or ctx.settings.files_dir
            log.error("file %s has no blob %s under %s", rec.id, rec.blob, where)
            raise BackburnerError(
                f"the content of file '{rec.id}' is missing from the file store; with several"
                ' replicas on several machines, use object storage (files_url = "s3://...")'
                " or a files_dir they all share"
            ) from None
        headers["Content-Length"] = str(rec.bytes)
        body = _stream(reader)
    else:
        # Batch output and error files are rendered from the database (store/batches.py).
        body = ctx.store.batches.render_file(tenant_id, rec)
    return StreamingResponse(body, media_type=media or "application/octet-stream", headers=headers)
