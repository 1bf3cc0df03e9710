"""index generations by tenant, state and deadline (earliest deadline first inside a tenant's
turns; it also serves what (tenant, state) did) and by finish time (the pace of background
work); groups by status and deadline (open groups, earliest first)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 19:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_tenant_state")
        batch_op.create_index(
            "ix_generations_tenant_state_expires_at",
            ["tenant", "state", "expires_at"],
            unique=False,
        )
        batch_op.create_index("ix_generations_finished_at", ["finished_at"], unique=False)
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.create_index("ix_groups_status_expires_at", ["status", "expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_index("ix_groups_status_expires_at")
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_finished_at")
        batch_op.drop_index("ix_generations_tenant_state_expires_at")
        batch_op.create_index("ix_generations_tenant_state", ["tenant", "state"], unique=False)
