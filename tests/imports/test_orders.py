"""Orders files: an order is imported whole or not at all, its lines on consecutive rows;
a refusal names the row and column to put right; postings say which store (and merchant)."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from jifen.db.uow import Database
from jifen.imports import service as imports
from jifen.imports.core import Misshapen, Place, Record, RowError, order_records
from jifen.points.models import posting_origins, postings
from tests.events.test_service import activate
from tests.factories import assert_ledger_sound, new_program
from tests.imports.test_csv import ORDER_HEADER, RATES, balances, read_csv, setup_members, write

WHEN = "2026-01-01T10:00:00+08:00"
ORDER_LINES = 500  # the most lines an order.paid event has


def write_raw(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join([",".join(ORDER_HEADER), *lines]) + "\n", encoding="utf-8")
    return path


def test_a_misshapen_row_refuses_its_whole_order_which_then_imports_whole(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    path = write_raw(tmp_path / "orders.csv", [
        f"o1,c0,{WHEN},TV,家电,10000",
        f'o1,c0,{WHEN},T1,日用品,"5,000",x',  # one field too many, order id o1
        f"o1,c0,{WHEN},T2,日用品,2000",
        f"o2,c1,{WHEN},TV,家电,10000",
        f",c1,{WHEN},T1,日用品,5000,x",  # no order id: o2's, which goes on after it
        f"o2,c1,{WHEN},T2,日用品,2000",
        f"o3,c2,{WHEN},T1,日用品,5000",
    ])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert (report.records, report.accepted, report.refused) == (3, 1, 2)
    assert balances(db, ids) == {"c0": 0, "c1": 0, "c2": 50}
    header, *errors = read_csv(tmp_path / "orders.errors.csv")
    assert [(row[0], row[6], row[7], row[9]) for row in errors] == [
        ("o1", "2", "", "refused with the rest of its order: row 3 is at fault"),
        ("o1", "3", "row", "has 7 fields, the header 6"),
        ("o1", "4", "", "refused with the rest of its order: row 3 is at fault"),
        ("o2", "5", "", "refused with the rest of its order: row 6 is at fault"),
        ("", "6", "row", "has 7 fields, the header 6"),
        ("o2", "7", "", "refused with the rest of its order: row 6 is at fault"),
    ]
    # put right in the error file, which imports both orders whole
    errors[1][5], errors[4][0], errors[4][5] = "5000", "o2", "5000"
    fixed = write(tmp_path / "fixed.csv", header, errors)
    again = imports.run_import(db, program_id=program.id, kind="orders", path=fixed)
    assert (again.records, again.accepted, again.refused) == (2, 2, 0)
    assert balances(db, ids) == {"c0": 370, "c1": 370, "c2": 50}
    assert_ledger_sound(db, program.id)


def test_every_part_of_an_order_split_over_the_file_is_refused_so_that_it_imports_whole(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    rows = [
        ["s1", "c0", WHEN, "T1", "日用品", 5000],
        ["s2", "c1", WHEN, "T1", "日用品", 5000],
        ["s1", "c0", WHEN, "T2", "日用品", 2000],
        ["s3", "c2", WHEN, "T1", "x", 100],
    ]
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)

    class Stop(Exception):
        pass

    def interrupt(report: imports.Report) -> None:
        if report.records == 2:
            raise Stop

    with pytest.raises(Stop):  # the first part is refused before the run stops, the rest after
        imports.run_import(
            db, program_id=program.id, kind="orders", path=path, batch=2, progress=interrupt
        )
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=2)
    assert (report.resumed_from, report.accepted, report.replayed, report.refused) == (2, 1, 0, 1)
    header, *refused = read_csv(tmp_path / "orders.errors.csv")
    why = "the lines of order s1 must be on consecutive rows: its parts begin on row 2, row 4"
    assert [row[6:] for row in refused] == [
        ["2", "order_id", "invalid_input", why], ["4", "order_id", "invalid_input", why]
    ]  # fmt: skip
    assert balances(db, ids) == {"c0": 0, "c1": 50, "c2": 1}
    # its rows together in the error file, the order imports whole
    fixed = write(tmp_path / "fixed.csv", header, refused)
    again = imports.run_import(db, program_id=program.id, kind="orders", path=fixed)
    assert (again.accepted, again.refused) == (1, 0)
    assert balances(db, ids) == {"c0": 70, "c1": 50, "c2": 1}


def test_a_refused_order_line_is_named_by_its_row_and_column(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    setup_members(db, program.id)
    rows = [["n1", "c0", WHEN, "TV", "家电", 10000], ["n1", "c0", WHEN, "T1", "日用品", -5]]
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)
    imports.run_import(db, program_id=program.id, kind="orders", path=path, language="zh")
    _, first, second = read_csv(tmp_path / "orders.errors.csv")
    assert first[6:9] == ["2", "", "invalid_input"]
    assert first[9] == "随所在订单一并拒绝:第 3 行有误"
    assert second[6:8] == ["3", "amount_fen"]


def test_an_amount_in_yuan_or_with_separators_is_refused_saying_to_write_whole_fen(
    db: Database, tmp_path: Path
) -> None:
    """An amount_fen with a decimal point is most likely yuan: 100.00 is refused like 12.50
    (not taken for 100 fen, a hundredth of what was paid), and 5,000 too, each saying how
    to write it; the other lines of its order are refused with it."""
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    rows = [["y1", "c0", WHEN, "TV", "家电", "100.00"], ["y2", "c1", WHEN, "TV", "家电", 100],
            ["y2", "c1", WHEN, "T1", "日用品", "12.50"], ["y3", "c2", WHEN, "TV", "家电", "5,000"],
            ["y4", "c2", WHEN, "TV", "家电", " 200 "]]  # fmt: skip
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert (report.records, report.accepted, report.refused) == (4, 1, 3)
    assert balances(db, ids) == {"c0": 0, "c1": 0, "c2": 6}
    _, *errors = read_csv(tmp_path / "orders.errors.csv")
    assert [row[6:8] for row in errors] == [["2", "amount_fen"], ["3", ""], ["4", "amount_fen"],
                                            ["5", "amount_fen"]]  # fmt: skip
    assert "'100.00'" in errors[0][9] and "whole number of fen" in errors[0][9]
    assert "1250" in errors[2][9] and "'5,000'" in errors[3][9]
    imports.run_import(db, program_id=program.id, kind="orders", path=path, language="zh",
                       restart=True)  # fmt: skip
    _, *errors = read_csv(tmp_path / "orders.errors.csv")
    assert "整数" in errors[0][9] and "分" in errors[0][9]


@pytest.mark.parametrize("amount", ["¥100", "100元", "", "1e3", "１００"])
def test_an_amount_with_a_currency_sign_or_unit_or_none_says_to_write_whole_fen(
    db: Database, tmp_path: Path, amount: str
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    setup_members(db, program.id)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, [["y1", "c0", WHEN, "TV", "家电", amount]])
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert (report.accepted, report.refused) == (0, 1)
    _, refused = read_csv(tmp_path / "orders.errors.csv")
    assert refused[6:8] == ["2", "amount_fen"]
    assert f"{amount!r} is not a whole number of fen" in refused[9]


def test_an_order_line_refused_by_ingest_is_explained_by_its_column_not_the_request_path(
    db: Database, tmp_path: Path
) -> None:
    """The reason speaks of the file's column (amount_fen: ...), not of the event the rows
    became (payload.lines.1.amount_fen: ...): error_line already says which row."""
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    setup_members(db, program.id)
    rows = [["n1", "c0", WHEN, "TV", "家电", 10000], ["n1", "c0", WHEN, "T1", "日用品", -5]]
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)
    for language, prefix in (("en", "amount_fen: "), ("zh", "amount_fen:")):
        imports.run_import(db, program_id=program.id, kind="orders", path=path,
                           language=language, restart=True)  # fmt: skip
        _, _, second = read_csv(tmp_path / "orders.errors.csv")
        assert second[6:8] == ["3", "amount_fen"]
        assert second[9].startswith(prefix) and "payload" not in second[9], second[9]


@pytest.mark.parametrize("merchant", [None, "m-01"])
def test_imported_orders_record_their_store_and_merchant_on_their_postings(
    db: Database, tmp_path: Path, merchant: str | None
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    setup_members(db, program.id)
    path = write(
        tmp_path / "orders.csv",
        [*ORDER_HEADER, "store"],
        [["t1", "c0", WHEN, "TV", "家电", 10000, "S01"], ["t2", "c1", WHEN, "TV", "家电", 100, ""]],
    )
    report = imports.run_import(
        db, program_id=program.id, kind="orders", path=path, merchant=merchant
    )
    assert report.accepted == 2
    origins = db.run(
        lambda uow: uow.conn.execute(
            select(posting_origins.c.merchant, posting_origins.c.store)
            .join(postings, postings.c.id == posting_origins.c.posting_id)
            .where(postings.c.program_id == program.id)
        ).all(),
        read_only=True,
    )
    expected = [(merchant, "S01")] + ([(merchant, None)] if merchant else [])
    assert sorted((tuple(o) for o in origins), key=str) == sorted(expected, key=str)


def test_a_merchant_code_too_long_for_a_posting_is_refused(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, [])
    with pytest.raises(imports.InvalidInput, match="merchant code of 1 to 64"):
        imports.run_import(db, program_id=program.id, kind="orders", path=path, merchant="m" * 65)


def test_misshapen_rows_after_a_whole_order_are_refused_alone(tmp_path: Path) -> None:
    """An order of the most lines allowed, followed by a row that does not match the header:
    the row is not the order's unless the order goes on after it."""
    good = {"member_ref": "c0", "occurred_at": WHEN, "category": "日用品", "amount_fen": "100"}
    read = [
        (Place(n, n), {**good, "order_id": "A", "sku": f"T{n}"}) for n in range(2, ORDER_LINES + 2)
    ]
    stray = Misshapen(("", "y"), RowError("row", "has 2 fields, the header 6"))
    read += [(Place(600, 600), stray), (Place(601, 601), {**good, "order_id": "B", "sku": "T"})]
    parts = list(order_records(read, "csv", UTC))
    assert [type(p).__name__ for p in parts] == ["Record", "BadOrder", "Record"]
    assert len(parts[0].rows) == ORDER_LINES  # type: ignore[union-attr]
    assert parts[1][1] == (stray,)


def test_an_order_of_more_lines_than_allowed_is_refused_as_it_streams_holding_few_rows(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    many = ORDER_LINES * 2 + 100
    rows = [["big", "c0", WHEN, f"T{n}", "日用品", 100] for n in range(many)]
    rows.append(["ok", "c1", WHEN, "T1", "日用品", 5000])
    strays = [["", "y"]] * many  # misshapen, no order id: inside order s1, which goes on
    rows += [
        ["s1", "c2", WHEN, "T1", "日用品", 5000],
        *strays,
        ["s1", "c2", WHEN, "T2", "日用品", 1],
    ]
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)
    # read in parts of at most an order's lines and as many misshapen rows after them (+ 1),
    # whatever the file holds
    stray = Misshapen(("", "y"), RowError("row", "has 2 fields, the header 6"))
    read = [
        (
            Place(n, n),
            stray if row[0] == "" else dict(zip(ORDER_HEADER, map(str, row), strict=True)),
        )
        for n, row in enumerate(rows, 2)
    ]
    parts = order_records(read, "csv", UTC)
    assert max(len(p.rows if isinstance(p, Record) else p[1]) for p in parts) <= (
        2 * ORDER_LINES + 1
    )

    class Stop(Exception):
        pass

    def interrupt(report: imports.Report) -> None:
        raise Stop

    with pytest.raises(Stop):  # stopped in the middle of the long order
        imports.run_import(
            db, program_id=program.id, kind="orders", path=path, batch=2, progress=interrupt
        )
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=2)
    # three records (big counted once, refused by the first run), its rows in four parts
    assert (report.resumed_from, report.records, report.accepted, report.refused) == (1, 3, 1, 1)
    _, *errors = read_csv(tmp_path / "orders.errors.csv")
    assert len(errors) == many + 2 + many  # each row once, none lost
    too_long = f"order big has more than {ORDER_LINES} lines: an order has at most {ORDER_LINES}"
    assert {tuple(row[7:]) for row in errors[:many]} == {("order_id", "invalid_input", too_long)}
    assert errors[many][0] == "s1" and "runs over more than 500 rows" in errors[many][9]
    assert {row[9] for row in errors[many + 1 : -1]} == {"has 2 fields, the header 6"}
    assert balances(db, ids) == {"c0": 0, "c1": 50, "c2": 0}
    # and a batch holds few rows, however few records they make
    monkeypatch.setattr(imports, "BATCH_ROWS", 600)
    commit, batches = imports._commit, []

    def counted(*args: Any) -> Any:
        batches.append(sum(len(item.rows) for item in args[3]))
        return commit(*args)

    monkeypatch.setattr(imports, "_commit", counted)
    imports.run_import(db, program_id=program.id, kind="orders", path=path, restart=True)
    assert sum(batches) == len(rows) and max(batches) <= 600 + ORDER_LINES
