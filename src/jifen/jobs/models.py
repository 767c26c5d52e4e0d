"""Tables of the jobs domain: each run of a job, with where it has got to, and the parts of
a run that several workers share out."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from jifen.db.base import BigId, UTCDateTime, metadata

job_runs = Table(
    "job_runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("program_id", BigId, nullable=False),
    Column("run_at", UTCDateTime(), nullable=False, comment="the 'now' the run works for"),
    Column("state", String(16), nullable=False, comment="running, done"),
    Column("cursor", BigInteger, nullable=False, server_default="0",
           comment="the last member id (or other key) a finished chunk covered"),
    Column("chunks", Integer, nullable=False, server_default="0"),
    Column("figures", Text, nullable=False, server_default="{}",
           comment="JSON: what the run did so far (accounts, lots, points…)"),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    UniqueConstraint("name", "program_id", "run_at"),
)  # fmt: skip

job_parts = Table(
    "job_parts",
    metadata,
    Column("run_id", BigId, ForeignKey("job_runs.id"), primary_key=True),
    Column("after_key", BigInteger, primary_key=True, autoincrement=False,
           comment="the part covers the keys (member ids) above this one"),
    Column("last_key", BigInteger, nullable=True,
           comment="and up to this one; NULL: every key above"),
    Column("state", String(16), nullable=False, comment="todo, done"),
    Column("figures", Text, nullable=False, server_default="{}",
           comment="JSON: what the part did"),
    Column("done_at", UTCDateTime(), nullable=True),
)  # fmt: skip
"""A run of a job that shares out its keys: one row a part, made when the run starts. A
worker takes the next part that is still to do and that no other worker holds (SKIP
LOCKED), does it and marks it done in the same transaction: a worker that dies leaves
its part to do, unlocked, for the next."""
