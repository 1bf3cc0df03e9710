"""Prefix runs: the order in which one engine (one lane) takes queued work.

The queue's fair order (``fair_key``, :mod:`backburner.store.queue`) says whose turn it is. Within
a window of the next ``window`` generations in that order, a lane takes work in *runs*: once a
prefix (:mod:`backburner.core.prefix`) has started on the engine, its siblings in the window
follow while they last, so the engine's prefix cache stays warm instead of cycling through every
prompt at once. Rules:

- **First alone.** A prefix new to the lane starts with one request; its siblings wait until that
  one has finished (or ``warmup_seconds`` have passed, long enough for an engine to compute the
  shared part), so the shared part is computed once and then served from the cache. Other work
  fills the slots meanwhile.
- **Few runs at once.** At most ``max_runs`` prefixes run side by side on a lane; a run ends when
  the window holds no more of its siblings.
- **Fairness first.** The head of the fair order is passed over at most ``fair_every`` times in a
  row; then it is taken whatever its prefix. So a tenant's lone request behind another tenant's
  100,000-line batch waits at most one such round, and no run can hold a lane for longer than the
  window lets it get ahead of the fair order.

Pure bookkeeping: the store hands :meth:`PrefixRuns.choose` the window (it counts its own picks),
the worker reports :meth:`finished`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backburner.core.prefix import Candidate


@dataclass
class PrefixRuns:
    max_runs: int = 2
    fair_every: int = 16
    warmup_seconds: float = 2.0
    clock: Callable[[], float] = time.monotonic
    #: prefixes running on the lane, the oldest run first
    runs: list[str] = field(default_factory=list)
    #: prefixes whose first request is still running: prefix -> (how many such, since when)
    warming: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: picks in a row that passed the head of the fair order over
    bypassed: int = 0

    def choose(self, window: Sequence[Candidate], n: int) -> list[Candidate]:
        """Up to ``n`` of ``window`` (given in fair order) to take now, in run order."""
        now = self.clock()
        for p, (_, since) in list(self.warming.items()):
            if now - since >= self.warmup_seconds:
                del self.warming[p]
        # each prefix's places in the window, in fair order: the next of a run is its first
        by_key: dict[str | None, deque[int]] = {}
        for i, c in enumerate(window):
            by_key.setdefault(c.prefix_key, deque()).append(i)
        taken_at: set[int] = set()
        taken: list[Candidate] = []
        head = 0  # the first place not taken
        while len(taken) < n and head < len(window):
            at = self._from_runs(by_key) if self.bypassed < self.fair_every else None
            if at is None:
                at = (
                    head if self.bypassed >= self.fair_every else self._head(window, head, taken_at)
                )
                if at is None:
                    break
                self._start(window[at].prefix_key)
            self.bypassed = 0 if at == head else self.bypassed + 1
            by_key[window[at].prefix_key].popleft()  # ``at`` is always its prefix's first
            taken_at.add(at)
            taken.append(window[at])
            while head in taken_at:
                head += 1
        # a run with no siblings left in view has ended
        self.runs = [r for r in self.runs if by_key.get(r) or r in self.warming]
        return taken

    def finished(self, prefix_key: str | None) -> None:
        """A generation with this prefix finished on the lane (however it ended)."""
        if prefix_key is None:
            return
        held = self.warming.get(prefix_key)
        if held is None:
            return
        if held[0] <= 1:
            del self.warming[prefix_key]
        else:
            self.warming[prefix_key] = (held[0] - 1, held[1])

    def _from_runs(self, by_key: dict[str | None, deque[int]]) -> int | None:
        for run in self.runs:
            if run in self.warming:
                continue
            places = by_key.get(run)
            if places:
                return places[0]
        return None

    def _head(self, window: Sequence[Candidate], head: int, taken_at: set[int]) -> int | None:
        """The first place in fair order whose prefix does not have to warm up first."""
        for at in range(head, len(window)):
            key = window[at].prefix_key
            if at not in taken_at and (key is None or key not in self.warming):
                return at
        return None

    def _start(self, prefix_key: str | None) -> None:
        if prefix_key is None:
            return
        if prefix_key in self.runs:
            held = self.warming.get(prefix_key)
            if held is not None:  # taken by the fairness rule while warming
                self.warming[prefix_key] = (held[0] + 1, held[1])
            return
        self.runs.append(prefix_key)
        self.warming[prefix_key] = (1, self.clock())
        if len(self.runs) > self.max_runs:
            # the oldest run that is not warming gives way
            for r in self.runs:
                if r not in self.warming:
                    self.runs.remove(r)
                    break
