"""Generation and group wire shapes, camelCase exactly as inference.net's asynchronous API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from backburner.core.clock import iso
from backburner.core.states import GroupStatus, Kind, State


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    """A generation as the store returns it (never an ORM row)."""

    id: str
    tenant: str
    kind: Kind
    model: str
    request: dict[str, Any]
    state: State
    state_message: str
    attempts: int
    created_at: datetime
    expires_at: datetime
    response: dict[str, Any] | None = None
    dispatched_at: datetime | None = None
    finished_at: datetime | None = None
    group_id: str | None = None
    group_index: int | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    webhook_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The Generation object: ``response`` only on Success; absent timestamps are absent."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "generation",
            "state": self.state.value,
            "stateMessage": self.state_message,
            "request": self.request,
            "createdAt": iso(self.created_at),
            "model": self.model,
            "attempts": self.attempts,
        }
        if self.state is State.SUCCESS and self.response is not None:
            out["response"] = self.response
        if self.dispatched_at is not None:
            out["dispatchedAt"] = iso(self.dispatched_at)
        if self.finished_at is not None:
            out["finishedAt"] = iso(self.finished_at)
        if self.group_id is not None:
            out["groupId"] = self.group_id
        if self.batch_id is not None:
            out["batchId"] = self.batch_id
        return out


@dataclass(frozen=True, slots=True)
class NewGeneration:
    """What the API hands the store to enqueue."""

    kind: Kind
    model: str
    request: dict[str, Any]
    custom_id: str | None = None
    webhook_id: str | None = None


@dataclass(frozen=True, slots=True)
class GroupCounts:
    queued: int = 0
    in_progress: int = 0
    success: int = 0
    failed: int = 0

    def to_wire(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "inProgress": self.in_progress,
            "success": self.success,
            "failed": self.failed,
        }


@dataclass(frozen=True, slots=True)
class GroupRecord:
    id: str
    tenant: str
    kind: Kind
    size: int
    status: GroupStatus
    metadata: dict[str, Any] | None
    webhook_id: str | None
    created_at: datetime
    expires_at: datetime
    completed_at: datetime | None = None
    counts: GroupCounts = field(default_factory=GroupCounts)

    def to_wire(self, generations: list[GenerationRecord] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "groupId": self.groupId,
            "object": "group",
            "groupSize": self.size,
            "status": self.status.value,
            "counts": self.counts.to_wire(),
            "createdAt": iso(self.created_at),
            "expiresAt": iso(self.expires_at),
        }
        if self.metadata is not None:
            out["metadata"] = self.metadata
        if self.webhook_id is not None:
            out["webhook_id"] = self.webhook_id
        if self.completed_at is not None:
            out["completedAt"] = iso(self.completed_at)
        if generations is not None:
            out["generations"] = [g.to_wire() for g in generations]
        return out

    @property
    def groupId(self) -> str:
        return self.id


class GroupSubmitted(BaseModel):
    groupId: str
    groupSize: int
