"""Tables of a test's own, created for it and dropped after it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Column, Constraint, Integer, MetaData, Table

from jifen.db.uow import Database


@contextmanager
def scratch_table(
    db: Database, prefix: str, *columns: Column[object] | Constraint
) -> Iterator[Table]:
    """A table with an integer ``id`` key and ``columns`` (and constraints), dropped when the
    block ends."""
    table = Table(
        f"{prefix}_{uuid.uuid4().hex[:10]}",
        MetaData(),
        Column("id", Integer, primary_key=True),
        *columns,
    )
    table.create(db.engine)
    try:
        yield table
    finally:
        table.drop(db.engine)
