"""A voucher keeps the coupon terms it was bought with: a later edit of the reward no longer
changes what an issued coupon takes off (vouchers issued before keep NULL and read the
reward's terms, as they did).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vouchers") as batch:
        batch.add_column(
            sa.Column(
                "coupon", sa.JSON(), nullable=True,
                comment="a coupon's terms as bought (NULL: issued before they were kept here)",
            )
        )  # fmt: skip


def downgrade() -> None:
    with op.batch_alter_table("vouchers") as batch:
        batch.drop_column("coupon")
