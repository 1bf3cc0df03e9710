"""Where the bytes of uploaded files live: a blob store keyed by file id.

:class:`LocalBlobStore` keeps each blob as one file under a root directory::

    <root>/<first two characters of the key>/<key>

A blob is written to a temporary file in the same directory (``.<key>.<random>.part``), flushed,
fsynced and then renamed onto its final name, so a reader never sees half a blob and a failed or
interrupted upload leaves nothing behind under the final name. File I/O runs in worker threads
(:func:`asyncio.to_thread`), never on the event loop, and data moves in chunks of at most
:data:`CHUNK_SIZE`: a file of any size is never held in memory.

Several API replicas can share one store when ``root`` is a shared directory (NFS, EFS, a CSI
volume mounted on every replica): keys are random file ids, so replicas never write the same
name, and the atomic rename makes a blob visible to every replica only once it is complete.
Object storage (S3 and compatible) is the other implementation of the same small interface,
:class:`BlobStore` (``writer``/``write``, ``open``, ``delete``, ``exists``):
:class:`~backburner.store.s3blobs.S3BlobStore`. The database row, not the blob store, says which
files exist.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

CHUNK_SIZE = 1024 * 1024
_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX: the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobInfo(NamedTuple):
    """What writing a blob measured: its size, its line count and its sha256 (hex)."""

    bytes: int
    lines: int
    sha256: str


class BlobNotFound(KeyError):
    """No blob with this key."""


class BlobSink(Protocol):
    """A blob being written: chunks in, then ``commit`` (it appears whole) or ``abort``;
    ``bytes`` counts what was written so far."""

    bytes: int

    async def write(self, data: builtins.bytes) -> None: ...

    async def commit(self) -> BlobInfo: ...

    async def abort(self) -> None: ...


class BlobSource(Protocol):
    """An open blob: its bytes in chunks; ``aclose`` when not read to the end."""

    def __aiter__(self) -> BlobSource: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...


class BlobStore(Protocol):
    """Where file contents live (:class:`LocalBlobStore`, or S3 and compatible)."""

    async def writer(self, key: str) -> BlobSink: ...

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> BlobInfo: ...

    async def open(self, key: str) -> BlobSource: ...

    async def delete(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool: ...


class Tally:
    """What passes through a writer: lines (newlines, plus one for a last line without a
    newline) and the sha256."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._newlines = 0
        self._last = b""

    def add(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self._newlines += chunk.count(b"\n")
        self._last = chunk[-1:]

    def info(self, size: int) -> BlobInfo:
        lines = self._newlines + (1 if self._last not in (b"", b"\n") else 0)
        return BlobInfo(size, lines, self._sha.hexdigest())


async def write_all(sink: BlobSink, chunks: AsyncIterator[bytes]) -> BlobInfo:
    """Every chunk into ``sink``, then commit; if the chunks fail, abort (nothing appears)."""
    try:
        async for chunk in chunks:
            await sink.write(chunk)
    except BaseException:
        await sink.abort()
        raise
    return await sink.commit()


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"invalid blob key {key!r}: use 1 to 128 characters of A-Za-z0-9_-")
    return key


class BufferedSink:
    """What both blob writers share: writes are buffered into chunks of :data:`CHUNK_SIZE`,
    each handed to :meth:`_put` (which counts it into ``_tally`` and sends it on); then
    :meth:`commit` (:meth:`_done` makes the blob appear) or :meth:`abort` (:meth:`_drop`)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._tally = Tally()
        self._open = True
        self.bytes = 0

    async def write(self, data: builtins.bytes) -> None:
        if not self._open:
            raise RuntimeError("blob writer is closed")
        if not data:
            return
        self.bytes += len(data)
        self._buf += data
        if len(self._buf) >= CHUNK_SIZE:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buf or not self._open:
            return
        chunk = builtins.bytes(self._buf)
        self._buf.clear()
        await self._put(chunk)

    async def commit(self) -> BlobInfo:
        """Make the blob visible under its key (atomically) and say what was written."""
        if not self._open:
            raise RuntimeError("blob writer is closed")
        try:
            await self._flush()
            await self._done()
        except BaseException:
            await self.abort()
            raise
        self._open = False
        return self._tally.info(self.bytes)

    async def abort(self) -> None:
        """Drop what was written; nothing is left behind. Safe to call more than once."""
        was_open, self._open = self._open, False
        self._buf.clear()
        if was_open:
            await self._drop()

    async def _put(self, chunk: builtins.bytes) -> None:
        raise NotImplementedError

    async def _done(self) -> None:
        raise NotImplementedError

    async def _drop(self) -> None:
        raise NotImplementedError


class BlobWriter(BufferedSink):
    """One blob being written to a temporary file, renamed onto its name on commit; the file
    I/O (and the counting) runs in a thread."""

    def __init__(self, final: Path, tmp: Path, fh: BinaryIO) -> None:
        super().__init__()
        self._final = final
        self._tmp = tmp
        self._fh = fh

    async def _put(self, chunk: builtins.bytes) -> None:
        await asyncio.to_thread(self._absorb, chunk)

    def _absorb(self, chunk: builtins.bytes) -> None:
        self._tally.add(chunk)
        self._fh.write(chunk)

    async def _done(self) -> None:
        await asyncio.to_thread(self._finish)

    def _finish(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self._final)
        _fsync_dir(self._final.parent)  # the rename itself survives a power loss

    async def _drop(self) -> None:
        await asyncio.to_thread(_discard, self._fh, self._tmp)


def _discard(fh: BinaryIO, tmp: Path) -> None:
    fh.close()
    tmp.unlink(missing_ok=True)


def _open_tmp(tmp: Path) -> BinaryIO:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return open(tmp, "xb")


class LocalBlobStore:
    """Blobs as files under ``root`` (a local or shared directory); see the module docstring."""

    def __init__(self, root: Path, chunk_size: int = CHUNK_SIZE) -> None:
        self.root = Path(root)
        self.chunk_size = chunk_size

    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key

    async def writer(self, key: str) -> BlobWriter:
        """Start writing blob ``key``; it appears only when the writer commits."""
        final = self.path(key)
        tmp = final.with_name(f".{key}.{secrets.token_hex(6)}.part")
        fh = await asyncio.to_thread(_open_tmp, tmp)
        return BlobWriter(final, tmp, fh)

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> BlobInfo:
        """Write blob ``key`` from ``chunks``; if they fail, nothing is left behind."""
        return await write_all(await self.writer(key), chunks)

    async def open(self, key: str) -> BlobReader:
        """The blob's bytes in chunks of ``chunk_size``; raises :class:`BlobNotFound` at once.

        The file is opened before this returns, so a blob deleted while it is being read is
        still read whole. Iterate the result to its end or ``aclose()`` it.
        """
        path = self.path(key)
        try:
            fh = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        return BlobReader(fh, self.chunk_size)

    async def delete(self, key: str) -> None:
        """Remove blob ``key``; removing a missing blob is not an error."""
        await asyncio.to_thread(self.path(key).unlink, missing_ok=True)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)


class BlobReader:
    """An open blob, read in chunks off the event loop; closes itself at the end or on
    :meth:`aclose` (which is safe to call whether or not it was iterated)."""

    def __init__(self, fh: BinaryIO, chunk_size: int) -> None:
        self._fh: BinaryIO | None = fh
        self._chunk_size = chunk_size

    def __aiter__(self) -> BlobReader:
        return self

    async def __anext__(self) -> bytes:
        if self._fh is None:
            raise StopAsyncIteration
        chunk = await asyncio.to_thread(self._fh.read, self._chunk_size)
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            await asyncio.to_thread(fh.close)
