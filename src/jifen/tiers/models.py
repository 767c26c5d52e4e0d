"""Tables of the tiers domain: a programme's tiers, and each member's current tier."""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, Integer, String, Table, Text, UniqueConstraint

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
)
