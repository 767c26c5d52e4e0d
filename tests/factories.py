"""Small builders of test data, and the ledger-wide checks tests make after acting."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from jifen.db.uow import Database, UnitOfWork
from jifen.members import service as members
from jifen.members.models import members as members_table
from jifen.points import integrity
from jifen.points.models import accounts
from jifen.programs import service as programs
from jifen.programs.schemas import ProgramRead


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
    """Every invariant of the ledger holds for the programme: reconcile and verify are clean,
    and each member account carries its member's state."""
    reconciled = db.run(lambda uow: integrity.reconcile(uow, program_id=program_id), read_only=True)
    assert reconciled.problems == []
    assert reconciled.member_total + sum(reconciled.system_balances.values()) == 0
    verified = db.run(lambda uow: integrity.verify(uow, program_id=program_id), read_only=True)
    assert verified.problems == []
    carried = (
        select(accounts.c.member_id)
        .join(members_table, members_table.c.id == accounts.c.member_id)
        .where(
            accounts.c.program_id == program_id,
            accounts.c.member_state != members_table.c.state,
        )
    )
    assert db.run(lambda uow: uow.conn.execute(carried).all(), read_only=True) == []
