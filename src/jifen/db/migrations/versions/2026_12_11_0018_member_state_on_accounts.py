"""A member account carries its member's state (``accounts.member_state``), set in the same
transaction as ``members.state`` by every change of it. A posting reads it from the account
row it locks: on PostgreSQL a lock that waited for a freeze, ban or closing reads the row as
that transaction left it, where the member's own row, read in the same statement, would
still show the state from before. So no earning posts after a closing (or a freeze, or a
ban) has committed. Accounts of members that are not active take their state.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-11 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One statement on both backends: SQLite adds a column with its CHECK constraint in place,
# where a batch would copy the table; PostgreSQL adds it without rewriting the table.
_ADD = """
ALTER TABLE accounts ADD COLUMN member_state VARCHAR(16) DEFAULT 'active' NOT NULL
CONSTRAINT ck_accounts_known_member_state
CHECK (member_state IN ('active', 'frozen', 'banned', 'closed'))
"""

_COPY = """
UPDATE accounts SET member_state = (
    SELECT members.state FROM members WHERE members.id = accounts.member_id
)
WHERE member_id IN (SELECT id FROM members WHERE state <> 'active')
"""

_COMMENT = (
    "COMMENT ON COLUMN accounts.member_state IS 'the member''s state (members.state), set "
    "with it by every change of state: what posts to the account reads it under the "
    "account''s row lock'"
)


def upgrade() -> None:
    op.execute(_ADD)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_COMMENT)
    op.execute(_COPY)


def downgrade() -> None:
    op.execute("ALTER TABLE accounts DROP COLUMN member_state")
