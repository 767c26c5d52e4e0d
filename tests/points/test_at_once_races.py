"""Races on PostgreSQL of the earning and spending written in the statement that locks the
account (``points.store.credit_at_once`` and ``debit_at_once``) with a posting to the same
account that commits while that statement waits for the account's row lock.

Such a statement's snapshot predates the posting it waited for. Its locked row (the CTE
``a``) is the newest version, and ``open_lots`` reads the newest lots, but the sibling
``UPDATE``s scan the tables in the statement's snapshot: an ``UPDATE`` of a row the posting
changed follows it to the newest version only after it has checked the row's constraints
against the version of its snapshot, and a row the posting inserted (a lot) it does not
see at all. Each test holds a posting's transaction open until the other statement waits
for it (``pg_blocking_pids``), then commits it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from jifen.db import uow as uow_module
from jifen.db.uow import Database, UnitOfWork
from jifen.points import service as points
from jifen.points import store
from jifen.points.models import accounts, lots, postings
from tests.factories import assert_ledger_sound, new_members, new_program


def while_held(
    pg: Database,
    hold: Callable[[UnitOfWork], Any],
    then: Callable[[UnitOfWork], Any],
    meanwhile: Callable[[], Any] | None = None,
    *,
    alone: bool = False,
) -> Any:
    """Run ``hold`` in a transaction and, once it is done, ``then`` in another (through
    ``Database.run``, told ``alone``: ``then`` is one points operation); commit the first
    only when the second is waiting for a lock the first holds (after running
    ``meanwhile``, if given, while it waits). Answers what ``then`` answered, or the
    exception it raised."""
    held, done = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def holder() -> None:
        with pg.transaction() as uow:
            pid = uow.conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            hold(uow)
            held.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not done.is_set():
                waiting = pg.run(
                    lambda r: r.conn.execute(
                        text("SELECT count(*) FROM pg_stat_activity "
                             "WHERE :pid = ANY(pg_blocking_pids(pid))"),
                        {"pid": pid},
                    ).scalar_one(),
                    read_only=True,
                )  # fmt: skip
                if waiting:
                    outcome["waited"] = True
                    if meanwhile is not None:
                        meanwhile()
                    break
                time.sleep(0.01)

    def waiter() -> None:
        assert held.wait(10)
        try:
            outcome["result"] = pg.run(then, alone=alone)
        except Exception as exc:
            outcome["result"] = exc
        finally:
            done.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcome.get("waited"), "the second transaction never waited for the first"
    return outcome["result"]


def lots_and_balance(pg: Database, member_id: int) -> tuple[int, int]:
    """(the account's balance, the sum of its lots' remaining), read in one statement."""

    def read(uow: UnitOfWork) -> tuple[int, int]:
        lot_sum = (
            select(func.coalesce(func.sum(lots.c.remaining), 0))
            .where(lots.c.account_id == accounts.c.id)
            .scalar_subquery()
        )
        row = uow.conn.execute(
            select(accounts.c.balance, lot_sum).where(accounts.c.member_id == member_id)
        ).one()
        return int(row[0]), int(row[1])

    return pg.run(read, read_only=True)


def written_at_once(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int | None]:
    """What ``store.<name>`` (the statement at once) answered as the new posting, call by
    call: ``None`` where it wrote nothing and the service went on the general path."""
    answered: list[int | None] = []
    original = getattr(store, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        answer = original(*args, **kwargs)  # (row, new posting id, ...)
        answered.append(answer[1])
        return answer

    monkeypatch.setattr(store, name, spy)
    return answered


# What commits while the spending waits, on a member who earned 100 points (key "e", lot
# expiring in a year) and spent 80 of them (key "s1"): the spending that waits then takes
# 90 points, which only what the posting left can cover.
_LATER = timedelta(days=365)


def _earn_sooner(uow: UnitOfWork, member_id: int) -> None:
    # A lot that expires before the member's other one: FIFO takes it first.
    now = uow.clock.now()
    points.earn(uow, member_id=member_id, amount=100, key="sooner",
                expires_at=now + timedelta(days=30))  # fmt: skip


def _refund(uow: UnitOfWork, member_id: int) -> None:
    # Gives the 80 points back to the very lot they came from (20 left there before).
    spend_id = uow.conn.execute(
        select(postings.c.id).where(postings.c.idempotency_key == "s1",
                                    postings.c.account_id == accounts.c.id,
                                    accounts.c.member_id == member_id)
    ).scalar_one()  # fmt: skip
    points.refund(uow, spend_id=spend_id, key="refund")


def _renew(uow: UnitOfWork, member_id: int) -> None:
    # A change of tier extends the lot: what remains of it moves to a new lot.
    later = uow.clock.now() + 2 * _LATER
    points.renew(uow, member_id=member_id, key="tier", new_date=lambda _lot: later,
                 reason="tier")  # fmt: skip


def _transfer_in(uow: UnitOfWork, member_id: int) -> None:
    # Another member (the one registered after it) sends 100 points: a new lot.
    points.transfer(uow, from_member_id=member_id + 1, to_member_id=member_id, amount=100,
                    key="gift")  # fmt: skip


@pytest.mark.parametrize(
    ("meanwhile", "amount", "balance", "at_once"),
    [
        # a new lot taken first: the UPDATE of lots would never see it (the service takes it)
        (_earn_sooner, 90, 120 - 90, False),
        (_earn_sooner, 15, 120 - 15, False),
        (_renew, 15, 20 - 15, False),  # likewise, though the balance did not move
        (_transfer_in, 90, 120 - 90, False),  # 20 from the old lot, 70 from the new one
        # the lot the refund restored was there before: the statement writes it, though its
        # snapshot's versions of the lot and the account hold 20 points, not 100
        (_refund, 90, 100 - 90, True),
    ],
    ids=["earn-sooner", "earn-sooner-small", "renewal", "transfer-in", "refund"],
)
@pytest.mark.parametrize("alone", [False, True], ids=["in-a-transaction", "alone"])
def test_a_spending_that_waited_for_a_posting_spends_as_if_it_had_not_waited(
    pg: Database,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[UnitOfWork, int], None],
    amount: int,
    balance: int,
    at_once: bool,
    alone: bool,
) -> None:
    # Given a member with 20 points left of a lot of 100 (and another member with 100) ...
    program = new_program(pg)
    member_id, other = new_members(pg, program.id, 2)
    assert other == member_id + 1
    later = pg.clock.now() + _LATER
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=100, key="e",
                                   expires_at=later))  # fmt: skip
    pg.run(lambda uow: points.earn(uow, member_id=other, amount=100, key="o"))
    pg.run(lambda uow: points.spend(uow, member_id=member_id, amount=80, key="s1"))
    written = written_at_once(monkeypatch, "debit_at_once")

    # When a spending's statement waits for a posting to the member's lots to commit ...
    result = while_held(
        pg,
        lambda uow: meanwhile(uow, member_id),
        lambda uow: points.spend(uow, member_id=member_id, amount=amount, key="waited"),
        alone=alone,
    )

    # Then it spends from what that posting left, and the lots still hold the balance.
    assert not isinstance(result, BaseException), result
    assert result.amount == amount and not result.replayed
    assert written[-1] is not None if at_once else written[-1] is None
    assert lots_and_balance(pg, member_id) == (balance, balance)
    assert_ledger_sound(pg, program.id)


def _spend_30(uow: UnitOfWork, member_id: int) -> None:
    points.spend(uow, member_id=member_id, amount=30, key="spent")


def _claw_back(uow: UnitOfWork, member_id: int) -> None:
    # The member spent its first 100 points: clawing them back leaves a debt of 100.
    earn_id = uow.conn.execute(
        select(postings.c.id).where(postings.c.idempotency_key == "first",
                                    postings.c.account_id == accounts.c.id,
                                    accounts.c.member_id == member_id)
    ).scalar_one()  # fmt: skip
    points.spend(uow, member_id=member_id, amount=100 + 50, key="all")
    points.reverse(uow, earn_id=earn_id, key="claw-back")


@pytest.mark.parametrize(
    ("meanwhile", "at_once", "after"),
    [
        (_spend_30, True, (150 - 30 + 40, 0)),  # written by the statement, from the newest row
        (_claw_back, False, (0, 100 - 40)),  # the newest row owes: the debt is paid first
    ],
    ids=["after-a-spending", "after-a-claw-back"],
)
@pytest.mark.parametrize("alone", [False, True], ids=["in-a-transaction", "alone"])
def test_an_earning_that_waited_for_a_posting_earns_from_the_newest_row(
    pg: Database,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[UnitOfWork, int], None],
    at_once: bool,
    after: tuple[int, int],
    alone: bool,
) -> None:
    # Given a member with 150 points ...
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=100, key="first"))
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=50, key="a"))
    written = written_at_once(monkeypatch, "credit_at_once")

    # When an earning's statement waits for another posting to the member to commit ...
    result = while_held(
        pg,
        lambda uow: meanwhile(uow, member_id),
        lambda uow: points.earn(uow, member_id=member_id, amount=40, key="waited"),
        alone=alone,
    )

    # Then the earning follows that posting: its chain link, balance and debt (or it
    # leaves an earning that pays off debt to the general path), exactly once.
    assert not isinstance(result, BaseException), result
    assert not result.replayed
    assert written[-1] is not None if at_once else written[-1] is None
    summary = pg.run(lambda uow: points.balance(uow, member_id=member_id), read_only=True)
    assert (summary.balance, summary.debt) == after
    assert lots_and_balance(pg, member_id) == (summary.balance, summary.balance)
    assert_ledger_sound(pg, program.id)


@pytest.mark.parametrize("operation", ["earn", "spend"])
@pytest.mark.parametrize("alone", [False, True], ids=["in-a-transaction", "alone"])
def test_a_twin_that_waited_for_its_twin_loses_on_the_key_and_replays(
    pg: Database, monkeypatch: pytest.MonkeyPatch, operation: str, alone: bool
) -> None:
    # Given a member with points, and the errors Database.run is asked about ...
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=100, key="seed"))
    seen: list[str] = []
    original = uow_module.is_transient

    def counting(exc: BaseException) -> bool:
        seen.append(str(exc).splitlines()[0])
        return original(exc)

    monkeypatch.setattr(uow_module, "is_transient", counting)
    post = points.earn if operation == "earn" else points.spend

    # When twins with one key post, the second waiting for the first's lock ...
    first: list[Any] = []
    second = while_held(
        pg,
        lambda uow: first.append(post(uow, member_id=member_id, amount=10, key="twin")),
        lambda uow: post(uow, member_id=member_id, amount=10, key="twin"),
        alone=alone,
    )

    # Then the second replayed the first: one posting. Its statement did not see the
    # first's posting (its snapshot is older): an earning broke the unique key and ran
    # again; a spending may find it before, where the general path took its lots.
    assert not isinstance(second, BaseException), second
    assert second.replayed and second.id == first[0].id
    assert all("uq_postings_program_id_idempotency_key" in error for error in seen), seen
    if operation == "earn":
        assert seen
    expected = 110 if operation == "earn" else 90
    assert lots_and_balance(pg, member_id) == (expected, expected)
    assert_ledger_sound(pg, program.id)


def test_a_twin_of_a_spending_that_took_the_last_points_replays_it(pg: Database) -> None:
    # Given a member with 100 points ...
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=100, key="seed"))

    # When twins with one key spend all of them, the second waiting for the first's lock ...
    first: list[Any] = []
    second = while_held(
        pg,
        lambda uow: first.append(points.spend(uow, member_id=member_id, amount=100, key="all")),
        lambda uow: points.spend(uow, member_id=member_id, amount=100, key="all"),
    )

    # Then the second replays the first, as a twin sent after it does; it is not refused
    # for want of the points the first took (its statement's snapshot missed the posting).
    assert not isinstance(second, BaseException), second
    assert second.replayed and second.id == first[0].id
    assert_ledger_sound(pg, program.id)


def _twins(pg: Database, member_id: int, other: int, spend_id: int, freeze_id: int) -> Any:
    return {
        "transfer": lambda uow: points.transfer(
            uow, from_member_id=member_id, to_member_id=other, amount=60, key="twin"
        ),
        "freeze": lambda uow: points.freeze(
            uow, member_id=member_id, amount=60, key="twin", reason="review", actor="t"
        ),
        "refund": lambda uow: points.refund(uow, spend_id=spend_id, key="twin"),
        "unfreeze": lambda uow: points.unfreeze(uow, freeze_id=freeze_id, key="twin"),
    }


@pytest.mark.parametrize("operation", ["transfer", "freeze", "refund", "unfreeze"])
def test_a_twin_refused_for_what_its_twin_took_replays_it_instead(
    pg: Database, operation: str
) -> None:
    """The general path (the lock statement, then the plan): its look-up of the key ran in
    the lock statement's snapshot, before the wait, so the twin's posting was not seen."""
    # Given a member with 100 points available, 30 more spent and 30 more frozen ...
    program = new_program(pg)
    member_id, other = new_members(pg, program.id, 2)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=160, key="seed"))
    spent = pg.run(lambda uow: points.spend(uow, member_id=member_id, amount=30, key="s"))
    frozen = pg.run(
        lambda uow: points.freeze(
            uow, member_id=member_id, amount=30, key="f", reason="review", actor="t"
        )
    )
    twin = _twins(pg, member_id, other, spent.id, frozen.id)[operation]

    # When twins with one key each need what the first takes, the second waiting for its lock ...
    first: list[Any] = []
    second = while_held(pg, lambda uow: first.append(twin(uow)), twin)

    # Then the second replays the first rather than being refused, as a twin sent later does.
    assert not isinstance(second, BaseException), second
    assert second.replayed and second.id == first[0].id
    later = pg.run(twin)
    assert later.replayed and later.id == first[0].id
    assert_ledger_sound(pg, program.id)
