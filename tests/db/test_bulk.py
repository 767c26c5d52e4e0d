"""Many rows in one statement, on both backends: what goes in comes back in order, an
update touches exactly its rows, and ``among`` finds what ``IN`` finds."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, String, Table, select, text

from jifen.db import bulk
from jifen.db.base import UTCDateTime
from jifen.db.uow import Database, UnitOfWork
from tests.db.scratch import scratch_table

AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def scratch(db: Database) -> Iterator[Table]:
    """A table of this test's own, dropped after it."""
    with scratch_table(
        db,
        "scratch",
        Column("code", String(40), nullable=False, unique=True),
        Column("note", String(200)),
        Column("at", UTCDateTime()),
    ) as table:
        yield table


def rows_of(db: Database, table: Table) -> list[tuple[object, ...]]:
    def read(uow: UnitOfWork) -> list[tuple[object, ...]]:
        return [tuple(r) for r in uow.conn.execute(select(table).order_by(table.c.id))]

    return db.run(read, read_only=True)


def test_insert_many_returns_the_rows_in_order_and_skips_conflicts(
    db: Database, scratch: Table
) -> None:
    rows = [
        {"code": f"c{i}", "note": None if i % 3 == 0 else f"说明 {i} 'quoted'", "at": AT}
        for i in range(500)
    ]
    ids = db.run(lambda uow: bulk.insert_many(uow.conn, scratch, rows, returning=[scratch.c.id]))
    assert [i for (i,) in ids] == sorted(i for (i,) in ids)
    stored = rows_of(db, scratch)
    assert [(r[1], r[2], r[3]) for r in stored] == [(r["code"], r["note"], r["at"]) for r in rows]
    again = [{"code": "c7", "note": "twin", "at": AT}, {"code": "new", "note": "x", "at": AT}]
    got = db.run(
        lambda uow: bulk.insert_many(
            uow.conn, scratch, again, returning=[scratch.c.code], skip_conflicts=True
        )
    )
    assert got == [("new",)]
    assert len(rows_of(db, scratch)) == 501


def test_update_many_changes_exactly_the_keyed_rows(db: Database, scratch: Table) -> None:
    rows = [{"code": f"c{i}", "note": "before", "at": AT} for i in range(300)]
    db.run(lambda uow: bulk.insert_many(uow.conn, scratch, rows))
    changes = [
        {"code": f"c{i}", "note": None if i % 2 else f"after {i}", "at": AT + timedelta(days=i)}
        for i in range(0, 300, 3)
    ]
    db.run(lambda uow: bulk.update_many(uow.conn, scratch, "code", changes))
    db.run(lambda uow: bulk.update_many(uow.conn, scratch, "code", []))  # nothing to do
    wanted = {r["code"]: (r["note"], r["at"]) for r in rows} | {
        c["code"]: (c["note"], c["at"]) for c in changes
    }
    assert {r[1]: (r[2], r[3]) for r in rows_of(db, scratch)} == wanted


@pytest.fixture
def numbered(db: Database, scratch: Table) -> Table:
    """The scratch table holding ids 1 to 2,000 but every seventh."""
    rows = [{"id": i, "code": f"n{i}", "note": None, "at": None} for i in range(1, 2_001)
            if i % 7]  # fmt: skip
    db.run(lambda uow: bulk.insert_many(uow.conn, scratch, rows))
    return scratch


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(wanted=st.lists(st.integers(min_value=-5, max_value=2_500), max_size=3_000))
def test_among_finds_what_in_finds(db: Database, numbered: Table, wanted: list[int]) -> None:
    expected = {i for i in wanted if 1 <= i <= 2_000 and i % 7}

    def both(uow: UnitOfWork) -> tuple[set[int], set[int]]:
        column = numbered.c.id
        by_among = uow.conn.execute(
            select(column).where(bulk.among(uow.dialect, column, wanted))
        ).scalars()
        by_in = uow.conn.execute(select(column).where(column.in_(wanted))).scalars()
        return set(by_among), set(by_in)

    by_among, by_in = db.run(both, read_only=True)
    assert by_among == by_in == expected


_ELEMENTS = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    # Any text PostgreSQL can hold (no NUL, no lone surrogate, which UTF-8 cannot encode):
    # quotes, backslashes, braces, commas, spaces, the word NULL and non-ASCII among them.
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=12,
    ),
    st.sampled_from(["NULL", "null", '"', "\\", "{}", "a,b", " ", ""]),
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(values=st.lists(_ELEMENTS, max_size=8))
def test_array_literal_round_trips_through_postgresql(pg: Database, values: list[object]) -> None:
    texts = [None if v is None else str(v) for v in values]
    numbers = [v if v is None or isinstance(v, int) else len(str(v)) for v in values]
    moments = [None if v is None else AT + timedelta(microseconds=len(str(v))) for v in values]

    def read(uow: UnitOfWork) -> tuple[list[object], list[object], list[object]]:
        driver = uow.conn.connection.driver_connection
        assert driver is not None
        row = driver.execute(
            "SELECT %(t)s::text[], %(n)s::bigint[], %(m)s::timestamptz[]",
            {
                "t": bulk.array_literal(texts),
                "n": bulk.array_literal(numbers),
                "m": bulk.array_literal(moments),
            },
        ).fetchone()
        assert row is not None
        return row[0], row[1], row[2]

    got_texts, got_numbers, got_moments = pg.run(read, read_only=True)
    assert got_texts == texts
    assert got_numbers == numbers
    assert got_moments == moments


def test_a_read_only_unit_of_work_refuses_writes_in_the_suite(pg: Database) -> None:
    """The suite's guard: PostgreSQL runs a read-only unit of work without a transaction,
    so a write slipped into one would not be atomic; the suite's engine refuses it."""
    touch = text("UPDATE programs SET name = name WHERE id = -1")
    with pytest.raises(AssertionError, match="a write in a read-only unit of work"):
        pg.run(lambda uow: uow.conn.execute(touch), read_only=True)
    pg.run(lambda uow: uow.conn.execute(touch))  # the same in a writing one is fine
