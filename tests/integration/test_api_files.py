"""The Files API in-process: streaming uploads, downloads, tenancy, limits, and the OpenAI SDK."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import AppHarness
from tests.support.sdk import asgi_http_client

# one multipart part as httpx takes it: (field, (file name, content[, content type]))
Part = tuple[str, tuple[str | None, bytes] | tuple[str | None, bytes, str]]

LINES = [
    {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "fake-model", "messages": [{"role": "user", "content": f"hi {i} é"}]},
    }
    for i in range(5)
]
JSONL = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in LINES).encode()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def blobs_on_disk(files_dir: Path) -> list[Path]:
    return [p for p in files_dir.rglob("*") if p.is_file()] if files_dir.exists() else []


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    return tmp_path / "files"


@pytest.fixture
async def h(harness_factory: Any, files_dir: Path) -> AppHarness:
    harness: AppHarness = await harness_factory(files_dir=str(files_dir), run_worker=False)
    return harness


async def upload(
    client: httpx.AsyncClient,
    data: bytes = JSONL,
    *,
    filename: str = "in.jsonl",
    purpose: str | None = "batch",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    form = {"purpose": purpose} if purpose is not None else {}
    return await client.post(
        "/v1/files",
        data=form,
        files={"file": (filename, data, "application/jsonl")},
        headers=headers,
    )


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    return err


async def test_upload_list_retrieve_content_round_trip(h: AppHarness, files_dir: Path) -> None:
    r = await upload(h.client)
    assert r.status_code == 200, r.text
    f = r.json()
    assert set(f) == {
        "id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at",
        "status_details",
    }  # fmt: skip
    assert len(f["id"]) == 21
    assert f["object"] == "file" and f["purpose"] == "batch" and f["status"] == "processed"
    assert f["bytes"] == len(JSONL) and f["filename"] == "in.jsonl"
    assert isinstance(f["created_at"], int) and f["expires_at"] is None
    assert f["status_details"] is None

    rec = await h.state.store.files.get("default", f["id"])
    assert rec.lines == len(LINES) and rec.sha256 == hashlib.sha256(JSONL).hexdigest()
    assert rec.blob == f["id"] and rec.batch_id is None
    assert [p.name for p in blobs_on_disk(files_dir)] == [f["id"]]

    assert (await h.client.get(f"/v1/files/{f['id']}")).json() == f
    listed = (await h.client.get("/v1/files")).json()
    assert listed["object"] == "list" and listed["data"] == [f]
    assert listed["first_id"] == listed["last_id"] == f["id"] and listed["has_more"] is False

    c = await h.client.get(f"/v1/files/{f['id']}/content")
    assert c.status_code == 200
    assert c.content == JSONL
    assert c.headers["content-type"] == "application/jsonl"
    assert c.headers["content-disposition"] == 'attachment; filename="in.jsonl"'
    assert c.headers["content-length"] == str(len(JSONL))


async def test_content_types_and_odd_filenames(h: AppHarness) -> None:
    data = bytes(range(256)) * 10  # binary, no trailing newline
    r = await upload(h.client, data, filename="C:\\tmp\\données.bin")
    f = r.json()
    assert f["filename"] == "données.bin"  # the client's directories are dropped
    c = await h.client.get(f"/v1/files/{f['id']}/content")
    assert c.content == data
    assert c.headers["content-type"] == "application/octet-stream"
    disposition = c.headers["content-disposition"]
    assert 'filename="donnes.bin"' in disposition
    assert "filename*=UTF-8''donn%C3%A9es.bin" in disposition


async def test_empty_file(h: AppHarness) -> None:
    f = (await upload(h.client, b"")).json()
    assert f["bytes"] == 0
    assert (await h.client.get(f"/v1/files/{f['id']}/content")).content == b""


async def test_openai_sdk_works_unchanged(h: AppHarness) -> None:
    http = asgi_http_client(h.app)
    async with http:
        client = openai.AsyncOpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
        )
        created = await client.files.create(
            file=("in.jsonl", JSONL, "application/jsonl"), purpose="batch"
        )
        assert created.object == "file" and created.bytes == len(JSONL)
        assert created.filename == "in.jsonl" and created.purpose == "batch"
        assert created.status == "processed"

        got = await client.files.retrieve(created.id)
        assert got.id == created.id and got.created_at == created.created_at

        page = await client.files.list()
        assert [x.id for x in page.data] == [created.id]
        assert [x.id async for x in client.files.list(purpose="batch")] == [created.id]

        content = await client.files.content(created.id)
        assert content.read() == JSONL
        assert content.text == JSONL.decode()

        deleted = await client.files.delete(created.id)
        assert deleted.id == created.id and deleted.deleted is True
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(created.id)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.files.create(file=("x.jsonl", JSONL), purpose="fine-tune")
        assert "purpose" in str(bad.value)


async def test_sdk_pages_through_files(h: AppHarness) -> None:
    ids = [(await upload(h.client, filename=f"{i}.jsonl")).json()["id"] for i in range(5)]
    http = asgi_http_client(h.app)
    async with http:
        client = openai.AsyncOpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
        )
        seen = [f.id async for f in client.files.list(limit=2)]
    assert seen == ids[::-1]


@pytest.mark.parametrize("purpose_first", [True, False])
async def test_wrong_purpose_is_400_and_stores_nothing(
    h: AppHarness, files_dir: Path, purpose_first: bool
) -> None:
    file_part = ("file", ("in.jsonl", JSONL, "application/jsonl"))
    purpose_part = ("purpose", (None, b"fine-tune"))
    parts: list[Part] = [purpose_part, file_part] if purpose_first else [file_part, purpose_part]
    r = await h.client.post("/v1/files", files=parts)
    err = assert_error(r, 400, "purpose")
    assert "'batch'" in err["message"] and "fine-tune" in err["message"]
    assert blobs_on_disk(files_dir) == []
    assert await h.state.store.files.list("default") == []


async def test_missing_purpose_is_400(h: AppHarness, files_dir: Path) -> None:
    err = assert_error(await upload(h.client, purpose=None), 400, "purpose")
    assert "required" in err["message"]
    assert blobs_on_disk(files_dir) == []


async def test_missing_file_is_400(h: AppHarness) -> None:
    r = await h.client.post("/v1/files", files={"purpose": (None, b"batch")})
    err = assert_error(r, 400, "file")
    assert "file" in err["message"]


async def test_not_multipart_is_400(h: AppHarness) -> None:
    assert_error(await h.client.post("/v1/files", json={"purpose": "batch"}), 400, "file")
    r = await h.client.post(
        "/v1/files",
        content=b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    err = assert_error(r, 400, "file")
    assert "multipart" in err["message"]


async def test_two_files_is_400(h: AppHarness, files_dir: Path) -> None:
    parts: list[Part] = [
        ("purpose", (None, b"batch")),
        ("file", ("a.jsonl", JSONL, "application/jsonl")),
        ("file", ("b.jsonl", JSONL, "application/jsonl")),
    ]
    assert_error(await h.client.post("/v1/files", files=parts), 400, "file")
    assert blobs_on_disk(files_dir) == []


@pytest.mark.parametrize("size", [5000, 3 * 1024 * 1024])  # counted as it streams; declared
async def test_over_files_max_bytes_is_413_and_leaves_nothing(
    harness_factory: Any, files_dir: Path, size: int
) -> None:
    h = await harness_factory(files_dir=str(files_dir), files_max_bytes=4096, run_worker=False)
    err = assert_error(await upload(h.client, b"x" * size), 413, "file")
    assert "4096" in err["message"]
    assert blobs_on_disk(files_dir) == []
    assert await h.state.store.files.list("default") == []
    ok = await upload(h.client, b"y" * 4096)  # exactly at the limit is fine
    assert ok.status_code == 200 and ok.json()["bytes"] == 4096


async def test_other_tenant_gets_404(harness_factory: Any, files_dir: Path) -> None:
    h = await harness_factory(files_dir=str(files_dir), auth="required", run_worker=False)
    _, ka = await h.state.store.keys.create("tenant-a")
    _, kb = await h.state.store.keys.create("tenant-b")
    assert (await upload(h.client)).status_code == 401
    fid = (await upload(h.client, headers=bearer(ka))).json()["id"]
    for path in (f"/v1/files/{fid}", f"/v1/files/{fid}/content"):
        r = await h.client.get(path, headers=bearer(kb))
        assert_error(r, 404, "file_id")
        assert fid in r.json()["error"]["message"]
    assert_error(await h.client.delete(f"/v1/files/{fid}", headers=bearer(kb)), 404, "file_id")
    assert (await h.client.get("/v1/files", headers=bearer(kb))).json()["data"] == []
    assert_error(
        await h.client.get("/v1/files", params={"after": fid}, headers=bearer(kb)), 400, "after"
    )
    r = await h.client.get(f"/v1/files/{fid}/content", headers=bearer(ka))
    assert r.content == JSONL  # still there for its owner


async def test_delete(h: AppHarness, files_dir: Path) -> None:
    f = (await upload(h.client)).json()
    keep = (await upload(h.client, filename="keep.jsonl")).json()
    r = await h.client.delete(f"/v1/files/{f['id']}")
    assert r.status_code == 200
    assert r.json() == {"id": f["id"], "object": "file", "deleted": True}
    assert [p.name for p in blobs_on_disk(files_dir)] == [keep["id"]]
    for path in (f"/v1/files/{f['id']}", f"/v1/files/{f['id']}/content"):
        assert_error(await h.client.get(path), 404, "file_id")
    assert_error(await h.client.delete(f"/v1/files/{f['id']}"), 404, "file_id")
    assert [x["id"] for x in (await h.client.get("/v1/files")).json()["data"]] == [keep["id"]]


async def test_pagination(h: AppHarness) -> None:
    ids = [(await upload(h.client, filename=f"{i}.jsonl")).json()["id"] for i in range(7)]

    async def page(**params: Any) -> dict[str, Any]:
        r = await h.client.get("/v1/files", params=params)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    newest_first = ids[::-1]
    assert [f["id"] for f in (await page())["data"]] == newest_first
    assert [f["id"] for f in (await page(order="asc"))["data"]] == ids

    p1 = await page(limit=3)
    assert [f["id"] for f in p1["data"]] == newest_first[:3] and p1["has_more"] is True
    assert p1["first_id"] == newest_first[0] and p1["last_id"] == newest_first[2]
    p2 = await page(limit=3, after=p1["last_id"])
    assert [f["id"] for f in p2["data"]] == newest_first[3:6] and p2["has_more"] is True
    p3 = await page(limit=3, after=p2["last_id"])
    assert [f["id"] for f in p3["data"]] == newest_first[6:] and p3["has_more"] is False

    a1 = await page(limit=4, order="asc")
    a2 = await page(limit=4, order="asc", after=a1["last_id"])
    assert [f["id"] for f in a1["data"] + a2["data"]] == ids and a2["has_more"] is False

    # a cursor deleted between pages still works
    await h.client.delete(f"/v1/files/{newest_first[2]}")
    p2b = await page(limit=3, after=newest_first[2])
    assert [f["id"] for f in p2b["data"]] == newest_first[3:6]

    assert (await page(purpose="batch_output"))["data"] == []
    empty = await page(purpose="batch_output")
    assert empty["first_id"] is None and empty["has_more"] is False


@pytest.mark.parametrize(
    ("params", "param"),
    [({"limit": 0}, "limit"), ({"limit": 10001}, "limit"), ({"order": "up"}, "order")],
)
async def test_bad_list_params_are_400(h: AppHarness, params: dict[str, Any], param: str) -> None:
    assert_error(await h.client.get("/v1/files", params=params), 400, param)


async def test_idempotency_key(h: AppHarness, files_dir: Path) -> None:
    key = {"Idempotency-Key": "upload-1"}
    first = await upload(h.client, headers=key)
    again = await upload(h.client, headers=key)
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    assert len(await h.state.store.files.list("default")) == 1
    assert len(blobs_on_disk(files_dir)) == 1
    r = await upload(h.client, JSONL + b"{}\n", headers=key)
    assert r.status_code == 409
    assert len(blobs_on_disk(files_dir)) == 1
