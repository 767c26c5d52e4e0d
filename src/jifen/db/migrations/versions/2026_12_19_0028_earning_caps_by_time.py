"""The earning caps keep every version with the time it took effect, as rule versions do: an
event is capped by the caps in force at its own time, not by those of when it came in.
``earning_caps`` is keyed by programme and ``active_from`` (``updated_at`` renamed). Each
programme's caps on record become its first version, in force since the earliest time jifen
stores: nothing records the caps they replaced, and every event was capped by them until
now. The downgrade keeps each programme's current caps only.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-19 10:00:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import jifen.db.base

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
"""``jifen.clock.EARLIEST`` as it is now: no event is older."""
ACTIVE_FROM = "when they were set: they cap the events from then until the next caps"

_caps = sa.table(
    "earning_caps",
    sa.column("program_id", sa.BigInteger()),
    sa.column("active_from", jifen.db.base.UTCDateTime()),
)


def _key(columns: list[str]) -> None:
    """Key the table by ``columns``: on SQLite, a copy of the table of its own (the copy
    that renames a column leaves a key on the new name out)."""
    with op.batch_alter_table("earning_caps") as batch:
        batch.drop_constraint(op.f("pk_earning_caps"), type_="primary")
        batch.create_primary_key(op.f("pk_earning_caps"), columns)


def upgrade() -> None:
    with op.batch_alter_table("earning_caps") as batch:
        batch.alter_column(
            "updated_at", new_column_name="active_from", comment=ACTIVE_FROM,
            existing_type=sa.DateTime(timezone=True), existing_nullable=False,
        )  # fmt: skip
    _key(["program_id", "active_from"])
    op.execute(_caps.update().values(active_from=EARLIEST))


def downgrade() -> None:
    later = _caps.alias("later")
    current = sa.select(sa.func.max(later.c.active_from)).where(
        later.c.program_id == _caps.c.program_id
    )
    op.execute(_caps.delete().where(_caps.c.active_from < current.scalar_subquery()))
    _key(["program_id"])
    with op.batch_alter_table("earning_caps") as batch:
        batch.alter_column(
            "active_from", new_column_name="updated_at", comment=None,
            existing_comment=ACTIVE_FROM, existing_type=sa.DateTime(timezone=True),
            existing_nullable=False,
        )  # fmt: skip
