"""Identifiers: 21-character nanoid-style strings (SPEC section 1)."""

from __future__ import annotations

import secrets

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
ID_LENGTH = 21


def new_id() -> str:
    """A 21-character URL-safe random id (126 bits of entropy)."""
    return "".join(secrets.choice(ALPHABET) for _ in range(ID_LENGTH))


def new_api_key() -> str:
    """A new API key; only its hash is ever stored."""
    return "bb-" + secrets.token_urlsafe(32)
