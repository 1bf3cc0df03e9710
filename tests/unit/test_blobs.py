"""LocalBlobStore: streaming writes that count, atomic commits, chunked reads."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from backburner.store.blobs import BlobNotFound, LocalBlobStore


async def chunks_of(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def test_write_counts_bytes_lines_and_sha256(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "files")
    parts = [b'{"a": 1}\n{"b"', b": 2}\n", b'{"c": 3}']  # last line has no newline
    info = await blobs.write("abc_DEF-123", chunks_of(parts))
    data = b"".join(parts)
    assert info.bytes == len(data)
    assert info.lines == 3
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert blobs.path("abc_DEF-123").read_bytes() == data
    assert await blobs.exists("abc_DEF-123")


@pytest.mark.parametrize(
    ("data", "lines"),
    [(b"", 0), (b"\n", 1), (b"x", 1), (b"x\n", 1), (b"x\ny", 2), (b"x\ny\n", 2), (b"\n\n", 2)],
)
async def test_line_counting(tmp_path: Path, data: bytes, lines: int) -> None:
    info = await LocalBlobStore(tmp_path).write("k", chunks_of([data]))
    assert (info.bytes, info.lines) == (len(data), lines)


async def test_large_write_and_chunked_read(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path, chunk_size=1024 * 1024)
    line = b'{"custom_id": "x", "body": {}}\n'
    parts = [line * 10_000 for _ in range(10)]  # ~3 MB in 10 writes
    info = await blobs.write("big", chunks_of(parts))
    assert info.lines == 100_000
    reader = await blobs.open("big")
    got = [c async for c in reader]
    assert all(len(c) <= 1024 * 1024 for c in got)
    assert len(got) == 3
    assert b"".join(got) == b"".join(parts)


async def test_failing_chunks_leave_nothing(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "files")

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * (3 * 1024 * 1024)  # past the buffer: some bytes reach the disk
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        await blobs.write("k1", broken())
    assert not await blobs.exists("k1")
    assert leftovers(tmp_path / "files") == []


async def test_writer_abort_and_commit_is_atomic(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    w = await blobs.writer("k2")
    await w.write(b"hello\n")
    assert not await blobs.exists("k2")  # invisible until committed
    await w.abort()
    await w.abort()  # twice is fine
    assert leftovers(tmp_path) == []
    w = await blobs.writer("k2")
    await w.write(b"hello\n")
    info = await w.commit()
    assert info.bytes == 6 and await blobs.exists("k2")
    assert [p.name for p in leftovers(tmp_path)] == ["k2"]


async def test_overwrite_replaces_whole(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    await blobs.write("k", chunks_of([b"first version\n"]))
    await blobs.write("k", chunks_of([b"second\n"]))
    assert blobs.path("k").read_bytes() == b"second\n"


async def test_delete_and_missing(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    await blobs.write("k", chunks_of([b"x"]))
    await blobs.delete("k")
    await blobs.delete("k")  # deleting a missing blob is fine
    assert not await blobs.exists("k")
    with pytest.raises(BlobNotFound):
        await blobs.open("k")


async def test_open_reads_a_blob_deleted_meanwhile(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path, chunk_size=4)
    await blobs.write("k", chunks_of([b"0123456789"]))
    reader = await blobs.open("k")
    await blobs.delete("k")
    assert b"".join([c async for c in reader]) == b"0123456789"


async def test_reader_aclose_without_reading(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    await blobs.write("k", chunks_of([b"x"]))
    reader = await blobs.open("k")
    await reader.aclose()
    assert [c async for c in reader] == []


@pytest.mark.parametrize("key", ["", "../etc", "a/b", "a.b", "x" * 129, "é", "a b"])
async def test_refuses_bad_keys(tmp_path: Path, key: str) -> None:
    blobs = LocalBlobStore(tmp_path)
    with pytest.raises(ValueError):
        blobs.path(key)
    with pytest.raises(ValueError):
        await blobs.write(key, chunks_of([b"x"]))
    assert leftovers(tmp_path) == []
