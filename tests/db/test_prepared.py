"""A statement run through the driver gives what ``conn.execute`` gives, on both backends:
values bound and read through the column types (times in UTC, JSON), rows as tuples, in the
unit of work's own transaction."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH
from sqlalchemy import JSON, Column, String, Table, bindparam, select

import jifen
from jifen.db.base import UTCDateTime
from jifen.db.prepared import (
    Prepared,
    PreparedSQL,
    Read,
    compact,
    driver,
    execute,
    in_transaction,
    read_one,
    read_together,
)
from jifen.db.uow import Database, UnitOfWork
from tests.db.scratch import scratch_table

SHANGHAI = timezone(timedelta(hours=8))


@pytest.fixture
def scratch(db: Database) -> Iterator[Table]:
    with scratch_table(
        db, "prepared", Column("code", String(40), nullable=False), Column("body", JSON),
        Column("at", UTCDateTime()),
    ) as table:  # fmt: skip
        yield table


def _insert(scratch: Table) -> Prepared:
    return Prepared(
        scratch.insert().values({name: bindparam(name) for name in ("code", "body", "at")})
    )


def _by_code(scratch: Table, *, named: bool = False) -> Prepared:
    query = select(scratch.c.code, scratch.c.body, scratch.c.at)
    return Prepared(query.where(scratch.c.code == bindparam("code")), named=named)


def test_rows_come_back_as_conn_execute_gives_them(db: Database, scratch: Table) -> None:
    insert, read = _insert(scratch), _by_code(scratch)
    body = {"名称": "积分", "lines": [1, None, {"x": 2.5}]}
    at = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=SHANGHAI)
    with db.transaction() as uow:
        assert insert.rows(uow.conn, {"code": "a", "body": body, "at": at}) in ([], [(1,)])
        insert.rows(uow.conn, {"code": "b", "body": None, "at": None})
        # the same transaction sees its own rows, through either path
        assert read.one_or_none(uow.conn, {"code": "a"}) == ("a", body, at)
    with db.transaction(read_only=True) as uow:
        for code in ("a", "b"):
            fast = read.one_or_none(uow.conn, {"code": code})
            plain = uow.conn.execute(read.statement, {"code": code}).one()
            assert fast == tuple(plain)
        assert fast is not None and fast[1:] == (None, None)
        stored = read.one_or_none(uow.conn, {"code": "a"})
        assert stored is not None and stored[2].tzinfo == UTC and stored[2] == at
        assert read.one_or_none(uow.conn, {"code": "none such"}) is None
        assert read.rows(uow.conn, {"code": "a"}) == [stored]


def test_a_rolled_back_transaction_leaves_nothing(db: Database, scratch: Table) -> None:
    insert = Prepared(scratch.insert().values(code=bindparam("code")))

    def fail_after_insert() -> None:
        with db.transaction() as uow:
            insert.rows(uow.conn, {"code": "gone"})
            raise RuntimeError("the use case failed")

    with pytest.raises(RuntimeError):
        fail_after_insert()
    with db.transaction(read_only=True) as uow:
        assert uow.conn.execute(select(scratch.c.id)).all() == []


def test_more_than_one_row_is_refused_where_one_was_expected(db: Database, scratch: Table) -> None:
    insert = Prepared(scratch.insert().values(code=bindparam("code")))
    every = Prepared(  # a value of the statement's own ("z") beside the one bound at each call
        select(scratch.c.code).where(scratch.c.code != bindparam("code"), scratch.c.code != "z")
    )
    with db.transaction() as uow:
        for code in ("x", "y", "z"):
            insert.rows(uow.conn, {"code": code})
        assert sorted(every.rows(uow.conn, {"code": ""})) == [("x",), ("y",)]
        with pytest.raises(ValueError, match="at most one row"):
            every.one_or_none(uow.conn, {"code": ""})


def test_reads_together_answer_what_each_read_alone_answers(db: Database, scratch: Table) -> None:
    # Two reads with a value of the same name ("code"), one with a value of its own ("z"),
    # rows named and plain, JSON and times read through the column types.
    insert, by_code = _insert(scratch), _by_code(scratch, named=True)
    id_of = Prepared(
        select(scratch.c.id).where(scratch.c.code == bindparam("code"), scratch.c.code != "z")
    )
    at = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=SHANGHAI)
    with db.transaction() as uow:
        insert.rows(uow.conn, {"code": "a", "body": {"积分": [1, 2]}, "at": at})
        insert.rows(uow.conn, {"code": "z", "body": None, "at": None})

    def reads(first: str, second: str) -> list[Read[Any]]:
        return [
            Read(by_code, {"code": first}, lambda row: row),
            Read(None, {}, lambda _: "known already"),
            Read(id_of, {"code": second}, lambda row: row),
            Read(by_code, {"code": second}, lambda row: None if row is None else row.body),
        ]

    with db.transaction(read_only=True) as uow:
        for first, second in [("a", "z"), ("z", "a"), ("none", "a"), ("a", "none")]:
            together = read_together(uow.conn, *reads(first, second))
            alone = [read_one(uow.conn, read) for read in reads(first, second)]
            assert together == alone
        found = read_together(uow.conn, *reads("a", "a"))
        assert found[0].at == at and found[0].at.tzinfo == UTC and found[0].code == "a"
        assert found[1:] == ["known already", (1,), {"积分": [1, 2]}]


def test_reads_together_answer_in_order_so_the_first_refusal_is_the_one_raised(
    db: Database, scratch: Table
) -> None:
    read = Prepared(select(scratch.c.id).where(scratch.c.code == bindparam("code")))

    def refuse(name: str) -> Callable[[Any], Any]:
        def answer(row: Any) -> Any:
            if row is None:
                raise LookupError(name)
            return row

        return answer

    with db.transaction(read_only=True) as uow, pytest.raises(LookupError, match="first"):
        read_together(
            uow.conn, Read(read, {"code": "x"}, refuse("first")),
            Read(read, {"code": "y"}, refuse("second")),
        )  # fmt: skip


CODES = ("a", "z", "none")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(chosen=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(CODES)), max_size=6))
def test_any_reads_together_answer_as_alone(
    db: Database, scratch: Table, chosen: list[tuple[int, str]]
) -> None:
    with db.transaction() as uow:
        if not _by_code(scratch).rows(uow.conn, {"code": "a"}):
            _insert(scratch).rows(uow.conn, {"code": "a", "body": [1], "at": datetime.now(UTC)})
            _insert(scratch).rows(uow.conn, {"code": "z", "body": None, "at": None})
    queries = [
        _by_code(scratch, named=True),
        _by_code(scratch),
        Prepared(select(scratch.c.id).where(scratch.c.code == bindparam("code"))),
    ]
    reads = [Read(queries[which], {"code": code}, lambda row: row) for which, code in chosen]
    with db.transaction(read_only=True) as uow:
        assert read_together(uow.conn, *reads) == [read_one(uow.conn, read) for read in reads]


def _driver_statements() -> Iterator[tuple[str, str]]:
    """Every statement of jifen's modules written for the driver (module-level SQL text with
    ``%(name)s`` placeholders, and :class:`PreparedSQL` reads): (where, its text)."""
    for found in pkgutil.walk_packages(jifen.__path__, "jifen."):
        if found.name.endswith("__main__") or found.name.startswith("jifen.db.migrations"):
            continue  # the command line, and Alembic's scripts, which run as they load
        module = importlib.import_module(found.name)
        for name, value in vars(module).items():
            if isinstance(value, PreparedSQL):
                value = value.sql
            if isinstance(value, str) and "%(" in value and _SQL_WORD.search(value):
                yield f"{found.name}.{name}", value


_SQL_WORD = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b")


def test_every_driver_statement_is_short_enough_for_psycopg_to_keep_its_conversion() -> None:
    """psycopg caches a statement's placeholder conversion only up to 4096 bytes; a longer
    statement is scanned again on every call (``compact`` makes one fit)."""
    statements = dict(_driver_statements())
    assert "jifen.points.store._POSTGRESQL_DEBIT_AT_ONCE" in statements
    too_long = {
        where: len(sql.encode())
        for where, sql in statements.items()
        if len(sql.encode()) > MAX_CACHED_STATEMENT_LENGTH
    }
    assert not too_long, f"over {MAX_CACHED_STATEMENT_LENGTH} bytes: {too_long}"


def test_compact_drops_comment_lines_and_indentation_only() -> None:
    sql = """
    SELECT 'a  b' AS x,  -- kept: not a whole line
        -%(amount)s::bigint
      -- dropped
    FROM t
    """
    assert (
        compact(sql)
        == "SELECT 'a  b' AS x,  -- kept: not a whole line\n-%(amount)s::bigint\nFROM t"
    )


def test_a_statement_alone_commits_by_itself_only_where_no_transaction_is_open(
    pg: Database,
) -> None:
    with scratch_table(pg, "alone", Column("code", String(40), nullable=False)) as table:
        sql = f"INSERT INTO {table.name} (code) VALUES (%(code)s)"

        def failing(*steps: tuple[str, bool]) -> list[bool]:
            """Run inserts (code, alone) in one unit of work that then fails; whether a
            transaction was open after each, and the driver connection's autocommit last."""
            seen: list[bool] = []

            def work(uow: UnitOfWork) -> None:
                for code, alone in steps:
                    execute(uow.conn, sql, {"code": code}, alone=alone)
                    seen.append(in_transaction(uow.conn))
                seen.append(driver(uow.conn).autocommit)
                raise ZeroDivisionError

            with pytest.raises(ZeroDivisionError):
                pg.run(work)
            return seen

        # first in its unit of work: its own transaction, committed though the unit then fails
        assert failing(("first", True)) == [False, False]
        # after another statement: inside the open transaction, undone with it
        assert failing(("second", False), ("third", True)) == [True, True, False]
        # without ``alone``: in the transaction as always
        assert failing(("fourth", False)) == [True, False]
        codes = pg.run(
            lambda uow: sorted(uow.conn.execute(select(table.c.code)).scalars()), read_only=True
        )
        assert codes == ["first"]
