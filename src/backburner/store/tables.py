"""Table definitions: the one schema that migrations must reproduce."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores naive UTC)."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


ID = sa.String(32)
# a generation of neither a group nor a batch: the predicate of a partial index, which queries
# repeat word for word (store/retention.py); one expression, so that SQLite cannot take the
# indexes on group_id or batch_id for it instead
STANDALONE = "coalesce(batch_id, group_id) IS NULL"

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    # an admin key sees every tenant in the dashboard and manages keys there
    sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.false()),
)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("tenant", sa.String(128), primary_key=True),
    # virtual clock for fair ordering across tenants (see store/queue.py)
    sa.Column("vclock", sa.BigInteger(), nullable=False, server_default="0"),
    # share of background capacity while others have work too (store/queue.py: fair keys)
    sa.Column("weight", sa.Float(), nullable=False, server_default="1"),
    # its own limits, JSON (schemas/tenants.py); NULL: the defaults
    sa.Column("limits", sa.Text(), nullable=True),
    # disabled: its keys stop working, its queued work is held (store/tenants.py)
    sa.Column("disabled_at", UTCDateTime(), nullable=True),
    # slow and group generations ever accepted (max_queued_generations: open is this minus
    # tenant_finished.finished; raised under this row's lock by each submission)
    sa.Column("accepted_generations", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("created_at", UTCDateTime(), nullable=True),
)

# How many of a tenant's slow and group generations became terminal: a row apart from the
# tenant's, so that finishing work never waits on a submission's lock of that row (a submission
# reading a count a finish has not yet committed sees more open than there is: it may refuse a
# moment early, never accept too much)
tenant_finished = sa.Table(
    "tenant_finished",
    metadata,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("finished", sa.BigInteger(), nullable=False, server_default="0"),
)

# Requests per minute, counted in the database so that every API process shares them: one row
# per tenant and kind of request, a GCRA cell (store/rates.py)
rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("bucket", sa.String(16), primary_key=True),
    # the theoretical arrival time, seconds since the epoch
    sa.Column("tat", sa.Float(), nullable=False),
)

# Usage per tenant, UTC day, model and lane (realtime, slow, group, batch), written with each
# outcome (store/usage.py)
usage = sa.Table(
    "usage",
    metadata,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("lane", sa.String(16), primary_key=True),
    sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("failed", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    # an admin's report over every tenant: by day
    sa.Index("ix_usage_day", "day"),
)

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("size", sa.Integer(), nullable=False),
    sa.Column("pending", sa.Integer(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("metadata", sa.Text(), nullable=True),
    sa.Column("webhook_id", ID, nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("completed_at", UTCDateTime(), nullable=True),
    # retention: finished groups, oldest first
    sa.Index("ix_groups_completed_at", "completed_at"),
    # deadlines: open groups, earliest first
    sa.Index("ix_groups_status_expires_at", "status", "expires_at"),
    # the dashboard's lists: a tenant's groups newest first, and every tenant's (an admin)
    sa.Index("ix_groups_tenant_created_at", "tenant", "created_at"),
    sa.Index("ix_groups_created_at", "created_at"),
)

generations = sa.Table(
    "generations",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("request", sa.Text(), nullable=False),
    sa.Column("response", sa.Text(), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("state_message", sa.Text(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("fair_key", sa.BigInteger(), nullable=False),
    sa.Column("available_at", UTCDateTime(), nullable=False),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("dispatched_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("group_id", ID, nullable=True),
    sa.Column("group_index", sa.Integer(), nullable=True),
    sa.Column("batch_id", ID, nullable=True),
    sa.Column("custom_id", sa.String(512), nullable=True),
    sa.Column("webhook_id", ID, nullable=True),
    # what the engine's prefix cache can share (backburner.core.prefix); NULL on older rows
    sa.Column("prefix_key", sa.String(24), nullable=True),
    sa.Index("ix_generations_state_fair_key", "state", "fair_key"),
    # a tenant's queued work by deadline (earliest first inside its turns), and its counts
    sa.Index("ix_generations_tenant_state_expires_at", "tenant", "state", "expires_at"),
    # the pace of background work: what finished lately
    sa.Index("ix_generations_finished_at", "finished_at"),
    sa.Index("ix_generations_state_model_fair_key", "state", "model", "fair_key"),
    sa.Index("ix_generations_state_lease_expires_at", "state", "lease_expires_at"),
    sa.Index("ix_generations_state_expires_at", "state", "expires_at"),
    sa.Index("ix_generations_group_id_group_index", "group_id", "group_index"),
    sa.Index("ix_generations_batch_id_state_group_index", "batch_id", "state", "group_index"),
    # retention: finished generations of neither a group nor a batch, oldest first (partial:
    # batch lines, often most rows, are not in it)
    sa.Index(
        "ix_generations_standalone_finished_at",
        "finished_at",
        postgresql_where=sa.text(STANDALONE),
        sqlite_where=sa.text(STANDALONE),
    ),
)

webhooks = sa.Table(
    "webhooks",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False, index=True),
    sa.Column("url", sa.Text(), nullable=False),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("secret", sa.String(128), nullable=False),
    sa.Column("events", sa.Text(), nullable=False),
    sa.Column("enabled", sa.Boolean(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

files = sa.Table(
    "files",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("bytes", sa.BigInteger(), nullable=False),
    sa.Column("lines", sa.BigInteger(), nullable=True),
    sa.Column("sha256", sa.String(64), nullable=True),
    # where the bytes live (blob key); NULL for output/error files produced from the store
    sa.Column("blob", sa.Text(), nullable=True),
    sa.Column("batch_id", ID, nullable=True),  # output/error files: the batch they render
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=True),
    sa.Column("deleted_at", UTCDateTime(), nullable=True),
    sa.Index("ix_files_tenant_created_at", "tenant", "created_at"),
    # retention: deleted or expired files, and the output/error files of a purged batch
    sa.Index("ix_files_deleted_at", "deleted_at"),
    sa.Index("ix_files_expires_at", "expires_at"),
    sa.Index("ix_files_batch_id", "batch_id"),
)

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("input_file_id", ID, nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("metadata", sa.Text(), nullable=True),
    sa.Column("webhook_url", sa.Text(), nullable=True),
    sa.Column("errors", sa.Text(), nullable=True),
    sa.Column("total", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("completed", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("failed", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("pending", sa.BigInteger(), nullable=False, server_default="0"),
    # lines inserted as generations so far (loading resumes from here after a crash)
    sa.Column("loaded", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("fair_start", sa.BigInteger(), nullable=True),
    # fair keys of its lines: fair_start + index * fair_step (NULL: the unit step)
    sa.Column("fair_step", sa.BigInteger(), nullable=True),
    sa.Column("output_file_id", ID, nullable=True),
    sa.Column("error_file_id", ID, nullable=True),
    # validation runs in a worker under a lease, like a generation
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    sa.Column("in_progress_at", UTCDateTime(), nullable=True),
    sa.Column("finalizing_at", UTCDateTime(), nullable=True),
    sa.Column("completed_at", UTCDateTime(), nullable=True),
    sa.Column("failed_at", UTCDateTime(), nullable=True),
    sa.Column("expired_at", UTCDateTime(), nullable=True),
    sa.Column("cancelling_at", UTCDateTime(), nullable=True),
    sa.Column("cancelled_at", UTCDateTime(), nullable=True),
    sa.Index("ix_batches_tenant_created_at", "tenant", "created_at"),
    sa.Index("ix_batches_status", "status"),
    sa.Index("ix_batches_created_at", "created_at"),
)

# The outbox: one row per event to deliver to one endpoint, written in the same transaction as the
# state change that causes it. ``id`` is the Standard Webhooks message id, stable across retries.
webhook_events = sa.Table(
    "webhook_events",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("webhook_id", ID, nullable=True),
    sa.Column("url", sa.Text(), nullable=True),  # for a batch's webhook_url (no registered hook)
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("payload", sa.Text(), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending | delivered | failed
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("delivered_at", UTCDateTime(), nullable=True),
    # the generation, group or batch the event tells of (the dashboard's detail pages)
    sa.Column("subject_id", ID, nullable=True),
    sa.Index("ix_webhook_events_subject_id", "subject_id"),
    sa.Index("ix_webhook_events_state_next_attempt_at", "state", "next_attempt_at"),
    sa.Index("ix_webhook_events_webhook_id_created_at", "webhook_id", "created_at"),
)

# The delivery log: every attempt of every event.
webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("event_id", sa.String(40), nullable=False, index=True),
    sa.Column("webhook_id", ID, nullable=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("status_code", sa.Integer(), nullable=True),
    sa.Column("duration_ms", sa.Integer(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index("ix_webhook_attempts_webhook_id_created_at", "webhook_id", "created_at"),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(256), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("status_code", sa.Integer(), nullable=False),
    sa.Column("response", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False, index=True),
)
