"""Checkpoints of the audit log: every stripe's head sealed under one root hash, chained to
the previous checkpoint, as the ledger's are. Someone able to write the database could edit
entries and compute every chain again; the root hash, kept outside the database, then no
longer matches.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from jifen.db.base import BigId, UTCDateTime

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column(
            "heads", sa.JSON(), nullable=False,
            comment='each stripe\'s head then: {"stripe": [seq, hash]}',
        ),
        sa.Column("previous_root", sa.String(64), nullable=False),
        sa.Column("root_hash", sa.String(64), nullable=False),
        comment="every stripe's head sealed together: a log rewritten and re-chained after a "
        "checkpoint no longer matches the root hash kept outside the database",
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
