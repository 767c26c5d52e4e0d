"""Stored answers of writes, for ``Idempotency-Key`` replays."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Index, Integer, String, Table, UniqueConstraint

from jifen.db.base import BigId, UTCDateTime, metadata

ERASED_STATUS = 410
"""The ``status_code`` of a stored answer erased with the personal data of the member it
concerned (no write answers 410, so it marks them): its ``body`` keeps the member's id and
the status the write answered, nothing else."""

idempotency_records = Table(
    "idempotency_records",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("scope", String(120), nullable=False, comment="who sent it: staff:1, key:7, member:9"),
    Column("key", String(200), nullable=False),
    Column("request_hash", String(64), nullable=False, comment="method, path and body"),
    Column("status_code", Integer, nullable=False),
    Column("body", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column(
        "member_id",
        BigId,
        nullable=True,
        comment="the member the write was about, whose erasure erases this answer",
    ),
    UniqueConstraint("scope", "key"),
    Index("ix_idempotency_records_member", "member_id"),
)
