"""Reading request bodies: size-limited, JSON, with clear errors; and how a route that reads its
body itself declares it in the OpenAPI document.

Routes read the raw body rather than take a model in their signature: it is size-limited as it
streams in, hashed as sent for ``Idempotency-Key``, stored exactly as sent (unknown fields and all),
refused when it holds non-finite numbers, and checked together with what needs the server (served
models, known webhooks) so that every problem is reported in one answer. The model that validates
it is the one :func:`json_body` puts in the document.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from backburner.api.errors import describe
from backburner.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from backburner.schemas.validation import JsonValueError, load_json


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


def require_json(request: Request) -> None:
    """JSON routes take JSON only. A browser may send a cross-site ``text/plain`` or form POST
    without asking first; refusing other content types keeps such a page from submitting work."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        shown = media or "none"
        raise UnsupportedMediaType(
            f"send the body as JSON with Content-Type: application/json (got {shown})",
            param="content-type",
            code="unsupported_media_type",
        )


async def read_json(request: Request, max_bytes: int) -> tuple[Any, bytes]:
    """The body's JSON, exactly as sent, and its raw bytes."""
    require_json(request)
    raw = await read_raw(request, max_bytes)
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object", param="body")
    try:
        return load_json(raw), raw
    except JsonValueError as exc:
        raise InvalidRequest(
            f"{exc.path or 'the request body'} {exc.message}", param=exc.path or "body"
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", param="body") from exc


def body_hash(path: str, raw: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\0" + raw).hexdigest()


def inline_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place: an operation's own schema cannot point
    into the document's components (none of these models is recursive)."""
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        out = {k: resolve(v) for k, v in node.items() if k != "$ref"}
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return {**resolve(defs[ref.removeprefix("#/$defs/")]), **out}
        return out

    resolved: dict[str, Any] = resolve(schema)
    return resolved


UNSUPPORTED_MEDIA: dict[str, Any] = {
    "description": describe(415),
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
}
"""The 415 of :func:`require_json`, as the OpenAPI document declares it (the envelope)."""


def json_body(model: type[BaseModel], media_type: str = "application/json") -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the request body of a route that reads its body
    itself (and validates it with ``model``); a JSON body also declares the 415 of
    :func:`require_json`. The model's ``examples`` are shown in /docs and /redoc."""
    schema = inline_schema(model.model_json_schema())
    extra: dict[str, Any] = {
        "requestBody": {"required": True, "content": {media_type: {"schema": schema}}}
    }
    if media_type == "application/json":
        extra["responses"] = {"415": UNSUPPORTED_MEDIA}
    return extra
