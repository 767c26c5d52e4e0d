"""The points use cases on both backends: what each does, and what bad input does not do."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import (
    ExceedsOriginal,
    IdempotencyConflict,
    InsufficientPoints,
    InvalidDates,
    InvalidInput,
    JifenError,
    MissingReason,
    NonPositiveAmount,
    SameAccount,
    UnknownMember,
    UnknownPosting,
)
from jifen.points import service as points
from jifen.points.models import accounts, lines, lots, postings
from tests.factories import assert_ledger_sound, new_members, new_program

DAY = timedelta(days=1)


def snapshot(db: Database, program_id: int) -> tuple[Any, ...]:
    """Everything a failed call must leave as it was."""

    def read(uow: UnitOfWork) -> tuple[Any, ...]:
        in_program = accounts.c.program_id == program_id
        counts = tuple(
            uow.conn.execute(
                select(func.count())
                .select_from(t.join(accounts, accounts.c.id == t.c.account_id))
                .where(in_program)
            ).scalar_one()
            for t in (lines, lots)
        )
        posted = uow.conn.execute(
            select(func.count()).where(postings.c.program_id == program_id)
        ).scalar_one()
        state = uow.conn.execute(
            select(
                accounts.c.id,
                accounts.c.balance,
                accounts.c.frozen,
                accounts.c.debt,
                accounts.c.head_hash,
            )
            .where(in_program)
            .order_by(accounts.c.id)
        ).all()
        remaining = uow.conn.execute(
            select(lots.c.id, lots.c.remaining)
            .join(accounts, accounts.c.id == lots.c.account_id)
            .where(in_program)
            .order_by(lots.c.id)
        ).all()
        return (counts, posted, tuple(map(tuple, state)), tuple(map(tuple, remaining)))

    return db.run(read, read_only=True)


@pytest.fixture
def setup(db: Database) -> tuple[Database, int, int, int]:
    program = new_program(db)
    alice, bob = new_members(db, program.id, 2)
    return db, program.id, alice, bob


def call(db: Database, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    return db.run(lambda uow: fn(uow, **kwargs))


def test_earn_then_spend_then_full_refund_restores_the_same_lots(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    # given two lots with different expiry
    call(db, points.earn, member_id=alice, amount=100, key="e1", expires_at=clock.now() + 90 * DAY)
    call(db, points.earn, member_id=alice, amount=50, key="e2", expires_at=clock.now() + 30 * DAY)
    before = call(db, points.member_lots, member_id=alice)
    # when 120 are spent and then refunded in full
    spend = call(db, points.spend, member_id=alice, amount=120, key="s1")
    after_spend = {lot.id: lot.remaining for lot in call(db, points.member_lots, member_id=alice)}
    call(db, points.refund, spend_id=spend.id, key="r1")
    # then the spend took the 30-day lot first and the refund put every lot back
    assert list(after_spend.values()) == [30]
    assert call(db, points.member_lots, member_id=alice) == before
    assert call(db, points.balance, member_id=alice).available == 150
    assert_ledger_sound(db, program_id)


def test_points_given_back_to_a_renewed_lot_take_its_later_date(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    # given 1,000 points expiring in 30 days, of which 300 are spent and 200 frozen
    call(db, points.earn, member_id=alice, amount=1000, key="e", expires_at=clock.now() + 30 * DAY)
    spend = call(db, points.spend, member_id=alice, amount=300, key="s")
    hold = call(db, points.freeze, member_id=alice, amount=200, key="f", reason="risk",
                actor="ops")  # fmt: skip
    # and a tier change renews what is left to 400 days, then again to never
    call(db, points.renew, member_id=alice, key="t1", reason="tier",
         new_date=lambda lot: clock.now() + 400 * DAY)  # fmt: skip
    clock.advance(40 * DAY)  # the old lot's own date has passed
    call(db, points.renew, member_id=alice, key="t2", reason="tier", new_date=lambda lot: None)
    # when the spend is refunded in two parts and the freeze released
    first = call(db, points.refund, spend_id=spend.id, key="r1", amount=100)
    call(db, points.refund, spend_id=spend.id, key="r2")
    call(db, points.unfreeze, freeze_id=hold.id, key="u")
    # then every point came back with the renewed date, none with the old one
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.available, summary.overdue) == (1000, 1000, 0)
    assert summary.expiring == []
    assert call(db, points.expire_member, member_id=alice) is None
    # a replayed refund changes nothing, and the refund's answer is the refund itself
    again = call(db, points.refund, spend_id=spend.id, key="r1", amount=100)
    assert (again.id, again.replayed, again.kind) == (first.id, True, "refund")
    assert call(db, points.balance, member_id=alice).balance == 1000
    assert_ledger_sound(db, program_id)


def test_points_given_back_to_a_lot_never_renewed_keep_its_date(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    call(db, points.earn, member_id=alice, amount=100, key="e", expires_at=clock.now() + 30 * DAY)
    spend = call(db, points.spend, member_id=alice, amount=60, key="s")
    clock.advance(40 * DAY)
    call(db, points.refund, spend_id=spend.id, key="r")
    # the refund restored the lapsed lot, as the lots it took: overdue, then expired
    assert call(db, points.balance, member_id=alice).overdue == 100
    expired = call(db, points.expire_member, member_id=alice)
    assert expired is not None and expired.amount == 100
    assert_ledger_sound(db, program_id)


def test_balance_summary_separates_available_pending_overdue_and_expiry_days(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    # given: 100 pending for 7 days, 40 expiring tomorrow, 10 never expiring
    call(db, points.earn, member_id=alice, amount=100, key="p", available_at=clock.now() + 7 * DAY,
         expires_at=clock.now() + 365 * DAY)  # fmt: skip
    call(db, points.earn, member_id=alice, amount=40, key="x", expires_at=clock.now() + DAY)
    call(db, points.earn, member_id=alice, amount=10, key="n")
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.available, summary.pending, summary.overdue) == (
        150,
        50,
        100,
        0,
    )
    # the programme's day (Asia/Shanghai, UTC+8): 2026-01-01 09:00 + 1 day
    assert [(e.date, e.amount) for e in summary.expiring] == [
        (date(2026, 1, 2), 40),
        (date(2027, 1, 1), 100),
    ]
    # when two days pass, the 40 are overdue (not spendable) until the expiry run
    clock.advance(2 * DAY)
    summary = call(db, points.balance, member_id=alice)
    assert (summary.available, summary.pending, summary.overdue) == (10, 100, 40)
    expired = call(db, points.expire_member, member_id=alice)
    assert expired is not None and expired.amount == 40
    assert call(db, points.expire_member, member_id=alice) is None
    # and after the return window the pending points are spendable
    clock.advance(6 * DAY)
    assert call(db, points.balance, member_id=alice).available == 110
    assert_ledger_sound(db, program_id)


def test_reversal_after_spending_leaves_debt_that_the_next_earning_pays(setup: Any) -> None:
    db, program_id, alice, _ = setup
    earned = call(db, points.earn, member_id=alice, amount=100, key="e")
    call(db, points.spend, member_id=alice, amount=80, key="s")
    # when the order is returned and its points clawed back
    reversal = call(db, points.reverse, earn_id=earned.id, key="rv")
    # then the 20 left are taken, 80 are owed, and the balance is 0, not negative
    summary = call(db, points.balance, member_id=alice)
    assert (reversal.debt_change, summary.balance, summary.debt) == (80, 0, 80)
    # when the member earns 50 then 50 more
    call(db, points.earn, member_id=alice, amount=50, key="e2")
    call(db, points.earn, member_id=alice, amount=50, key="e3")
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.debt) == (20, 0)
    assert_ledger_sound(db, program_id)


def test_a_refund_after_a_claw_back_pays_the_debt_first_as_if_it_had_come_before(
    setup: Any,
) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    # given 100 earned in two lots and all of it spent on a reward
    earned = call(db, points.earn, member_id=alice, amount=60, key="e1",
                  expires_at=clock.now() + 30 * DAY)  # fmt: skip
    call(db, points.earn, member_id=alice, amount=40, key="e2", expires_at=clock.now() + 90 * DAY)
    spend = call(db, points.spend, member_id=alice, amount=100, key="s")
    # and the first earning's order returned: its 60 points, spent, become a debt
    assert call(db, points.reverse, earn_id=earned.id, key="rv").debt_change == 60
    # when 70 of the spend are refunded (the reward cancelled in part)
    refund = call(db, points.refund, spend_id=spend.id, amount=70, key="r1")
    # then the debt is paid off first and the member keeps 10, on the later lot
    summary = call(db, points.balance, member_id=alice)
    assert (refund.amount, refund.debt_change) == (70, -60)
    assert (summary.balance, summary.debt) == (10, 0)
    lots = call(db, points.member_lots, member_id=alice)
    assert [(lot.remaining, lot.expires_at) for lot in lots if lot.remaining] == [
        (10, clock.now() + 90 * DAY)
    ]
    # and the rest of the spend comes back whole: nothing is owed any more
    rest = call(db, points.refund, spend_id=spend.id, key="r2")
    assert (rest.amount, rest.debt_change) == (30, 0)
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.debt) == (40, 0)
    # the same as a refund first and the claw-back after would have left
    assert_ledger_sound(db, program_id)


def test_a_claw_back_takes_lapsed_points_from_the_expired_account_and_charges_only_the_used(
    setup: Any,
) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    # given an earn of 100 for 10 days, 30 of it spent, the other 70 lapsed
    earned = call(db, points.earn, member_id=alice, amount=100, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    call(db, points.earn, member_id=alice, amount=500, key="e2")  # never expires
    call(db, points.spend, member_id=alice, amount=30, key="s")
    clock.advance(11 * DAY)
    assert call(db, points.expire_member, member_id=alice).amount == 70
    # when half the earn is clawed back: it comes out of what lapsed
    half = call(db, points.reverse, earn_id=earned.id, key="rv1", amount=50)
    summary = call(db, points.balance, member_id=alice)
    assert (half.debt_change, summary.balance, summary.debt) == (0, 500, 0)
    # when the rest is: the 20 that lapsed still, then the 30 she spent, from her other lot
    call(db, points.reverse, earn_id=earned.id, key="rv2")
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.debt) == (470, 0)
    assert_ledger_sound(db, program_id)


def test_a_claw_back_takes_points_frozen_at_expiry_out_of_the_freeze(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    earned = call(db, points.earn, member_id=alice, amount=400, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    call(db, points.earn, member_id=alice, amount=300, key="e2")
    call(db, points.spend, member_id=alice, amount=150, key="s")
    # lapsed points frozen instead of cleared (on_expiry: freeze): staff may give them back
    clock.advance(11 * DAY)
    assert call(db, points.expire_member, member_id=alice, freeze=True).amount == 250
    assert points.FROZEN_AT_EXPIRY in [
        p.reason for p in call(db, points.history, member_id=alice).items
    ]
    # when the order is refunded: the 250 come out of the freeze, the 150 spent from e2
    reversal = call(db, points.reverse, earn_id=earned.id, key="rv")
    summary = call(db, points.balance, member_id=alice)
    assert (reversal.debt_change, summary.balance, summary.frozen, summary.debt) == (0, 150, 0, 0)
    # and nothing is left frozen for staff to give back as free points
    held = call(db, points.open_freezes, member_id=alice, reason=points.FROZEN_AT_EXPIRY)
    assert held == []
    assert_ledger_sound(db, program_id)


def test_a_claw_back_after_frozen_lapsed_points_were_released_charges_them_as_used(
    setup: Any,
) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    earned = call(db, points.earn, member_id=alice, amount=400, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    call(db, points.earn, member_id=alice, amount=300, key="e2")
    clock.advance(11 * DAY)
    frozen = call(db, points.expire_member, member_id=alice, freeze=True)
    # staff give 100 of the 400 back as a fresh lot: hers to use now
    call(db, points.release, freeze_id=frozen.id, key="rel", amount=100, expires_at=None,
         reason="goodwill", actor="staff")  # fmt: skip
    call(db, points.reverse, earn_id=earned.id, key="rv")
    # 300 still frozen come out of the freeze; the 100 released are charged to her lots
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.frozen, summary.debt) == (300, 0, 0)
    assert_ledger_sound(db, program_id)


def test_transfer_moves_lots_with_their_expiry_and_freeze_holds_points(setup: Any) -> None:
    db, program_id, alice, bob = setup
    clock: ManualClock = db.clock
    call(db, points.earn, member_id=alice, amount=60, key="e", expires_at=clock.now() + 10 * DAY)
    call(db, points.transfer, from_member_id=alice, to_member_id=bob, amount=25, key="t")
    bob_lots = call(db, points.member_lots, member_id=bob)
    assert [(lot.remaining, lot.expires_at) for lot in bob_lots] == [(25, clock.now() + 10 * DAY)]
    frozen = call(db, points.freeze, member_id=alice, amount=30, key="f", reason="risk review",
                  actor="officer-1")  # fmt: skip
    summary = call(db, points.balance, member_id=alice)
    assert (summary.available, summary.frozen) == (5, 30)
    with pytest.raises(InsufficientPoints):
        call(db, points.spend, member_id=alice, amount=6, key="s")
    call(db, points.unfreeze, freeze_id=frozen.id, key="u1", amount=10)
    call(db, points.unfreeze, freeze_id=frozen.id, key="u2")
    summary = call(db, points.balance, member_id=alice)
    assert (summary.available, summary.frozen) == (35, 0)
    assert_ledger_sound(db, program_id)


def test_manual_adjustments_credit_and_debit_with_reason(setup: Any) -> None:
    db, program_id, alice, _ = setup
    call(db, points.adjust, member_id=alice, amount=70, key="a1", reason="goodwill", actor="ops")
    call(db, points.adjust, member_id=alice, amount=-20, key="a2", reason="typo", actor="ops")
    page = call(db, points.history, member_id=alice)
    assert [(i.kind, i.change, i.reason, i.counterpart) for i in page.items] == [
        ("adjust", -20, "typo", "adjustments"),
        ("adjust", 70, "goodwill", "adjustments"),
    ]
    assert_ledger_sound(db, program_id)


def owing(db: Database, member_id: int, debt: int, key: str) -> None:
    """Leave the member owing ``debt`` and holding nothing: an earning spent, then clawed back."""
    earned = call(db, points.earn, member_id=member_id, amount=debt, key=f"{key}-e")
    call(db, points.spend, member_id=member_id, amount=debt, key=f"{key}-s")
    assert call(db, points.reverse, earn_id=earned.id, key=f"{key}-r").debt_change == debt


def test_a_credit_by_adjustment_pays_the_debt_first_as_an_earning_does(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    owing(db, alice, 80, "owed")
    # when staff credit 50 (all of it pays the debt), then 50 more
    first = call(db, points.adjust, member_id=alice, amount=50, key="a1", reason="goodwill",
                 actor="ops")  # fmt: skip
    summary = call(db, points.balance, member_id=alice)
    assert (first.amount, first.debt_change, summary.balance, summary.debt) == (50, -50, 0, 30)
    assert call(db, points.member_lots, member_id=alice) == []
    second = call(db, points.adjust, member_id=alice, amount=50, key="a2", reason="goodwill",
                  actor="ops", expires_at=clock.now() + 30 * DAY)  # fmt: skip
    # then only what is left after the debt becomes points the member can spend
    summary = call(db, points.balance, member_id=alice)
    assert (second.debt_change, summary.balance, summary.debt) == (-30, 20, 0)
    assert [(lot.remaining, lot.expires_at) for lot in call(
        db, points.member_lots, member_id=alice
    )] == [(20, clock.now() + 30 * DAY)]  # fmt: skip
    with pytest.raises(InsufficientPoints):
        call(db, points.spend, member_id=alice, amount=21, key="s")
    # and the history shows the repayment as an earning's does: a line to the receivable
    entry = call(db, points.history, member_id=alice).items[0]
    assert (entry.kind, entry.change, entry.amount) == ("adjust", 20, 50)
    assert [(line.account, line.amount) for line in entry.lines if line.account != "adjustments"
            and not line.account.startswith("member:")] == [("receivable", 30)]  # fmt: skip
    assert entry.counterpart == "adjustments, receivable"
    # and a replay, or the posting read back, answers the same
    again = call(db, points.adjust, member_id=alice, amount=50, key="a2", reason="goodwill",
                 actor="ops", expires_at=clock.now() + 30 * DAY)  # fmt: skip
    assert (again.replayed, again.debt_change) == (True, -30)
    read = call(db, points.get_posting, program_id=program_id, posting_id=first.id)
    assert read.debt_change == -50
    assert_ledger_sound(db, program_id)


def test_a_transfer_pays_the_receivers_debt_first_with_the_earliest_expiring_points(
    setup: Any,
) -> None:
    db, program_id, alice, bob = setup
    clock: ManualClock = db.clock
    soon, later = clock.now() + 10 * DAY, clock.now() + 90 * DAY
    call(db, points.earn, member_id=alice, amount=60, key="e1", expires_at=soon)
    call(db, points.earn, member_id=alice, amount=200, key="e2", expires_at=later)
    owing(db, bob, 100, "bob")
    # when alice gives bob 30: all of it pays his debt, and he holds nothing
    first = call(db, points.transfer, from_member_id=alice, to_member_id=bob, amount=30, key="t1")
    assert (first.debt_change, first.counterparty_debt_change) == (0, -30)
    bob_now = call(db, points.balance, member_id=bob)
    assert (bob_now.balance, bob_now.debt) == (0, 70)
    assert call(db, points.member_lots, member_id=bob) == []
    # when she gives him 100 more: her 30 due soonest and 40 of the later ones pay the rest
    second = call(db, points.transfer, from_member_id=alice, to_member_id=bob, amount=100,
                  key="t2")  # fmt: skip
    assert (second.debt_change, second.counterparty_debt_change) == (0, -70)
    # then he keeps 30, with the sender's later date, and owes nothing
    bob_now = call(db, points.balance, member_id=bob)
    assert (bob_now.balance, bob_now.available, bob_now.debt) == (30, 30, 0)
    assert [(lot.remaining, lot.expires_at) for lot in call(
        db, points.member_lots, member_id=bob
    )] == [(30, later)]  # fmt: skip
    with pytest.raises(InsufficientPoints):
        call(db, points.spend, member_id=bob, amount=31, key="s")
    # and alice gave 130 in all, earliest expiry first, her own debt untouched
    alice_now = call(db, points.balance, member_id=alice)
    assert (alice_now.balance, alice_now.debt) == (130, 0)
    assert [(lot.remaining, lot.expires_at) for lot in call(
        db, points.member_lots, member_id=alice
    )] == [(130, later)]  # fmt: skip
    # and each history shows the repayment: bob's as an earning's, a line to the receivable
    entry = call(db, points.history, member_id=bob).items[0]
    assert (entry.kind, entry.change, entry.amount) == ("transfer", 30, 100)
    assert [line.amount for line in entry.lines if line.account == "receivable"] == [70]
    assert "receivable" in entry.counterpart
    assert call(db, points.history, member_id=alice).items[0].change == -100
    # and a replay, or the posting read back, answers the same
    again = call(db, points.transfer, from_member_id=alice, to_member_id=bob, amount=100,
                 key="t2")  # fmt: skip
    assert (again.replayed, again.debt_change, again.counterparty_debt_change) == (True, 0, -70)
    read = call(db, points.get_posting, program_id=program_id, posting_id=first.id)
    assert (read.debt_change, read.counterparty_debt_change) == (0, -30)
    assert_ledger_sound(db, program_id)


def test_history_pages_by_cursor_and_filters_by_kind(setup: Any) -> None:
    db, _, alice, bob = setup
    for i in range(7):
        call(db, points.earn, member_id=alice, amount=10 + i, key=f"e{i}")
    call(db, points.transfer, from_member_id=alice, to_member_id=bob, amount=5, key="t")
    seen, cursor = [], None
    while True:
        page = call(db, points.history, member_id=alice, limit=3, cursor=cursor)
        seen.extend(item.seq for item in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [8, 7, 6, 5, 4, 3, 2, 1]
    transfers = call(db, points.history, member_id=alice, kinds=["transfer"]).items
    assert [(t.change, t.counterpart) for t in transfers] == [(-5, "member:m1")]
    with pytest.raises(InvalidInput):
        call(db, points.history, member_id=alice, cursor="not-a-cursor")


def test_the_last_full_page_of_lots_gives_no_cursor(setup: Any) -> None:
    """Four lots read two at a time: the second page is the last, and says so (no
    ``next_cursor``) rather than sending the caller on to an empty page."""
    db, _, alice, _ = setup
    for i in range(4):
        call(db, points.earn, member_id=alice, amount=10 + i, key=f"e{i}")
    first = call(db, points.lots_page, member_id=alice, limit=2)
    assert [lot.amount for lot in first.items] == [10, 11] and first.next_cursor is not None
    second = call(db, points.lots_page, member_id=alice, limit=2, cursor=first.next_cursor)
    assert [lot.amount for lot in second.items] == [12, 13]
    assert second.next_cursor is None


def test_same_key_same_request_replays_the_first_result(setup: Any) -> None:
    db, program_id, alice, _ = setup
    first = call(db, points.earn, member_id=alice, amount=10, key="k")
    again = call(db, points.earn, member_id=alice, amount=10, key="k")
    assert again.id == first.id and again.replayed and not first.replayed
    assert call(db, points.balance, member_id=alice).balance == 10
    spend = call(db, points.spend, member_id=alice, amount=10, key="s")
    # replaying the spend returns it, even though the balance could not pay it again now
    assert call(db, points.spend, member_id=alice, amount=10, key="s").id == spend.id
    assert_ledger_sound(db, program_id)


BETWEEN: dict[str, Callable[[UnitOfWork, int], Any]] = {
    "earn": lambda uow, m: points.earn(uow, member_id=m, amount=5, key="between"),
    "earn_many": lambda uow, m: points.earn_many(uow, [points.Earning(m, 5, "between")]),
}


@pytest.mark.parametrize("between", list(BETWEEN))
def test_a_lock_held_for_a_key_serves_that_posting_and_no_other(setup: Any, between: str) -> None:
    db, program_id, alice, _ = setup
    call(db, points.earn, member_id=alice, amount=100, key="e")

    def held_then_spent(uow: UnitOfWork) -> int:
        assert not points.lock_account(uow, member_id=alice, key="s1")
        return points.spend(uow, member_id=alice, amount=60, key="s1").amount

    def held_then_overtaken(uow: UnitOfWork) -> int:
        assert not points.lock_account(uow, member_id=alice, key="s2")
        # a posting between the lock and the one it was taken for: the spend must start
        # from the account as that posting left it (45 = 40 left + 5), not as it was locked
        BETWEEN[between](uow, alice)
        return points.spend(uow, member_id=alice, amount=45, key="s2").amount

    assert db.run(held_then_spent) == 60
    assert db.run(held_then_overtaken) == 45
    # a key already posted is a replay, and holds nothing for the next posting
    assert db.run(lambda uow: points.lock_account(uow, member_id=alice, key="s1"))
    assert call(db, points.balance, member_id=alice).available == 0
    assert_ledger_sound(db, program_id)


BAD_CALLS: list[tuple[str, type[JifenError], Callable[[int, int, int, int], dict[str, Any]]]] = [
    (
        "unknown member",
        UnknownMember,
        lambda a, b, e, s: {"fn": points.earn, "member_id": 10**9, "amount": 5},
    ),
    (
        "zero amount",
        NonPositiveAmount,
        lambda a, b, e, s: {"fn": points.earn, "member_id": a, "amount": 0},
    ),
    (
        "negative spend",
        NonPositiveAmount,
        lambda a, b, e, s: {"fn": points.spend, "member_id": a, "amount": -3},
    ),
    (
        "overdraft",
        InsufficientPoints,
        lambda a, b, e, s: {"fn": points.spend, "member_id": a, "amount": 61},
    ),
    (
        "overdraft by transfer",
        InsufficientPoints,
        lambda a, b, e, s: {
            "fn": points.transfer,
            "from_member_id": a,
            "to_member_id": b,
            "amount": 500,
        },
    ),
    (
        "transfer to self",
        SameAccount,
        lambda a, b, e, s: {
            "fn": points.transfer,
            "from_member_id": a,
            "to_member_id": a,
            "amount": 1,
        },
    ),
    (
        "refund larger than spend",
        ExceedsOriginal,
        lambda a, b, e, s: {"fn": points.refund, "spend_id": s, "amount": 41},
    ),
    ("refund of an earn", UnknownPosting, lambda a, b, e, s: {"fn": points.refund, "spend_id": e}),
    (
        "reverse more than earned",
        ExceedsOriginal,
        lambda a, b, e, s: {"fn": points.reverse, "earn_id": e, "amount": 101},
    ),
    (
        "reused key, other content",
        IdempotencyConflict,
        lambda a, b, e, s: {"fn": points.earn, "member_id": a, "amount": 99, "key": "earn-1"},
    ),
    (
        "adjust without reason",
        MissingReason,
        lambda a, b, e, s: {
            "fn": points.adjust,
            "member_id": a,
            "amount": 5,
            "reason": "",
            "actor": "ops",
        },
    ),
    (
        "expiry in the past",
        InvalidDates,
        lambda a, b, e, s: {
            "fn": points.earn,
            "member_id": a,
            "amount": 5,
            "expires_at": START_MINUS_DAY,
        },
    ),
    (
        "empty key",
        InvalidInput,
        lambda a, b, e, s: {"fn": points.earn, "member_id": a, "amount": 5, "key": ""},
    ),
    (
        "freeze more than available",
        InsufficientPoints,
        lambda a, b, e, s: {
            "fn": points.freeze,
            "member_id": a,
            "amount": 61,
            "reason": "x",
            "actor": "y",
        },
    ),
]

from tests.conftest import START  # noqa: E402

START_MINUS_DAY = START - DAY


@pytest.mark.parametrize(("label", "error", "make"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_a_typed_error_and_changes_nothing(
    setup: Any, label: str, error: type[JifenError], make: Callable[..., dict[str, Any]]
) -> None:
    db, program_id, alice, bob = setup
    earned = call(db, points.earn, member_id=alice, amount=100, key="earn-1")
    spent = call(db, points.spend, member_id=alice, amount=40, key="spend-1")
    before = snapshot(db, program_id)
    kwargs = make(alice, bob, earned.id, spent.id)
    fn = kwargs.pop("fn")
    kwargs.setdefault("key", f"bad-{label}")
    with pytest.raises(error) as raised:
        call(db, fn, **kwargs)
    # the message says what was wrong in both languages, with no template holes left
    for language in ("en", "zh"):
        text = raised.value.message(language)
        assert text and "{" not in text
    assert raised.value.code
    assert snapshot(db, program_id) == before
    assert_ledger_sound(db, program_id)
