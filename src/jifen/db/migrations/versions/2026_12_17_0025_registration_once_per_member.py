"""A member registers once and completes its profile once: ``member.registered`` and
``member.profile_completed`` join the events that happen once to their subject (the
member), so that a registration or completed profile sent again under another event id is
refused as sent twice instead of paying again.

Events of these types stored before get their subject, the first of each member only (the
later ones were the repeats that paid again): the index then keeps any more from coming in.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-17 10:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = (
    "order.paid",
    "member.birthday",
    "referral.completed",
    "review.posted",
    "review.featured",
    "quiz.answered",
    "activity.attended",
    "member.checked_in",
)
_NEW = ("member.registered", "member.profile_completed")


def _where(types: tuple[str, ...]) -> Any:
    return sa.text("type IN ({})".format(", ".join(f"'{kind}'" for kind in types)))


# The member's id is its subject (as ``jifen.events.service.subject_of`` makes it at this
# revision); the first event of each member keeps it, the later ones (the repeats that paid
# again) keep none, as if they had been refused.
_SUBJECTS = "UPDATE events SET subject = CAST(member_id AS VARCHAR(128)) WHERE {types}"
_REPEATS = """
UPDATE events SET subject = NULL WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY program_id, type, subject ORDER BY id) AS n
        FROM events WHERE {types} AND subject IS NOT NULL
    ) AS ranked WHERE n > 1
)
"""


def _index(types: tuple[str, ...]) -> None:
    op.drop_index("uq_events_once", table_name="events")
    where = _where(types)
    op.create_index(
        "uq_events_once",
        "events",
        ["program_id", "type", "subject"],
        unique=True,
        postgresql_where=where,
        sqlite_where=where,
    )


def upgrade() -> None:
    types = _where(_NEW).text
    op.execute(_SUBJECTS.format(types=types))
    op.execute(_REPEATS.format(types=types))
    _index(_BEFORE + _NEW)


def downgrade() -> None:
    _index(_BEFORE)
    events = sa.table("events", sa.column("type", sa.String()), sa.column("subject", sa.String()))
    op.execute(events.update().where(events.c.type.in_(_NEW)).values(subject=None))
