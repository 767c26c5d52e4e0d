"""Claw-backs at the edges: in pieces after points lapsed, were spent and refunded; after a
transfer; through renewal chains; with debt; with freezes at expiry holding several orders;
random histories; and, on PostgreSQL, racing expiry runs, restores and their own twins."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import IdempotencyConflict, JifenError
from jifen.expiry import service as expiry
from jifen.ledger import SystemAccount
from jifen.points import service as points
from jifen.points.models import lines, postings
from tests.factories import assert_ledger_sound, new_members, new_program
from tests.points.test_concurrency import run_together
from tests.points.test_service import call

DAY = timedelta(days=1)


@pytest.fixture
def setup(db: Database) -> tuple[Database, int, int, int]:
    program = new_program(db)
    alice, bob = new_members(db, program.id, 2)
    return db, program.id, alice, bob


def system(db: Database, program_id: int, code: SystemAccount) -> int:
    def read(uow: UnitOfWork) -> int:
        account_id = points.system_account_ids(uow, program_id)[code]
        return int(
            uow.conn.execute(
                select(func.coalesce(func.sum(lines.c.amount), 0)).where(
                    lines.c.account_id == account_id
                )
            ).scalar_one()
        )

    return db.run(read, read_only=True)


def figures(db: Database, member: int) -> tuple[int, int, int]:
    s = call(db, points.balance, member_id=member)
    return s.balance, s.frozen, s.debt


def count_postings(db: Database, program_id: int, kind: str) -> int:
    return db.run(
        lambda uow: uow.conn.execute(
            select(func.count()).where(postings.c.program_id == program_id, postings.c.kind == kind)
        ).scalar_one(),
        read_only=True,
    )


# --------------------------------------------------------------------------- probes that hold


def test_claw_back_in_pieces_after_lapse_spend_and_partial_refund(setup: Any) -> None:
    """Earn 100: 40 spent, 60 lapsed, then 20 of the spend refunded to the lapsed lot; the
    order clawed back in three pieces. In all she pays for the 20 still spent, nothing more."""
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    earned = call(db, points.earn, member_id=alice, amount=100, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    call(db, points.earn, member_id=alice, amount=500, key="e2")
    spent = call(db, points.spend, member_id=alice, amount=40, key="s")
    clock.advance(11 * DAY)
    assert call(db, points.expire_member, member_id=alice).amount == 60
    call(db, points.refund, spend_id=spent.id, key="r", amount=20)  # back to the lapsed lot
    call(db, points.reverse, earn_id=earned.id, key="rv1", amount=30)
    call(db, points.reverse, earn_id=earned.id, key="rv2", amount=30)
    call(db, points.reverse, earn_id=earned.id, key="rv3")
    # 500 - 20 still spent; the 20 refunded taken off their lot, 60 out of the expired
    assert figures(db, alice) == (480, 0, 0)
    assert system(db, program_id, SystemAccount.EXPIRED) == 0
    assert_ledger_sound(db, program_id)


def test_claw_back_after_a_transfer_leaves_the_receivers_lot_alone(setup: Any) -> None:
    """The receiver's lots carry source_lot_id, but a transfer is no renewal: the claw-back
    charges the sender for what she gave away and never touches the receiver."""
    db, program_id, alice, bob = setup
    clock: ManualClock = db.clock
    earned = call(db, points.earn, member_id=alice, amount=100, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    call(db, points.transfer, from_member_id=alice, to_member_id=bob, amount=60, key="t")
    clock.advance(11 * DAY)
    call(db, points.expire_member, member_id=bob)  # bob's 60 lapse (sender's date)
    call(db, points.expire_member, member_id=alice)  # alice's 40 lapse
    call(db, points.reverse, earn_id=earned.id, key="rv")
    assert figures(db, alice) == (0, 0, 60)  # the 60 she gave away are owed
    assert figures(db, bob) == (0, 0, 0)
    assert system(db, program_id, SystemAccount.EXPIRED) == 60  # bob's lapse stays
    assert_ledger_sound(db, program_id)


def test_claw_back_through_a_renewal_chain_three_deep(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    earned = call(db, points.earn, member_id=alice, amount=100, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    spent = call(db, points.spend, member_id=alice, amount=30, key="s")
    for i, days in enumerate((20, 30, 40)):
        call(db, points.renew, member_id=alice, key=f"t{i}", reason="tier",
             new_date=lambda lot, d=days: clock.now() + d * DAY)  # fmt: skip
    call(db, points.refund, spend_id=spent.id, key="r", amount=10)  # follows to the chain's end
    clock.advance(41 * DAY)
    assert call(db, points.expire_member, member_id=alice).amount == 80
    call(db, points.reverse, earn_id=earned.id, key="rv1", amount=50)
    call(db, points.reverse, earn_id=earned.id, key="rv2")
    assert figures(db, alice) == (0, 0, 20)  # the 20 still spent
    assert system(db, program_id, SystemAccount.EXPIRED) == 0
    assert_ledger_sound(db, program_id)


def test_claw_back_of_an_earn_that_paid_debt_after_it_lapsed(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    first = call(db, points.earn, member_id=alice, amount=50, key="e0")
    call(db, points.spend, member_id=alice, amount=50, key="s0")
    call(db, points.reverse, earn_id=first.id, key="rv0")  # owes 50
    earned = call(db, points.earn, member_id=alice, amount=100, key="e",
                  expires_at=clock.now() + 10 * DAY)  # 50 pay the debt, a lot of 50  # fmt: skip
    assert figures(db, alice) == (50, 0, 0)
    clock.advance(11 * DAY)
    call(db, points.expire_member, member_id=alice)
    call(db, points.reverse, earn_id=earned.id, key="rv")
    assert figures(db, alice) == (0, 0, 50)  # the debt it paid is owed again, the lapse not
    assert system(db, program_id, SystemAccount.EXPIRED) == 0
    assert_ledger_sound(db, program_id)


def test_a_member_that_owes_keeps_no_points_to_spend_or_on_the_way(setup: Any) -> None:
    """A claw-back takes an order's pending points before it makes debt; an unfreeze and a
    release pay the debt first out of what they give back; a hold spent for what it was
    held for pays for that, not the debt."""
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    first = call(db, points.earn, member_id=alice, amount=100, key="e1")
    held = call(db, points.freeze, member_id=alice, amount=40, key="f", reason="review",
                actor="risk")  # fmt: skip
    redeeming = call(db, points.freeze, member_id=alice, amount=25, key="f2",
                     reason="cooling-off", actor="shop")  # fmt: skip
    call(db, points.spend, member_id=alice, amount=35, key="s")
    call(db, points.earn, member_id=alice, amount=30, key="e2", available_at=clock.now() + 7 * DAY)
    call(db, points.reverse, earn_id=first.id, key="rv")
    s = call(db, points.balance, member_id=alice)
    # 100 clawed back: the 30 on the way, the 70 spent or held owed (the holds stay)
    assert (s.available, s.pending, s.frozen, s.debt) == (0, 0, 65, 70)
    unfrozen = call(db, points.unfreeze, freeze_id=held.id, key="u", amount=30)
    assert unfrozen.debt_change == -30
    spent = call(db, points.spend_frozen, freeze_id=redeeming.id, release_key="r2", key="s2",
                 reason="redeem", release_reason="confirmed", actor="shop")  # fmt: skip
    assert (spent.kind, spent.amount) == ("spend", 25)
    s = call(db, points.balance, member_id=alice)
    assert (s.available, s.pending, s.frozen, s.debt) == (0, 0, 10, 40)
    clock.advance(8 * DAY)  # the pending points would have been spendable by now
    assert call(db, points.balance, member_id=alice).available == 0
    rest = call(db, points.unfreeze, freeze_id=held.id, key="u2")
    assert (rest.amount, rest.debt_change) == (10, -10)
    lapsed = call(db, points.earn, member_id=alice, amount=50, key="e3",
                  expires_at=clock.now() + DAY)  # pays the last 30 owed: a lot of 20  # fmt: skip
    assert lapsed.debt_change == -30
    clock.advance(2 * DAY)
    frozen = call(db, points.expire_member, member_id=alice, freeze=True)
    assert frozen.amount == 20
    later = call(db, points.earn, member_id=alice, amount=60, key="e4")
    call(db, points.spend, member_id=alice, amount=60, key="s4")
    call(db, points.reverse, earn_id=later.id, key="rv4")  # owes 60
    given = call(db, points.release, freeze_id=frozen.id, key="rel", expires_at=None,
                 reason="goodwill", actor="staff")  # fmt: skip
    assert (given.amount, given.debt_change) == (20, -20)
    s = call(db, points.balance, member_id=alice)
    assert (s.available, s.pending, s.frozen, s.debt) == (0, 0, 0, 40)
    assert_ledger_sound(db, program_id)


def test_same_reverse_key_replays_and_a_different_amount_conflicts(setup: Any) -> None:
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    earned = call(db, points.earn, member_id=alice, amount=400, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    clock.advance(11 * DAY)
    call(db, points.expire_member, member_id=alice, freeze=True)
    first = call(db, points.reverse, earn_id=earned.id, key="rv", amount=100)
    again = call(db, points.reverse, earn_id=earned.id, key="rv", amount=100)
    assert (again.id, again.replayed) == (first.id, True)
    with pytest.raises(IdempotencyConflict):
        call(db, points.reverse, earn_id=earned.id, key="rv", amount=150)
    assert count_postings(db, program_id, "unfreeze") == 1
    assert figures(db, alice) == (0, 300, 0)
    call(db, points.reverse, earn_id=earned.id, key="rv2", amount=100)  # a second key
    call(db, points.reverse, earn_id=earned.id, key="rv3")
    assert figures(db, alice) == (0, 0, 0)
    assert count_postings(db, program_id, "unfreeze") == 3
    assert_ledger_sound(db, program_id)


def test_freeze_at_expiry_of_two_orders_partly_unfrozen_and_released(setup: Any) -> None:
    """One freeze at expiry holds two orders' points; staff unfreeze part to the lots it held
    (last taken first: order B's) and release part as a fresh lot; both orders clawed back."""
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    a = call(db, points.earn, member_id=alice, amount=100, key="a",
             expires_at=clock.now() + 10 * DAY)  # fmt: skip
    b = call(db, points.earn, member_id=alice, amount=100, key="b",
             expires_at=clock.now() + 10 * DAY)  # fmt: skip
    clock.advance(11 * DAY)
    frozen = call(db, points.expire_member, member_id=alice, freeze=True)
    assert frozen.amount == 200
    call(db, points.unfreeze, freeze_id=frozen.id, key="u", amount=30)  # to b's lot, overdue
    call(db, points.release, freeze_id=frozen.id, key="rel", amount=50, expires_at=None,
         reason="goodwill", actor="staff")  # fmt: skip
    call(db, points.reverse, earn_id=a.id, key="rva")
    call(db, points.reverse, earn_id=b.id, key="rvb")
    # she keeps nothing: the 50 released are charged as used (from that very lot)
    assert figures(db, alice) == (0, 0, 0)
    assert system(db, program_id, SystemAccount.FROZEN) == 0
    assert_ledger_sound(db, program_id)


def test_frozen_at_expiry_at_the_end_of_a_renewal_chain_with_debt(setup: Any) -> None:
    """A member already owing 30; the order's points moved twice by renewals, then frozen
    at expiry (some refunded back first, overdue, frozen by a second run); clawed back in
    two pieces: the freezes pay, the debt stays what it was."""
    db, program_id, alice, _ = setup
    clock: ManualClock = db.clock
    old = call(db, points.earn, member_id=alice, amount=30, key="e0")
    call(db, points.spend, member_id=alice, amount=30, key="s0")
    call(db, points.reverse, earn_id=old.id, key="rv0")
    assert figures(db, alice) == (0, 0, 30)
    earned = call(db, points.earn, member_id=alice, amount=230, key="e",
                  expires_at=clock.now() + 10 * DAY)  # 30 repay the debt, a lot of 200  # fmt: skip
    call(db, points.earn, member_id=alice, amount=30, key="d")  # pays the debt again later
    spent = call(db, points.spend, member_id=alice, amount=50, key="s")  # from the order's lot
    for i, days in enumerate((20, 30)):
        call(db, points.renew, member_id=alice, key=f"t{i}", reason="tier",
             new_date=lambda lot, d=days: clock.now() + d * DAY)  # fmt: skip
    clock.advance(31 * DAY)
    first = call(db, points.expire_member, member_id=alice, freeze=True)
    assert first.amount == 150
    call(db, points.refund, spend_id=spent.id, key="r", amount=20)  # overdue, chain's end
    assert call(db, points.expire_member, member_id=alice, freeze=True).amount == 20
    call(db, points.reverse, earn_id=earned.id, key="rv1", amount=100)
    call(db, points.reverse, earn_id=earned.id, key="rv2")
    # 170 out of the freezes, 30 still spent from "d", the 30 the order repaid owed again
    assert figures(db, alice) == (0, 0, 30)
    assert system(db, program_id, SystemAccount.FROZEN) == 0
    assert_ledger_sound(db, program_id)


def test_a_refund_that_took_a_missed_tier_date_is_clawed_back_from_the_new_lot(
    db: Database,
) -> None:
    """Points refunded to a spent lot move to a new lot with the date a missed upgrade gave;
    the claw-back finds them there through the renewal."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from jifen.expiry.schemas import ExpiryPolicy, Validity
    from jifen.programs import service as programs
    from jifen.tiers import service as tiers
    from jifen.tiers.schemas import TierDef

    zone = ZoneInfo("Asia/Shanghai")
    program_id = new_program(db).id
    alice, _ = new_members(db, program_id, 2)
    policy = ExpiryPolicy(
        by_tier={"普通": Validity(kind="rolling", months=12), "金卡": Validity(kind="never")},
        on_tier_change="extend",
    )

    def configure(uow: UnitOfWork) -> None:
        tiers.set_tiers(  # first: the policy names them
            uow,
            program_id=program_id,
            definitions=[
                TierDef(code="普通", name="普通", rank=0),
                TierDef(code="金卡", name="金卡", rank=1),
            ],
        )
        settings = programs.get_settings(uow, program_id=program_id)
        programs.set_settings(
            uow, program_id=program_id, settings=settings.model_copy(update={"expiry": policy})
        )
        tiers.set_member_tier(uow, program_id=program_id, member_id=alice, tier="普通",
                              reason="t", set_by="t")  # fmt: skip

    db.run(configure)
    clock: ManualClock = db.clock
    clock.set(datetime(2026, 1, 10, 9, tzinfo=zone))

    def earn(uow: UnitOfWork) -> Any:
        expires_at = expiry.lot_expiries(uow, program_id=program_id, start=uow.clock.now(),
                                         member_ids=[alice])[alice]  # fmt: skip
        return points.earn(uow, member_id=alice, amount=300, key="e", expires_at=expires_at)

    earned = db.run(earn)
    spent = call(db, points.spend, member_id=alice, amount=300, key="s")
    clock.set(datetime(2026, 3, 1, 9, tzinfo=zone))
    db.run(lambda uow: tiers.set_member_tier(uow, program_id=program_id, member_id=alice,
                                             tier="金卡", reason="t", set_by="t"))  # fmt: skip
    call(db, points.refund, spend_id=spent.id, key="r")
    lots = call(db, points.member_lots, member_id=alice)
    assert [(lot.remaining, lot.expires_at) for lot in lots] == [(300, None)]
    call(db, points.reverse, earn_id=earned.id, key="rv")
    assert figures(db, alice) == (0, 0, 0)
    assert_ledger_sound(db, program_id)


@pytest.mark.parametrize("seed", range(12))
def test_random_histories_then_claw_backs_charge_only_what_was_used(
    db: Database, seed: int
) -> None:
    """Random earns, spends, refunds, transfers, risk freezes and unfreezes, expiry runs
    (cleared or frozen), releases and renewals; then every earn clawed back in random
    pieces, with expiry runs between. Lapsed points cost nothing: what the member is worth
    at the end (balance + frozen - debt) is minus what it spent and gave away; the expired
    and frozen accounts never go negative."""
    rnd = random.Random(seed)
    program_id = new_program(db).id
    alice, bob = new_members(db, program_id, 2)
    clock: ManualClock = db.clock
    keys = itertools.count()

    def post(fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return call(db, fn, key=f"k{next(keys)}", **kwargs)
        except JifenError:
            return None

    earns: list[Any] = []
    spends: list[Any] = []
    freezes: list[Any] = []
    at_expiry: list[Any] = []
    used = 0
    for _ in range(rnd.randint(8, 25)):
        op = rnd.choice(["earn", "earn", "spend", "spend", "refund", "transfer", "freeze",
                         "unfreeze", "tick", "tick", "expire", "release", "renew"])  # fmt: skip
        if op == "earn":
            days = rnd.choice([None, 3, 5, 10, 20])
            expires_at = None if days is None else clock.now() + days * DAY
            if p := post(points.earn, member_id=alice, amount=rnd.randint(10, 200),
                         expires_at=expires_at):  # fmt: skip
                earns.append(p)
        elif op == "spend":
            if p := post(points.spend, member_id=alice, amount=rnd.randint(1, 150)):
                spends.append(p)
                used += p.amount
        elif op == "refund" and spends:
            if p := post(points.refund, spend_id=rnd.choice(spends).id,
                         amount=rnd.choice([None, rnd.randint(1, 60)])):  # fmt: skip
                used -= p.amount
        elif op == "transfer":
            if p := post(points.transfer, from_member_id=alice, to_member_id=bob,
                         amount=rnd.randint(1, 80)):  # fmt: skip
                used += p.amount
        elif op == "freeze":
            if p := post(points.freeze, member_id=alice, amount=rnd.randint(1, 80), reason="r",
                         actor="a"):  # fmt: skip
                freezes.append(p)
        elif op == "unfreeze" and freezes + at_expiry:
            post(points.unfreeze, freeze_id=rnd.choice(freezes + at_expiry).id,
                 amount=rnd.choice([None, rnd.randint(1, 40)]))  # fmt: skip
        elif op == "tick":
            clock.advance(rnd.randint(1, 8) * DAY)
        elif op == "expire":
            freeze = rnd.random() < 0.5
            p = call(db, points.expire_member, member_id=alice, freeze=freeze)
            if p is not None and freeze:
                at_expiry.append(p)
        elif op == "release" and at_expiry:
            post(points.release, freeze_id=rnd.choice(at_expiry).id, expires_at=None,
                 amount=rnd.choice([None, rnd.randint(1, 40)]), reason="g", actor="s")  # fmt: skip
        elif op == "renew":
            days = rnd.randint(5, 30)
            post(points.renew, member_id=alice, reason="tier",
                 new_date=lambda lot, d=days: clock.now() + d * DAY)  # fmt: skip
    for earned in rnd.sample(earns, len(earns)):
        left = earned.amount
        while left:
            piece = rnd.choice([None, rnd.randint(1, left)])
            posted = call(db, points.reverse, earn_id=earned.id, key=f"k{next(keys)}",
                          amount=piece)  # fmt: skip
            left -= posted.amount
            if rnd.random() < 0.3:
                clock.advance(rnd.randint(1, 8) * DAY)
                call(db, points.expire_member, member_id=alice, freeze=rnd.random() < 0.5)
    worth = call(db, points.balance, member_id=alice)
    assert worth.balance + worth.frozen - worth.debt == -used
    assert system(db, program_id, SystemAccount.EXPIRED) >= 0
    assert system(db, program_id, SystemAccount.FROZEN) >= 0
    assert_ledger_sound(db, program_id)


# --------------------------------------------------------------------------- PostgreSQL races


def _frozen_at_expiry(db: Database, member: int, amount: int) -> tuple[Any, Any]:
    clock: ManualClock = db.clock
    earned = call(db, points.earn, member_id=member, amount=amount, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    clock.advance(11 * DAY)
    frozen = call(db, points.expire_member, member_id=member, freeze=True)
    return earned, frozen


def test_pg_twins_of_one_reverse_key_unfreeze_and_claw_back_once(pg: Database) -> None:
    program = new_program(pg)
    (alice,) = new_members(pg, program.id, 1)
    earned, _ = _frozen_at_expiry(pg, alice, 400)
    results = run_together(
        8, lambda i: call(pg, points.reverse, earn_id=earned.id, key="rv", amount=150)
    )
    assert len({r.id for r in results}) == 1, results
    assert count_postings(pg, program.id, "unfreeze") == 1
    assert count_postings(pg, program.id, "reverse") == 1
    assert figures(pg, alice) == (0, 250, 0)
    assert_ledger_sound(pg, program.id)


def test_pg_a_claw_back_waiting_for_an_expiry_run_takes_what_it_froze(
    pg: Database,
) -> None:
    program = new_program(pg)
    (alice,) = new_members(pg, program.id, 1)
    clock: ManualClock = pg.clock
    earned = call(pg, points.earn, member_id=alice, amount=300, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    call(pg, points.earn, member_id=alice, amount=50, key="e2")
    call(pg, points.spend, member_id=alice, amount=100, key="s")  # 100 of e used
    clock.advance(11 * DAY)
    started = threading.Event()

    def expiry() -> None:
        with pg.transaction() as uow:
            points.expire_due(uow, program_id=program.id, freeze=True)
            started.set()
            time.sleep(0.4)  # the claw-back waits for the account meanwhile

    def claw_back() -> Any:
        assert started.wait(10)
        return call(pg, points.reverse, earn_id=earned.id, key="rv")

    results = run_together(2, lambda i: expiry() if i == 0 else claw_back())
    assert results[0] is None and results[1].kind == "reverse", results
    # 200 frozen at expiry come out of the freeze, the 100 used from e2's 50, 50 owed
    assert figures(pg, alice) == (0, 0, 50)
    assert system(pg, program.id, SystemAccount.FROZEN) == 0
    assert_ledger_sound(pg, program.id)


def test_pg_an_expiry_run_waiting_for_a_claw_back_expires_only_what_it_left(
    pg: Database,
) -> None:
    program = new_program(pg)
    (alice,) = new_members(pg, program.id, 1)
    clock: ManualClock = pg.clock
    earned = call(pg, points.earn, member_id=alice, amount=300, key="e",
                  expires_at=clock.now() + 10 * DAY)  # fmt: skip
    call(pg, points.earn, member_id=alice, amount=40, key="e2",
         expires_at=clock.now() + 10 * DAY)  # fmt: skip
    clock.advance(11 * DAY)
    locked = threading.Event()

    def claw_back() -> Any:
        with pg.transaction() as uow:
            posted = points.reverse(uow, earn_id=earned.id, key="rv", amount=120)
            locked.set()
            time.sleep(0.4)
            return posted

    def expiry() -> Any:
        assert locked.wait(10)
        return pg.run(lambda uow: points.expire_due(uow, program_id=program.id))

    results = run_together(2, lambda i: claw_back() if i == 0 else expiry())
    assert results[1].points == 180 + 40, results
    call(pg, points.reverse, earn_id=earned.id, key="rv2")  # the 180 that lapsed meanwhile
    assert figures(pg, alice) == (0, 0, 0)
    assert system(pg, program.id, SystemAccount.EXPIRED) == 40
    assert_ledger_sound(pg, program.id)


def test_pg_restore_expired_racing_a_claw_back_gives_back_nothing_left(pg: Database) -> None:
    """restore_frozen looks for the open freezes under the member's lock: a claw-back that
    emptied a freeze at expiry while the restore waited leaves nothing frozen to give back
    (``[]``), not a refusal."""
    program = new_program(pg)
    (alice,) = new_members(pg, program.id, 1)
    earned, _ = _frozen_at_expiry(pg, alice, 400)
    locked = threading.Event()

    def claw_back() -> Any:
        with pg.transaction() as uow:
            posted = points.reverse(uow, earn_id=earned.id, key="rv")
            locked.set()
            time.sleep(0.4)  # restore_frozen read the freeze as open, waits for the lock
            return posted

    def restore() -> Any:
        assert locked.wait(10)
        return pg.run(lambda uow: expiry.restore_frozen(
            uow, program_id=program.id, member_id=alice, key="restore", actor="staff",
            reason="goodwill"))  # fmt: skip

    results = run_together(2, lambda i: claw_back() if i == 0 else restore())
    assert results[0].kind == "reverse"
    assert results[1] == [], results[1]
    assert figures(pg, alice) == (0, 0, 0)
    assert_ledger_sound(pg, program.id)


# --------------------------------------------------------------------------- performance


def test_a_claw_back_its_own_lots_cover_reads_no_more_than_the_first_lots(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claw-back reads the member's other lots only for what the earn's own lots and its
    lapsed points cannot cover: where they cover it all, the first batch of lots is all it
    reads, however many lots the member holds that expire before the earn's."""
    db, _, alice, _ = setup
    clock: ManualClock = db.clock

    def small_lots(uow: UnitOfWork) -> None:
        for i in range(80):  # daily check-ins, expiring before the big order's points
            points.earn(uow, member_id=alice, amount=1, key=f"c{i}",
                        expires_at=clock.now() + 30 * DAY)  # fmt: skip

    db.run(small_lots)
    big = call(db, points.earn, member_id=alice, amount=10_000, key="big",
               expires_at=clock.now() + 365 * DAY)  # fmt: skip
    lapsing = call(db, points.earn, member_id=alice, amount=5_000, key="lapsing",
                   expires_at=clock.now() + 10 * DAY)  # fmt: skip
    clock.advance(11 * DAY)
    call(db, points.expire_member, member_id=alice)  # the 5,000 lapse; the 80 do not
    limits: list[int | None] = []
    real = points.store.spendable_lots

    def recording(conn: Any, account_id: int, now: Any, limit: int | None) -> Any:
        limits.append(limit)
        return real(conn, account_id, now, limit)

    monkeypatch.setattr(points.store, "spendable_lots", recording)
    call(db, points.reverse, earn_id=big.id, key="rv", amount=10)  # its own lot pays
    call(db, points.reverse, earn_id=lapsing.id, key="rv2")  # the expired account pays
    assert figures(db, alice) == (80 + 9_990, 0, 0)
    assert None not in limits, limits  # no unbounded read of all the member's lots
