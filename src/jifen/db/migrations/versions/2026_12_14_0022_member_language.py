"""A member may choose the language of the messages jifen sends it (``members.language``:
``zh`` or ``en``; NULL, as for every member before, means Chinese, jifen's default). A CHECK
keeps it to the two languages jifen writes.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-14 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One statement on both backends, as 0020 adds its column: SQLite adds a column with its
# CHECK constraint in place, where a batch would copy the table; PostgreSQL adds it without
# rewriting the table.
_ADD = """
ALTER TABLE members ADD COLUMN language VARCHAR(2)
CONSTRAINT ck_members_known_language CHECK (language IN ('zh', 'en'))
"""

_COMMENT = (
    "COMMENT ON COLUMN members.language IS 'zh or en: the language of the messages sent to "
    "the member; none: Chinese'"
)


def upgrade() -> None:
    op.execute(_ADD)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_COMMENT)


def downgrade() -> None:
    op.execute("ALTER TABLE members DROP COLUMN language")
