"""An earning or a spending run as one points operation and nothing else
(``Database.run(fn, alone=True)``): on PostgreSQL its one statement is its transaction,
committed as it returns; where it must do more than that statement, the statement wrote
nothing and the operation takes its lock again in a transaction of its own."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from jifen.db.prepared import in_transaction
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import StateConflict
from jifen.ledger.errors import IdempotencyConflict, InsufficientPoints, UnknownMember
from jifen.members import service as members
from jifen.points import service as points
from jifen.points.models import postings
from jifen.points.schemas import PostingRead
from tests.factories import assert_ledger_sound, new_members, new_program


def _postings_with_key(pg: Database, program_id: int, key: str) -> int:
    """Postings with ``key`` that another connection sees committed."""
    return pg.run(
        lambda uow: uow.conn.execute(
            select(func.count()).where(
                postings.c.program_id == program_id, postings.c.idempotency_key == key
            )
        ).scalar_one(),
        read_only=True,
    )


def _earn(member_id: int, key: str) -> Callable[[UnitOfWork], PostingRead]:
    return lambda uow: points.earn(uow, member_id=member_id, amount=30, key=key)


def _spend(member_id: int, key: str) -> Callable[[UnitOfWork], PostingRead]:
    return lambda uow: points.spend(uow, member_id=member_id, amount=30, key=key)


@pytest.mark.parametrize("operation", [_earn, _spend], ids=["earn", "spend"])
@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-a-transaction"])
def test_an_operation_run_alone_is_committed_by_its_statement(
    pg: Database, operation: Callable[[int, str], Callable[[UnitOfWork], Any]], alone: bool
) -> None:
    # Given a member with points ...
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=100, key="seed"))
    seen: list[tuple[bool, int]] = []

    def fn(uow: UnitOfWork) -> PostingRead:
        posted = operation(member_id, "op")(uow)
        # before the unit of work ends: is a transaction open, does another connection see it
        seen.append((in_transaction(uow.conn), _postings_with_key(pg, program.id, "op")))
        return posted

    # When the operation runs as one points operation (or, by default, in a transaction) ...
    posted = pg.run(fn, alone=alone)

    # Then alone, its statement committed it before the function returned: no transaction
    # was left open; in a transaction, it committed only at the end.
    assert seen == [(False, 1)] if alone else [(True, 0)]
    assert not posted.replayed and posted.amount == 30
    assert _postings_with_key(pg, program.id, "op") == 1
    assert_ledger_sound(pg, program.id)


def test_an_earning_alone_that_pays_a_debt_takes_the_lock_again_and_pays_it(
    pg: Database,
) -> None:
    # Given a member who spent 100 points of an earning that was then clawed back: a debt
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    earned = pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=100, key="e"))
    pg.run(lambda uow: points.spend(uow, member_id=member_id, amount=100, key="s"))
    pg.run(lambda uow: points.reverse(uow, earn_id=earned.id, key="r"))
    assert pg.run(lambda uow: points.balance(uow, member_id=member_id)).debt == 100
    opened: list[bool] = []

    def fn(uow: UnitOfWork) -> PostingRead:
        posted = points.earn(uow, member_id=member_id, amount=130, key="pays")
        opened.append(in_transaction(uow.conn))
        return posted

    # When an earning runs alone: its statement writes nothing for a member who owes ...
    posted = pg.run(fn, alone=True)

    # Then the general path wrote it under the lock, in a transaction: the debt paid first.
    assert opened == [True]
    assert posted.debt_change == -100
    summary = pg.run(lambda uow: points.balance(uow, member_id=member_id), read_only=True)
    assert (summary.available, summary.debt) == (30, 0)
    assert_ledger_sound(pg, program.id)


def test_a_spending_alone_of_more_lots_than_its_statement_reads_takes_them_all(
    pg: Database,
) -> None:
    # Given a member with 40 lots of 5 points, expiring day after day ...
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    now = pg.clock.now()
    with pg.transaction() as uow:
        for day in range(1, 41):
            points.earn(uow, member_id=member_id, amount=5, key=f"lot-{day}",
                        expires_at=now + timedelta(days=day))  # fmt: skip

    # When a spending alone takes 180 of the 200 points (36 lots) ...
    posted = pg.run(_spend_amount(member_id, 180, "big"), alone=True)

    # Then it took them, soonest expiring first, and left the last 4 lots whole.
    assert posted.amount == 180
    page = pg.run(lambda uow: points.lots_page(uow, member_id=member_id, limit=100), read_only=True)
    assert [lot.remaining for lot in page.items] == [5, 5, 5, 5]
    assert_ledger_sound(pg, program.id)


def _spend_amount(member_id: int, amount: int, key: str) -> Callable[[UnitOfWork], PostingRead]:
    return lambda uow: points.spend(uow, member_id=member_id, amount=amount, key=key)


@pytest.mark.parametrize("operation", [_earn, _spend], ids=["earn", "spend"])
def test_an_operation_alone_sent_again_replays_and_refuses_another_body(
    pg: Database, operation: Callable[[int, str], Callable[[UnitOfWork], Any]]
) -> None:
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=100, key="seed"))
    first = pg.run(operation(member_id, "k"), alone=True)
    again = pg.run(operation(member_id, "k"), alone=True)
    assert again.replayed and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        pg.run(_spend_amount(member_id, 7, "k"), alone=True)
    assert _postings_with_key(pg, program.id, "k") == 1
    assert_ledger_sound(pg, program.id)


def test_refusals_alone_write_nothing(pg: Database) -> None:
    program = new_program(pg)
    member_id, frozen = new_members(pg, program.id, 2)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=20, key="seed"))
    pg.run(lambda uow: members.change_state(uow, program_id=program.id, member_id=frozen,
                                            state="frozen"))  # fmt: skip
    with pytest.raises(InsufficientPoints):
        pg.run(_spend(member_id, "too-much"), alone=True)
    with pytest.raises(UnknownMember):
        pg.run(_earn(10**9, "nobody"), alone=True)
    for operation in (_earn, _spend):
        with pytest.raises(StateConflict):
            pg.run(operation(frozen, f"frozen-{operation.__name__}"), alone=True)
    assert (
        pg.run(
            lambda uow: uow.conn.execute(
                select(func.count()).where(postings.c.program_id == program.id)
            ).scalar_one(),
            read_only=True,
        )
        == 1
    )  # the seed alone
    assert_ledger_sound(pg, program.id)
