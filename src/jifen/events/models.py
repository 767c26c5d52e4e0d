"""Tables of the events domain: each event once, the awards it produced and why, and the
per-member counters the rules read (how many of each event, the current daily streak)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    text,
)

from jifen.db.base import BigId, UTCDateTime, metadata

ONCE_TYPES = (
    "order.paid",
    "member.birthday",
    "referral.completed",
    "review.posted",
    "review.featured",
    "quiz.answered",
    "activity.attended",
    "member.checked_in",
    "member.registered",
    "member.profile_completed",
)
"""Events that happen once to their ``subject``: an order is paid once (its merchant and
order id, see ``jifen.events.service.order_subject``: each merchant numbers its own), a
member has one birthday a year (member and year), registers and completes its profile once
and is referred once (the member),
checks in once a day (member and programme day), answers a quiz and attends an activity
once (member and quiz or activity); a review is posted and featured once (the review id)."""
ONCE = "type IN ({})".format(", ".join(f"'{kind}'" for kind in ONCE_TYPES))
SEALED = "sealed:"
"""How a sealed fingerprint starts (``jifen.events.service._sealed``)."""
UNSEALED = f"substr(request_hash, 1, {len(SEALED)}) <> '{SEALED}'"
"""An event whose fingerprint is not sealed yet (``jifen.events.service._sealed``): one
stored before fingerprints were sealed. The partial index on it is empty once the job
``events.seal_fingerprints`` has run (new events are stored sealed), so that the job's
later runs find nothing to do without reading the programme's events."""

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("source", String(64), nullable=False, comment="the sending system, e.g. pos, app"),
    Column("external_id", String(128), nullable=False, comment="the event's id in its source"),
    Column("type", String(64), nullable=False),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("occurred_at", UTCDateTime(), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column(
        "subject",
        String(128),
        nullable=True,
        comment="what the event happens to: the order of order events, the review of review "
        "events, the member and day of a check-in",
    ),
    Column(
        "amount_fen",
        BigInteger,
        nullable=True,
        comment="an order's amount paid in money, or the amount a refund gives back",
    ),
    Column("merchant", String(64), nullable=True, comment="the merchant whose credentials sent it"),
    Column("store", String(64), nullable=True, comment="the store its points were posted for"),
    Column(
        "sent_by",
        String(128),
        nullable=True,
        comment="who sent it (staff:…, key:…), when sent through the API",
    ),
    Column("points", BigInteger, nullable=False, server_default="0"),
    Column(
        "skipped",
        JSON,
        nullable=False,
        server_default="[]",
        comment="the rules that did not fire, and why",
    ),
    UniqueConstraint("program_id", "source", "external_id"),
    Index("ix_events_subject", "program_id", "subject", "type"),
    Index(
        "uq_events_once",
        "program_id",
        "type",
        "subject",
        unique=True,
        postgresql_where=text(ONCE),
        sqlite_where=text(ONCE),
    ),
    Index("ix_events_member", "member_id", "occurred_at"),
    Index(
        "ix_events_unsealed",
        "program_id",
        "id",
        postgresql_where=text(UNSEALED),
        sqlite_where=text(UNSEALED),
    ),
)

event_awards = Table(
    "event_awards",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("event_id", BigId, ForeignKey("events.id"), nullable=False),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("rule_code", String(64), nullable=False),
    Column("rule_version", Integer, nullable=False),
    Column("kind", String(32), nullable=False, comment="the rule's kind, or 'reversal'"),
    Column("wanted", BigInteger, nullable=False, comment="what the rule computed"),
    Column("points", BigInteger, nullable=False, comment="what posted (negative: taken back)"),
    Column("cap", String(120), nullable=True, comment="the cap that bit"),
    Column("held", Boolean, nullable=False, server_default="0"),
    Column("posting_id", BigId, ForeignKey("postings.id"), nullable=True),
    Column("reverses_id", BigId, ForeignKey("event_awards.id"), nullable=True),
    Column("local_day", Date, nullable=False, comment="the event's day in the programme's zone"),
    Column("detail", JSON, nullable=False, server_default="{}"),
    Column(
        "decision",
        String(16),
        nullable=True,
        comment="a held award's: approved or rejected, by a reviewer",
    ),
    Column("decided_by", String(128), nullable=True),
    Column("decided_at", UTCDateTime(), nullable=True),
    Index("ix_event_awards_member_day", "member_id", "local_day"),
    Index("ix_event_awards_held", "program_id", "held", "id"),
    Index("ix_event_awards_event", "event_id"),
)

member_counters = Table(
    "member_counters",
    metadata,
    Column("member_id", BigId, ForeignKey("members.id"), primary_key=True),
    Column("event_type", String(64), primary_key=True),
    Column("seen", BigInteger, nullable=False, server_default="0"),
    Column("streak_day", Date, nullable=True),
    Column("streak_length", Integer, nullable=False, server_default="0"),
)
