"""The audit log: every write by staff or an API key, hash-chained.

One chain per stripe, not one for the whole log: a single chain head would be a row every
writer queues on. The stripe is chosen from the target (a member's writes always land on
the same stripe, whose lock the member's account lock already serialises), and a removed or
edited entry breaks its stripe's chain.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, String, Table

from jifen.db.base import BigId, UTCDateTime, metadata

STRIPES = 64

audit_entries = Table(
    "audit_entries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("stripe", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False, comment="position in its stripe's chain, from 1"),
    Column("at", UTCDateTime(), nullable=False),
    Column("program_id", BigId, nullable=True),
    Column("actor", String(120), nullable=False, comment="staff:<username> / key:<prefix> / …"),
    Column("role", String(200), nullable=False, server_default=""),
    Column("api_key_id", BigId, nullable=True),
    Column("ip", String(64), nullable=False, server_default=""),
    Column("user_agent", String(300), nullable=False, server_default=""),
    Column("action", String(64), nullable=False, comment='"resource.action", e.g. points.earn'),
    Column("target", String(200), nullable=False, comment='e.g. "member:42", "role:7"'),
    Column("before", JSON, nullable=True),
    Column("after", JSON, nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_entries_stripe_seq", "stripe", "seq", unique=True),
    Index("ix_audit_entries_program_at", "program_id", "at"),
    Index("ix_audit_entries_target", "target"),
)

audit_heads = Table(
    "audit_heads",
    metadata,
    Column("stripe", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False, server_default="0"),
    Column("hash", String(64), nullable=False, server_default="0" * 64),
    comment="each stripe's last entry; the lock writers of one stripe take",
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False),
    Column(
        "heads", JSON, nullable=False, comment='each stripe\'s head then: {"stripe": [seq, hash]}'
    ),
    Column("previous_root", String(64), nullable=False),
    Column("root_hash", String(64), nullable=False),
    comment="every stripe's head sealed together: a log rewritten and re-chained after a "
    "checkpoint no longer matches the root hash kept outside the database",
)
