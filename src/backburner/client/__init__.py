"""A typed Python client for backburner, for what the OpenAI SDK does not cover: slow submits that
answer with generation ids, groups, generation retrieval, waiting with backoff, webhooks, and the
files and batches calls the command line needs (docs/client.md).

It speaks HTTP only (httpx) and parses answers with :mod:`backburner.schemas`; it never imports
the server's packages (an import-linter contract holds it to that)::

    from backburner.client import Client

    with Client("http://127.0.0.1:8000", api_key="bb-...") as bb:
        gid = bb.submit({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}).id
        print(bb.wait_generation(gid).response)
"""

from backburner.client._core import (
    APIConnectionError,
    BackburnerAPIError,
    Backoff,
    ObjectKind,
    Snapshot,
    WaitTimeout,
)
from backburner.client.aio import AsyncClient
from backburner.client.sync import Client

__all__ = [
    "APIConnectionError",
    "AsyncClient",
    "BackburnerAPIError",
    "Backoff",
    "Client",
    "ObjectKind",
    "Snapshot",
    "WaitTimeout",
]
