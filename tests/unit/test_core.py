"""core: the state machine, retry policy, ids and the wire time format."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from backburner.core.clock import epoch, iso
from backburner.core.ids import ALPHABET, ID_LENGTH, new_api_key, new_id
from backburner.core.retry import Backoff, should_retry
from backburner.core.states import (
    TRANSITIONS,
    UNFINISHED,
    GroupStatus,
    State,
    StateMessage,
    can_transition,
)

# ---------------------------------------------------------------------------- states


def test_state_strings_are_inference_net_compatible() -> None:
    assert [s.value for s in State] == ["Queued", "In Progress", "Success", "Failed"]
    assert [g.value for g in GroupStatus] == ["in_progress", "completed", "cancelled", "expired"]


def test_terminal_states() -> None:
    assert {s for s in State if s.terminal} == {State.SUCCESS, State.FAILED}
    assert set(UNFINISHED) == {State.QUEUED, State.IN_PROGRESS}


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (State.QUEUED, State.IN_PROGRESS),  # claim
        (State.QUEUED, State.FAILED),  # cancel / expire
        (State.IN_PROGRESS, State.SUCCESS),
        (State.IN_PROGRESS, State.FAILED),
        (State.IN_PROGRESS, State.QUEUED),  # retry or lost lease
        (State.FAILED, State.QUEUED),  # a batch retry (backburner's extension)
    ],
)
def test_allowed_transitions(src: State, dst: State) -> None:
    assert can_transition(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (State.QUEUED, State.SUCCESS),
        (State.QUEUED, State.QUEUED),
        (State.IN_PROGRESS, State.IN_PROGRESS),
        *[(State.SUCCESS, d) for d in State],
        *[(State.FAILED, d) for d in State if d is not State.QUEUED],
    ],
)
def test_forbidden_transitions(src: State, dst: State) -> None:
    assert not can_transition(src, dst)


def test_every_state_has_a_transition_entry() -> None:
    assert set(TRANSITIONS) == set(State)
    for src, dsts in TRANSITIONS.items():
        # a terminal state is left only by a batch retry, back to Queued
        assert not (src.terminal and dsts - {State.QUEUED}), f"{src} is terminal but has exits"


def test_state_messages() -> None:
    assert StateMessage.QUEUED == "Queued"
    assert StateMessage.CANCELLED == "Cancelled"
    assert StateMessage.EXPIRED == "Expired"


# ---------------------------------------------------------------------------- retry


@pytest.mark.parametrize("seed", range(20))
def test_backoff_delay_is_bounded(seed: int) -> None:
    b = Backoff(base_seconds=1.0, cap_seconds=60.0, jitter=0.5)
    rng = random.Random(seed)
    for attempt in range(1, 30):
        raw = min(60.0, 2.0 ** (attempt - 1))
        d = b.delay(attempt, rng)
        assert raw * 0.5 <= d <= raw
        assert 0 < d <= 60.0


def test_backoff_grows_until_the_cap() -> None:
    b = Backoff(base_seconds=0.5, cap_seconds=10.0, jitter=0.5)
    # The same random draw each time: the delay is then monotone in the attempt number.
    delays = [b.delay(a, random.Random(7)) for a in range(1, 12)]
    assert delays == sorted(delays)
    assert delays[1] > delays[0]
    assert delays[-1] == delays[-2]  # capped
    assert delays[-1] <= 10.0


def test_backoff_without_jitter_is_exact() -> None:
    b = Backoff(base_seconds=1.0, cap_seconds=8.0, jitter=0.0)
    assert [b.delay(a) for a in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert b.delay(0) == 1.0  # attempt numbers below 1 are treated as the first


@pytest.mark.parametrize(
    ("attempts", "max_attempts", "retryable", "expected"),
    [
        (1, 3, True, True),
        (2, 3, True, True),
        (3, 3, True, False),
        (4, 3, True, False),
        (1, 3, False, False),
        (1, 1, True, False),
    ],
)
def test_should_retry(attempts: int, max_attempts: int, retryable: bool, expected: bool) -> None:
    assert should_retry(attempts, max_attempts, retryable) is expected


# ---------------------------------------------------------------------------- ids


def test_new_id_shape() -> None:
    assert ID_LENGTH == 21
    assert set(ALPHABET) == set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
    pattern = re.compile(r"^[A-Za-z0-9_-]{21}$")
    ids = [new_id() for _ in range(500)]
    assert all(pattern.match(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_new_api_key_is_random_and_prefixed() -> None:
    a, b = new_api_key(), new_api_key()
    assert a.startswith("bb-") and b.startswith("bb-")
    assert a != b
    assert len(a) >= 40


# ---------------------------------------------------------------------------- clock


def test_iso_has_milliseconds_and_z() -> None:
    ts = datetime(2026, 1, 20, 12, 0, 3, 456789, tzinfo=UTC)
    assert iso(ts) == "2026-01-20T12:00:03.456Z"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", iso(datetime.now(UTC)))


def test_iso_pads_milliseconds() -> None:
    assert iso(datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)) == "2026-01-20T12:00:00.000Z"
    assert iso(datetime(2026, 1, 20, 12, 0, 0, 7000, tzinfo=UTC)) == "2026-01-20T12:00:00.007Z"


def test_iso_converts_other_zones_and_treats_naive_as_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert iso(datetime(2026, 1, 20, 14, 0, 0, tzinfo=plus2)) == "2026-01-20T12:00:00.000Z"
    assert iso(datetime(2026, 1, 20, 12, 0, 0)) == "2026-01-20T12:00:00.000Z"


def test_epoch() -> None:
    assert epoch(datetime(1970, 1, 1, 0, 1, tzinfo=UTC)) == 60
    assert epoch(datetime(1970, 1, 1, 0, 1)) == 60
