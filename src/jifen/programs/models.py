"""Tables of the programmes domain."""

from __future__ import annotations

from sqlalchemy import JSON, Column, String, Table, UniqueConstraint

from jifen.db.base import BigId, UTCDateTime, metadata

programs = Table(
    "programs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("code", String(64), nullable=False, comment="short stable name, e.g. 'demo'"),
    Column("name", String(200), nullable=False),
    Column(
        "time_zone",
        String(64),
        nullable=False,
        server_default="Asia/Shanghai",
        comment="IANA zone for calendar rules: days for caps, birthdays, year-end clearing",
    ),
    Column("created_at", UTCDateTime(), nullable=False),
    Column(
        "settings",
        JSON,
        nullable=False,
        server_default="{}",
        comment="programme policy (see ProgramSettings); changed only through an approval",
    ),
    UniqueConstraint("code"),
)
