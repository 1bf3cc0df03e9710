"""tenants: weights, limits, disabling, open counts; rate limits; usage; fair keys scaled

Fair keys were one apart per generation; they are now ``FAIR_STEP`` (1000) apart for a tenant of
weight 1, so that a weight can shorten or lengthen the step. Every open generation's key, every
tenant's virtual clock and every batch's ``fair_start`` is multiplied by 1000, which keeps the
order exactly as it was.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

STEP = 1000
OPEN = "('Queued', 'In Progress')"


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("limits", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("disabled_at", sa.DateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("accepted_generations", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("created_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fair_step", sa.BigInteger(), nullable=True))
    op.create_table(
        "rate_limits",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("bucket", sa.String(16), nullable=False),
        sa.Column("tat", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "bucket", name="pk_rate_limits"),
    )
    op.create_table(
        "tenant_finished",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("finished", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("tenant", name="pk_tenant_finished"),
    )
    op.create_table(
        "usage",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("lane", sa.String(16), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("failed", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("tenant", "day", "model", "lane", name="pk_usage"),
    )
    op.create_index("ix_usage_day", "usage", ["day"], unique=False)
    # the fair order, scaled: the same order, room for weights between the keys
    op.execute(f"UPDATE generations SET fair_key = fair_key * {STEP} WHERE state IN {OPEN}")
    op.execute(f"UPDATE tenants SET vclock = vclock * {STEP}")
    op.execute(
        f"UPDATE batches SET fair_start = fair_start * {STEP}, fair_step = {STEP}"
        " WHERE fair_start IS NOT NULL"
    )
    # a tenant exists once it has a key or submitted: rows for the tenants of keys
    op.execute(
        "INSERT INTO tenants (tenant, vclock, weight, accepted_generations)"
        " SELECT DISTINCT k.tenant, 0, 1, 0 FROM api_keys k"
        " WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.tenant = k.tenant)"
    )
    # every tenant with open work has a row (submitting made one); count what it has open (as
    # accepted, none finished yet)
    op.execute(
        "UPDATE tenants SET accepted_generations = (SELECT count(*) FROM generations g"
        f" WHERE g.tenant = tenants.tenant AND g.state IN {OPEN} AND g.batch_id IS NULL)"
    )


def downgrade() -> None:
    op.execute(f"UPDATE generations SET fair_key = fair_key / {STEP} WHERE state IN {OPEN}")
    op.execute(f"UPDATE tenants SET vclock = vclock / {STEP}")
    op.execute(f"UPDATE batches SET fair_start = fair_start / {STEP} WHERE fair_start IS NOT NULL")
    op.drop_index("ix_usage_day", table_name="usage")
    op.drop_table("usage")
    op.drop_table("rate_limits")
    op.drop_table("tenant_finished")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("fair_step")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("created_at")
        batch_op.drop_column("accepted_generations")
        batch_op.drop_column("disabled_at")
        batch_op.drop_column("limits")
        batch_op.drop_column("weight")
