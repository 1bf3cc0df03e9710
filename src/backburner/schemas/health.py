"""What the operations routes answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class Readiness(BaseModel):
    """200 when the store and every backend answer, 503 otherwise (the same shape)."""

    status: Literal["ready", "not ready"]
    checks: dict[str, str]
    """``store`` and ``backend:<name>``: "ok" or the error."""
    scheduler: dict[str, Any]
    """Per lane: the background window, in-flight counts and the engine's load signals."""
