"""The notification outbox: a message is written in the same transaction as the change
that causes it, and sent after commit."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, String, Table, Text

from jifen.db.base import BigId, UTCDateTime, metadata

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, nullable=True),
    Column("channel", String(16), nullable=False, comment="sms, email, inbox, webhook"),
    Column("recipient", String(200), nullable=False, comment="masked where it is personal"),
    Column("template", String(64), nullable=False),
    Column("body", Text, nullable=False, comment="secrets in it (one-time codes) are masked"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Index("ix_outbox_unsent", "sent_at", "id"),
)
