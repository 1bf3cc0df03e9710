"""Every status backburner stores, and the transitions allowed between them.

Generations::

    Queued ──claim──> In Progress ──ok──> Success
     ^ │ ^                 │  │
     │ │ └─────────────────┘  └──4xx, attempts spent, lost too often──> Failed
     │ │   retryable error, lease lost, given back
     │ └──cancel / expire──> Failed
     └──batch retry── Failed            (backburner's extension)

Groups: ``in_progress`` -> ``completed`` | ``cancelled`` | ``expired``.

Batches (OpenAI's batch statuses)::

    validating ──valid──> in_progress ──last request done──> finalizing ──> completed | expired
    validating ──a bad line──> failed
    validating | in_progress ──cancel──> cancelling ──files written──> cancelled
    cancelling ──a bad line (cancelled while validating)──> failed
    completed | expired | cancelled ──retry──> in_progress      (backburner's extension)

Webhook events (the outbox): ``pending`` -> ``delivered`` | ``failed``; a retry keeps an event
``pending``; a redelivery makes any event ``pending`` again.

Files are ``processed`` when their row is written and never change status (a deletion sets
``deleted_at``).

Each table below maps a status to the statuses it may move to. Every write in the store is a
compare-and-set whose allowed current statuses come from :func:`sources`, so a transition missing
here is refused by the SQL. The strings are wire values that clients compare against: never
change them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, TypeVar


class State(StrEnum):
    """A generation's state."""

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


class BatchStatus(StrEnum):
    """OpenAI's Batch statuses."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """The batch is over (OpenAI's final statuses); only a retry moves it on."""
        return self in BATCH_FINISHED

    @property
    def running(self) -> bool:
        """Its generations are loading or running (it counts them as they finish)."""
        return self in BATCH_RUNNING


class FileStatus(StrEnum):
    PROCESSED = "processed"


class EventState(StrEnum):
    """A webhook event's delivery state in the outbox."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.IN_PROGRESS, State.FAILED}),
    State.IN_PROGRESS: frozenset({State.SUCCESS, State.FAILED, State.QUEUED}),
    State.SUCCESS: frozenset(),
    # backburner's batch retry queues a finished batch's failed requests again
    State.FAILED: frozenset({State.QUEUED}),
}

GROUP_TRANSITIONS: dict[GroupStatus, frozenset[GroupStatus]] = {
    GroupStatus.IN_PROGRESS: frozenset(
        {GroupStatus.COMPLETED, GroupStatus.CANCELLED, GroupStatus.EXPIRED}
    ),
    GroupStatus.COMPLETED: frozenset(),
    GroupStatus.CANCELLED: frozenset(),
    GroupStatus.EXPIRED: frozenset(),
}

BATCH_TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset(
        {BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.CANCELLING}
    ),
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.FINALIZING, BatchStatus.CANCELLING}),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED, BatchStatus.EXPIRED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED, BatchStatus.FAILED}),
    BatchStatus.COMPLETED: frozenset({BatchStatus.IN_PROGRESS}),  # retry
    BatchStatus.EXPIRED: frozenset({BatchStatus.IN_PROGRESS}),  # retry
    BatchStatus.CANCELLED: frozenset({BatchStatus.IN_PROGRESS}),  # retry
    BatchStatus.FAILED: frozenset(),
}

FILE_TRANSITIONS: dict[FileStatus, frozenset[FileStatus]] = {
    FileStatus.PROCESSED: frozenset(),
}

EVENT_TRANSITIONS: dict[EventState, frozenset[EventState]] = {
    # an attempt that will be retried leaves the event pending; a redelivery makes it pending
    EventState.PENDING: frozenset({EventState.PENDING, EventState.DELIVERED, EventState.FAILED}),
    EventState.DELIVERED: frozenset({EventState.PENDING}),
    EventState.FAILED: frozenset({EventState.PENDING}),
}

# OpenAI's final statuses: the batch is over (a retry may still reopen it)
BATCH_FINISHED: tuple[BatchStatus, ...] = (
    BatchStatus.FAILED,
    BatchStatus.COMPLETED,
    BatchStatus.EXPIRED,
    BatchStatus.CANCELLED,
)
# statuses in which a batch's generations load and run, and count against it as they finish
BATCH_RUNNING: tuple[BatchStatus, ...] = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)

UNFINISHED: tuple[State, ...] = (State.QUEUED, State.IN_PROGRESS)

S = TypeVar("S", State, GroupStatus, BatchStatus, FileStatus, EventState)

TABLES: Mapping[type[StrEnum], Mapping[Any, frozenset[Any]]] = {
    State: TRANSITIONS,
    GroupStatus: GROUP_TRANSITIONS,
    BatchStatus: BATCH_TRANSITIONS,
    FileStatus: FILE_TRANSITIONS,
    EventState: EVENT_TRANSITIONS,
}


def can_transition(src: S, dst: S) -> bool:
    return dst in TABLES[type(src)][src]


def sources(target: S, among: Iterable[S] | None = None) -> tuple[S, ...]:
    """The statuses that may move to ``target``, in declaration order; with ``among``, only
    those of them (an operation that starts from fewer statuses than the table allows)."""
    table = TABLES[type(target)]
    allowed = set(table) if among is None else set(among)
    return tuple(s for s in table if s in allowed and target in table[s])


class StateMessage:
    """The stateMessage strings backburner writes."""

    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    CANCELLED = "Cancelled"
    EXPIRED = "Expired"
