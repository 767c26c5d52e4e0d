"""PostgreSQL: ``open_lots(account, max_lots)``, an account's first open lots in FIFO order
packed in one array, read by the lock of a debit in the same statement *after* the row lock
is granted (see ``points.store``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 15:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# VOLATILE: evaluated again, with a fresh snapshot, when the row lock it is read under had
# to wait for another transaction (PostgreSQL rechecks the newest version of the row and
# projects it anew). PL/pgSQL: its query is planned once per session.
_CREATE = """
CREATE FUNCTION open_lots(account bigint, max_lots integer) RETURNS bigint[]
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN (
        SELECT array_agg(id ORDER BY expires_at ASC NULLS LAST, id)
            || array_agg(amount ORDER BY expires_at ASC NULLS LAST, id)
            || array_agg(remaining ORDER BY expires_at ASC NULLS LAST, id)
            || array_agg(available_us ORDER BY expires_at ASC NULLS LAST, id)
            || array_agg(expires_us ORDER BY expires_at ASC NULLS LAST, id)
        FROM (
            SELECT id, amount, remaining, expires_at,
                   (extract(epoch FROM available_at) * 1000000)::bigint AS available_us,
                   (extract(epoch FROM expires_at) * 1000000)::bigint AS expires_us
            FROM lots
            WHERE account_id = account AND remaining > 0
            ORDER BY expires_at ASC NULLS LAST, id
            LIMIT max_lots
        ) first
    );
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION open_lots(bigint, integer)")
