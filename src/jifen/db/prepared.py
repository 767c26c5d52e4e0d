"""A Core statement that every request runs, sent to PostgreSQL through the driver itself.

SQLAlchemy's execution path (parameters, cursor wrapping, result metadata) costs some
100 µs of Python a statement; an API write runs half a dozen such statements around its
change. :class:`Prepared` compiles its statement once, binds values as the column types
do, and runs it as a server-side prepared statement on the psycopg connection under the
unit of work (the same transaction), answering plain tuples. SQLite, whose driver is in
process, takes the ordinary path.

Values go in and come out through the column types' own processors (a time is stored
and read in UTC, as everywhere else), so a row is what ``conn.execute`` would give, as a
tuple (``named``: a named tuple, fields by the columns' keys). Values come from named
``bindparam`` or the statement itself (no expanding ``IN``).

A use case that starts with several single-row reads of different domains (the member, the
reward, the programme's policy) runs them as one statement with :func:`read_together`: each
domain's service offers its read as a :class:`Read` (its statement, its values and what the
service makes of the row), so no domain queries another's tables, and the reads cost one
round trip instead of one each.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.pq import ExecStatus, TransactionStatus
from sqlalchemy import text
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.expression import Executable

Processor = Callable[[Any], Any]
T = TypeVar("T")
TUPLES_OK = ExecStatus.TUPLES_OK


def driver(conn: Connection) -> Any:
    """The driver's connection under SQLAlchemy's (psycopg's or sqlite3's), in the same
    transaction: what the hot paths talk to directly (prepared statements, plain tuples,
    arrays as parameters)."""
    connection = conn.connection.driver_connection
    assert connection is not None, "a unit of work holds a live connection"
    return connection


def execute(
    conn: Connection,
    sql: str,
    params: Mapping[str, Any],
    *,
    prepare: bool | None = True,
    alone: bool = False,
) -> Any:
    """Run ``sql`` with ``params`` on PostgreSQL's driver connection in ``conn``'s transaction
    (``prepare``: as a server-side prepared statement; ``None``: once it has run five
    times); the cursor, whose rows must be read before the next statement runs.

    ``alone``: where nothing has opened a transaction on the connection yet, the statement
    is a transaction of its own, committed when it returns (one round trip, where BEGIN,
    the statement and COMMIT take three); :func:`in_transaction` then answers False. Only
    for a unit of work whose caller said that this is all it writes
    (:attr:`jifen.db.uow.UnitOfWork.alone`).

    Every call uses the same cursor of the driver connection, made the first time: a new
    cursor a statement cost some 12 µs, a tenth of a cheap statement's cost here."""
    info = conn.connection.info  # lives as long as the driver connection does
    cursor = info.get(_CURSOR)
    if cursor is None:
        cursor = info[_CURSOR] = driver(conn).cursor()
    if alone and not in_transaction(conn):
        raw = cursor.connection
        raw.autocommit = True
        try:
            return cursor.execute(sql, params, prepare=prepare)
        finally:
            try:
                raw.autocommit = False
            except psycopg.Error:  # a broken connection: never back in the pool as it is
                raw.close()
    return cursor.execute(sql, params, prepare=prepare)


def in_transaction(conn: Connection) -> bool:
    """PostgreSQL: whether a transaction is open on ``conn``'s driver connection (after a
    statement run ``alone``: none, what it wrote is committed and its locks are gone)."""
    return bool(driver(conn).info.transaction_status != TransactionStatus.IDLE)


_CURSOR = "jifen.cursor"


def compact(sql: str) -> str:
    """``sql`` without its comment lines and indentation (no literal in it may span lines).

    psycopg converts a statement's ``%(name)s`` placeholders once and caches the result,
    but only for statements of at most 4096 bytes (``MAX_CACHED_STATEMENT_LENGTH``); a
    longer one is scanned again on every call, which costs over 100 µs of Python for the
    ledger's longest statements. Their layout and comments stay in the source."""
    kept = (line.strip() for line in sql.splitlines())
    return "\n".join(line for line in kept if line and not line.startswith("--"))


@dataclass(frozen=True)
class _Compiled:
    dialect: Dialect
    sql: str
    binds: dict[str, Processor]
    fixed: dict[str, Any]
    """Values the statement holds itself (``column == "points"``), bound already."""
    results: list[Processor | None]


class Prepared:
    """``statement``, compiled once for PostgreSQL and run many times."""

    def __init__(self, statement: Executable, *, named: bool = False) -> None:
        self.statement = statement
        self._compiled: _Compiled | None = None
        self._make: Callable[[Any], tuple[Any, ...]] = tuple
        if named:
            keys = [column.key for column in getattr(statement, "exported_columns", ())]
            self._make = namedtuple("Row", keys)._make  # type: ignore[attr-defined]

    def _postgresql(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled
        if compiled is None or compiled.dialect is not dialect:
            sql = self.statement.compile(dialect=dialect)  # type: ignore[attr-defined]
            binds, fixed = {}, {}
            for name, bind in sql.binds.items():
                processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if not bind.required:
                    value = bind.effective_value
                    fixed[name] = processor(value) if processor is not None else value
                elif processor is not None:
                    binds[name] = processor
            # The columns it answers (selected or returned), in order; an insert's implicit
            # RETURNING of its key comes after them and needs nothing.
            results = [
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in getattr(self.statement, "exported_columns", ())
            ]
            compiled = self._compiled = _Compiled(dialect, str(sql), binds, fixed, results)
        return compiled

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run it in ``conn``'s transaction; every row it answers."""
        if conn.dialect.name != "postgresql":
            result = conn.execute(self.statement, dict(params))
            return [self._make(row) for row in result] if result.returns_rows else []
        compiled = self._postgresql(conn.dialect)
        binds = compiled.binds
        values = {
            name: binds[name](value) if name in binds else value for name, value in params.items()
        }
        values.update(compiled.fixed)
        cursor = execute(conn, compiled.sql, values)
        if cursor.pgresult.status != TUPLES_OK:  # (``description`` would build each column)
            return []
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        make = self._make
        if any(compiled.results):
            return [make(_processed(row, compiled.results)) for row in rows]
        return rows if make is tuple else [make(row) for row in rows]

    def one_or_none(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The single row it answers, or ``None``."""
        rows = self.rows(conn, params)
        if len(rows) > 1:
            raise ValueError(f"expected at most one row, got {len(rows)}")
        return rows[0] if rows else None


class PreparedSQL(Prepared):
    """A PostgreSQL statement written as SQL (``%(name)s`` parameters, values already as the
    driver takes them) answering ``width`` columns as they come: a read in the hot path's
    own terms (a row lock, say) that can still go :func:`read_together` with others."""

    def __init__(self, sql: str, width: int) -> None:
        super().__init__(text(sql))
        self.sql = sql
        self.width = width

    def _postgresql(self, dialect: Dialect) -> _Compiled:
        compiled = self._compiled
        if compiled is None or compiled.dialect is not dialect:
            compiled = self._compiled = _Compiled(dialect, self.sql, {}, {}, [None] * self.width)
        return compiled

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        assert conn.dialect.name == "postgresql", "SQL written for PostgreSQL"
        return list(execute(conn, self.sql, params).fetchall())


def _processed(row: tuple[Any, ...], processors: list[Processor | None]) -> tuple[Any, ...]:
    values = list(row)
    for i, processor in enumerate(processors):
        if processor is not None:
            values[i] = processor(values[i])
    return tuple(values)


# --------------------------------------------------------------------------- reads together


@dataclass(frozen=True)
class Read(Generic[T]):
    """A single-row read as a domain's service offers it: its statement (``None`` when the
    answer is known already, say cached in the transaction), the statement's values, and
    what the service makes of the row it found or of ``None``."""

    query: Prepared | None
    params: Mapping[str, Any]
    answer: Callable[[Any], T]


def read_together(conn: Connection, *reads: Read[Any]) -> list[Any]:
    """Each read's answer, in order (the first read to refuse raises before the others are
    answered), for one round trip on PostgreSQL: the statements, each answering at most one
    row, are joined laterally into one. SQLite runs them one after the other."""
    rows = read_rows(conn, *reads)
    return [read.answer(row) for read, row in zip(reads, rows, strict=True)]


def read_rows(conn: Connection, *reads: Read[Any]) -> list[Any]:
    """:func:`read_together`'s rows, each read's row or ``None``, not yet answered: for a
    caller that decides by the first row whether the others are answered at all."""
    pending = [read for read in reads if read.query is not None]
    if len(pending) < 2 or conn.dialect.name != "postgresql":
        found = {id(read): _one(conn, read) for read in pending}
    else:
        found = dict(zip(map(id, pending), _joined(conn, pending), strict=True))
    return [found.get(id(read)) for read in reads]


def read_one(conn: Connection, read: Read[T]) -> T:
    """A read run alone: its answer."""
    return read.answer(_one(conn, read) if read.query is not None else None)


def _one(conn: Connection, read: Read[Any]) -> tuple[Any, ...] | None:
    assert read.query is not None
    return read.query.one_or_none(conn, read.params)


_PLACEHOLDER = re.compile(r"(?<!%)%\((\w+)\)s")


@dataclass(frozen=True)
class _Joined:
    sql: str
    parts: list[tuple[Prepared, _Compiled]]


_JOINED: dict[tuple[int, ...], _Joined] = {}


def _lateral(i: int, sql: str) -> str:
    """The ``i``-th read as a lateral join: a leading ``true`` tells a row found from none,
    and its values are renamed apart from the other reads' (``%(member)s`` → ``%(p0_member)s``)."""
    renamed = _PLACEHOLDER.sub(lambda m: f"%(p{i}_{m.group(1)})s", sql)
    return f"\nLEFT JOIN LATERAL (SELECT true, q.* FROM ({renamed}) AS q) AS p{i} ON true"  # noqa: S608


def _joined(conn: Connection, reads: list[Read[Any]]) -> list[tuple[Any, ...] | None]:
    queries: list[Prepared] = [read.query for read in reads]  # type: ignore[misc]
    joined = _JOINED.get(tuple(map(id, queries)))
    if joined is None or joined.parts[0][1].dialect is not conn.dialect:
        parts = [(query, query._postgresql(conn.dialect)) for query in queries]
        laterals = "".join(_lateral(i, compiled.sql) for i, (_, compiled) in enumerate(parts))
        joined = _Joined(f"SELECT * FROM (SELECT 1) AS one{laterals}", parts)  # noqa: S608
        _JOINED[tuple(map(id, queries))] = joined
    values: dict[str, Any] = {}
    for i, ((_, compiled), read) in enumerate(zip(joined.parts, reads, strict=True)):
        binds = compiled.binds
        for name, value in read.params.items():
            values[f"p{i}_{name}"] = binds[name](value) if name in binds else value
        for name, value in compiled.fixed.items():
            values[f"p{i}_{name}"] = value
    found = execute(conn, joined.sql, values).fetchall()
    if len(found) != 1:
        raise ValueError(f"reads together must each answer at most one row, got {len(found)}")
    row = found[0]
    answers: list[tuple[Any, ...] | None] = []
    at = 1  # after the anchor's column
    for query, compiled in joined.parts:
        width = len(compiled.results)
        if row[at] is None:
            answers.append(None)
        else:
            values_of = row[at + 1 : at + 1 + width]
            if any(compiled.results):
                values_of = _processed(values_of, compiled.results)
            answers.append(query._make(values_of))
        at += 1 + width
    return answers
