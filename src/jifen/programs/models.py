"""Tables of the programmes domain."""

from __future__ import annotations

from sqlalchemy import JSON, Column, ForeignKey, String, Table, UniqueConstraint

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

UNTIL = "when they were replaced: in force before then, since the one replaced before them"
REPLACED = (
    "programme policies replaced, each with when: an event is evaluated by the one in force "
    "at its own time"
)

program_settings_history = Table(
    "program_settings_history",
    metadata,
    Column("program_id", BigId, ForeignKey("programs.id"), primary_key=True),
    Column("until", UTCDateTime(), primary_key=True, comment=UNTIL),
    Column("settings", JSON, nullable=False, comment="the policy replaced then"),
    comment=REPLACED,
)
"""Each policy a programme had before its current one (``programs.settings``), with when it
was replaced: the policy in force at a time is the first replaced after it, or the current
one. What the evaluation of an event reads of the policy (the benefits matrix's earn
multipliers, earning caps and birthday gifts) it reads as it was at the event's time."""
