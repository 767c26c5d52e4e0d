"""Maker–checker requests: a sensitive change waits here until a second person decides."""

from __future__ import annotations

from sqlalchemy import JSON, CheckConstraint, Column, ForeignKey, Index, String, Table, Text

from jifen.db.base import BigId, UTCDateTime, metadata

approvals = Table(
    "approvals",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column(
        "action",
        String(64),
        nullable=False,
        comment="points.adjust, points.clear, programs.settings",
    ),
    Column("params", JSON, nullable=False, comment="what executes on approval"),
    Column("summary", Text, nullable=False, server_default=""),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("requested_by", BigId, ForeignKey("staff_users.id"), nullable=False),
    Column("requested_at", UTCDateTime(), nullable=False),
    Column("decided_by", BigId, ForeignKey("staff_users.id"), nullable=True),
    Column("decided_at", UTCDateTime(), nullable=True),
    Column("decision_note", Text, nullable=False, server_default=""),
    Column("result", JSON, nullable=True, comment="what the execution produced"),
    Column(
        "based_on",
        String(64),
        nullable=True,
        comment="digest of the value a settings or caps request was filed on (NULL: none, or "
        "filed before it was kept)",
    ),
    CheckConstraint(
        "status IN ('pending', 'approved', 'rejected', 'failed', 'withdrawn')",
        name="known_status",
    ),
    CheckConstraint(
        "decided_by IS NULL OR decided_by <> requested_by", name="checker_is_not_maker"
    ),
    Index("ix_approvals_program_status", "program_id", "status"),
)
