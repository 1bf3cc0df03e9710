"""Files on S3-compatible object storage (a real ``moto_server`` on loopback): the blob store
itself, and uploads, batches, downloads and deletes through the API on both databases."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backburner.store.blobs import BlobNotFound, LocalBlobStore
from backburner.store.s3blobs import S3BlobStore, parse_s3_url
from tests.integration.test_api_batches import MarkerBackend, jsonl, line


def bucket(s3: Any) -> str:
    return str(s3.create_bucket("bb-" + uuid.uuid4().hex[:12]))


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_s3_urls() -> None:
    assert parse_s3_url("s3://b") == ("b", "")
    assert parse_s3_url("s3://b/some/prefix/") == ("b", "some/prefix")
    with pytest.raises(ValueError):
        parse_s3_url("https://b/x")


async def test_multipart_round_trip_matches_the_local_store(s3_env: Any, tmp_path: Path) -> None:
    name = bucket(s3_env)
    store = S3BlobStore(f"s3://{name}/files", endpoint_url=s3_env.endpoint_url)
    # 3 parts of 8 MiB and a last line without a newline
    data = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 200) for i in range(90_000)) + b"end"
    info = await store.write("Key_1", chunks(data, 300_000))
    local = await LocalBlobStore(tmp_path).write("Key_1", chunks(data, 300_000))
    assert info == local
    assert info.bytes == len(data) and info.lines == 90_001
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert s3_env.objects(name) == ["files/Ke/Key_1"]
    got = b"".join([c async for c in await store.open("Key_1")])
    assert got == data
    assert await store.exists("Key_1")
    await store.delete("Key_1")
    await store.delete("Key_1")  # deleting what is gone is not an error
    assert not await store.exists("Key_1")
    with pytest.raises(BlobNotFound):
        await store.open("Key_1")


async def test_an_aborted_or_failed_upload_leaves_nothing(s3_env: Any) -> None:
    name = bucket(s3_env)
    store = S3BlobStore(f"s3://{name}", endpoint_url=s3_env.endpoint_url)
    w = await store.writer("gone")
    await w.write(os.urandom(9 * 1024 * 1024))  # a part was sent
    await w.abort()

    async def failing() -> AsyncIterator[bytes]:
        yield b"a" * (10 * 1024 * 1024)
        raise OSError("the client went away")

    with pytest.raises(OSError):
        await store.write("failed", failing())
    assert s3_env.objects(name) == []
    assert not await store.exists("gone") and not await store.exists("failed")


async def test_batch_through_s3_on_both_stores(
    harness_factory: Any, db_url: str, s3_env: Any, tmp_path: Path
) -> None:
    name = bucket(s3_env)
    h = await harness_factory(
        db=db_url,
        backend=MarkerBackend("fake"),
        files_url=f"s3://{name}/bb",
        files_endpoint_url=s3_env.endpoint_url,
        files_dir=str(tmp_path / "unused"),
    )
    lines = [line(i) for i in range(300)] + [line(300, "REJECT")]
    r = await h.client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", jsonl(lines), "application/jsonl")},
    )
    assert r.status_code == 200, r.text
    fid = r.json()["id"]
    assert s3_env.objects(name) == [f"bb/{fid[:2]}/{fid}"]
    assert not (tmp_path / "unused").exists()  # nothing on local disk
    body = await h.client.get(f"/v1/files/{fid}/content")
    assert body.content == jsonl(lines)
    r = await h.client.post(
        "/v1/batches",
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    bid = r.json()["id"]
    async with asyncio.timeout(30):
        while (b := (await h.client.get(f"/v1/batches/{bid}")).json())["status"] != "completed":
            await asyncio.sleep(0.05)
    out = (await h.client.get(f"/v1/files/{b['output_file_id']}/content")).text.splitlines()
    err = (await h.client.get(f"/v1/files/{b['error_file_id']}/content")).text.splitlines()
    assert len(out) == 300 and len(err) == 1
    # the output and error files were written to the bucket as they were rendered
    for key in (b["output_file_id"], b["error_file_id"]):
        assert f"bb/{key[:2]}/{key}" in s3_env.objects(name)
    assert {json.loads(x)["custom_id"] for x in out} == {f"req-{i}" for i in range(300)}
    r = await h.client.delete(f"/v1/files/{fid}")
    assert r.status_code == 200
    assert f"bb/{fid[:2]}/{fid}" not in s3_env.objects(name)
