"""Lease tokens for tests that drive ``store.work`` by hand: one token held for many ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from backburner.core.outcome import Outcome
from backburner.store import Store


def held(lease: str, ids: Iterable[str]) -> dict[str, str]:
    """``ids``, each held under ``lease`` (the token a test's claim was given)."""
    return dict.fromkeys(ids, lease)


async def finish_as(store: Store, lease: str, outcomes: Sequence[Outcome]) -> list[str]:
    """``store.work.finish`` for outcomes all claimed under ``lease``."""
    return await store.work.finish(held(lease, [o.generation_id for o in outcomes]), outcomes)
