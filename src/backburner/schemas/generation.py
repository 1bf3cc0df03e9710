"""Generation and group wire shapes, camelCase exactly as inference.net's asynchronous API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

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
    prefix_key: str | None = None  # never on the wire

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

    def to_wire(
        self,
        generations: list[GenerationRecord] | None = None,
        expected: datetime | None = None,
    ) -> dict[str, Any]:
        """The Group object; ``expected`` is its expected completion (an extra field)."""
        out: dict[str, Any] = {
            "groupId": self.groupId,
            "object": "group",
            "groupSize": self.size,
            "status": self.status.value,
            "counts": self.counts.to_wire(),
            "createdAt": iso(self.created_at),
            "expiresAt": iso(self.expires_at),
            "expected_completion_at": None if expected is None else iso(expected),
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
    """The answer to a group submission *(compat: camelCase)*."""

    groupId: str
    groupSize: int


# ---------------------------------------------------------------- on the wire
# Keys that are absent until they apply (never null) default to None, hidden from the schema;
# routes answer with ``response_model_exclude_unset`` so they stay absent.


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def absent() -> Any:
    """A key that is absent (never null) until it applies."""
    return Field(default=None, json_schema_extra=_no_default)


StateName = Literal["Queued", "In Progress", "Success", "Failed"]


class Generation(BaseModel):
    """A generation *(compat: names, casing, state strings)*."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    id: str
    object: Literal["generation"]
    state: StateName
    stateMessage: str
    request: dict[str, Any]
    """The original body, metadata included, exactly as sent."""
    response: dict[str, Any] | SkipJsonSchema[None] = absent()
    """The engine's answer: present only on Success, never null."""
    createdAt: str
    dispatchedAt: str | SkipJsonSchema[None] = absent()
    finishedAt: str | SkipJsonSchema[None] = absent()
    model: str
    attempts: int
    groupId: str | SkipJsonSchema[None] = absent()
    batchId: str | SkipJsonSchema[None] = absent()


class StateCounts(BaseModel):
    queued: int
    inProgress: int
    success: int
    failed: int


class Group(BaseModel):
    """A group's summary."""

    groupId: str
    object: Literal["group"]
    groupSize: int
    status: Literal["in_progress", "completed", "cancelled", "expired"]
    counts: StateCounts
    createdAt: str
    expiresAt: str
    metadata: dict[str, Any] | SkipJsonSchema[None] = absent()
    webhook_id: str | SkipJsonSchema[None] = absent()
    completedAt: str | SkipJsonSchema[None] = absent()
    # extra: when its remaining work should be done at its tenant's recent pace (null: unknown
    # or finished); docs/scheduling.md
    expected_completion_at: str | None = None


class GroupWithGenerations(Group):
    """A group and every one of its ``groupSize`` generations, in submission order."""

    generations: list[Generation]
