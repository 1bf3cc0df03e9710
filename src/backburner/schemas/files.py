"""Files: the stored record and OpenAI's File object on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
