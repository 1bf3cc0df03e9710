"""Row <-> record conversion and JSON encoding (kept exact: the request is stored as sent).

What a text column can hold: no NUL (PostgreSQL refuses it) and nothing that is not UTF-8 (a
lone surrogate such as ``"\ud800"``; both databases refuse it). :func:`dumps` escapes both, so a
request is stored whatever it holds; :func:`checked_text` and :func:`answer` refuse them instead
(:class:`Unstorable`), for values that are stored as they are or must be sent on as UTF-8 JSON;
:func:`printable` writes them as escapes in a message of ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from backburner.core.states import BatchStatus, FileStatus, GroupStatus, Kind, State
from backburner.schemas.batch import BatchRecord
from backburner.schemas.files import FileRecord
from backburner.schemas.generation import GenerationRecord, GroupCounts, GroupRecord
from backburner.schemas.webhook import WebhookRecord


def dumps(obj: Any) -> str:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid JSON, not UTF-8): keep it escaped
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    return text


class Unstorable(ValueError):
    """A value that no column can hold as it is (``reason`` says why, without the value)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _utf8(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def checked_text(value: str, what: str) -> str:
    """``value`` for a text column, or :class:`Unstorable` naming ``what`` when it holds a NUL
    or invalid Unicode (refused the same way on SQLite and PostgreSQL)."""
    if "\x00" in value:
        raise Unstorable(f"{what} holds a NUL character")
    if not _utf8(value):
        raise Unstorable(f"{what} holds invalid Unicode (a lone surrogate)")
    return value


def answer(obj: Any, what: str = "the response") -> str:
    """JSON text of a value that is read back and sent on as UTF-8 JSON (an engine's answer):
    :class:`Unstorable` when it could not be (invalid Unicode, NaN or Infinity, nesting too deep
    to encode, or not JSON at all). NUL is fine: JSON escapes it."""
    try:
        encoded = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        raise Unstorable(f"{what} is nested too deeply") from None
    except ValueError:
        raise Unstorable(f"{what} holds a number JSON cannot carry (NaN or Infinity)") from None
    except TypeError as exc:
        raise Unstorable(f"{what} is not JSON ({exc})") from None
    return checked_text(encoded, what)


def printable(value: str, limit: int = 300) -> str:
    """``value`` cut to ``limit`` characters, with NUL and lone surrogates written as escapes:
    fit for a text column and UTF-8 JSON (for messages that quote what went wrong)."""
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    value = value.replace("\x00", "\\x00")
    if not _utf8(value):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _mapping(row: sa.Row[Any] | Mapping[str, Any]) -> Mapping[Any, Any]:
    return row._mapping if isinstance(row, sa.Row) else row


def generation(row: sa.Row[Any] | Mapping[str, Any]) -> GenerationRecord:
    m = _mapping(row)
    return GenerationRecord(
        id=m["id"],
        tenant=m["tenant"],
        kind=Kind(m["kind"]),
        model=m["model"],
        request=loads(m["request"]),
        response=loads(m["response"]),
        state=State(m["state"]),
        state_message=m["state_message"],
        attempts=m["attempts"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        dispatched_at=m["dispatched_at"],
        finished_at=m["finished_at"],
        group_id=m["group_id"],
        group_index=m["group_index"],
        batch_id=m["batch_id"],
        custom_id=m["custom_id"],
        webhook_id=m["webhook_id"],
        prefix_key=m.get("prefix_key"),
    )


def group(row: sa.Row[Any] | Mapping[str, Any], counts: GroupCounts) -> GroupRecord:
    m = _mapping(row)
    return GroupRecord(
        id=m["id"],
        tenant=m["tenant"],
        kind=Kind(m["kind"]),
        size=m["size"],
        status=GroupStatus(m["status"]),
        metadata=loads(m["metadata"]),
        webhook_id=m["webhook_id"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        completed_at=m["completed_at"],
        counts=counts,
    )


def batch(row: sa.Row[Any] | Mapping[str, Any]) -> BatchRecord:
    m = _mapping(row)
    return BatchRecord(
        id=m["id"],
        tenant=m["tenant"],
        input_file_id=m["input_file_id"],
        endpoint=m["endpoint"],
        completion_window=m["completion_window"],
        status=BatchStatus(m["status"]),
        metadata=loads(m["metadata"]),
        webhook_url=m["webhook_url"],
        errors=loads(m["errors"]),
        total=m["total"],
        completed=m["completed"],
        failed=m["failed"],
        pending=m["pending"],
        loaded=m["loaded"],
        output_file_id=m["output_file_id"],
        error_file_id=m["error_file_id"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        in_progress_at=m["in_progress_at"],
        finalizing_at=m["finalizing_at"],
        completed_at=m["completed_at"],
        failed_at=m["failed_at"],
        expired_at=m["expired_at"],
        cancelling_at=m["cancelling_at"],
        cancelled_at=m["cancelled_at"],
        fair_start=m["fair_start"],
    )


def file(row: sa.Row[Any] | Mapping[str, Any]) -> FileRecord:
    m = _mapping(row)
    return FileRecord(
        id=m["id"],
        tenant=m["tenant"],
        filename=m["filename"],
        purpose=m["purpose"],
        bytes=int(m["bytes"]),
        lines=None if m["lines"] is None else int(m["lines"]),
        sha256=m["sha256"],
        blob=m["blob"],
        batch_id=m["batch_id"],
        status=FileStatus(m["status"]),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        deleted_at=m["deleted_at"],
    )


def webhook(row: sa.Row[Any] | Mapping[str, Any]) -> WebhookRecord:
    m = _mapping(row)
    return WebhookRecord(
        id=m["id"],
        tenant=m["tenant"],
        url=m["url"],
        name=m["name"],
        secret=m["secret"],
        events=json.loads(m["events"]),
        enabled=bool(m["enabled"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )
