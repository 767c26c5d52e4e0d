"""The due-lots index carries each lot's account: an expiry chunk picks its accounts from
the index alone, without reading the lots themselves.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = sa.text("remaining > 0")


def _due_index(columns: list[str]) -> None:
    op.drop_index("ix_lots_due", table_name="lots", postgresql_where=_OPEN, sqlite_where=_OPEN)
    op.create_index(
        "ix_lots_due", "lots", columns, unique=False, postgresql_where=_OPEN, sqlite_where=_OPEN
    )


def upgrade() -> None:
    _due_index(["expires_at", "account_id"])


def downgrade() -> None:
    _due_index(["expires_at"])
