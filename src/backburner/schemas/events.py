"""Webhook events: their names, their bodies, and the headers that go with them.

Bodies are plain dicts ready to serialise. Every body has ``event``, ``timestamp`` (ISO 8601 UTC,
``Z``) and ``data``; the ids sit at the top level in snake_case with camelCase twins beside them
(``webhook_id``/``webhookId``, ``generation_id``/``generationId``, ``group_id``/``groupId``,
``batch_id``/``batchId``). Generation data follows the Generation rules: ``response`` only on
Success, ``dispatchedAt`` and ``finishedAt`` absent (never null) until they happen.

The store builds these bodies when it writes an event to the outbox, in the transaction of the
change that causes it; the webhooks package reads them back to deliver them.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from backburner.core.clock import iso
from backburner.core.states import Kind, State
from backburner.schemas.generation import GenerationRecord, GroupRecord


class EventName(StrEnum):
    """Every event backburner sends; the values are wire names."""

    GENERATION_COMPLETED = "generation.completed"
    EMBEDDING_COMPLETED = "async-embedding.completed"
    GROUP_COMPLETED = "slow-group.completed"
    WEBHOOK_TEST = "webhook.test"
    BATCH_COMPLETED = "batch.completed"


# Top-level id keys and the header each one travels in.
_ID_HEADERS: tuple[tuple[str, str], ...] = (
    ("webhook_id", "X-Inference-Webhook-ID"),
    ("generation_id", "X-Inference-Generation-ID"),
    ("group_id", "X-Inference-Group-ID"),
    ("batch_id", "X-Inference-Batch-ID"),
)


def _envelope(event: EventName, webhook_id: str | None, now: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {"event": event.value, "timestamp": iso(now)}
    if webhook_id is not None:
        out["webhook_id"] = webhook_id
        out["webhookId"] = webhook_id
    return out


def _outcome(generation: GenerationRecord) -> dict[str, Any]:
    """state, stateMessage, request and, when they exist, response."""
    out: dict[str, Any] = {
        "state": generation.state.value,
        "stateMessage": generation.state_message,
        "request": generation.request,
    }
    if generation.state is State.SUCCESS and generation.response is not None:
        out["response"] = generation.response
    return out


def generation_event(generation: GenerationRecord) -> EventName:
    """``async-embedding.completed`` for an embedding, else ``generation.completed``."""
    if generation.kind is Kind.EMBEDDING:
        return EventName.EMBEDDING_COMPLETED
    return EventName.GENERATION_COMPLETED


def generation_completed(
    webhook_id: str, generation: GenerationRecord, now: datetime
) -> dict[str, Any]:
    """``generation.completed`` (``async-embedding.completed`` for an embedding)."""
    out = _envelope(generation_event(generation), webhook_id, now)
    out["generation_id"] = generation.id
    out["generationId"] = generation.id
    data = _outcome(generation)
    if generation.dispatched_at is not None:
        data["dispatchedAt"] = iso(generation.dispatched_at)
    if generation.finished_at is not None:
        data["finishedAt"] = iso(generation.finished_at)
    out["data"] = data
    return out


def _group_item(generation: GenerationRecord) -> dict[str, Any]:
    item: dict[str, Any] = {"generationId": generation.id, "customId": generation.custom_id}
    item.update(_outcome(generation))
    if generation.finished_at is not None:
        item["finishedAt"] = iso(generation.finished_at)
    return item


def group_completed(
    webhook_id: str, group: GroupRecord, gens: list[GenerationRecord], now: datetime
) -> dict[str, Any]:
    """``slow-group.completed``: every generation in submission order, with a summary."""
    ordered = sorted(gens, key=lambda g: (g.group_index is None, g.group_index or 0))
    out = _envelope(EventName.GROUP_COMPLETED, webhook_id, now)
    out["group_id"] = group.id
    out["groupId"] = group.id
    out["data"] = {
        "group_size": group.size,
        "status": group.status.value,
        "summary": {
            "success": sum(1 for g in ordered if g.state is State.SUCCESS),
            "failed": sum(1 for g in ordered if g.state is State.FAILED),
        },
        "generations": [_group_item(g) for g in ordered],
    }
    return out


def webhook_test(webhook_id: str, now: datetime) -> dict[str, Any]:
    """``webhook.test``, sent by ``POST /v1/webhooks/{id}/test``."""
    out = _envelope(EventName.WEBHOOK_TEST, webhook_id, now)
    out["data"] = {"message": "This is a test event from backburner."}
    return out


def batch_completed(webhook_id: str | None, batch: dict[str, Any], now: datetime) -> dict[str, Any]:
    """``batch.completed``; ``webhook_id`` is None when sent to a batch's own ``webhook_url``."""
    out = _envelope(EventName.BATCH_COMPLETED, webhook_id, now)
    batch_id = batch.get("id")
    if batch_id is not None:
        out["batch_id"] = batch_id
        out["batchId"] = batch_id
    out["data"] = batch
    return out


def headers_for(payload: dict[str, Any]) -> dict[str, str]:
    """The ``X-Inference-*`` headers that go with a body built here."""
    headers = {"X-Inference-Event": str(payload["event"])}
    for key, header in _ID_HEADERS:
        value = payload.get(key)
        if value is not None:
            headers[header] = str(value)
    return headers
