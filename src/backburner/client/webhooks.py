"""Webhook management, the same for the sync and async clients (mixed into both)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backburner.client._core import M
from backburner.schemas.webhook import (
    DeliveryAttemptList,
    DeliveryQueued,
    Webhook,
    WebhookCreated,
    WebhookDeleted,
    WebhookList,
)


class SyncWebhooks:
    """``/v1/webhooks``: create, list, get, update, enable or disable, delete, test, the
    delivery log and redelivery."""

    def _call(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        raise NotImplementedError

    def create_webhook(
        self,
        url: str,
        *,
        name: str | None = None,
        events: Sequence[str] | None = None,
        enabled: bool = True,
    ) -> WebhookCreated:
        """Register a webhook; the answer holds its signing secret, this once."""
        body: dict[str, Any] = {"url": url, "enabled": enabled}
        if name is not None:
            body["name"] = name
        if events is not None:
            body["events"] = list(events)
        return self._call(WebhookCreated, "POST", "/v1/webhooks", json=body)

    def list_webhooks(self) -> WebhookList:
        return self._call(WebhookList, "GET", "/v1/webhooks")

    def get_webhook(self, webhook_id: str) -> Webhook:
        return self._call(Webhook, "GET", f"/v1/webhooks/{webhook_id}")

    def update_webhook(self, webhook_id: str, **changes: Any) -> Webhook:
        """Change ``url``, ``name``, ``events`` or ``enabled`` (only the keys given)."""
        return self._call(Webhook, "PATCH", f"/v1/webhooks/{webhook_id}", json=changes)

    def enable_webhook(self, webhook_id: str, enabled: bool = True) -> Webhook:
        return self.update_webhook(webhook_id, enabled=enabled)

    def delete_webhook(self, webhook_id: str) -> WebhookDeleted:
        return self._call(WebhookDeleted, "DELETE", f"/v1/webhooks/{webhook_id}")

    def test_webhook(self, webhook_id: str) -> DeliveryQueued:
        return self._call(DeliveryQueued, "POST", f"/v1/webhooks/{webhook_id}/test")

    def webhook_deliveries(self, webhook_id: str) -> DeliveryAttemptList:
        return self._call(DeliveryAttemptList, "GET", f"/v1/webhooks/{webhook_id}/deliveries")

    def redeliver(self, delivery_id: str) -> DeliveryQueued:
        return self._call(
            DeliveryQueued, "POST", f"/v1/webhooks/deliveries/{delivery_id}/redeliver"
        )


class AsyncWebhooks:
    """``/v1/webhooks``, awaited."""

    async def _call(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        raise NotImplementedError

    async def create_webhook(
        self,
        url: str,
        *,
        name: str | None = None,
        events: Sequence[str] | None = None,
        enabled: bool = True,
    ) -> WebhookCreated:
        """Register a webhook; the answer holds its signing secret, this once."""
        body: dict[str, Any] = {"url": url, "enabled": enabled}
        if name is not None:
            body["name"] = name
        if events is not None:
            body["events"] = list(events)
        return await self._call(WebhookCreated, "POST", "/v1/webhooks", json=body)

    async def list_webhooks(self) -> WebhookList:
        return await self._call(WebhookList, "GET", "/v1/webhooks")

    async def get_webhook(self, webhook_id: str) -> Webhook:
        return await self._call(Webhook, "GET", f"/v1/webhooks/{webhook_id}")

    async def update_webhook(self, webhook_id: str, **changes: Any) -> Webhook:
        """Change ``url``, ``name``, ``events`` or ``enabled`` (only the keys given)."""
        return await self._call(Webhook, "PATCH", f"/v1/webhooks/{webhook_id}", json=changes)

    async def enable_webhook(self, webhook_id: str, enabled: bool = True) -> Webhook:
        return await self.update_webhook(webhook_id, enabled=enabled)

    async def delete_webhook(self, webhook_id: str) -> WebhookDeleted:
        return await self._call(WebhookDeleted, "DELETE", f"/v1/webhooks/{webhook_id}")

    async def test_webhook(self, webhook_id: str) -> DeliveryQueued:
        return await self._call(DeliveryQueued, "POST", f"/v1/webhooks/{webhook_id}/test")

    async def webhook_deliveries(self, webhook_id: str) -> DeliveryAttemptList:
        return await self._call(DeliveryAttemptList, "GET", f"/v1/webhooks/{webhook_id}/deliveries")

    async def redeliver(self, delivery_id: str) -> DeliveryQueued:
        return await self._call(
            DeliveryQueued, "POST", f"/v1/webhooks/deliveries/{delivery_id}/redeliver"
        )
