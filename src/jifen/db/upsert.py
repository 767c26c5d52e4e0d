"""Insert a row or change the one there, in one statement on either backend (``INSERT … ON
CONFLICT`` on the table's primary key): no window between a read and a write for a
concurrent twin to slip into."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from jifen.db.uow import UnitOfWork


def _insert(uow: UnitOfWork, table: Table) -> Any:
    return (postgresql_insert if uow.dialect == "postgresql" else sqlite_insert)(table)


def upsert(
    uow: UnitOfWork,
    table: Table,
    row: Mapping[str, Any],
    change: Mapping[str, Any] | None = None,
) -> None:
    """Insert ``row``; when its primary key is taken, apply ``change`` to the row there
    (default: the non-key values of ``row``)."""
    keys = [column.name for column in table.primary_key.columns]
    values = change if change is not None else {k: v for k, v in row.items() if k not in keys}
    uow.conn.execute(
        _insert(uow, table).values(**row).on_conflict_do_update(index_elements=keys, set_=values)
    )


def insert_missing(uow: UnitOfWork, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert those of ``rows`` whose primary key is free; leave the others as they are."""
    if rows:
        uow.conn.execute(_insert(uow, table).values(list(rows)).on_conflict_do_nothing())


def upsert_many(
    uow: UnitOfWork,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    change: Callable[[Any], Mapping[str, Any]],
) -> None:
    """:func:`upsert` of many rows (each with the same keys) in one execution: ``change``
    is given the row that was refused (``excluded``) and says what to set on the one there."""
    if not rows:
        return
    keys = [column.name for column in table.primary_key.columns]
    statement = _insert(uow, table)
    statement = statement.on_conflict_do_update(
        index_elements=keys, set_=dict(change(statement.excluded))
    )
    uow.conn.execute(statement, list(rows))
