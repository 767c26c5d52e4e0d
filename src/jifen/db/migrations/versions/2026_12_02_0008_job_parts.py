"""Job parts: the keys of a run shared out among several workers.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 01:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import jifen.db.base

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_parts",
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "after_key",
            sa.BigInteger(),
            autoincrement=False,
            nullable=False,
            comment="the part covers the keys (member ids) above this one",
        ),
        sa.Column(
            "last_key",
            sa.BigInteger(),
            nullable=True,
            comment="and up to this one; NULL: every key above",
        ),
        sa.Column("state", sa.String(length=16), nullable=False, comment="todo, done"),
        sa.Column(
            "figures",
            sa.Text(),
            server_default="{}",
            nullable=False,
            comment="JSON: what the part did",
        ),
        sa.Column("done_at", jifen.db.base.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["job_runs.id"], name=op.f("fk_job_parts_run_id_job_runs")
        ),
        sa.PrimaryKeyConstraint("run_id", "after_key", name=op.f("pk_job_parts")),
    )


def downgrade() -> None:
    op.drop_table("job_parts")
