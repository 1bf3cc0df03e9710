"""Row <-> record conversion and JSON encoding (kept exact: the request is stored as sent)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from backburner.core.states import GroupStatus, Kind, State
from backburner.schemas.generation import GenerationRecord, GroupCounts, GroupRecord


def dumps(obj: Any) -> str:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid JSON, not UTF-8): keep it escaped
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    return text


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def generation(row: sa.Row[Any] | Mapping[str, Any]) -> GenerationRecord:
    m = row._mapping if isinstance(row, sa.Row) else row
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
    )


def group(row: sa.Row[Any] | Mapping[str, Any], counts: GroupCounts) -> GroupRecord:
    m = row._mapping if isinstance(row, sa.Row) else row
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
