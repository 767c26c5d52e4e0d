"""Two indexes of the ledger that every posting wrote to and nothing reads by: the lines by
account (a posting's lines are read by their posting; reconcile sums every line) goes, and
the postings by the posting they refer to keeps only the postings that refer to one
(refunds, reversals, unfreezes, expiries of frozen points), not every earning and spending.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-18 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REFERRING = sa.text("ref_posting_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_lines_account_id", table_name="lines")
    op.drop_index("ix_postings_ref_posting_id", table_name="postings")
    op.create_index(
        "ix_postings_ref_posting_id", "postings", ["ref_posting_id"],
        postgresql_where=_REFERRING, sqlite_where=_REFERRING,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_postings_ref_posting_id", table_name="postings")
    op.create_index("ix_postings_ref_posting_id", "postings", ["ref_posting_id"])
    op.create_index("ix_lines_account_id", "lines", ["account_id"])
