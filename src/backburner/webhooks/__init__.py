"""Webhooks: signing (pure) and delivery (outbox worker)."""
