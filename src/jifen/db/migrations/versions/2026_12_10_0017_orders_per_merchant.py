"""An order is known within a programme by its merchant and its id, as each merchant's till
numbers its own orders: the subject of ``order.paid`` and ``order.refunded`` events becomes
``<merchant>/<order id>``, the merchant with ``%`` and ``/`` escaped (``%25``, ``%2F``); an
order of no merchant keeps its bare id, led by a ``/`` when the id holds one; a subject
longer than the column is kept as its digest (``jifen.events.service.order_subject``).

Events stored before are rewritten in two statements: the refunds first, each taking the
merchant of the order it refunded (the one order.paid of its programme and id until now),
then the orders. The downgrade puts back the bare order ids; it fails on the once-only
index if orders of two merchants share an id by then.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-10 10:00:00
"""

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ORDERS = "type IN ('order.paid', 'order.refunded')"

# The subject of merchant ``{merchant}`` and order id ``{order}`` (SQL expressions), before
# it is fitted to the column.
_QUALIFIED = """
CASE WHEN {merchant} IS NULL
     THEN CASE WHEN {order} LIKE '%/%' THEN '/' || {order} ELSE {order} END
     ELSE replace(replace({merchant}, '%', '%25'), '/', '%2F') || '/' || {order}
END
"""

_FITTED = "CASE WHEN length({text}) <= 128 THEN {text} ELSE 'sha256:' || {digest} END"

# The refunds first: each takes the merchant of its order (until now the one order.paid of
# its programme with its subject), or its own when the order is not there.
_REFUNDS = """
UPDATE events SET subject = {subject}
WHERE type = 'order.refunded' AND subject IS NOT NULL
"""
_PAID_MERCHANT = """
COALESCE(
    (SELECT paid.merchant FROM events AS paid
     WHERE paid.program_id = events.program_id AND paid.type = 'order.paid'
       AND paid.subject = events.subject),
    events.merchant
)
"""

_ORDERS_PAID = """
UPDATE events SET subject = {subject}
WHERE type = 'order.paid' AND subject IS NOT NULL
  AND (merchant IS NOT NULL OR subject LIKE '%/%')
"""


def _hex_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _subject(conn: sa.Connection, merchant: str) -> str:
    """The fitted subject of ``merchant`` and the row's current subject (its order id)."""
    text = _QUALIFIED.format(merchant=merchant, order="events.subject")
    if conn.dialect.name == "postgresql":
        digest = f"encode(sha256(convert_to({text}, 'UTF8')), 'hex')"
    else:
        # SQLite has no SHA-256 of its own: the statement calls Python's, row by row.
        conn.connection.driver_connection.create_function(  # type: ignore[union-attr]
            "jifen_sha256", 1, _hex_sha256, deterministic=True
        )
        digest = f"jifen_sha256({text})"
    return _FITTED.format(text=text, digest=digest)


def upgrade() -> None:
    conn = op.get_bind()
    conn.execute(sa.text(_REFUNDS.format(subject=_subject(conn, _PAID_MERCHANT))))
    conn.execute(sa.text(_ORDERS_PAID.format(subject=_subject(conn, "events.merchant"))))


def downgrade() -> None:
    events = sa.table(
        "events",
        sa.column("type", sa.String()),
        sa.column("payload", sa.JSON()),
        sa.column("subject", sa.String()),
    )
    op.execute(
        sa.update(events)
        .where(sa.text(_ORDERS), events.c.subject.is_not(None))
        .values(subject=events.c.payload["order_id"].as_string())
    )
