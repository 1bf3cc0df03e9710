"""File contents on S3-compatible object storage (AWS S3, MinIO, Cloudflare R2, GCS's S3
interface), through obstore: the :class:`~backburner.store.blobs.BlobStore` of a fleet with no
shared disk.

    files_url = "s3://bucket/prefix"         # objects are <prefix>/<first two chars>/<key>
    files_endpoint_url = "http://minio:9000"  # optional: another S3-compatible service

Credentials and the region come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``) or the
instance's role, as the AWS SDKs find them.

- **Writes stream as a multipart upload**: parts of :data:`PART_SIZE` are sent as they fill, at
  most :data:`PART_CONCURRENCY` at a time, so an upload of any size holds at most a few parts in
  memory. A blob appears under its key only when the upload completes (``commit``); one that is
  aborted or whose process dies never appears (S3 keeps the uploaded parts of an unfinished
  upload until a bucket lifecycle rule such as ``AbortIncompleteMultipartUpload`` removes them).
- **Reads stream** in chunks of about :data:`~backburner.store.blobs.CHUNK_SIZE`.
- Sizes, line counts and sha256 are computed as data passes, as the local store does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore
from obstore.store import S3Store

from backburner.store.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobNotFound,
    BlobSink,
    BlobSource,
    BufferedSink,
    check_key,
    write_all,
)

if TYPE_CHECKING:
    from obstore import AsyncWritableFile, BytesStream

PART_SIZE = 8 * 1024 * 1024  # S3 parts are 5 MiB at least (but the last)
PART_CONCURRENCY = 2


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// URL with a bucket: {url!r}")
    return parts.netloc, parts.path.strip("/")


def _not_found(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or type(exc).__name__ == "NotFoundError"


class S3BlobWriter(BufferedSink):
    """One object being uploaded (see :class:`BlobSink`); obstore sends a part whenever
    ``PART_SIZE`` is buffered on its side."""

    def __init__(self, file: AsyncWritableFile) -> None:
        super().__init__()
        self._file = file

    async def _put(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._tally.add, chunk)
        await self._file.write(chunk)

    async def _done(self) -> None:
        await self._file.close()  # completes the multipart upload (or one PUT if small)

    async def _drop(self) -> None:
        """The upload is never completed: nothing appears under the key."""


class S3BlobReader:
    """An object's bytes as they arrive (see :class:`BlobSource`)."""

    def __init__(self, stream: BytesStream) -> None:
        self._stream: BytesStream | None = stream

    def __aiter__(self) -> S3BlobReader:
        return self

    async def __anext__(self) -> bytes:
        if self._stream is None:
            raise StopAsyncIteration
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            self._stream = None
            raise
        return bytes(chunk)

    async def aclose(self) -> None:
        self._stream = None  # dropping the stream closes its connection


class S3BlobStore:
    """Blobs as objects ``<prefix>/<key[:2]>/<key>`` in one bucket."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        part_size: int = PART_SIZE,
        store: Any = None,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.part_size = part_size
        options: dict[str, Any] = {}
        client_options: Any = {"timeout": "120s", "connect_timeout": "10s"}
        if endpoint_url:
            options["endpoint"] = endpoint_url
            options["virtual_hosted_style_request"] = False  # path style: MinIO, moto, R2
            if endpoint_url.startswith("http://"):
                client_options["allow_http"] = True
        self._store = store or S3Store(
            self.bucket, prefix=self.prefix or None, client_options=client_options, **options
        )

    def path(self, key: str) -> str:
        check_key(key)
        return f"{key[:2]}/{key}"

    async def writer(self, key: str) -> BlobSink:
        file = obstore.open_writer_async(
            self._store,
            self.path(key),
            buffer_size=self.part_size,
            max_concurrency=PART_CONCURRENCY,
        )
        return S3BlobWriter(file)

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> BlobInfo:
        return await write_all(await self.writer(key), chunks)

    async def open(self, key: str) -> BlobSource:
        """Starts the download before it returns: a missing object raises :class:`BlobNotFound`
        at once."""
        try:
            result = await obstore.get_async(self._store, self.path(key))
        except Exception as exc:
            if _not_found(exc):
                raise BlobNotFound(key) from None
            raise
        return S3BlobReader(result.stream(min_chunk_size=CHUNK_SIZE))

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self._store, self.path(key))
        except Exception as exc:
            if not _not_found(exc):
                raise

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self._store, self.path(key))
        except Exception as exc:
            if _not_found(exc):
                return False
            raise
        return True
