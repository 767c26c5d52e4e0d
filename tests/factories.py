"""Small builders of test data, and the ledger-wide checks tests make after acting."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from jifen import crypto
from jifen.db.uow import Database, UnitOfWork
from jifen.members import service as members
from jifen.points import integrity
from jifen.programs import service as programs
from jifen.programs.schemas import ProgramRead
from jifen.settings import get_settings


def new_program(db: Database, *, time_zone: str = "Asia/Shanghai") -> ProgramRead:
    code = f"t-{uuid.uuid4().hex[:10]}"
    return db.run(
        lambda uow: programs.create_program(uow, code=code, name=code, time_zone=time_zone)
    )


def new_members(db: Database, program_id: int, count: int) -> list[int]:
    def register(uow: UnitOfWork) -> list[int]:
        return [
            members.register_member(uow, program_id=program_id, external_ref=f"m{i}").id
            for i in range(count)
        ]

    return db.run(register)


def assert_ledger_sound(db: Database, program_id: int) -> None:
    """Every invariant of the ledger holds for the programme: reconcile (which checks that
    each member account carries its member's state) and verify are clean."""
    reconciled = db.run(lambda uow: integrity.reconcile(uow, program_id=program_id), read_only=True)
    assert reconciled.problems == []
    assert reconciled.member_total + sum(reconciled.system_balances.values()) == 0
    verified = db.run(lambda uow: integrity.verify(uow, program_id=program_id), read_only=True)
    assert verified.problems == []


@contextmanager
def secret_keys(monkeypatch: pytest.MonkeyPatch, current: str, *previous: str) -> Iterator[None]:
    """The installation's secret key ``current`` (and the ``previous`` keys it replaced)
    for a while, the run's own again after."""
    monkeypatch.setenv("JIFEN_SECRET_KEY", current)
    monkeypatch.setenv("JIFEN_PREVIOUS_SECRET_KEYS", ",".join(previous))
    get_settings.cache_clear()
    crypto.forget_keys()
    try:
        yield
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        crypto.forget_keys()
