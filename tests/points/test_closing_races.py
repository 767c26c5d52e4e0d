"""Races on PostgreSQL between a change of a member's state and what posts to its account:
once a freeze, ban or closing has committed, no earning, spend or transfer posts after it,
even one whose statement began (and read the member as active) before it committed. SQLite
serialises every writer, so it cannot show a race."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from jifen.db.prepared import read_together
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import StateConflict
from jifen.members import service as members
from jifen.members.models import members as members_table
from jifen.members.schemas import MemberUpdate
from jifen.points import service as points
from jifen.points.models import accounts, postings
from tests.events.test_service import activate, lines, send
from tests.factories import assert_ledger_sound, new_members, new_program
from tests.points.test_concurrency import run_together


def earn_as_the_api_does(db: Database, program_id: int, member_id: int, key: str) -> Any:
    """An earning as ``POST …/points/earn`` makes it: the member checked (active) and its
    account locked in one statement, then the posting."""

    def post(uow: UnitOfWork) -> Any:
        read_together(
            uow.conn,
            members.require_member_read(
                program_id=program_id, member_id=member_id, transacting=True
            ),
            points.lock_account_read(uow, member_id=member_id, key=key),
        )
        return points.earn(uow, member_id=member_id, amount=10, key=key)

    return db.run(post)


def _doors(program_id: int, member_id: int, other: int) -> dict[str, Callable[[Database], Any]]:
    def key() -> str:
        return uuid.uuid4().hex

    return {
        "api earn": lambda db: earn_as_the_api_does(db, program_id, member_id, key()),
        "earn": lambda db: db.run(
            lambda uow: points.earn(uow, member_id=member_id, amount=10, key=key())
        ),
        "spend": lambda db: db.run(
            lambda uow: points.spend(uow, member_id=member_id, amount=10, key=key())
        ),
        "transfer in": lambda db: db.run(
            lambda uow: points.transfer(
                uow, from_member_id=other, to_member_id=member_id, amount=10, key=key()
            )
        ),
        "event": lambda db: order_paid(db, program_id, member_id, key()),
    }


def order_paid(db: Database, program_id: int, member_id: int, order_id: str) -> Any:
    return send(
        db, program_id, member_id, "order.paid", db.clock.now(), order_id, move_clock=False,
        order_id=order_id, lines=lines(("A", "x", 10)),
    )  # fmt: skip


@pytest.mark.parametrize("door", ["api earn", "earn", "spend", "transfer in", "event"])
@pytest.mark.parametrize("state", ["frozen", "banned", "closed"])
def test_a_posting_that_waited_for_a_change_of_state_is_refused(
    pg: Database, state: str, door: str
) -> None:
    program = new_program(pg)
    member, other = new_members(pg, program.id, 2)
    activate(pg, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    for who in (member, other):
        pg.run(lambda uow, m=who: points.earn(uow, member_id=m, amount=500, key=f"fund-{m}"))
    post = _doors(program.id, member, other)[door]
    outcome: list[Any] = []

    def attempt() -> None:
        try:
            outcome.append(post(pg))
        except Exception as exc:
            outcome.append(exc)

    # given a change of state that has not committed yet, and a posting to the member's
    # account started meanwhile, which waits for it
    with pg.transaction() as uow:
        members.change_state(
            uow, program_id=program.id, member_id=member, state=state, actor="staff:test"
        )
        racer = threading.Thread(target=attempt)
        racer.start()
        time.sleep(0.5)
        assert racer.is_alive(), outcome  # waiting for the account (or the member)
    # when the change commits, the posting goes on: refused, the member is no longer active
    racer.join(timeout=30)
    (refused,) = outcome
    assert isinstance(refused, StateConflict), refused
    assert f"is {state}" in refused.message("en")
    balance = pg.run(lambda uow: points.balance(uow, member_id=member), read_only=True)
    assert balance.balance == (0 if state == "closed" else 500)
    assert_ledger_sound(pg, program.id)


def test_earnings_racing_a_closing_all_post_before_it(pg: Database) -> None:
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member, amount=100, key="fund"))
    earners = 12

    def work(i: int) -> Any:
        if i == 0:
            time.sleep(0.02)  # amid the earnings
            return pg.run(
                lambda uow: members.change_state(
                    uow, program_id=program.id, member_id=member, state="closed", actor="t"
                )
            )
        posted = 0
        for n in range(40):
            try:
                earn_as_the_api_does(pg, program.id, member, f"e{i}-{n}")
            except StateConflict:
                return posted
            posted += 1
        return posted

    results = run_together(earners + 1, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    closing = results[0].settlement
    assert closing.posting_id is not None
    # every earning posted before the closing's forfeit, which took them all
    account_id = pg.run(
        lambda uow: uow.conn.execute(
            select(accounts.c.id).where(accounts.c.member_id == member)
        ).scalar_one()
    )
    kinds = pg.run(
        lambda uow: uow.conn.execute(
            select(postings.c.id, postings.c.kind, postings.c.amount)
            .where(postings.c.account_id == account_id)
            .order_by(postings.c.id)
        ).all()
    )
    assert kinds[-1].id == closing.posting_id and kinds[-1].kind == "expire"
    earned = [row for row in kinds if row.kind == "earn"]
    assert len(earned) == 1 + sum(results[1:])
    assert closing.forfeited == sum(row.amount for row in earned)
    summary = pg.run(lambda uow: points.balance(uow, member_id=member), read_only=True)
    assert summary.balance == 0
    assert_ledger_sound(pg, program.id)


def test_a_profile_write_that_waited_for_a_closing_is_refused(pg: Database) -> None:
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    outcome: list[Any] = []

    def write() -> None:
        body = MemberUpdate(name="李雷")
        try:
            outcome.append(
                pg.run(
                    lambda uow: members.update_profile(
                        uow, program_id=program.id, member_id=member, body=body
                    )
                )
            )
        except Exception as exc:
            outcome.append(exc)

    with pg.transaction() as uow:
        members.change_state(uow, program_id=program.id, member_id=member, state="closed")
        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.5)
        assert writer.is_alive(), outcome  # read the member as active, waits to write it
    writer.join(timeout=30)
    (refused,) = outcome
    assert isinstance(refused, StateConflict) and "is closed" in refused.message("en")
    name = select(members_table.c.name).where(members_table.c.id == member)
    assert pg.run(lambda uow: uow.conn.execute(name).scalar_one()) != "李雷"
