"""The generation state machine (SPEC section 2).

    Queued ──claim──> In Progress ──ok──> Success
      ^  │                 │  │
      │  │                 │  └──4xx / attempts spent──> Failed
      │  │                 └──retryable error, lease lost──> Queued
      │  └──cancel / expire──> Failed
      └───────────────────────────────────────────────────────┘

Every transition in the store is a compare-and-set on the current state; this module is the one
list of which transitions exist.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    QUEUED = "Queued"
    IN_PROGRESS = "In Progress"
    SUCCESS = "Success"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (State.SUCCESS, State.FAILED)


class Kind(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


class GroupStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.IN_PROGRESS, State.FAILED}),
    State.IN_PROGRESS: frozenset({State.SUCCESS, State.FAILED, State.QUEUED}),
    State.SUCCESS: frozenset(),
    State.FAILED: frozenset(),
}

UNFINISHED: tuple[State, ...] = (State.QUEUED, State.IN_PROGRESS)


def can_transition(src: State, dst: State) -> bool:
    return dst in TRANSITIONS[src]


class StateMessage:
    """The stateMessage strings backburner writes."""

    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    CANCELLED = "Cancelled"
    EXPIRED = "Expired"
