"""Many rows into one table in one statement: on PostgreSQL an ``INSERT … SELECT`` over
``unnest`` of one array per column (one round trip, a query text that never changes, so it
is parsed and planned once); elsewhere an executemany. For jobs that write thousands of
rows a chunk (notifications, tier changes). :func:`update_many` does the same for updates,
and :func:`among` tests a column against many ids in one parameter (:func:`among_bound`: in
a statement built once, the ids given when it runs)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, ColumnElement, Table, any_, bindparam, literal
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from jifen.db.prepared import execute

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


@cache
def _statement(table: Table, names: tuple[str, ...], returning: tuple[str, ...],
               skip_conflicts: bool) -> str:  # fmt: skip
    types = [table.c[name].type.compile(dialect=_DIALECT) for name in names]
    # Binary parameters: an array of thousands of values is dumped several times faster.
    arrays = ", ".join(f"%({name})b::{kind}[]" for name, kind in zip(names, types, strict=True))
    columns = ", ".join(f'"{name}"' for name in names)
    text = (
        f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM unnest({arrays})'  # noqa: S608
        f" WITH ORDINALITY AS x({columns}, n) ORDER BY n"
    )
    if skip_conflicts:
        text += " ON CONFLICT DO NOTHING"
    if returning:
        text += " RETURNING " + ", ".join(f'"{name}"' for name in returning)
    return text


@cache
def _update_statement(table: Table, key: str, names: tuple[str, ...]) -> str:
    columns = (key, *names)
    types = [table.c[name].type.compile(dialect=_DIALECT) for name in columns]
    arrays = ", ".join(f"%({name})b::{kind}[]" for name, kind in zip(columns, types, strict=True))
    assignments = ", ".join(f'"{name}" = v."{name}"' for name in names)
    aliases = ", ".join(f'"{name}"' for name in columns)
    return (
        f'UPDATE "{table.name}" SET {assignments} FROM unnest({arrays}) AS v({aliases})'  # noqa: S608
        f' WHERE "{table.name}"."{key}" = v."{key}"'
    )


def update_many(
    conn: Connection, table: Table, key: str, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Update the rows of ``table`` whose ``key`` column holds each row's ``key`` value with
    that row's other values (each row with the same keys): one statement on PostgreSQL."""
    if not rows:
        return
    names = tuple(name for name in rows[0] if name != key)
    if conn.dialect.name == "postgresql":
        params = {name: [row[name] for row in rows] for name in (key, *names)}
        execute(conn, _update_statement(table, key, names), params, prepare=None)
        return
    statement = (
        table.update()
        .where(table.c[key] == bindparam(f"k_{key}"))
        .values({name: bindparam(f"k_{name}") for name in names})
    )
    conn.execute(statement, [{f"k_{name}": value for name, value in row.items()} for row in rows])


def insert_many(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    returning: Sequence[Column[Any]] = (),
    skip_conflicts: bool = False,
) -> list[tuple[Any, ...]]:
    """Insert ``rows`` (each with the same keys); the ``returning`` columns of the rows
    inserted, in the order of ``rows`` on PostgreSQL. ``skip_conflicts`` leaves out rows
    that would break a unique constraint (``ON CONFLICT DO NOTHING``)."""
    if not rows:
        return []
    names = tuple(rows[0])
    wanted = tuple(column.name for column in returning)
    if conn.dialect.name == "postgresql":
        params = {name: _values(table.c[name], [row[name] for row in rows]) for name in names}
        sql = _statement(table, names, wanted, skip_conflicts)
        cursor = execute(conn, sql, params, prepare=None)
        return [tuple(row) for row in cursor.fetchall()] if wanted else []
    statement = _sqlite_statement(table, wanted, skip_conflicts)
    if wanted:
        return [tuple(row) for row in conn.execute(statement, list(rows))]
    conn.execute(statement, list(rows))
    return []


@cache
def _sqlite_statement(table: Table, returning: tuple[str, ...], skip_conflicts: bool) -> Any:
    """:func:`insert_many`'s statement elsewhere than on PostgreSQL, built once."""
    statement: Any = sqlite_insert(table)
    if skip_conflicts:
        statement = statement.on_conflict_do_nothing()
    if returning:
        columns = [table.c[name] for name in returning]
        statement = statement.returning(*columns, sort_by_parameter_order=not skip_conflicts)
    return statement


def _values(column: Column[Any], values: list[Any]) -> list[Any]:
    """A column's values as the driver takes them: JSON as its text (as SQLAlchemy writes
    it; the array of text is cast to ``json[]``)."""
    if isinstance(column.type, JSON):
        return [None if value is None else json.dumps(value) for value in values]
    return values


def array_literal(values: Sequence[Any]) -> str:
    """A short array as PostgreSQL's text form (``{1,NULL,"a \\"b\\""}``), for a parameter
    the statement casts (``%(x)s::bigint[]``). For the arrays of one posting: psycopg spends
    some 25 µs finding the dumper of each list it is given, more than the whole text form of
    a few values costs; arrays of thousands of values are faster dumped by psycopg itself."""
    parts = []
    for value in values:
        if value is None:
            parts.append("NULL")
        elif isinstance(value, bool):
            parts.append("true" if value else "false")
        elif isinstance(value, int):
            parts.append(str(value))
        else:
            text = str(value).replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'"{text}"')
    return "{" + ",".join(parts) + "}"


def among(
    dialect: str,
    column: ColumnElement[Any],
    ids: Sequence[Any],
    element: TypeEngine[Any] | None = None,
) -> ColumnElement[bool]:
    """``column IN (ids)``. On PostgreSQL ``column = ANY(array)``: one parameter however many
    ids, where an ``IN`` list renders, sends and parses a parameter each (a job's chunk of
    thousands of members reads several times faster). ``element``: the type of the values
    when they are not integers (``String()``)."""
    if dialect == "postgresql":
        kind = element if element is not None else BigInteger()
        return column == any_(literal(list(ids), postgresql.ARRAY(kind)))
    return column.in_(ids)


def among_bound(
    dialect: str,
    column: ColumnElement[Any],
    name: str,
    element: TypeEngine[Any] | None = None,
) -> ColumnElement[bool]:
    """:func:`among` with the ids as the bound parameter ``name``, a list given when the
    statement runs: for a statement built once (a query of every event's path), which
    then costs no construction a call. ``column = ANY(array)`` on PostgreSQL, an expanding
    ``IN`` elsewhere."""
    if dialect == "postgresql":
        kind = element if element is not None else BigInteger()
        return column == any_(bindparam(name, type_=postgresql.ARRAY(kind)))
    return column.in_(bindparam(name, expanding=True))
