"""Files: the stored record and OpenAI's File object on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from backburner.core.clock import epoch

UPLOAD_PURPOSES: tuple[str, ...] = ("batch",)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file row. ``blob`` is the blob store key of an uploaded file; output and error files of
    a batch have ``blob=None`` and ``batch_id`` set, and are rendered from the database."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    lines: int | None
    sha256: str | None
    blob: str | None
    batch_id: str | None
    status: str
    created_at: datetime
    expires_at: datetime | None
    deleted_at: datetime | None

    def to_wire(self) -> dict[str, Any]:
        """OpenAI's File object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": epoch(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "expires_at": epoch(self.expires_at) if self.expires_at is not None else None,
            "status_details": None,
        }


class FileUpload(BaseModel):
    """``POST /v1/files``, sent as multipart/form-data (read as it streams in)."""

    file: bytes
    """The JSONL file: one batch request a line."""
    purpose: Literal["batch"]


class FileObject(BaseModel):
    """OpenAI's File object (timestamps in epoch seconds)."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool
