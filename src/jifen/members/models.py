"""Tables of the members domain."""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, String, Table, UniqueConstraint

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
    UniqueConstraint("program_id", "external_ref"),
)
