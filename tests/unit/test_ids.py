"""Identifiers (core/ids.py)."""

from __future__ import annotations

from backburner.core.ids import ID_LENGTH, new_id


def test_an_id_never_starts_like_an_option() -> None:
    """``backburner watch ID`` must not read an id as an option: 64 symbols, so about one id in
    64 would start with ``-``; among 5,000 none does."""
    firsts = {new_id()[0] for _ in range(5000)}
    assert "-" not in firsts and len(firsts) > 50


def test_ids_are_21_symbols_of_the_alphabet() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == ID_LENGTH for i in ids)
