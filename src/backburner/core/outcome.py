"""What running a generation produced, as the scheduler reports it to the store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from backburner.core.states import State


@dataclass(frozen=True, slots=True)
class Outcome:
    generation_id: str
    state: State  # SUCCESS, FAILED, or QUEUED for "retry at retry_at"
    message: str
    response: dict[str, Any] | None = None
    retry_at: datetime | None = None
    # False for work given back unfinished (preempted for realtime): the try is not counted
    count_attempt: bool = True


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An Idempotency-Key and the answer to store with the work it creates, atomically."""

    key: str
    request_hash: str
    status_code: int
    response: dict[str, Any]
