"""Stored answers of writes, for ``Idempotency-Key`` replays."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Integer, String, Table, UniqueConstraint

from jifen.db.base import BigId, UTCDateTime, metadata

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
    UniqueConstraint("scope", "key"),
)
