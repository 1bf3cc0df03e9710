"""Retry policy: exponential backoff with full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base_seconds: float = 1.0
    cap_seconds: float = 60.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempt``-th failed try (1-based)."""
        raw = min(self.cap_seconds, self.base_seconds * (2 ** max(0, attempt - 1)))
        r = rng.random() if rng is not None else random.random()
        return float(raw * (1 - self.jitter + self.jitter * r))


def should_retry(attempts: int, max_attempts: int, retryable: bool) -> bool:
    return retryable and attempts < max_attempts
