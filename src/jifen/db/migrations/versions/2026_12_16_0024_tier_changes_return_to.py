"""A tier change records the tier the member goes back to when it leaves the member in a
temporary upgrade (``tier_changes.returns_to``): a lent tier, and an evaluation during one
that moves the tier it returns to. The expiry policy's ``extend`` dates the member's lots by
that tier, the member's own, rather than by the lent one.

Changes recorded before this revision name none.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-16 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COMMENT = (
    "COMMENT ON COLUMN tier_changes.returns_to IS 'while a temporary upgrade lasts after the "
    "change: the tier the member goes back to'"
)


def upgrade() -> None:
    op.execute("ALTER TABLE tier_changes ADD COLUMN returns_to VARCHAR(64)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_COMMENT)


def downgrade() -> None:
    op.execute("ALTER TABLE tier_changes DROP COLUMN returns_to")
