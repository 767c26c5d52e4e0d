"""Resuming: an interrupted import continues only into the database and programme it was
importing into, once it has found there the last record it committed; its error file as
that run left it, and no other import's."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from jifen.clock import ManualClock
from jifen.db.migrate import upgrade
from jifen.db.uow import Database
from jifen.errors import InvalidInput
from jifen.imports import service as imports
from jifen.members import service as members
from jifen.settings import normalise_database_url
from tests.conftest import BACKENDS, POSTGRES_URL, START, postgres_schema_url
from tests.events.test_service import activate
from tests.factories import new_program
from tests.imports.test_csv import (
    ORDER_HEADER,
    RATES,
    balances,
    order_rows,
    read_csv,
    setup_members,
    write,
)


def database(path: Path) -> Database:
    db = Database(f"sqlite:///{path}", clock=ManualClock(START))
    upgrade(db.engine)
    return db


def programme_in(*databases: Database) -> int:
    """The same programme, by id, in each database, with its earning rule."""
    made = {new_program(db).id for db in databases}
    assert len(made) == 1
    (program_id,) = made
    for db in databases:
        activate(db, program_id, "base", RATES)
    return program_id


def test_an_import_interrupted_in_one_database_does_not_skip_rows_in_another(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(30))
    first, second = database(tmp_path / "a.db"), database(tmp_path / "b.db")
    try:
        program_id = programme_in(first, second)

        class Stop(Exception):
            pass

        def interrupt(report: imports.Report) -> None:
            raise Stop

        setup_members(first, program_id)
        with pytest.raises(Stop):
            imports.run_import(first, program_id=program_id, kind="orders", path=path,
                               batch=10, progress=interrupt)  # fmt: skip
        ids = setup_members(second, program_id)
        report = imports.run_import(second, program_id=program_id, kind="orders", path=path,
                                    errors_path=tmp_path / "b.errors.csv")  # fmt: skip
        assert (report.resumed_from, report.accepted) == (0, 30)
        assert balances(second, ids) == {"c0": 3500, "c1": 3500, "c2": 3500}
        # and the first continues where it stopped
        again = imports.run_import(first, program_id=program_id, kind="orders", path=path)
        assert (again.resumed_from, again.accepted) == (10, 20)
    finally:
        first.dispose()
        second.dispose()


class Stop(Exception):
    pass


def interrupt(report: imports.Report) -> None:
    raise Stop


@pytest.fixture(params=BACKENDS)
def rebuild(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """An empty database, migrated, always behind the same URL: each call replaces the one
    before, as a backup restored or ``jifen demo --reset`` does."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jifen.db'}"
    else:
        schema = f"jifen_test_{uuid.uuid4().hex[:12]}"
        url = postgres_schema_url(POSTGRES_URL, schema)
        admin = create_engine(normalise_database_url(POSTGRES_URL))
    made: list[Database] = []

    def anew() -> Database:
        for db in made:
            db.dispose()
        if request.param == "sqlite":
            (tmp_path / "jifen.db").unlink(missing_ok=True)
        else:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        made.append(Database(url, clock=ManualClock(START)))
        upgrade(made[-1].engine)
        return made[-1]

    yield anew
    for db in made:
        db.dispose()
    if request.param != "sqlite":
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def test_a_database_replaced_behind_the_same_url_is_imported_into_from_the_top(
    rebuild: Callable[[], Database], tmp_path: Path
) -> None:
    path = write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(30))
    for attempt in range(2):
        db = rebuild()
        program = new_program(db)
        activate(db, program.id, "base", RATES)
        ids = setup_members(db, program.id)
        if attempt == 0:
            with pytest.raises(Stop):
                imports.run_import(db, program_id=program.id, kind="orders", path=path,
                                   batch=10, progress=interrupt)  # fmt: skip
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10)
    assert (report.resumed_from, report.accepted, report.replayed) == (0, 30, 0)
    assert report.started_over.startswith(
        "this database does not hold the order order:o9 of source csv, the last record"
    )
    assert balances(db, ids) == {"c0": 3500, "c1": 3500, "c2": 3500}


def test_rows_written_to_the_error_file_by_a_run_stopped_before_saving_are_not_written_twice(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    ids = setup_members(db, program.id)
    rows = [[r[0], "c9" if r[0] == "o15" else r[1], *r[2:]] for r in order_rows(20)]
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)  # o15: a member not there yet
    save = imports._Checkpoint.save

    def dies_before_saving(self: imports._Checkpoint, report: imports.Report, *rest: Any) -> None:
        if report.records == 20:
            raise Stop  # o15's rows are written, the batch that refused it not yet recorded
        save(self, report, *rest)

    monkeypatch.setattr(imports._Checkpoint, "save", dies_before_saving)
    with pytest.raises(Stop):
        imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10)
    monkeypatch.undo()
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10)
    assert (report.resumed_from, report.replayed, report.refused) == (10, 9, 1)
    header, *refused = read_csv(tmp_path / "orders.errors.csv")
    assert [(row[0], row[6]) for row in refused] == [("o15", "32"), ("o15", "33")]
    # put right, the error file imports the order once
    db.run(lambda uow: members.register_member(uow, program_id=program.id, external_ref="c9"))
    fixed = imports.run_import(db, program_id=program.id, kind="orders", path=write(
        tmp_path / "fixed.csv", header, refused))  # fmt: skip
    assert (fixed.accepted, fixed.points) == (1, 350)
    assert sum(balances(db, ids).values()) == 19 * 350


def test_an_import_from_the_top_stops_over_an_error_file_another_unfinished_import_writes(
    tmp_path: Path,
) -> None:
    rows = [[r[0], "nobody" if r[0] == "o3" else r[1], *r[2:]] for r in order_rows(30)]
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)  # o3: refused by A, not by B
    errors = tmp_path / "orders.errors.csv"
    first, second = database(tmp_path / "a.db"), database(tmp_path / "b.db")
    try:
        program_id = programme_in(first, second)
        for db in (first, second):
            setup_members(db, program_id)
        second.run(lambda uow: members.register_member(uow, program_id=program_id,
                                                        external_ref="nobody"))  # fmt: skip
        with pytest.raises(Stop):
            imports.run_import(first, program_id=program_id, kind="orders", path=path,
                               batch=10, progress=interrupt)  # fmt: skip
        kept = errors.read_bytes()
        with pytest.raises(imports.InvalidInput) as raised:
            imports.run_import(second, program_id=program_id, kind="orders", path=path)
        assert "holds the rejected rows of an import of orders.csv into another database or " \
            "programme that is unfinished" in str(raised.value)  # fmt: skip
        assert "--errors OTHER.csv; --restart drops the unfinished import" in str(raised.value)
        assert "请先完成该导入" in raised.value.message("zh")
        assert errors.read_bytes() == kept
        other = tmp_path / "b.errors.csv"
        report = imports.run_import(second, program_id=program_id, kind="orders", path=path,
                                    errors_path=other)  # fmt: skip
        assert (report.accepted, report.refused) == (30, 0)
        again = imports.run_import(first, program_id=program_id, kind="orders", path=path)
        assert (again.resumed_from, again.accepted) == (10, 20)
        assert [row[0] for row in read_csv(errors)[1:]] == ["o3", "o3"]
        # --restart drops the unfinished import whose error file it takes
        with pytest.raises(Stop):
            imports.run_import(first, program_id=program_id, kind="orders", path=path,
                               batch=10, restart=True, progress=interrupt)  # fmt: skip
        imports.run_import(second, program_id=program_id, kind="orders", path=path,
                           restart=True)  # fmt: skip
        assert not errors.exists()
        dropped = imports.run_import(first, program_id=program_id, kind="orders", path=path)
        assert (dropped.resumed_from, dropped.replayed, dropped.refused) == (0, 29, 1)
    finally:
        first.dispose()
        second.dispose()


def test_the_error_file_and_the_progress_record_are_readable_by_their_owner_alone(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused rows are kept as they were (phones, names), and a progress record names the
    last record: neither is left for other users of the machine to read, whatever the
    umask, and an error file an earlier import left readable is closed to them too."""
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    setup_members(db, program.id)
    rows = [[r[0], "c9" if r[0] == "o15" else r[1], *r[2:]] for r in order_rows(20)]
    path = write(tmp_path / "orders.csv", ORDER_HEADER, rows)  # o15: a member not there
    (tmp_path / "orders.errors.csv").write_text("left by an earlier import\n")
    (tmp_path / "orders.errors.csv").chmod(0o644)
    save = imports._Checkpoint.save
    modes: list[int] = []

    def stops_after_two_batches(
        self: imports._Checkpoint, report: imports.Report, *rest: Any
    ) -> None:
        save(self, report, *rest)
        if report.records == 20:
            modes.append(self.path.stat().st_mode & 0o777)
            raise Stop

    monkeypatch.setattr(imports._Checkpoint, "save", stops_after_two_batches)
    old_umask = os.umask(0o022)
    try:
        with pytest.raises(Stop):
            imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10)
    finally:
        os.umask(old_umask)
    assert modes == [0o600]
    assert (tmp_path / "orders.errors.csv").stat().st_mode & 0o777 == 0o600
    _, *refused = read_csv(tmp_path / "orders.errors.csv")
    assert [row[0] for row in refused] == ["o15", "o15"]


@pytest.mark.parametrize("changed", [{"merchant": "m-2"}, {"source": "pos"}])
def test_an_interrupted_import_run_again_for_another_merchant_or_source_stops_saying_so(
    db: Database, tmp_path: Path, changed: dict[str, str]
) -> None:
    """Continuing after the orders posted for one merchant (or keyed by one source) with
    another would leave the file split between the two without a word: the run stops, saying
    how to continue as begun or start over; --restart starts over."""
    program = new_program(db)
    activate(db, program.id, "base", RATES)
    setup_members(db, program.id)
    path = write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(30))

    class Stop(Exception):
        pass

    def interrupt(report: imports.Report) -> None:
        if report.records >= 10:
            raise Stop

    begun: dict[str, Any] = {"merchant": "m-1", "source": "csv"}
    with pytest.raises(Stop):
        imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10,
                           progress=interrupt, **begun)  # fmt: skip
    with pytest.raises(InvalidInput) as raised:
        imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10,
                           **{**begun, **changed})  # fmt: skip
    (option,) = changed
    said = raised.value.message("en")
    assert f"--{option} {begun[option]}" in said and "--restart" in said
    assert "stopped after 10 records" in said
    assert imports.progress_path(path, imports.target_of(db, program.id)).exists()
    report = imports.run_import(db, program_id=program.id, kind="orders", path=path, batch=10,
                                **begun)  # fmt: skip
    assert (report.resumed_from, report.records, report.accepted) == (10, 30, 20)
