"""A staff session records whether it was opened with a TOTP code
(``sessions.totp_verified``): the roles of a staff user are read again on every request,
and one given a role that can write after it signed in without a code must not write
through that session. Only a session opened with a code writes; the others sign in again
with their code.

Every session open before this revision counts as opened without a code: staff whose roles
can write sign in again once (a staff session lasts 12 hours), members are not concerned.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-15 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One statement on both backends, as 0022 adds its column: SQLite adds a column with a
# constant default in place; PostgreSQL adds it without rewriting the table.
_ADD = "ALTER TABLE sessions ADD COLUMN totp_verified BOOLEAN DEFAULT '0' NOT NULL"

_COMMENT = (
    "COMMENT ON COLUMN sessions.totp_verified IS 'a staff session opened with a TOTP code: "
    "only such a session writes'"
)


def upgrade() -> None:
    op.execute(_ADD)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_COMMENT)


def downgrade() -> None:
    op.execute("ALTER TABLE sessions DROP COLUMN totp_verified")
