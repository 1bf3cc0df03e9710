"""Recording outcomes: a group in one transaction; what the store refuses, alone and as Failed.

A group the store will not take is tried once more, then split in halves until an outcome it
refuses is alone: that one is recorded as Failed ("the engine's answer could not be stored"),
without what it held; the others as they are. Only a database that cannot be reached keeps the
writer on the same write (waiting, losing nothing).
"""

from __future__ import annotations

import asyncio
import logging

from backburner.core.outcome import Outcome
from backburner.core.states import State
from backburner.errors import ServiceUnavailable
from backburner.store import Store
from backburner.store.codec import Unstorable, printable

log = logging.getLogger("backburner.worker")


def _said(exc: Exception) -> str:
    """What an error says, for a message: the reason of an :class:`Unstorable`, else the first
    line of the error (a database error's later lines quote the statement and its values)."""
    if isinstance(exc, Unstorable):
        return exc.reason
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class Recorder:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def record(
        self, leases: dict[str, str], outcomes: list[Outcome], *, retry: bool
    ) -> tuple[list[Outcome], list[str]]:
        """The outcomes written (a refused one replaced by its Failed outcome; one that could
        not be written at all left out) and the groups that completed."""
        try:
            return outcomes, await self._finish(leases, outcomes, retry=retry)
        except Exception as exc:
            if len(outcomes) == 1:
                return await self._refused(leases, outcomes[0], exc)
            log.warning(
                "recording %d outcomes failed (%s); recording them in halves",
                len(outcomes),
                _said(exc),
            )
            half = len(outcomes) // 2
            first, first_groups = await self.record(leases, outcomes[:half], retry=False)
            second, second_groups = await self.record(leases, outcomes[half:], retry=False)
            return first + second, first_groups + second_groups

    async def _refused(
        self, leases: dict[str, str], outcome: Outcome, exc: Exception
    ) -> tuple[list[Outcome], list[str]]:
        failed = Outcome(
            outcome.generation_id,
            State.FAILED,
            f"Failed: the engine's answer could not be stored: {printable(_said(exc), 200)}",
        )
        log.warning(
            "generation %s: its outcome (%s) could not be recorded: %s; recording it as Failed",
            outcome.generation_id,
            outcome.state.value,
            _said(exc),
        )
        try:
            return [failed], await self._finish(leases, [failed], retry=True)
        except Exception:
            log.exception(
                "generation %s: not even its failure could be recorded; it is let go, and"
                " maintenance takes it back when its lease runs out",
                outcome.generation_id,
            )
            return [], []

    async def _finish(
        self, leases: dict[str, str], outcomes: list[Outcome], *, retry: bool
    ) -> list[str]:
        """``store.work.finish``, waited out while the database cannot be reached; with
        ``retry`` another failure is tried once more before it is raised."""
        delay = 0.1
        again = retry
        while True:
            try:
                return await self.store.work.finish(leases, outcomes)
            except ServiceUnavailable as exc:
                log.warning("recording %d outcomes: %s; waiting", len(outcomes), exc.message)
            except Unstorable:
                raise  # refused before reaching the database: the same again would be too
            except Exception:
                if not again:
                    raise
                again = False
                log.warning("recording %d outcomes failed; once more", len(outcomes), exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
