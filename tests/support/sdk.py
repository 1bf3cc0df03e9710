"""The HTTP client for an OpenAI SDK pointed at the in-process app.

The SDK declares its ``http_client`` as an ``httpx2.AsyncClient`` (httpx2 comes with it), so this
is one, over httpx2's ASGI transport: requests go straight to the app, nothing listens and
nothing is contacted.
"""

from __future__ import annotations

from typing import Any

import httpx2


def asgi_http_client(app: Any, base_url: str = "http://testserver") -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=base_url)
