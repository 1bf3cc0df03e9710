"""One claim of a lane: in prefix runs from a window of the fair order, or in plain fair order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from backburner.core.prefix import Candidate
from backburner.scheduler.prefix_runs import PrefixRuns
from backburner.schemas.generation import GenerationRecord
from backburner.store.work import Work


async def claim(
    work: Work,
    lease: str,
    models: list[str],
    n: int,
    *,
    lease_seconds: float,
    horizon: float,
    runs: PrefixRuns | None,
    window: int,
    allowed: Callable[[str | None], bool] | None,
) -> list[GenerationRecord]:
    """Claim up to ``n`` under the lease token ``lease``. With ``runs``, picks come from the
    first ``window`` of the fair order (only prefixes ``allowed`` on this lane, when given);
    picks the claim did not get are not running."""
    if runs is None:
        return await work.claim(lease, models, n, lease_seconds, horizon=horizon)
    picked: list[Candidate] = []

    def choose(seen: Sequence[Candidate], k: int) -> Sequence[Candidate]:
        if allowed is not None:  # a replica takes its own prefixes (and spilled ones)
            seen = [c for c in seen if allowed(c.prefix_key)]
        picked[:] = runs.choose(seen, k)
        return picked

    claimed: list[GenerationRecord] = []
    try:
        claimed = await work.claim(
            lease, models, n, lease_seconds, choose=choose, window=window, horizon=horizon
        )
        return claimed
    finally:
        got = {g.id for g in claimed}
        for c in picked:
            if c.id not in got:
                runs.finished(c.prefix_key)
