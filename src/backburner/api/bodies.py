"""Reading request bodies: size-limited, JSON, with clear errors."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import Request

from backburner.errors import InvalidRequest, PayloadTooLarge


async def read_raw(request: Request, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes:
            raise PayloadTooLarge(
                f"request body is larger than the limit of {max_bytes} bytes",
                code="body_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise InvalidRequest(
        f"the request body is not valid JSON: {name} is not a JSON number", param="body"
    )


async def read_json(request: Request, max_bytes: int) -> tuple[Any, bytes]:
    raw = await read_raw(request, max_bytes)
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object", param="body")
    try:
        return json.loads(raw, parse_constant=_no_constants), raw
    except InvalidRequest:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", param="body") from exc


def body_hash(path: str, raw: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\0" + raw).hexdigest()
