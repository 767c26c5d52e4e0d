"""Engines for the two backends, each set up the way the ledger needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url

from jifen.settings import normalise_database_url

READ_ONLY = "jifen_read_only"
"""Execution option: this transaction only reads (SQLite then begins DEFERRED)."""

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # A commit is acknowledged only once the write-ahead log holding it is on the disk, as
    # on PostgreSQL with synchronous_commit on: an earning a till was told of survives a
    # power cut or a crash of the machine. With NORMAL the log is synced only at
    # checkpoints, and such a crash may roll back the last acknowledged transactions.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=60000",
)
"""Set on every SQLite connection jifen opens."""


def make_engine(url: str, *, pool_size: int = 20) -> Engine:
    """An engine for ``url``: PostgreSQL through psycopg 3, or an SQLite file in WAL mode."""
    url = normalise_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database)
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size)


def _sqlite_engine(url: str, database: str | None) -> Engine:
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not the driver, decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the write lock up front (BEGIN IMMEDIATE): SQLite's row lock
        # equivalent, so a read-then-write never fails half-way with SQLITE_BUSY.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
