"""indexes for retention: finished standalone generations by finish time (partial), finished groups by
completion time, files by deletion and expiry time and by the batch they render

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_generations_standalone_finished_at",
            ["finished_at"],
            unique=False,
            postgresql_where=sa.text("coalesce(batch_id, group_id) IS NULL"),
            sqlite_where=sa.text("coalesce(batch_id, group_id) IS NULL"),
        )
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.create_index("ix_groups_completed_at", ["completed_at"], unique=False)
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index("ix_files_deleted_at", ["deleted_at"], unique=False)
        batch_op.create_index("ix_files_expires_at", ["expires_at"], unique=False)
        batch_op.create_index("ix_files_batch_id", ["batch_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index("ix_files_batch_id")
        batch_op.drop_index("ix_files_expires_at")
        batch_op.drop_index("ix_files_deleted_at")
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_index("ix_groups_completed_at")
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_standalone_finished_at")
