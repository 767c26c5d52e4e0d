"""A voucher keeps the coupon terms it was bought with: a later edit of the reward no longer
changes what an issued coupon takes off (vouchers issued before keep NULL and read the
reward's terms, as they did). A payment pays for one redemption order: ``(program_id,
payment_ref)`` is unique.

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

_ONE_ORDER_A_PAYMENT = "uq_reward_orders_program_id_payment_ref"

_PAID_TWICE = sa.text(
    "SELECT program_id, payment_ref, COUNT(*) FROM reward_orders "
    "WHERE payment_ref IS NOT NULL GROUP BY program_id, payment_ref HAVING COUNT(*) > 1 "
    "ORDER BY program_id, payment_ref"
)


def upgrade() -> None:
    # Orders that already share a payment are left for people to look at (one payment, or
    # none, may have bought several): nothing changes until they are put right. Checked
    # before any change: SQLite's DDL is not rolled back.
    shared = op.get_bind().execute(_PAID_TWICE).all()
    if shared:
        listed = "; ".join(f"programme {p}, {ref!r} × {n}" for p, ref, n in shared[:20])
        raise RuntimeError(
            f"{len(shared)} payment references were used by more than one redemption order "
            f"({listed}). Check those orders, give each its own payment_ref, then upgrade "
            f"again. / {len(shared)} 个支付流水号被多个兑换订单使用({listed})。请核查这些"
            "订单并为每个订单填写各自的 payment_ref,然后再次升级。"
        )
    with op.batch_alter_table("vouchers") as batch:
        batch.add_column(
            sa.Column(
                "coupon", sa.JSON(), nullable=True,
                comment="a coupon's terms as bought (NULL: issued before they were kept here)",
            )
        )  # fmt: skip
    op.create_index(
        _ONE_ORDER_A_PAYMENT, "reward_orders", ["program_id", "payment_ref"], unique=True
    )


def downgrade() -> None:
    op.drop_index(_ONE_ORDER_A_PAYMENT, table_name="reward_orders")
    with op.batch_alter_table("vouchers") as batch:
        batch.drop_column("coupon")
