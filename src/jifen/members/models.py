"""Tables of the members domain."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    Date,
    ForeignKey,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from jifen.db.base import BigId, UTCDateTime, metadata

members = Table(
    "members",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column(
        "external_ref",
        String(128),
        nullable=False,
        comment="the member's id in the merchant's own systems (card number, user id)",
    ),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=True),
    Column("name", String(100), nullable=False, server_default=""),
    Column("email", String(254), nullable=True),
    Column("birthday", Date, nullable=True),
    Column("gender", String(16), nullable=True),
    Column("region", String(100), nullable=True),
    Column("tags", JSON, nullable=False, server_default="[]"),
    Column(
        "state",
        String(16),
        nullable=False,
        server_default="active",
        comment="active; frozen (cannot earn or spend for now); banned; closed",
    ),
    Column(
        "phone_hash",
        String(64),
        nullable=True,
        comment="keyed SHA-256 of the normalised phone number, for lookup and sign-in",
    ),
    Column("phone_enc", Text, nullable=True, comment="the phone number, encrypted"),
    Column("id_number_hash", String(64), nullable=True),
    Column("id_number_enc", Text, nullable=True, comment="the ID number, encrypted"),
    Column("verified_at", UTCDateTime(), nullable=True, comment="real-name binding, when"),
    Column(
        "family_main_id",
        BigId,
        ForeignKey("members.id"),
        nullable=True,
        comment="the main account of this member's family group",
    ),
    Column(
        "language",
        String(2),
        nullable=True,
        comment="zh or en: the language of the messages sent to the member; none: Chinese",
    ),
    CheckConstraint("state IN ('active', 'frozen', 'banned', 'closed')", name="known_state"),
    CheckConstraint("language IN ('zh', 'en')", name="known_language"),
    UniqueConstraint("program_id", "external_ref"),
    UniqueConstraint("program_id", "phone_hash"),
    UniqueConstraint("program_id", "id_number_hash"),
)
