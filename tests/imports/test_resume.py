"""Resuming: an interrupted import continues only into the database and programme it was
importing into."""

from __future__ import annotations

from pathlib import Path

import pytest

from jifen.clock import ManualClock
from jifen.db.migrate import upgrade
from jifen.db.uow import Database
from jifen.imports import service as imports
from tests.conftest import START
from tests.events.test_service import activate
from tests.factories import new_program
from tests.imports.test_csv import ORDER_HEADER, RATES, balances, order_rows, setup_members, write


def database(path: Path) -> Database:
    db = Database(f"sqlite:///{path}", clock=ManualClock(START))
    upgrade(db.engine)
    return db


def test_an_import_interrupted_in_one_database_does_not_skip_rows_in_another(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "orders.csv", ORDER_HEADER, order_rows(30))
    first, second = database(tmp_path / "a.db"), database(tmp_path / "b.db")
    try:
        programs = []
        for db in (first, second):
            programs.append(new_program(db))
            activate(db, programs[-1].id, "base", RATES)
        assert programs[0].id == programs[1].id  # the same programme id in each

        class Stop(Exception):
            pass

        def interrupt(report: imports.Report) -> None:
            raise Stop

        setup_members(first, programs[0].id)
        with pytest.raises(Stop):
            imports.run_import(first, program_id=programs[0].id, kind="orders", path=path,
                               batch=10, progress=interrupt)  # fmt: skip
        ids = setup_members(second, programs[1].id)
        report = imports.run_import(second, program_id=programs[1].id, kind="orders", path=path)
        assert (report.resumed_from, report.accepted) == (0, 30)
        assert balances(second, ids) == {"c0": 3500, "c1": 3500, "c2": 3500}
        # and the first continues where it stopped
        again = imports.run_import(first, program_id=programs[0].id, kind="orders", path=path)
        assert (again.resumed_from, again.accepted) == (10, 20)
    finally:
        first.dispose()
        second.dispose()
