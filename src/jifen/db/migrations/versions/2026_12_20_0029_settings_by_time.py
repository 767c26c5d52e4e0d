"""The programme policies a programme had before its current one, each with when it was
replaced: an event is evaluated by the benefits matrix (earn multipliers, earning caps,
birthday gifts) in force at its own time, not by the one of when it came in. Nothing
records the policies replaced before this revision: events of any time before the next
change are evaluated by the current one, as they were until now.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-20 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from jifen.db.base import BigId, UTCDateTime

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNTIL = "when they were replaced: in force before then, since the one replaced before them"
REPLACED = (
    "programme policies replaced, each with when: an event is evaluated by the one in force "
    "at its own time"
)


def upgrade() -> None:
    op.create_table(
        "program_settings_history",
        sa.Column("program_id", BigId, sa.ForeignKey("programs.id"), primary_key=True),
        sa.Column("until", UTCDateTime(), primary_key=True, comment=UNTIL),
        sa.Column("settings", sa.JSON(), nullable=False, comment="the policy replaced then"),
        comment=REPLACED,
    )


def downgrade() -> None:
    op.drop_table("program_settings_history")
