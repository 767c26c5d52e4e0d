"""Concurrency on PostgreSQL: many writers, a reader, twins with one key, a race to overdraw.

These run on PostgreSQL only: SQLite serialises every writer, so it cannot show a race.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy import func, select

from jifen.db.uow import Database, UnitOfWork
from jifen.errors import ExceedsOriginal, InsufficientPoints
from jifen.points import service as points
from jifen.points.models import accounts, lines, postings
from tests.factories import assert_ledger_sound, new_members, new_program

THREADS = 16
OPERATIONS = 500
MEMBERS = 20


def run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Start ``count`` threads at the same instant; return each one's result or exception."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def ledger_total(uow: UnitOfWork, program_id: int) -> tuple[int, int]:
    """Member balances (stored) and system accounts (from lines), read in one statement."""
    members_sum = (
        select(func.coalesce(func.sum(accounts.c.balance), 0))
        .where(accounts.c.program_id == program_id, accounts.c.member_id.is_not(None))
        .scalar_subquery()
    )
    system_sum = (
        select(func.coalesce(func.sum(lines.c.amount), 0))
        .join(accounts, accounts.c.id == lines.c.account_id)
        .where(accounts.c.program_id == program_id, accounts.c.system_code.is_not(None))
        .scalar_subquery()
    )
    row = uow.conn.execute(select(members_sum, system_sum)).one()
    return int(row[0]), int(row[1])


def test_bank_many_writers_and_a_reader_keep_every_invariant(pg: Database) -> None:
    bank(pg, members=MEMBERS, operations=OPERATIONS, combine=False)


def test_bank_with_writes_of_one_member_sharing_commits_keeps_every_invariant(
    pg: Database,
) -> None:
    # fewer members than writers: writes of one member meet in one transaction, refusals
    # and lost races (transfers' deadlocks) among them
    before = pg.combiner.stats.transactions, pg.combiner.stats.functions
    bank(pg, members=6, operations=100, combine=True)
    transactions = pg.combiner.stats.transactions - before[0]
    functions = pg.combiner.stats.functions - before[1]
    assert functions > transactions > 0


def test_bank_with_earnings_and_spendings_run_alone_keeps_every_invariant(pg: Database) -> None:
    # each earning and spending is one points operation and nothing else: its statement
    # commits by itself where nobody queues behind it, and shares a commit where some do
    bank(pg, members=6, operations=100, combine=True, alone=True)


def bank(
    pg: Database, *, members: int, operations: int, combine: bool, alone: bool = False
) -> None:
    """16 writers x ``operations`` random spends, transfers, earnings and refunds over
    ``members`` members while a reader sums the programme; ``combine``: each write that
    locks one member's account names it as its group commit key, as the API's do;
    ``alone``: earnings and spendings are run as what they are, one points operation."""
    # given members with points in lots spread over a year
    program = new_program(pg)
    members_ids = new_members(pg, program.id, members)
    now = pg.clock.now()
    with pg.transaction() as uow:
        for i, m in enumerate(members_ids):
            for month in range(1, 13):
                points.earn(uow, member_id=m, amount=400, key=f"seed-{i}-{month}",
                            expires_at=now + timedelta(days=30 * month))  # fmt: skip
    stop = threading.Event()
    reads: list[tuple[int, int]] = []

    def reader() -> None:
        while not stop.is_set():
            reads.append(pg.run(lambda uow: ledger_total(uow, program.id), read_only=True))

    def writer(worker: int) -> Counter[str]:
        rng = random.Random(worker)
        outcome: Counter[str] = Counter()
        my_spends: list[tuple[int, int]] = []  # (posting, member)
        for n in range(operations):
            a, b = rng.sample(members_ids, 2)
            choice = rng.random()
            # Everything random is drawn here, outside the retried transaction.
            account: int | None = a  # whose account alone the write locks
            if choice < 0.35:
                op, kind = partial(points.spend, member_id=a, amount=rng.randint(1, 60)), "spend"
            elif choice < 0.65:
                op = partial(points.transfer, from_member_id=a, to_member_id=b,
                             amount=rng.randint(1, 80))  # fmt: skip
                kind, account = "transfer", None
            elif choice < 0.85 or not my_spends:
                op = partial(points.earn, member_id=a, amount=rng.randint(1, 50),
                             expires_at=now + timedelta(days=rng.randint(1, 365)))  # fmt: skip
                kind = "earn"
            else:
                spend_id, account = rng.choice(my_spends)
                op = partial(points.refund, spend_id=spend_id, amount=rng.randint(1, 10))
                kind = "refund"
            try:
                posted = pg.run(
                    partial(op, key=f"w{worker}-{n}"),
                    combine=points.account_key(account) if combine and account else None,
                    alone=alone and kind in ("earn", "spend"),
                )
                outcome[kind] += 1
                if kind == "spend":
                    my_spends.append((posted.id, a))
            except (InsufficientPoints, ExceedsOriginal):
                outcome["refused"] += 1
        return outcome

    reading = threading.Thread(target=reader)
    reading.start()
    try:
        results = run_together(THREADS, writer)
    finally:
        stop.set()
        reading.join()

    # then no writer saw an error other than an honest refusal (lost races were retried)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    done: Counter[str] = sum(results, Counter())
    assert min(done["spend"], done["transfer"]) > THREADS * operations // 8
    assert done["refund"] > THREADS * operations // 80
    # every read, taken while writers ran, summed to zero across the programme
    assert len(reads) > 10
    assert all(member_total + system_total == 0 for member_total, system_total in reads)
    # and afterwards every invariant holds; no balance is negative (reconcile checks it)
    assert_ledger_sound(pg, program.id)
    posted = pg.run(lambda uow: uow.conn.execute(
        select(func.count()).where(postings.c.program_id == program.id)).scalar_one())  # fmt: skip
    assert posted == members * 12 + sum(v for k, v in done.items() if k != "refused")


def test_eight_twins_with_one_idempotency_key_post_once(pg: Database) -> None:
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    results = run_together(
        8, lambda _: pg.run(lambda uow: points.earn(uow, member_id=member, amount=25, key="twin"))
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    assert len({r.id for r in results}) == 1
    assert sorted(r.replayed for r in results) == [False] + [True] * 7
    assert pg.run(lambda uow: points.balance(uow, member_id=member)).balance == 25
    assert_ledger_sound(pg, program.id)


def test_twins_with_one_key_on_different_members_post_once_and_refuse_the_rest(
    pg: Database,
) -> None:
    # different members lock different rows, so the race is decided by the unique key
    program = new_program(pg)
    members = new_members(pg, program.id, 8)
    results = run_together(
        8, lambda i: pg.run(lambda uow: points.earn(uow, member_id=members[i], amount=5, key="k"))
    )
    posted = [r for r in results if not isinstance(r, BaseException)]
    assert len(posted) == 1
    assert {type(r).__name__ for r in results if isinstance(r, BaseException)} == {
        "IdempotencyConflict"
    }
    assert_ledger_sound(pg, program.id)


def test_twenty_spends_of_the_whole_balance_exactly_one_succeeds(pg: Database) -> None:
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member, amount=1000, key="seed"))
    results = run_together(
        20,
        lambda i: pg.run(lambda uow: points.spend(uow, member_id=member, amount=1000, key=f"s{i}")),
    )
    succeeded = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, InsufficientPoints)]
    assert (len(succeeded), len(refused)) == (1, 19)
    assert pg.run(lambda uow: points.balance(uow, member_id=member)).balance == 0
    assert_ledger_sound(pg, program.id)


@pytest.mark.parametrize("alone", [False, True], ids=["in-transactions", "alone"])
def test_twins_and_whole_balance_spends_sharing_commits_post_once(
    pg: Database, alone: bool
) -> None:
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    account = points.account_key(member)
    twins = run_together(
        8,
        lambda _: pg.run(
            lambda uow: points.earn(uow, member_id=member, amount=1000, key="twin"),
            combine=account,
            alone=alone,
        ),
    )
    assert not [r for r in twins if isinstance(r, BaseException)]
    assert len({r.id for r in twins}) == 1
    assert sorted(r.replayed for r in twins) == [False] + [True] * 7
    before = pg.combiner.stats.transactions
    spends = run_together(
        20,
        lambda i: pg.run(
            lambda uow: points.spend(uow, member_id=member, amount=1000, key=f"s{i}"),
            combine=account,
            alone=alone,
        ),
    )
    succeeded = [r for r in spends if not isinstance(r, BaseException)]
    refused = [r for r in spends if isinstance(r, InsufficientPoints)]
    assert (len(succeeded), len(refused)) == (1, 19)
    # refusals inside a shared transaction did not undo the spending committed with them
    assert pg.combiner.stats.transactions - before < 20
    assert pg.run(lambda uow: points.balance(uow, member_id=member)).balance == 0
    assert_ledger_sound(pg, program.id)


def _spend(uow: UnitOfWork, member: int) -> int:
    return points.spend(uow, member_id=member, amount=100, key="debit").amount


def _freeze(uow: UnitOfWork, member: int) -> int:
    held = points.freeze(uow, member_id=member, amount=100, key="debit", reason="r", actor="a")
    return held.amount


def _held_then_spent(uow: UnitOfWork, member: int) -> int:
    assert not points.lock_account(uow, member_id=member, key="debit", spending=True)
    return _spend(uow, member)


@pytest.mark.parametrize("debit", [_spend, _freeze, _held_then_spent])
def test_a_debit_that_waited_for_the_lock_takes_the_lot_posted_meanwhile(
    pg: Database, debit: Callable[[UnitOfWork, int], int]
) -> None:
    # A debit's lock statement also reads the first open lots. Its snapshot was taken before
    # the lock was granted, so the lot of a posting committed while it waited is not in it:
    # the lots must be read after the wait (open_lots, read again when the lock rechecks
    # the row), or the debit would refuse for want of points it has.
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    posted, waiting = threading.Event(), threading.Event()

    def holder() -> None:
        with pg.transaction() as uow:
            points.earn(uow, member_id=member, amount=100, key="earn")
            posted.set()
            assert waiting.wait(10)
            time.sleep(0.3)  # the debit's statement is waiting for the account by now

    def debitor() -> int:
        assert posted.wait(10)
        with pg.transaction() as uow:
            waiting.set()
            return debit(uow, member)

    results = run_together(2, lambda i: holder() if i == 0 else debitor())
    assert results == [None, 100]
    assert pg.run(lambda uow: points.balance(uow, member_id=member)).available == 0
    assert_ledger_sound(pg, program.id)


def test_a_lock_handed_on_inside_a_rolled_back_savepoint_is_not_used_after_it(
    pg: Database,
) -> None:
    # The rollback of a savepoint releases a row lock taken inside it: another transaction
    # may then post to the member, and the posting the lock was handed to must lock again.
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member, amount=100, key="first"))

    def spend_after_a_failed_attempt(uow: UnitOfWork) -> int:
        with contextlib.suppress(RuntimeError), uow.savepoint():
            assert not points.lock_account(uow, member_id=member, key="debit", spending=True)
            raise RuntimeError("the attempt failed after the lock")
        # another transaction posts to the member in the meantime: the lock is free again
        pg.run(lambda other: points.earn(other, member_id=member, amount=50, key="meanwhile"))
        return points.spend(uow, member_id=member, amount=150, key="debit").amount

    assert pg.run(spend_after_a_failed_attempt) == 150
    assert pg.run(lambda uow: points.balance(uow, member_id=member)).available == 0
    assert_ledger_sound(pg, program.id)


def test_a_check_of_the_chains_beside_live_earnings_finds_nothing_broken(pg: Database) -> None:
    """jifen ledger verify reads the postings, then the chains, while members keep earning:
    it sees them at one moment, so an earning committed between its reads is no broken chain
    (on PostgreSQL a read-only unit of work sees, statement by statement, what committed)."""
    from sqlalchemy import event

    from jifen.points import integrity

    program_id = new_program(pg).id
    (alice,) = new_members(pg, program_id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=alice, amount=100, key="a1"))
    earned: list[int] = []

    def earn_between(conn: object, cursor: object, statement: str, *args: object) -> None:
        # once the postings are read, before the chains are
        if not earned and "FROM chain_entries" in statement:
            earned.append(1)
            pg.run(lambda uow: points.earn(uow, member_id=alice, amount=50, key="a2"))

    event.listen(pg.engine, "before_cursor_execute", earn_between)
    try:
        report = pg.run(lambda uow: integrity.verify(uow, program_id=program_id), read_only=True)
    finally:
        event.remove(pg.engine, "before_cursor_execute", earn_between)
    assert earned == [1]
    assert (report.problems, report.postings) == ([], 1)
    assert_ledger_sound(pg, program_id)
