"""The only place with SQL: tables, queries, claims and migrations."""

from backburner.store.store import IdempotencyRace, Store

__all__ = ["IdempotencyRace", "Store"]
