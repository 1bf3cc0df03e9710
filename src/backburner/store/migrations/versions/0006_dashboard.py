"""the dashboard: admin keys, webhook events by subject, groups and batches newest first

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject_id", sa.String(32), nullable=True))
        batch_op.create_index("ix_webhook_events_subject_id", ["subject_id"], unique=False)
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.create_index("ix_groups_tenant_created_at", ["tenant", "created_at"], unique=False)
        batch_op.create_index("ix_groups_created_at", ["created_at"], unique=False)
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index("ix_batches_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index("ix_batches_created_at")
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_index("ix_groups_created_at")
        batch_op.drop_index("ix_groups_tenant_created_at")
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_events_subject_id")
        batch_op.drop_column("subject_id")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("admin")
