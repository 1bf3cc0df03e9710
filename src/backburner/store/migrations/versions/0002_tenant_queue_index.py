"""index generations by tenant and state (fair keys of a tenant with nothing queued) and by
state, model and fair key (a claim reads only its own models' queued rows, in fair order)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 13:45:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_index("ix_generations_tenant_state", ["tenant", "state"], unique=False)
        batch_op.create_index(
            "ix_generations_state_model_fair_key", ["state", "model", "fair_key"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_state_model_fair_key")
        batch_op.drop_index("ix_generations_tenant_state")
