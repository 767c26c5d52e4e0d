"""Tables of the jobs domain: each run of a job, with where it has got to."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, String, Table, Text, UniqueConstraint

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
