"""Backends register as plugins: entry points in the ``backburner.backends`` group.

The built-in ``openai`` and ``llamacpp`` backends are registered by backburner's own pyproject
through the same path a third-party package uses.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

from backburner.backends.base import Backend
from backburner.config import BackendSettings

GROUP = "backburner.backends"


def available_types() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=GROUP))


def backend_factory(type_name: str) -> Callable[[BackendSettings], Any]:
    for ep in importlib.metadata.entry_points(group=GROUP):
        if ep.name == type_name:
            factory: Callable[[BackendSettings], Any] = ep.load()
            return factory
    raise ValueError(
        f"unknown backend type '{type_name}'; installed types: {', '.join(available_types())}"
    )


def build_backend(settings: BackendSettings) -> Backend:
    backend = backend_factory(settings.type)(settings)
    if not isinstance(backend, Backend):
        raise TypeError(f"backend type '{settings.type}' does not implement the Backend protocol")
    return backend
