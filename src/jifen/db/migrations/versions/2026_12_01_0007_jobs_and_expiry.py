"""Jobs and expiry: job runs with their progress, and the index the expiry run reads due
lots through.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import jifen.db.base

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_runs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column(
            "program_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "run_at",
            jifen.db.base.UTCDateTime(),
            nullable=False,
            comment="the 'now' the run works for",
        ),
        sa.Column("state", sa.String(length=16), nullable=False, comment="running, done"),
        sa.Column(
            "cursor",
            sa.BigInteger(),
            server_default="0",
            nullable=False,
            comment="the last member id (or other key) a finished chunk covered",
        ),
        sa.Column("chunks", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "figures",
            sa.Text(),
            server_default="{}",
            nullable=False,
            comment="JSON: what the run did so far (accounts, lots, points…)",
        ),
        sa.Column("started_at", jifen.db.base.UTCDateTime(), nullable=False),
        sa.Column("updated_at", jifen.db.base.UTCDateTime(), nullable=False),
        sa.Column("finished_at", jifen.db.base.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_runs")),
        sa.UniqueConstraint(
            "name", "program_id", "run_at", name=op.f("uq_job_runs_name_program_id_run_at")
        ),
    )
    op.create_index(
        "ix_lots_due",
        "lots",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("remaining > 0"),
        sqlite_where=sa.text("remaining > 0"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_lots_due",
        table_name="lots",
        postgresql_where=sa.text("remaining > 0"),
        sqlite_where=sa.text("remaining > 0"),
    )
    op.drop_table("job_runs")
