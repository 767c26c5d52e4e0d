"""Tables of the tiers domain: a programme's tiers, each member's current tier, and the
record of every tier change."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from jifen.db.base import BigId, UTCDateTime, metadata

tiers = Table(
    "tiers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("code", String(64), nullable=False, comment="what rules and caps name, e.g. 金卡"),
    Column("name", String(100), nullable=False),
    Column("rank", Integer, nullable=False, comment="0 for the entry tier, higher is better"),
    UniqueConstraint("program_id", "code"),
    UniqueConstraint("program_id", "rank"),
)

member_tiers = Table(
    "member_tiers",
    metadata,
    Column("member_id", BigId, ForeignKey("members.id"), primary_key=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("tier_code", String(64), nullable=False),
    Column("since", UTCDateTime(), nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("set_by", String(120), nullable=False, server_default=""),
    Column(
        "base_tier_code",
        String(64),
        nullable=True,
        comment="while a temporary upgrade lasts: the tier the member goes back to",
    ),
    Column(
        "temporary_until",
        UTCDateTime(),
        nullable=True,
        comment="when the temporary upgrade ends by itself; null: the tier is the member's own",
    ),
    # The job that ends temporary upgrades reads only the rows that have one.
    Index(
        "ix_member_tiers_temporary",
        "program_id",
        "temporary_until",
        postgresql_where=text("temporary_until IS NOT NULL"),
        sqlite_where=text("temporary_until IS NOT NULL"),
    ),
)

tier_changes = Table(
    "tier_changes",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("from_tier", String(64), nullable=True, comment="null: the member had no tier"),
    Column("to_tier", String(64), nullable=False),
    Column(
        "returns_to",
        String(64),
        nullable=True,
        comment="while a temporary upgrade lasts after the change: the tier the member goes "
        "back to",
    ),
    Column(
        "kind",
        String(16),
        nullable=False,
        comment="evaluation, upgrade, temporary, temporary_end or manual",
    ),
    Column("reason", Text, nullable=False, server_default=""),
    Column("score", BigInteger, nullable=True, comment="the score that decided it, if any"),
    Column("at", UTCDateTime(), nullable=False),
    Column("actor", String(120), nullable=False, server_default=""),
    CheckConstraint(
        "kind IN ('evaluation', 'upgrade', 'temporary', 'temporary_end', 'manual')",
        name="tier_change_kind",
    ),
    Index("ix_tier_changes_member", "member_id", "id"),
)
