"""A settings or earning-caps request keeps a digest of the value it was filed on
(``approvals.based_on``), so that approving it after another change refuses instead of
reverting that change; requests filed before keep NULL and are approved as they were. A
maker may withdraw its own pending request (status ``withdrawn``). Direct manual adjustments
are found by their author and time (``ix_postings_adjust_actor``), so that an operator's
adjustments of a day count together against the approval threshold.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUS = "ck_approvals_known_status"
_ADJUSTMENTS = sa.text("kind = 'adjust'")


def upgrade() -> None:
    with op.batch_alter_table("approvals") as batch:
        batch.add_column(
            sa.Column(
                "based_on", sa.String(64), nullable=True,
                comment="digest of the value a settings or caps request was filed on (NULL: "
                "none, or filed before it was kept)",
            )
        )  # fmt: skip
        batch.drop_constraint(op.f(_STATUS), type_="check")
        batch.create_check_constraint(
            op.f(_STATUS), "status IN ('pending', 'approved', 'rejected', 'failed', 'withdrawn')"
        )
    op.create_index(
        "ix_postings_adjust_actor", "postings", ["program_id", "actor", "created_at"],
        postgresql_where=_ADJUSTMENTS, sqlite_where=_ADJUSTMENTS,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_postings_adjust_actor", table_name="postings")
    # A withdrawn request reads as rejected under the older schema: nothing executed.
    op.execute("UPDATE approvals SET status = 'rejected' WHERE status = 'withdrawn'")
    with op.batch_alter_table("approvals") as batch:
        batch.drop_constraint(op.f(_STATUS), type_="check")
        batch.create_check_constraint(
            op.f(_STATUS), "status IN ('pending', 'approved', 'rejected', 'failed')"
        )
        batch.drop_column("based_on")
