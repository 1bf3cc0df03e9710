"""Standard Webhooks signatures (pure): secrets and the three ``webhook-*`` headers.

The HMAC itself is the ``standardwebhooks`` package's; this module only chooses the secret format
and turns a delivery into headers. A receiver verifies with any Standard Webhooks library::

    standardwebhooks.Webhook(secret).verify(body, headers)
"""

from __future__ import annotations

import base64
import math
import secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and the base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def _utc(ts: datetime) -> datetime:
    # standardwebhooks' sign() *replaces* tzinfo with UTC rather than converting, so an aware
    # datetime in another zone would be signed with the wrong epoch: convert first.
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def signature_headers(
    secret: str, message_id: str, timestamp: datetime, body: bytes
) -> dict[str, str]:
    """``webhook-id``, ``webhook-timestamp`` (epoch seconds) and ``webhook-signature`` (v1,...).

    ``body`` must be exactly the bytes sent (UTF-8 JSON); ``message_id`` stays the same across
    retries of one event so receivers can deduplicate.
    """
    ts = _utc(timestamp)
    signature: str = Webhook(secret).sign(message_id, ts, body.decode("utf-8"))
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(math.floor(ts.timestamp())),
        "webhook-signature": signature,
    }
