"""Path and query parameters: text the store can look up.

No id holds a NUL character, and PostgreSQL refuses one anywhere in a query, so a path that names
an object with one is answered 404 and a query parameter holding one 400, before a route reads
the store. Every route depends on :func:`lookup_safe` (the app factory installs it).
"""

from __future__ import annotations

from fastapi import Request

from backburner.errors import InvalidRequest, NotFound


async def lookup_safe(request: Request) -> None:
    for name, value in request.path_params.items():
        if isinstance(value, str) and "\x00" in value:
            raise NotFound(
                f"No object with this {name}: ids never hold a NUL character.", param=name
            )
    for name, value in request.query_params.multi_items():
        if "\x00" in value:
            raise InvalidRequest(f"{name}: must not contain NUL characters", param=name)
