"""core.states: every status enum has a consistent transition table, and the wire strings hold."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, cast

import pytest

from backburner.core.states import (
    BATCH_FINISHED,
    BATCH_RUNNING,
    BATCH_TRANSITIONS,
    EVENT_TRANSITIONS,
    FILE_TRANSITIONS,
    GROUP_TRANSITIONS,
    TABLES,
    TRANSITIONS,
    BatchStatus,
    EventState,
    FileStatus,
    GroupStatus,
    State,
    can_transition,
    sources,
)
from backburner.schemas import batch as batch_schema
from backburner.schemas import webhook as webhook_schema
from backburner.schemas.events import EventName

# the status every row of each kind starts in
INITIAL: dict[type[StrEnum], StrEnum] = {
    State: State.QUEUED,
    GroupStatus: GroupStatus.IN_PROGRESS,
    BatchStatus: BatchStatus.VALIDATING,
    FileStatus: FileStatus.PROCESSED,
    EventState: EventState.PENDING,
}
ENUMS = list(TABLES)


def _reachable(table: Mapping[Any, frozenset[Any]], start: Any) -> set[Any]:
    seen = {start}
    todo = deque([start])
    while todo:
        for nxt in table[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_wire_strings() -> None:
    assert [s.value for s in BatchStatus] == list(batch_schema.BATCH_STATUSES)
    assert [s.value for s in FileStatus] == ["processed"]
    assert [s.value for s in EventState] == ["pending", "delivered", "failed"]


def test_the_tables_are_the_ones_registered() -> None:
    assert {
        State: TRANSITIONS,
        GroupStatus: GROUP_TRANSITIONS,
        BatchStatus: BATCH_TRANSITIONS,
        FileStatus: FILE_TRANSITIONS,
        EventState: EVENT_TRANSITIONS,
    } == TABLES


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.__name__)
def test_table_covers_every_status_and_names_only_its_own(enum: type[StrEnum]) -> None:
    table = TABLES[enum]
    assert set(table) == set(enum)
    for src, dsts in table.items():
        assert isinstance(src, enum)
        assert all(isinstance(d, enum) for d in dsts), src


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.__name__)
def test_every_status_is_reachable_from_the_initial_one(enum: type[StrEnum]) -> None:
    assert _reachable(TABLES[enum], INITIAL[enum]) == set(enum)


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.__name__)
def test_sources_is_the_table_read_backwards(enum: type[StrEnum]) -> None:
    table = TABLES[enum]
    for target in enum:
        got = sources(cast(Any, target))
        assert set(got) == {s for s in enum if target in table[s]}
        assert list(got) == [s for s in enum if s in got]  # declaration order: stable SQL
        for src in enum:
            assert can_transition(cast(Any, src), target) == (src in got)


def test_sources_among_keeps_only_allowed_ones() -> None:
    assert sources(State.FAILED) == (State.QUEUED, State.IN_PROGRESS)
    assert sources(State.FAILED, among=[State.QUEUED]) == (State.QUEUED,)
    assert sources(State.SUCCESS, among=[State.QUEUED]) == ()
    assert sources(State.QUEUED, among=[State.IN_PROGRESS]) == (State.IN_PROGRESS,)
    assert sources(BatchStatus.IN_PROGRESS, among=BATCH_FINISHED) == (
        BatchStatus.COMPLETED,
        BatchStatus.EXPIRED,
        BatchStatus.CANCELLED,
    )
    assert sources(BatchStatus.IN_PROGRESS, among=[BatchStatus.VALIDATING]) == (
        BatchStatus.VALIDATING,
    )


def test_generation_states() -> None:
    # terminal states leave only through a batch retry, back to Queued
    for src in State:
        if src.terminal:
            assert TRANSITIONS[src] <= {State.QUEUED}
    assert sources(State.SUCCESS) == (State.IN_PROGRESS,)
    assert sources(State.IN_PROGRESS) == (State.QUEUED,)


def test_group_statuses_end_where_they_leave_in_progress() -> None:
    for status in GroupStatus:
        if status is not GroupStatus.IN_PROGRESS:
            assert GROUP_TRANSITIONS[status] == frozenset()
            assert sources(status) == (GroupStatus.IN_PROGRESS,)


def test_batch_statuses() -> None:
    assert {s.value for s in BATCH_FINISHED} == batch_schema.TERMINAL
    assert all(s.finished for s in BATCH_FINISHED)
    assert {s for s in BatchStatus if s.running} == set(BATCH_RUNNING)
    # a finished batch moves on only by a retry (failed ones not even that)
    for status in BATCH_FINISHED:
        assert BATCH_TRANSITIONS[status] <= {BatchStatus.IN_PROGRESS}
    assert BATCH_TRANSITIONS[BatchStatus.FAILED] == frozenset()
    assert sources(BatchStatus.CANCELLING) == (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    assert sources(BatchStatus.FAILED) == (BatchStatus.VALIDATING, BatchStatus.CANCELLING)
    assert sources(BatchStatus.FINALIZING) == (BatchStatus.IN_PROGRESS,)
    assert sources(BatchStatus.CANCELLED) == (BatchStatus.CANCELLING,)
    assert not can_transition(BatchStatus.COMPLETED, BatchStatus.CANCELLING)


def test_event_states() -> None:
    assert sources(EventState.DELIVERED) == (EventState.PENDING,)
    assert sources(EventState.FAILED) == (EventState.PENDING,)
    assert set(sources(EventState.PENDING)) == set(EventState)  # a redelivery


def test_event_names_agree_with_the_webhook_schema() -> None:
    assert [e.value for e in EventName] == list(webhook_schema.ALL_EVENTS)
