"""The only place with SQL: tables, queries, claims and migrations."""

from backburner.store.idempotency import IdempotencyRace
from backburner.store.store import Store

__all__ = ["IdempotencyRace", "Store"]
