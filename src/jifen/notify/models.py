"""Tables of the notify domain.

The outbox: every message (in-app, email, SMS, webhook) is a row written in the same
transaction as the change that causes it, and sent after commit by ``deliver_due``. The
in-app inbox, the keys that make a notification queue once, webhook subscriptions and the
log of every webhook attempt.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from jifen.db.base import BigId, UTCDateTime, metadata

webhook_subscriptions = Table(
    "webhook_subscriptions",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("url", String(2000), nullable=False),
    Column("event_types", JSON, nullable=False, comment='event types it receives; "*": all'),
    Column("description", String(200), nullable=False, server_default=""),
    Column("secret_enc", Text, nullable=False, comment="the signing secret, encrypted"),
    Column(
        "previous_secret_enc",
        Text,
        nullable=True,
        comment="the secret before the last rotation, encrypted; signs too until the time below",
    ),
    Column("previous_valid_until", UTCDateTime(), nullable=True),
    Column("active", Boolean, nullable=False, server_default="1"),
    Column(
        "allow_private",
        Boolean,
        nullable=False,
        server_default="0",
        comment="may target private, loopback or link-local addresses (set by an operator)",
    ),
    Column("created_by", String(120), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime(), nullable=True),
    Index("ix_webhook_subscriptions_program", "program_id", "id"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, nullable=True),
    Column("channel", String(16), nullable=False, comment="sms, email, inbox, webhook"),
    Column("recipient", String(200), nullable=False, comment="masked where it is personal"),
    Column("template", String(64), nullable=False),  # a webhook delivery's: its event type
    Column("body", Text, nullable=False, comment="secrets in it (one-time codes) are masked"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("member_id", BigId, nullable=True),
    Column("subject", String(200), nullable=True, comment="an email's subject, an inbox title"),
    Column(
        "address_enc",
        Text,
        nullable=True,
        comment="the full email address or phone number, encrypted; NULL for inbox and webhook",
    ),
    Column(
        "status",
        String(16),
        nullable=False,
        server_default="pending",
        comment="pending (due at next_attempt_at); sending (claimed until next_attempt_at); "
        "sent; dead (given up)",
    ),
    Column(
        "next_attempt_at",
        UTCDateTime(),
        nullable=True,
        comment="when pending: due time; when sending: end of the sender's lease; else NULL",
    ),
    Column("last_error", Text, nullable=True),
    Column("dedupe_key", String(200), nullable=True, comment="the key it was queued under"),
    Column("subscription_id", BigId, ForeignKey("webhook_subscriptions.id"), nullable=True),
    Column(
        "delivery_id",
        String(40),
        nullable=True,
        comment="stable across retries (Jifen-Delivery, Message-ID): receivers drop duplicates",
    ),
    Column("redelivery_of", BigId, nullable=True, comment="the delivery this one repeats"),
    CheckConstraint("status IN ('pending', 'sending', 'sent', 'dead')", name="known_status"),
    Index("ix_outbox_due", "next_attempt_at", "id"),
    Index("ix_outbox_program", "program_id", "id"),
    Index("ix_outbox_subscription", "subscription_id", "id"),
)

inbox_messages = Table(
    "inbox_messages",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("outbox_id", BigId, ForeignKey("outbox.id"), nullable=False),
    Column("template", String(64), nullable=False),
    Column("title", String(200), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("read_at", UTCDateTime(), nullable=True),
    Index("ix_inbox_messages_member", "member_id", "id"),
)

notification_keys = Table(
    "notification_keys",
    metadata,
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("kind", String(16), nullable=False, comment="notify or event: two key spaces"),
    Column("key", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("program_id", "kind", "key"),
)
"""Keys seen: a notification or an event with a key already here is not queued again."""

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, nullable=False),
    Column("subscription_id", BigId, ForeignKey("webhook_subscriptions.id"), nullable=False),
    Column("outbox_id", BigId, ForeignKey("outbox.id"), nullable=False),
    Column("delivery_id", String(40), nullable=False),
    Column("attempt", Integer, nullable=False, comment="1 for the first try of the delivery"),
    Column("status_code", Integer, nullable=True, comment="NULL: no answer (refused, timeout)"),
    Column("error", Text, nullable=True),
    Column("duration_ms", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_webhook_attempts_outbox", "outbox_id", "id"),
)
"""The delivery log: one row per webhook attempt, whatever it answered."""
