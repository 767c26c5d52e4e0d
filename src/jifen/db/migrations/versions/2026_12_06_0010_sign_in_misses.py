"""Failed sign-ins count in a row within a day, and those under logins that match no account
are counted too, so that they are slowed and locked as an account's are (a 429 must not tell
that a login exists).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 15:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from jifen.db.base import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACCOUNTS = ("staff_users", "member_credentials")


def upgrade() -> None:
    for table in _ACCOUNTS:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("last_failed_at", UTCDateTime(timezone=True), nullable=True))
    op.create_table(
        "sign_in_misses",
        sa.Column(
            "login_hash", sa.String(64), primary_key=True,
            comment="keyed digest of who was asked for: staff, or a programme's member, and "
            "the login",
        ),
        sa.Column("failed_sign_ins", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("locked_until", UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_failed_at", UTCDateTime(timezone=True), nullable=True),
        comment="failed sign-ins under logins that match no account, slowed and locked as an "
        "account's are: an answer never tells whether a login exists",
    )  # fmt: skip
    op.create_index("ix_sign_in_misses_last_failed_at", "sign_in_misses", ["last_failed_at"])


def downgrade() -> None:
    op.drop_index("ix_sign_in_misses_last_failed_at", table_name="sign_in_misses")
    op.drop_table("sign_in_misses")
    for table in _ACCOUNTS:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("last_failed_at")
