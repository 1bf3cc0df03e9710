"""Identifiers: 21-character nanoid-style strings (A-Z, a-z, 0-9, ``_`` and ``-``)."""

from __future__ import annotations

import os
import secrets
import socket

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
ID_LENGTH = 21


def new_id() -> str:
    """A 21-character URL-safe random id (126 bits of entropy).

    The alphabet has exactly 64 symbols, so the low 6 bits of each random byte pick one
    uniformly (as nanoid does); this is ~10x faster than one ``secrets.choice`` per symbol,
    which matters when a million-line batch is loaded.

    The first symbol is never ``-``, so an id never reads as an option on a command line
    (``backburner watch -w3…`` would).
    """
    while True:
        out = "".join([ALPHABET[b & 63] for b in secrets.token_bytes(ID_LENGTH)])
        if out[0] != "-":
            return out


def new_api_key() -> str:
    """A new API key; only its hash is ever stored."""
    return "bb-" + secrets.token_urlsafe(32)


def lease_owner_id(role: str) -> str:
    """Who holds a lease: host, process and a random suffix, e.g. ``box:4242:worker:Ab3dE6``."""
    # the lease_owner columns hold 64 characters
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{role[:12]}:{new_id()[:6]}"
