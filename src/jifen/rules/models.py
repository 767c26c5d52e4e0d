"""Tables of the rules domain: rule versions with their lifecycle and the periods each was
active, the programme's earning caps with the time each took effect, and what budgeted rules
have spent."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
)

from jifen.db.base import BigId, UTCDateTime, metadata

RULE_STATES = ("draft", "submitted", "approved", "active", "paused", "retired", "rejected")

rule_versions = Table(
    "rule_versions",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("code", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("spec", JSON, nullable=False, comment="the RuleSpec; never changed once submitted"),
    Column("state", String(16), nullable=False, server_default="draft"),
    Column("created_by", String(120), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("approval_id", BigId, ForeignKey("approvals.id"), nullable=True),
    Column("approved_by", String(120), nullable=True),
    Column("approved_at", UTCDateTime(), nullable=True),
    CheckConstraint(
        "state IN (" + ", ".join(f"'{s}'" for s in RULE_STATES) + ")", name="known_state"
    ),
    UniqueConstraint("program_id", "code", "version"),
)

rule_activations = Table(
    "rule_activations",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("version_id", BigId, ForeignKey("rule_versions.id"), nullable=False),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("active_from", UTCDateTime(), nullable=False),
    Column("active_to", UTCDateTime(), nullable=True, comment="NULL while it is still active"),
    Index("ix_rule_activations_program", "program_id", "active_from"),
)

earning_caps = Table(
    "earning_caps",
    metadata,
    Column("program_id", BigId, ForeignKey("programs.id"), primary_key=True),
    Column("caps", JSON, nullable=False, comment="the ProgramCaps: limits by tier, a budget"),
    Column(
        "active_from",
        UTCDateTime(),
        primary_key=True,
        comment="when they were set: they cap the events from then until the next caps",
    ),
)
"""The programme's caps, every version kept: an event is capped by the version in force at
its own time (the last set at or before it)."""

rule_budgets = Table(
    "rule_budgets",
    metadata,
    Column("program_id", BigId, ForeignKey("programs.id"), primary_key=True),
    Column(
        "rule_code",
        String(64),
        primary_key=True,
        comment="a budgeted rule, or '*' for the programme's own budget",
    ),
    Column("spent", BigInteger, nullable=False, server_default="0"),
)

event_types = Table(
    "event_types",
    metadata,
    Column("program_id", BigId, ForeignKey("programs.id"), primary_key=True),
    Column("name", String(64), primary_key=True, comment="custom.<name>"),
    Column("fields", JSON, nullable=False, comment="field name → {type, required}"),
    Column("description", String(500), nullable=False, server_default=""),
    Column("updated_at", UTCDateTime(), nullable=False),
)
