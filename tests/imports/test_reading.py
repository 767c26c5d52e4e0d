"""Reading a CSV file: what stops an import names the row (and the text line where the two
differ), before anything is touched where it can; cells a spreadsheet writes are read."""

from __future__ import annotations

import fcntl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from jifen.db.uow import Database
from jifen.errors import InvalidInput
from jifen.events.models import events
from jifen.imports import service as imports
from tests.events.test_service import activate
from tests.factories import new_program
from tests.imports.test_csv import ORDER_HEADER, RATES, balances, read_csv, setup_members, write

WHEN = "2026-01-01T10:00:00+08:00"


def test_an_error_file_that_is_the_input_is_refused_and_the_input_kept(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, [["o1", "c0", WHEN, "TV", "x", 100]])
    before = path.read_bytes()
    (tmp_path / "link.csv").symlink_to(path)
    for errors_path in (path, tmp_path / "." / "orders.csv", tmp_path / "link.csv"):
        with pytest.raises(InvalidInput, match="is the file being imported"):
            imports.run_import(
                db, program_id=program.id, kind="orders", path=path, errors_path=errors_path
            )
        assert path.read_bytes() == before


def test_a_line_longer_than_the_limit_stops_the_import_naming_it(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    monkeypatch.setattr(imports, "LINE_LIMIT", 200)
    path = tmp_path / "orders.csv"
    good = f"o1,c0,{WHEN},TV,家电,10000\n"
    lines = ",".join(ORDER_HEADER) + "\n" + good + good.replace("o1", "o2")
    path.write_bytes(lines.encode() + b"x" * 100_000)
    with pytest.raises(InvalidInput, match=r"row 4 is longer than 200 bytes") as raised:
        imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=1)
    assert "the 1 records before it are imported" in str(raised.value)
    assert balances(db, ids)["c0"] == 300
    # a file whose lines end in CR alone is one long line: said so
    path.write_bytes((",".join(ORDER_HEADER) + "\r" + good.replace("\n", "\r") * 9).encode())
    with pytest.raises(InvalidInput, match=r"row 1 is longer .* end in CR alone"):
        imports.run_import(db, program_id=program.id, kind="orders", path=path)


@pytest.mark.parametrize("language", ["en", "zh"])
def test_a_file_whose_lines_end_in_cr_alone_says_how_to_save_it(
    db: Database, tmp_path: Path, language: str
) -> None:
    """A short file saved as CSV for Macintosh (lines ending in CR alone), or one row of a
    file ending so, is refused saying so and how to save it, not in the words of Python's
    CSV reader."""
    program = new_program(db)
    path = tmp_path / "members.csv"
    for data, row in ((b"external_ref,name\rm1,A\rm2,B\r", 1),
                      (b"external_ref,name\r\nm1,A\rm2,B\r\n", 2)):  # fmt: skip
        path.write_bytes(data)
        with pytest.raises(InvalidInput) as raised:
            imports.run_import(
                db, program_id=program.id, kind="members", path=path, language=language
            )
        said = raised.value.message(language)
        assert "universal-newline" not in said
        if language == "en":
            assert f"row {row} " in said and "CR alone" in said and "CSV UTF-8" in said
        else:
            assert f"第 {row} 行" in said and "CR" in said and "CSV UTF-8" in said


def test_a_quote_never_closed_stops_the_import_naming_the_line_it_opens_on(
    db: Database, tmp_path: Path
) -> None:
    """A double quote opened and never closed runs the rest of the file into one field,
    until it is longer than a field may be: the import names the row, the line where it
    begins (not where reading stopped) and says to close the quote."""
    program = new_program(db)
    path = tmp_path / "members.csv"
    path.write_bytes(b'external_ref,name\nm0,"x\ny"\nm1,"A\n' + b"m2,B\n" * 30_000)
    with pytest.raises(InvalidInput) as raised:
        imports.run_import(db, program_id=program.id, kind="members", path=path, batch=1)
    said, said_zh = raised.value.message("en"), raised.value.message("zh")
    assert "row 3 (line 4)" in said and "double quote" in said and "never closed" in said
    assert "the 1 records before it are imported" in said
    assert "第 3 行(文本第 4 行)" in said_zh and "双引号" in said_zh


def test_a_payload_nested_too_deeply_refuses_its_row(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    activate(
        db, program.id, "checkin", {"kind": "fixed", "points": 10}, events_=("member.checked_in",)
    )
    ids = setup_members(db, program.id)
    deep = "[" * 30_000 + "]" * 30_000  # within the field limit; Python's json recurses
    path = write(
        tmp_path / "events.csv",
        ["external_id", "type", "occurred_at", "member_ref", "payload"],
        [["e1", "member.checked_in", WHEN, "c0", deep],
         ["e2", "member.checked_in", WHEN, "c1", ""]],
    )  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="events", path=path)
    assert (report.accepted, report.refused) == (1, 1)
    _, refused = read_csv(tmp_path / "events.errors.csv")
    assert refused[5:8] == ["2", "payload", "invalid_input"]
    assert refused[8] == "is nested too deeply (at most 200 levels)"
    assert balances(db, ids)["c1"] == 10


def test_a_row_that_cannot_be_read_is_named_by_its_row_and_text_line(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    setup_members(db, program.id)
    path = tmp_path / "orders.csv"
    path.write_text(
        ",".join(ORDER_HEADER) + "\n"
        f'o1,c0,{WHEN},"multi\nline",家电,x\n'  # row 2, lines 2-3
        f"o2,c0,{WHEN},TV,家电,y\n"  # row 3, line 4
        f"o3,c0,{WHEN},TV,家电,100\n"  # row 4, line 5
        f"o4,c0,{WHEN},T\rV,家电,100\n",  # row 5, line 6: a stray CR
        encoding="utf-8",
    )
    with pytest.raises(InvalidInput, match=r"row 5 \(line 6\) cannot be read as CSV") as raised:
        imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=1)
    assert "第 5 行(文本第 6 行)无法按 CSV 读取" in raised.value.message("zh")
    _, first, second = read_csv(tmp_path / "orders.errors.csv")
    assert (first[6], second[6]) == ("2", "3")  # error_line: the row, as a spreadsheet shows


def test_times_without_an_offset_are_the_programmes_and_other_forms_are_named(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)  # Asia/Shanghai
    activate(db, program.id, "base", RATES)
    setup_members(db, program.id)
    forms = ["2026/1/1 10:00", "2026-01-01 10:00:00", "2026/01/01 10:00:00",
             "2026-01-01T10:00:00", "2026-01-01T02:00:00Z",
             "2026-01-01", "1/1/2026 10:00"]  # fmt: skip
    rows = [[f"f{n}", "c0", when, "TV", "x", 100] for n, when in enumerate(forms)]
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert (report.accepted, report.refused) == (5, 2)
    times = db.run(
        lambda uow: uow.conn.execute(
            select(events.c.occurred_at).where(events.c.program_id == program.id)
        ).scalars().all(),
        read_only=True,
    )  # fmt: skip
    assert {t.replace(tzinfo=t.tzinfo or UTC) for t in times} == {
        datetime(2026, 1, 1, 2, tzinfo=UTC)
    }
    _, *refused = read_csv(tmp_path / "orders.errors.csv")
    assert [row[2] for row in refused] == ["2026-01-01", "1/1/2026 10:00"]
    assert all("2026/3/1 10:00 or 2026/03/01 10:00:00" in row[9] for row in refused)


def test_a_trailing_comma_in_the_header_is_ignored_while_its_cells_are_empty(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    path = tmp_path / "orders.csv"
    path.write_text(
        ",".join(ORDER_HEADER) + ",\n"
        f"o1,c0,{WHEN},TV,家电,10000,\n"
        f"o2,c1,{WHEN},TV,家电,10000\n"
        f"o3,c2,{WHEN},TV,家电,10000,note\n",
        encoding="utf-8",
    )
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert (report.accepted, report.refused) == (2, 1)
    assert balances(db, ids) == {"c0": 300, "c1": 300, "c2": 0}
    _, refused = read_csv(tmp_path / "orders.errors.csv")
    assert refused[6:9] == ["4", "row", "invalid_input"]
    assert refused[9] == "has a value in column 7, which the header does not name"


def test_a_second_import_of_the_same_file_into_the_same_programme_stops_at_once(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, [["o1", "c0", WHEN, "TV", "x", 100]])
    record = imports.progress_path(path, imports.target_of(db, program.id))
    with record.open("a") as running:  # as the import already running holds it
        fcntl.flock(running, fcntl.LOCK_EX)
        with pytest.raises(InvalidInput, match="is being imported into this programme already"):
            imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert not (tmp_path / "orders.errors.csv").exists()
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path)
    assert report.records == 1 and not record.exists()
