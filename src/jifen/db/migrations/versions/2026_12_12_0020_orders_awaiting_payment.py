"""A redemption of a reward with a cash part may be made before its cash is paid: the order
waits in the state ``awaiting_payment``, its points frozen and its stock taken, until the
payment system confirms the payment or the order lapses at ``reward_orders.pay_by`` (a new
column, NULL for every order made before). A CHECK keeps an order awaiting payment from
having no time to be paid by. The state column needs no change: it is free text of 16
characters, and ``awaiting_payment`` has 16.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-12 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One statement on both backends, as 0018 adds its column: SQLite adds a column with its
# CHECK constraint in place, where a batch would copy the table (and the orders' steps and
# vouchers refer to it); PostgreSQL adds it without rewriting the table.
_ADD = """
ALTER TABLE reward_orders ADD COLUMN pay_by {timestamp}
CONSTRAINT ck_reward_orders_awaiting_payment_pays_by
CHECK (state <> 'awaiting_payment' OR pay_by IS NOT NULL)
"""

_COMMENT = (
    "COMMENT ON COLUMN reward_orders.pay_by IS 'a cash part awaiting payment: the order "
    "lapses if not paid by then'"
)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.execute(_ADD.format(timestamp="TIMESTAMP WITH TIME ZONE" if postgresql else "DATETIME"))
    if postgresql:
        op.execute(_COMMENT)


def downgrade() -> None:
    op.execute("ALTER TABLE reward_orders DROP COLUMN pay_by")
