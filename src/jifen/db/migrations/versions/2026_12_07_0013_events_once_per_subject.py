"""Events that happen once to their subject: a referral once per invited member, a review
posted and featured once, a quiz answered and an activity attended once per member, a
check-in once per member and programme day, as orders and birthdays already were; and the
once-only index keyed by event type too, so that an order id such as ``2:2026`` no longer
collides with member 2's birthday of 2026. An event keeps the merchant and store it was sent
for, so that a merchant's credentials refund only that merchant's orders, and who sent it; a
held (reviewed) award keeps the reviewer's decision.

Events of the new once-only types stored before get their subject, the first of each
subject only (the later ones were the repeats that paid again): the index then keeps any
more from coming in.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 10:00:00
"""

import hashlib
from collections.abc import Sequence
from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from alembic import op

from jifen.db.base import UTCDateTime

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = ("order.paid", "member.birthday")
_NEW = (
    "referral.completed",
    "review.posted",
    "review.featured",
    "quiz.answered",
    "activity.attended",
    "member.checked_in",
)
_COMMENT = (
    "what the event happens to: the order of order events, the review of review events, "
    "the member and day of a check-in"
)
_OLD_COMMENT = "the order id of order events"

_events = sa.table(
    "events",
    sa.column("id", sa.BigInteger()),
    sa.column("program_id", sa.BigInteger()),
    sa.column("type", sa.String()),
    sa.column("member_id", sa.BigInteger()),
    sa.column("occurred_at", UTCDateTime()),
    sa.column("payload", sa.JSON()),
    sa.column("subject", sa.String()),
)
_programs = sa.table("programs", sa.column("id", sa.BigInteger()), sa.column("time_zone"))


def _where(types: tuple[str, ...]) -> Any:
    return sa.text("type IN ({})".format(", ".join(f"'{kind}'" for kind in types)))


def _subject(kind: str, payload: dict[str, Any], member_id: int, day: date) -> str:
    """As ``jifen.events.service.subject_of`` made it at this revision."""
    if kind == "referral.completed":
        text = str(member_id)
    elif kind in ("review.posted", "review.featured"):
        text = str(payload.get("review_id"))
    elif kind == "quiz.answered":
        text = f"{member_id}:{payload.get('quiz_id')}"
    elif kind == "activity.attended":
        text = f"{member_id}:{payload.get('activity_id')}"
    else:  # member.checked_in
        text = f"{member_id}:{day.isoformat()}"
    return text if len(text) <= 128 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


_SET_SUBJECT = (
    _events.update()
    .where(_events.c.id == sa.bindparam("event_id"))
    .values(subject=sa.bindparam("new_subject"))
)

# The first event of each subject keeps it; the later ones (the repeats that paid again)
# keep none, as if they had been refused.
_REPEATS = """
UPDATE events SET subject = NULL WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY program_id, type, subject ORDER BY id) AS n
        FROM events WHERE {types} AND subject IS NOT NULL
    ) AS ranked WHERE n > 1
)
"""


def _backfill(conn: sa.Connection) -> None:
    """Each event of the new once-only types its subject, 5,000 a statement, then the
    repeats none: memory is bounded by the chunk, whatever the number of events."""
    zones = {pid: ZoneInfo(zone) for pid, zone in conn.execute(sa.select(_programs))}
    after = 0
    while True:
        rows = conn.execute(
            sa.select(_events)
            .where(_events.c.type.in_(_NEW), _events.c.subject.is_(None), _events.c.id > after)
            .order_by(_events.c.id)
            .limit(5000)
        ).all()
        if not rows:
            break
        after = rows[-1].id
        subjects = [
            {
                "event_id": row.id,
                "new_subject": _subject(
                    row.type,
                    dict(row.payload or {}),
                    row.member_id,
                    row.occurred_at.astimezone(zones[row.program_id]).date(),
                ),
            }
            for row in rows
        ]
        conn.execute(_SET_SUBJECT, subjects)
    conn.execute(sa.text(_REPEATS.format(types=_where(_NEW).text)))


_ORIGIN = """
UPDATE events SET {column} = (
    SELECT posting_origins.{column} FROM event_awards
    JOIN posting_origins ON posting_origins.posting_id = event_awards.posting_id
    WHERE event_awards.event_id = events.id
    ORDER BY event_awards.id LIMIT 1
) WHERE type = 'order.paid'
"""


def upgrade() -> None:
    conn = op.get_bind()
    op.add_column(
        "events",
        sa.Column(
            "merchant", sa.String(64), nullable=True,
            comment="the merchant whose credentials sent it",
        ),
    )  # fmt: skip
    op.add_column(
        "events",
        sa.Column(
            "store", sa.String(64), nullable=True, comment="the store its points were posted for"
        ),
    )
    op.add_column(
        "events",
        sa.Column(
            "sent_by", sa.String(128), nullable=True,
            comment="who sent it (staff:…, key:…), when sent through the API",
        ),
    )  # fmt: skip
    op.add_column(
        "event_awards",
        sa.Column(
            "decision", sa.String(16), nullable=True,
            comment="a held award's: approved or rejected, by a reviewer",
        ),
    )  # fmt: skip
    op.add_column("event_awards", sa.Column("decided_by", sa.String(128), nullable=True))
    op.add_column("event_awards", sa.Column("decided_at", UTCDateTime(), nullable=True))
    op.create_index("ix_event_awards_held", "event_awards", ["program_id", "held", "id"])
    for column in ("merchant", "store"):  # orders stored before: where their points went
        op.execute(_ORIGIN.format(column=column))
    _backfill(conn)
    op.drop_index("uq_events_once", table_name="events")
    where = _where(_OLD + _NEW)
    op.create_index(
        "uq_events_once",
        "events",
        ["program_id", "type", "subject"],
        unique=True,
        postgresql_where=where,
        sqlite_where=where,
    )
    if conn.dialect.name == "postgresql":
        op.alter_column(
            "events", "subject", existing_type=sa.String(128), comment=_COMMENT,
            existing_comment=_OLD_COMMENT,
        )  # fmt: skip


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        op.alter_column(
            "events", "subject", existing_type=sa.String(128), comment=_OLD_COMMENT,
            existing_comment=_COMMENT,
        )  # fmt: skip
    op.drop_index("uq_events_once", table_name="events")
    conn.execute(_events.update().where(_events.c.type.in_(_NEW)).values(subject=None))
    where = _where(_OLD)
    op.drop_index("ix_event_awards_held", table_name="event_awards")
    with op.batch_alter_table("event_awards") as batch:
        batch.drop_column("decided_at")
        batch.drop_column("decided_by")
        batch.drop_column("decision")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("sent_by")
        batch.drop_column("store")
        batch.drop_column("merchant")
    op.create_index(
        "uq_events_once",
        "events",
        ["program_id", "subject"],
        unique=True,
        postgresql_where=where,
        sqlite_where=where,
    )
