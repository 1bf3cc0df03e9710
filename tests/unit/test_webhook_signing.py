"""webhooks.signing and schemas.events: Standard Webhooks signatures, SPEC section 6 bodies."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from backburner.core.states import GroupStatus, Kind, State
from backburner.schemas import events
from backburner.schemas.generation import GenerationRecord, GroupRecord
from backburner.webhooks.signing import new_secret, signature_headers

# --------------------------------------------------------------------------- signing

# The published Standard Webhooks test vector (standard-webhooks spec; svix test_sign_function).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_PAYLOAD = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_published_test_vector() -> None:
    ts = datetime.fromtimestamp(VECTOR_TS, UTC)
    assert signature_headers(VECTOR_SECRET, VECTOR_ID, ts, VECTOR_PAYLOAD) == {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIGNATURE,
    }


@pytest.mark.parametrize(
    "ts",
    [
        datetime.fromtimestamp(VECTOR_TS, timezone(timedelta(hours=5, minutes=30))),
        datetime.fromtimestamp(VECTOR_TS, timezone(timedelta(hours=-8))),
        datetime.fromtimestamp(VECTOR_TS, UTC).replace(tzinfo=None),  # naive means UTC
        datetime.fromtimestamp(VECTOR_TS + 0.999, UTC),  # sub-second part is dropped
    ],
)
def test_timestamp_zone_does_not_change_the_signature(ts: datetime) -> None:
    # standardwebhooks' sign() replaces tzinfo instead of converting; we must convert first.
    headers = signature_headers(VECTOR_SECRET, VECTOR_ID, ts, VECTOR_PAYLOAD)
    assert headers["webhook-timestamp"] == str(VECTOR_TS)
    assert headers["webhook-signature"] == VECTOR_SIGNATURE


def test_new_secret_format_and_roundtrip() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 24
    assert new_secret() != secret

    body = json.dumps({"event": "webhook.test", "text": "héllo ✓"}, ensure_ascii=False).encode()
    headers = signature_headers(secret, "evt_1", datetime.now(UTC), body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == json.loads(body)

    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


# --------------------------------------------------------------------------- events

NOW = datetime(2026, 1, 20, 12, 0, 5, 123456, tzinfo=UTC)
T0 = datetime(2026, 1, 20, 12, 0, 0, tzinfo=UTC)
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"k": 1}}
RESPONSE = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}


def gen(
    gid: str = "GEN_aaaaaaaaaaaaaaaaaa",
    state: State = State.SUCCESS,
    kind: Kind = Kind.CHAT,
    **kw: Any,
) -> GenerationRecord:
    fields: dict[str, Any] = {
        "id": gid,
        "tenant": "t",
        "kind": kind,
        "model": "m",
        "request": REQUEST,
        "state": state,
        "state_message": "Completed" if state is State.SUCCESS else "boom",
        "attempts": 1,
        "created_at": T0,
        "expires_at": T0 + timedelta(hours=72),
        "response": RESPONSE,
        "dispatched_at": T0 + timedelta(seconds=3),
        "finished_at": T0 + timedelta(seconds=4),
    }
    fields.update(kw)
    return GenerationRecord(**fields)


def test_event_names() -> None:
    assert tuple(events.EventName) == (
        "generation.completed",
        "async-embedding.completed",
        "slow-group.completed",
        "webhook.test",
        "batch.completed",
    )


def test_generation_completed_success_exact_body() -> None:
    body = events.generation_completed("WH1", gen(), NOW)
    assert body == {
        "event": "generation.completed",
        "timestamp": "2026-01-20T12:00:05.123Z",
        "webhook_id": "WH1",
        "webhookId": "WH1",
        "generation_id": "GEN_aaaaaaaaaaaaaaaaaa",
        "generationId": "GEN_aaaaaaaaaaaaaaaaaa",
        "data": {
            "state": "Success",
            "stateMessage": "Completed",
            "request": REQUEST,
            "response": RESPONSE,
            "dispatchedAt": "2026-01-20T12:00:03.000Z",
            "finishedAt": "2026-01-20T12:00:04.000Z",
        },
    }
    json.dumps(body)  # serialisable as is


def test_generation_completed_failed_has_no_response_key() -> None:
    # Even with a stored response, a non-Success generation never shows it (absent, not null).
    body = events.generation_completed("WH1", gen(state=State.FAILED), NOW)
    assert "response" not in body["data"]
    assert body["data"]["state"] == "Failed"
    assert body["data"]["stateMessage"] == "boom"


def test_generation_completed_absent_timestamps() -> None:
    g = gen(state=State.FAILED, response=None, dispatched_at=None, finished_at=None)
    data = events.generation_completed("WH1", g, NOW)["data"]
    assert set(data) == {"state", "stateMessage", "request"}


def test_embedding_event_name() -> None:
    g = gen(kind=Kind.EMBEDDING, response={"object": "list", "data": []})
    body = events.generation_completed("WH1", g, NOW)
    assert body["event"] == "async-embedding.completed"
    assert body["generationId"] == g.id


def test_group_completed_exact_body_in_submission_order() -> None:
    group = GroupRecord(
        id="GRP_aaaaaaaaaaaaaaaaaa",
        tenant="t",
        kind=Kind.CHAT,
        size=3,
        status=GroupStatus.COMPLETED,
        metadata=None,
        webhook_id="WH2",
        created_at=T0,
        expires_at=T0 + timedelta(hours=72),
    )
    g0 = gen("G0", group_id=group.id, group_index=0, custom_id="req-001")
    g1 = gen("G1", State.FAILED, group_id=group.id, group_index=1, custom_id="req-002")
    g2 = gen("G2", group_id=group.id, group_index=2, custom_id=None, finished_at=None)
    body = events.group_completed("WH2", group, [g2, g0, g1], NOW)
    assert body == {
        "event": "slow-group.completed",
        "timestamp": "2026-01-20T12:00:05.123Z",
        "webhook_id": "WH2",
        "webhookId": "WH2",
        "group_id": "GRP_aaaaaaaaaaaaaaaaaa",
        "groupId": "GRP_aaaaaaaaaaaaaaaaaa",
        "data": {
            "group_size": 3,
            "status": "completed",
            "summary": {"success": 2, "failed": 1},
            "generations": [
                {
                    "generationId": "G0",
                    "customId": "req-001",
                    "state": "Success",
                    "stateMessage": "Completed",
                    "request": REQUEST,
                    "response": RESPONSE,
                    "finishedAt": "2026-01-20T12:00:04.000Z",
                },
                {
                    "generationId": "G1",
                    "customId": "req-002",
                    "state": "Failed",
                    "stateMessage": "boom",
                    "request": REQUEST,
                    "finishedAt": "2026-01-20T12:00:04.000Z",
                },
                {
                    "generationId": "G2",
                    "customId": None,
                    "state": "Success",
                    "stateMessage": "Completed",
                    "request": REQUEST,
                    "response": RESPONSE,
                },
            ],
        },
    }


def test_webhook_test_event() -> None:
    body = events.webhook_test("WH3", NOW)
    assert body["event"] == "webhook.test"
    assert body["timestamp"] == "2026-01-20T12:00:05.123Z"
    assert body["webhook_id"] == body["webhookId"] == "WH3"
    assert isinstance(body["data"], dict)


def test_batch_completed_event() -> None:
    batch = {"id": "batch_1", "object": "batch", "status": "completed", "created_at": 1}
    body = events.batch_completed("WH4", batch, NOW)
    assert body == {
        "event": "batch.completed",
        "timestamp": "2026-01-20T12:00:05.123Z",
        "webhook_id": "WH4",
        "webhookId": "WH4",
        "batch_id": "batch_1",
        "batchId": "batch_1",
        "data": batch,
    }
    # Sent to a batch's own webhook_url: no registered webhook, so no webhook id keys at all.
    bare = events.batch_completed(None, batch, NOW)
    assert "webhook_id" not in bare and "webhookId" not in bare
    assert events.headers_for(bare) == {
        "X-Inference-Event": "batch.completed",
        "X-Inference-Batch-ID": "batch_1",
    }


def test_headers_for() -> None:
    assert events.headers_for(events.generation_completed("WH1", gen(), NOW)) == {
        "X-Inference-Event": "generation.completed",
        "X-Inference-Webhook-ID": "WH1",
        "X-Inference-Generation-ID": "GEN_aaaaaaaaaaaaaaaaaa",
    }
    group = GroupRecord("GRP", "t", Kind.CHAT, 1, GroupStatus.COMPLETED, None, "WH2", T0, T0)
    assert events.headers_for(events.group_completed("WH2", group, [gen()], NOW)) == {
        "X-Inference-Event": "slow-group.completed",
        "X-Inference-Webhook-ID": "WH2",
        "X-Inference-Group-ID": "GRP",
    }
    assert events.headers_for(events.webhook_test("WH3", NOW)) == {
        "X-Inference-Event": "webhook.test",
        "X-Inference-Webhook-ID": "WH3",
    }
