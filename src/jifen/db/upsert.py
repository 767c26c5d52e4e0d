"""Insert a row or change the one there, in one statement on either backend (``INSERT … ON
CONFLICT`` on the table's primary key): no window between a read and a write for a
concurrent twin to slip into."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Table, bindparam, cast, func, select
from sqlalchemy.dialects import postgresql
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
    """:func:`upsert` of many rows (each with the same keys, no two with the same primary
    key) in one execution: ``change`` is given the row that was refused (``excluded``) and
    says what to set on the one there. The statement is built once for each table, keys and
    ``change`` (a function of the module, not a new lambda a call, for it to be reused).

    On PostgreSQL the rows go as one array a column, unnested in their order: one statement
    however many rows, where an executemany runs (and binds) the statement once a row."""
    if not rows:
        return
    names = tuple(rows[0])
    statement = _upsert_statement(uow.dialect, table, names, change)
    if uow.dialect == "postgresql":
        uow.conn.execute(
            statement, {f"unnest_{name}": [row[name] for row in rows] for name in names}
        )
    else:
        uow.conn.execute(statement, list(rows))


@lru_cache(maxsize=64)
def _upsert_statement(
    dialect: str, table: Table, names: tuple[str, ...], change: Callable[[Any], Mapping[str, Any]]
) -> Any:
    keys = [column.name for column in table.primary_key.columns]
    if dialect == "postgresql":
        arrays = [
            cast(bindparam(f"unnest_{name}"), postgresql.ARRAY(table.c[name].type))
            for name in names
        ]
        source = (
            func.unnest(*arrays).table_valued(*names, with_ordinality="n").render_derived("new")
        )
        insert = postgresql_insert(table).from_select(
            list(names), select(*(source.c[name] for name in names)).order_by(source.c.n)
        )
        return insert.on_conflict_do_update(index_elements=keys, set_=dict(change(insert.excluded)))
    statement = sqlite_insert(table)
    return statement.on_conflict_do_update(
        index_elements=keys, set_=dict(change(statement.excluded))
    )
