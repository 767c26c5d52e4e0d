"""CSV imports on both backends: good rows in, bad rows in the error file as they were with
their line and reason (importable again once put right), an interrupted import resumed
without applying anything twice."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.errors import InvalidInput
from jifen.events.models import events
from jifen.events.schemas import EventIn
from jifen.imports import service as imports
from jifen.imports.core import ERROR_COLUMNS, Place, Record, order_records
from jifen.members import service as members
from jifen.points import service as points
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef
from tests.events.test_service import activate
from tests.factories import assert_ledger_sound, new_program

RATES = {"kind": "spend_rate", "rate": "1", "category_rates": {"家电": "3"}}


def write(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def member_ids(db: Database, program_id: int, refs: list[str]) -> dict[str, int]:
    return db.run(
        lambda uow: {
            ref: members.find_member(uow, program_id=program_id, external_ref=ref).id
            for ref in refs
        },
        read_only=True,
    )


def balances(db: Database, ids: dict[str, int]) -> dict[str, int]:
    return db.run(
        lambda uow: {ref: points.balance(uow, member_id=i).balance for ref, i in ids.items()},
        read_only=True,
    )


def test_members_with_tiers_and_a_second_run_changes_nothing(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    db.run(
        lambda uow: tiers.set_tiers(
            uow,
            program_id=program.id,
            definitions=[
                TierDef(code="普通", name="普通", rank=0),
                TierDef(code="金卡", name="金卡", rank=1),
            ],
        )
    )
    path = write(
        tmp_path / "members.csv",
        ["external_ref", "name", "birthday", "tags", "tier"],
        [
            ["c1", "王芳", "1990-06-01", "vip;new", "金卡"],
            ["c2", "李雷", "", "", ""],
            ["c3", "", "1990-13-01", "", ""],
            ["c4", "", "", "", "钻石"],
        ],
    )
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.records, report.accepted, report.refused) == (4, 2, 2)
    header, *errors = read_csv(tmp_path / "members.errors.csv")
    assert header == ["external_ref", "name", "birthday", "tags", "tier", *ERROR_COLUMNS]
    assert [row[:8] for row in errors] == [
        ["c3", "", "1990-13-01", "", "", "4", "birthday", "invalid_input"],
        ["c4", "", "", "", "钻石", "5", "tier", "unknown_tier"],
    ]
    ids = member_ids(db, program.id, ["c1", "c2"])
    tier = db.run(lambda uow: tiers.member_tier(uow, program_id=program.id, member_id=ids["c1"]))
    assert tier.tier == "金卡"
    again = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (again.accepted, again.replayed) == (0, 2)


def read_csv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


ORDER_HEADER = ["order_id", "member_ref", "occurred_at", "sku", "category", "amount_fen"]


def order_rows(count: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for n in range(count):
        when = f"2026-01-01T1{n % 9}:00:00+08:00"  # after the rules went live at 09:00
        rows.append([f"o{n}", f"c{n % 3}", when, "TV", "家电", 10_000])
        rows.append([f"o{n}", f"c{n % 3}", when, "T1", "日用品", 5_000])
    return rows


def setup_members(db: Database, program_id: int) -> dict[str, int]:
    """Three members; the clock moves a day on, so that the events of 1 January are past."""

    def go(uow: object) -> None:
        for ref in ("c0", "c1", "c2"):
            members.register_member(uow, program_id=program_id, external_ref=ref)  # type: ignore[arg-type]

    db.run(go)
    assert isinstance(db.clock, ManualClock)
    db.clock.advance(timedelta(days=1))
    return member_ids(db, program_id, ["c0", "c1", "c2"])


def test_orders_bad_rows_go_to_the_error_file_and_the_good_ones_in(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    rows = order_rows(3)
    rows.insert(2, ["bad1", "c0", "2026-01-01T01:00:00+08:00", "X", "x", -5])
    rows.append(["bad2", "nobody", "2026-01-01T01:00:00+08:00", "X", "x", 100])
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert (report.records, report.accepted, report.refused) == (5, 3, 2)
    header, *errors = read_csv(tmp_path / "orders.errors.csv")
    assert header == [*ORDER_HEADER, *ERROR_COLUMNS]
    # each rejected row as it was, in the file's order, with its line, column, code, reason
    assert [row[:9] for row in errors] == [
        ["bad1", "c0", "2026-01-01T01:00:00+08:00", "X", "x", "-5",
         "4", "amount_fen", "invalid_input"],
        ["bad2", "nobody", "2026-01-01T01:00:00+08:00", "X", "x", "100",
         "9", "member_ref", "unknown_member"],
    ]  # fmt: skip
    assert balances(db, ids) == {"c0": 350, "c1": 350, "c2": 350}
    assert_ledger_sound(db, program.id)
    # put right in the error file itself, which is then imported as it is
    fixed = tmp_path / "fixed.csv"
    errors[0][5], errors[1][1] = "500", "c1"
    write(fixed, header, errors)
    again = imports.run_import(db, program_id=program.id, kind="orders", path=fixed)
    assert (again.records, again.accepted, again.refused) == (2, 2, 0)
    assert not (tmp_path / "fixed.errors.csv").exists()
    assert_ledger_sound(db, program.id)


def test_an_interrupted_import_resumes_after_what_was_committed(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(30))

    class Stop(Exception):
        pass

    def interrupt(report: imports.Report) -> None:
        if report.records >= 10:
            raise Stop

    with pytest.raises(Stop):
        imports.run_import(
            db, program_id=program.id, kind="orders", path=path, batch=10, progress=interrupt
        )
    assert imports.progress_path(path, imports.target_of(db, program.id)).exists()
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10)
    assert (report.resumed_from, report.records, report.accepted) == (10, 30, 20)
    assert not imports.progress_path(path, imports.target_of(db, program.id)).exists()
    count = db.run(
        lambda uow: uow.conn.execute(
            select(func.count()).where(events.c.program_id == program.id)
        ).scalar_one()
    )
    assert count == 30
    assert balances(db, ids) == {"c0": 3500, "c1": 3500, "c2": 3500}
    # From the top again: everything is already there.
    again = imports.run_import(db, program_id=program.id, kind="orders", path=path, restart=True)
    assert (again.accepted, again.replayed) == (0, 30)
    assert_ledger_sound(db, program.id)


def test_events_file_and_a_bad_header(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    activate(
        db, program.id, "checkin", {"kind": "fixed", "points": 10}, events_=("member.checked_in",)
    )
    ids = setup_members(db, program.id)
    path = write(
        tmp_path / "events.csv",
        ["external_id", "type", "occurred_at", "member_ref", "payload"],
        [
            ["e1", "member.checked_in", "2026-01-01T10:00:00+08:00", "c0", ""],
            ["e2", "member.checked_in", "2026-01-02T08:00:00+08:00", "c0", "{}"],
            ["e3", "member.checked_in", "yesterday", "c0", ""],
            ["e4", "member.checked_in", "2026-01-02T08:00:00+08:00", "c1", "[1"],
        ],
    )
    report = imports.run_import(db, program_id=program.id, kind="events", path=path)
    assert (report.accepted, report.refused) == (2, 2)
    assert balances(db, ids)["c0"] == 20
    bad = write(tmp_path / "bad.csv", ["external_id", "kind"], [["1", "x"]])
    with pytest.raises(InvalidInput, match=r"missing column.*type.*unknown column.*kind"):
        imports.run_import(db, program_id=program.id, kind="events", path=bad)


def test_a_misshapen_order_row_is_rejected_alone(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    rows = order_rows(2)
    rows.insert(2, ["short", "c0"])  # between two orders, carrying an id of its own
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert (report.records, report.accepted, report.refused) == (3, 2, 1)
    _, rejected = read_csv(tmp_path / "orders.errors.csv")
    assert rejected[:9] == ["short", "c0", "", "", "", "", "4", "row", "invalid_input"]
    assert rejected[9].startswith("has 2 fields")
    assert sum(balances(db, ids).values()) == 700


def test_a_header_naming_a_column_twice_is_refused(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    path = write(tmp_path / "orders.csv", [*ORDER_HEADER, "amount_fen"], [])
    with pytest.raises(InvalidInput, match="named more than once: amount_fen"):
        imports.run_import(db, program_id=program.id, kind="orders", path=path)


def test_a_line_that_is_not_utf8_stops_the_import_naming_it(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(30))
    lines = path.read_bytes().split(b"\n")
    lines[45] = lines[45].replace("家电".encode(), "家电".encode("gbk"))  # order o22's TV line
    path.write_bytes(b"\n".join(lines))
    for _ in range(2):  # a second run stops at the same line, applying nothing twice
        with pytest.raises(InvalidInput) as raised:
            imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10)
        assert "row 46 is not UTF-8" in str(raised.value)
        assert "the 20 records before it are imported" in str(raised.value)
        assert sum(balances(db, ids).values()) == 20 * 350
    assert "第 46 行不是 UTF-8" in raised.value.message("zh")
    assert_ledger_sound(db, program.id)


def test_a_file_saved_as_gbk_is_said_to_be_gbk_and_how_to_save_it(
    db: Database, tmp_path: Path
) -> None:
    """Excel's plain "CSV" on a Chinese Windows writes GBK: the import says the line reads
    as GBK, and where the first byte that is not UTF-8 is (a byte of the line, not a
    character)."""
    program = new_program(db)
    path = tmp_path / "members.csv"
    path.write_bytes("external_ref,name\nm1,王芳\n".encode("gbk"))
    with pytest.raises(InvalidInput) as raised:
        imports.run_import(db, program_id=program.id, kind="members", path=path)
    said = raised.value.message("en")
    assert "row 2 is not UTF-8 text (byte 4 of the line, 0xcd)" in said
    assert "GBK" in said and "CSV UTF-8" in said
    assert "GBK" in raised.value.message("zh")


def test_an_unwritable_error_file_is_refused_before_anything_is_imported(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(3))
    folder = tmp_path / "errors"
    folder.mkdir()
    for errors_path, problem in (
        (folder, "is a folder"),
        (tmp_path / "missing" / "e.csv", "cannot write the rejected rows"),
    ):
        with pytest.raises(InvalidInput, match=problem):
            imports.run_import(
                db, program_id=program.id, kind="orders", path=path, errors_path=errors_path
            )
    assert sum(balances(db, ids).values()) == 0
    assert not imports.progress_path(path, imports.target_of(db, program.id)).exists()


def test_a_new_member_with_another_members_phone_is_refused_not_skipped(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    header = ["external_ref", "phone"]
    path = write(tmp_path / "m.csv", header, [["p1", "13800138000"], ["p2", "13800138000"]])
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.replayed, report.refused) == (1, 0, 1)
    errors = (tmp_path / "m.errors.csv").read_text(encoding="utf-8")
    assert "3,phone,duplicate_reference,Phone number" in errors
    # Run again: p1 is already there (its phone is its own); p2 is still refused.
    again = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (again.accepted, again.replayed, again.refused) == (0, 1, 1)


def test_an_order_split_over_the_file_is_refused_with_why_in_the_language_asked(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    first, second, *rest = order_rows(2)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, [first, *rest, second])
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path, language="zh")
    assert (report.accepted, report.refused) == (1, 2)  # o1; both parts of o0
    _, *errors = read_csv(tmp_path / "orders.errors.csv")
    assert [row[-1] for row in errors] == [
        "订单 o0 的各行须相邻:该订单分为几段,分别始于第 2 行、第 5 行"
    ] * 2
    assert sum(balances(db, ids).values()) == 350
    # Put right and run afresh: the old error file goes, and o0 goes in whole.
    write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(2))
    again = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert (again.accepted, again.replayed, again.refused) == (1, 1, 0)
    assert not (tmp_path / "orders.errors.csv").exists()
    assert sum(balances(db, ids).values()) == 350 + 350


def test_a_source_that_no_event_could_have_is_refused_up_front(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(2))
    with pytest.raises(InvalidInput, match="'POS System' is not a source name"):
        imports.run_import(db, program_id=program.id, kind="orders", path=path, source="POS System")
    assert not (tmp_path / "orders.errors.csv").exists()


@pytest.mark.parametrize(("column", "values"), [("pickup", ("0", "1")), ("source", ("pos", "app"))])
def test_an_order_whose_lines_disagree_on_pickup_or_source_is_refused(
    column: str, values: tuple[str, str]
) -> None:
    base = {"order_id": "O1", "member_ref": "m1", "occurred_at": "2026-03-01T10:00:00+00:00",
            "sku": "A", "amount_fen": "100"}  # fmt: skip
    rows = [(Place(2, 2), {**base, column: values[0]}),
            (Place(3, 3), {**base, "sku": "B", column: values[1]})]  # fmt: skip
    (bad,) = order_records(rows, "csv", UTC)
    assert not isinstance(bad, Record)
    lines, error = bad[0], bad[2]
    assert lines == (Place(2, 2), Place(3, 3)) and error.column == column
    assert "differs between the lines of order O1" in error.reason
    # Said alike in two spellings, a flag agrees.
    same = [(Place(2, 2), {**base, "pickup": "1"}),
            (Place(3, 3), {**base, "sku": "B", "pickup": "true"})]  # fmt: skip
    (good,) = order_records(same, "csv", UTC)
    assert isinstance(good, Record) and isinstance(good.request, EventIn)
    assert good.request.payload["pickup"] is True


def test_an_event_for_no_member_is_refused_in_the_column_naming_the_member(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    when = "2026-01-01T08:00:00+08:00"
    path = write(tmp_path / "events.csv", ["external_id", "type", "occurred_at", "member_ref",
                                           "member_id"],
                 [["e1", "member.checked_in", when, "nobody", ""],
                  ["e2", "member.checked_in", when, "", "999999"]])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="events", path=path)
    assert (report.accepted, report.refused) == (0, 2)
    _, *errors = read_csv(tmp_path / "events.errors.csv")
    assert [row[5:8] for row in errors] == [["2", "member_ref", "unknown_member"],
                                            ["3", "member_id", "unknown_member"]]  # fmt: skip


def test_a_bad_payload_field_is_refused_in_the_payload_column_naming_the_field(
    db: Database, tmp_path: Path
) -> None:
    """error_column is a column of the file: a field inside the payload's JSON is named by
    the reason (payload.order_id: ...), the column to put right is payload."""
    program = new_program(db)
    setup_members(db, program.id)
    when = "2026-01-01T08:00:00+08:00"
    path = write(tmp_path / "events.csv", ["external_id", "type", "occurred_at", "member_ref",
                                           "payload"],
                 [["e1", "order.paid", when, "c0", "{}"]])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="events", path=path)
    assert (report.accepted, report.refused) == (0, 1)
    _, refused = read_csv(tmp_path / "events.errors.csv")
    assert refused[5:8] == ["2", "payload", "invalid_input"]
    assert refused[8].startswith("payload.order_id: ")


def test_a_header_with_an_unnamed_column_between_others_names_its_position(
    db: Database, tmp_path: Path
) -> None:
    """A blank column between two named ones (a spreadsheet's empty column B) is named by
    its position, not listed as an unknown column with no name."""
    program = new_program(db)
    path = write(tmp_path / "members.csv", ["external_ref", "", "name"], [["m1", "", "A"]])
    with pytest.raises(InvalidInput) as raised:
        imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert "column 2 has no name" in raised.value.message("en")
    assert "unknown column(s) ." not in raised.value.message("en")
    assert "第 2 列没有列名" in raised.value.message("zh")
