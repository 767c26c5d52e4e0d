"""Members files: a row for a member already there must agree with it; an import never
changes a member."""

from __future__ import annotations

from pathlib import Path

from jifen.db.uow import Database
from jifen.imports import service as imports
from jifen.members import service as members
from tests.factories import new_program
from tests.imports.test_csv import member_ids, read_csv, write


def test_a_row_that_differs_from_the_member_already_there_is_refused_naming_columns(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    header = ["external_ref", "name", "phone", "tags"]
    path = write(tmp_path / "m.csv", header, [
        ["x1", "张三", "13800138001", "a;b"],
        ["x1", "张三", "13800138001", "b,a"],  # the same member again: nothing to do
        ["x1", "张三改", "13900139000", ""],
        ["x1", "", "", ""],  # says nothing that differs
    ])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.replayed, report.refused) == (1, 2, 1)
    _, refused = read_csv(tmp_path / "m.errors.csv")
    assert refused[4:7] == ["4", "name", "idempotency_conflict"]
    assert refused[7].startswith("member x1 is already there with other values in name, phone")
    assert "changed through the API or the staff tools" in refused[7]
    ids = member_ids(db, program.id, ["x1"])
    profile = db.run(
        lambda uow: members.get_profile(uow, program_id=program.id, member_id=ids["x1"])
    )
    assert profile.name == "张三"


def test_a_members_file_may_give_each_members_language(db: Database, tmp_path: Path) -> None:
    program = new_program(db)
    path = write(tmp_path / "m.csv", ["external_ref", "name", "language"], [
        ["y1", "Ann", "en"],
        ["y2", "王芳", ""],
        ["y3", "Jean", "fr"],
    ])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.refused) == (2, 1)
    _, refused = read_csv(tmp_path / "m.errors.csv")
    assert refused[3:6] == ["4", "language", "invalid_input"]
    ids = member_ids(db, program.id, ["y1", "y2"])
    chosen = db.run(
        lambda uow: members.languages(uow, program_id=program.id, member_ids=ids.values())
    )
    assert chosen == {ids["y1"]: "en"}


def test_a_members_row_born_after_today_is_refused_on_its_line(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)  # today: 1 January 2026 in Shanghai
    path = write(tmp_path / "m.csv", ["external_ref", "birthday"], [
        ["z1", "2025-12-31"],
        ["z2", "2026-06-01"],
    ])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.refused) == (1, 1)
    _, refused = read_csv(tmp_path / "m.errors.csv")
    assert refused[2:5] == ["3", "birthday", "invalid_input"]
    assert "after today" in refused[5]
    found = db.run(
        lambda uow: members.ids_by_refs(uow, program_id=program.id, refs=["z1", "z2"]),
        read_only=True,
    )
    assert list(found) == ["z1"]


def test_a_members_row_with_a_control_character_is_refused_on_its_line(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    path = write(tmp_path / "m.csv", ["external_ref", "name"], [
        ["k1", "王芳"],
        ["k2", "王\x1b[31m芳"],
    ])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.refused) == (1, 1)
    _, refused = read_csv(tmp_path / "m.errors.csv")
    assert refused[2:5] == ["3", "name", "invalid_input"]
    assert "control character (U+001B)" in refused[5]


def test_a_members_row_with_a_number_for_a_birthday_is_refused_on_its_line(
    db: Database, tmp_path: Path
) -> None:
    """ "00000000" is how many systems write an unknown birthday: not 1 January 1970."""
    program = new_program(db)
    path = write(tmp_path / "m.csv", ["external_ref", "birthday"], [
        ["n1", "00000000"],
        ["n2", "1990-01-02"],
    ])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.refused) == (1, 1)
    _, refused = read_csv(tmp_path / "m.errors.csv")
    assert refused[2:5] == ["2", "birthday", "invalid_input"]
    assert "YYYY-MM-DD" in refused[5]


def test_a_bad_tag_is_refused_in_the_tags_column_naming_the_tag(
    db: Database, tmp_path: Path
) -> None:
    """The error file names the CSV column (tags, not the request's tags.1) and the tag at
    fault, with what a tag may hold."""
    program = new_program(db)
    path = write(tmp_path / "m.csv", ["external_ref", "tags"], [["t1", "vip;a b"]])
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.refused) == (0, 1)
    _, refused = read_csv(tmp_path / "m.errors.csv")
    assert refused[2:4] == ["2", "tags"]
    assert "'a b'" in refused[5] and "separate tags with , or ;" in refused[5]
    imports.run_import(db, program_id=program.id, kind="members", path=path, language="zh")
    _, refused = read_csv(tmp_path / "m.errors.csv")
    assert refused[3] == "tags" and "'a b'" in refused[5] and "分隔" in refused[5]


def test_tags_separated_the_chinese_way_are_read_as_several(db: Database, tmp_path: Path) -> None:
    """A Chinese keyboard writes ， ； or 、 between tags: they separate tags as , and ; do
    (none of them can be part of a tag)."""
    program = new_program(db)
    path = write(tmp_path / "m.csv", ["external_ref", "tags"], [["t1", "vip，新客；a、b"]])
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.refused) == (1, 0)
    ids = member_ids(db, program.id, ["t1"])
    profile = db.run(
        lambda uow: members.get_profile(uow, program_id=program.id, member_id=ids["t1"])
    )
    assert sorted(profile.tags) == sorted(["vip", "新客", "a", "b"])


def test_a_tag_written_twice_in_a_row_is_stored_once(db: Database, tmp_path: Path) -> None:
    """A row naming a tag twice gives the member that tag once, in the order first written;
    the row again, in another order, is the same member (nothing to do)."""
    program = new_program(db)
    path = write(tmp_path / "m.csv", ["external_ref", "tags"],
                 [["t1", "vip;新客;vip，新客"], ["t1", "新客;vip"]])  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="members", path=path)
    assert (report.accepted, report.replayed, report.refused) == (1, 1, 0)
    ids = member_ids(db, program.id, ["t1"])
    profile = db.run(
        lambda uow: members.get_profile(uow, program_id=program.id, member_id=ids["t1"])
    )
    assert profile.tags == ["vip", "新客"]
