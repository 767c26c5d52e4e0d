"""Orders completed after a wait are checked again, a pickup order lapsing with its voucher
owes its cash back, the voucher expiry run does not stop early, and a lottery's budget
bounds the points its prizes credit."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.errors import NotOnSale
from jifen.jobs import service as jobs
from jifen.points import service as points
from jifen.rewards import service as rewards
from jifen.rewards.models import prize_stock, vouchers
from tests.factories import assert_ledger_sound
from tests.rewards.shop import Shop


def clock(db: Database) -> ManualClock:
    assert isinstance(db.clock, ManualClock)
    return db.clock


def owned(db: Database, member: int) -> int:
    """The member's points, spendable or frozen (frozen points are still the member's)."""
    summary = db.run(lambda uow: points.balance(uow, member_id=member), read_only=True)
    return summary.balance + summary.frozen


def confirm(db: Database, shop: Shop, member: int, order_id: int) -> Any:
    return db.run(
        lambda uow: rewards.confirm_held(
            uow, program_id=shop.program_id, member_id=member, order_id=order_id, actor="m"
        )
    )


# -------------------------------------------------------------------------- completing after a wait


def test_a_held_lottery_draw_confirmed_after_every_prize_is_gone_is_not_charged(
    db: Database,
) -> None:
    """A draw of a lottery that can no longer pay any prize is not sold (it "would cost the
    member a draw that cannot win"); rewards.service._check_deliverable refuses a draw held
    for its cooling-off and confirmed once the last prize is gone the same way: no charge."""
    shop = Shop.open(db)
    (diamond,) = shop.member(20000, tier="钻石")
    (gold,) = shop.member(20000, tier="金卡")
    prize = {"code": "tv", "name": {"en": "TV"}, "chance_ppm": 1_000_000, "quantity": 1,
             "value": 1}  # fmt: skip
    wheel = shop.reward(kind="lottery", points=6000, lottery={"prizes": [prize]})
    held = shop.redeem(diamond, wheel.code)  # 6,000 > 5,000: held 24 hours
    assert held.state == "held"
    assert shop.redeem(gold, wheel.code).outcome["prize"] == "tv"  # the only prize goes
    with pytest.raises(NotOnSale, match="no prize is left"):
        shop.redeem(gold, wheel.code)  # a new draw is refused: it cannot win
    clock(db).advance(timedelta(hours=25))
    before = owned(db, diamond)
    try:
        done = confirm(db, shop, diamond, held.id)
    except NotOnSale:
        done = None
    charged = before - owned(db, diamond)
    # none of the 6,000 points is spent on a draw that could not win
    assert charged == 0, (charged, done and done.outcome)


def test_an_event_registration_held_past_the_start_of_the_event_is_not_charged(
    db: Database,
) -> None:
    """Registration for an event closes when it starts: a registration held for its
    cooling-off and confirmed after the start is refused as a new one is, with nothing
    charged and no ticket issued."""
    shop = Shop.open(db)
    (diamond,) = shop.member(20000, tier="钻石")
    starts = clock(db).now() + timedelta(hours=12)
    gala = shop.reward(kind="event", points=8000, event={"starts_at": starts})  # 5,600 for 钻石
    held = shop.redeem(diamond, gala.code)
    assert held.state == "held"
    clock(db).advance(timedelta(hours=25))  # the gala started 13 hours ago
    with pytest.raises(NotOnSale, match="the event started"):
        shop.redeem(diamond, gala.code)
    before = owned(db, diamond)
    try:
        done = confirm(db, shop, diamond, held.id)
    except NotOnSale:
        done = None
    # the 5,600 points are not spent and no voucher is issued for an event that started
    assert before - owned(db, diamond) == 0, done and done.voucher


def test_an_event_registration_paid_after_the_event_started_is_refused_with_its_refund(
    db: Database,
) -> None:
    """The same through the payment path: a payment of an order's cash part that arrives
    after the event started is refused, its refusal naming the payment to refund, and the
    member pays no points for a registration that is closed."""
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    starts = clock(db).now() + timedelta(minutes=20)
    talk = shop.reward(kind="event", points=100, cash_fen=1000, event={"starts_at": starts})
    order = shop.redeem(member, talk.code)  # no payment named: awaits it for 30 minutes
    assert order.state == "awaiting_payment"
    clock(db).advance(timedelta(minutes=25))  # the talk started 5 minutes ago
    before = owned(db, member)
    try:
        paid = db.run(lambda uow: rewards.pay_order(
            uow, program_id=shop.program_id, order_id=order.id, payment_ref="wx-late",
            amount_fen=1000, actor="key:pay"))  # fmt: skip
    except NotOnSale:
        paid = None
    # no points are spent and no ticket is issued after the start
    assert before - owned(db, member) == 0, paid and (paid.state, paid.voucher)


# ---------------------------------------------------------------------------- a pickup order's cash


def test_goods_for_pickup_paid_in_part_with_cash_and_never_collected_say_the_cash_is_due(
    db: Database,
) -> None:
    """A pickup order with a cash part that its voucher's expiry cancels puts the goods back
    on the shelf and records ``cash_refund_due_fen`` for the payment system, as every other
    cancellation of a paid order does (rewards.service._cash_due)."""
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    towel = shop.reward(points=300, cash_fen=2000, pickup=True, stock=5)
    cancelled = shop.redeem(member, towel.code, payment_ref="till-1")
    assert shop.move(cancelled.id, "cancel").outcome["cash_refund_due_fen"] == 2000
    lapsed = shop.redeem(member, towel.code, payment_ref="till-2")
    clock(db).advance(timedelta(days=31))
    db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))
    order = db.run(lambda uow: rewards.get_order(uow, program_id=shop.program_id,
                                                 order_id=lapsed.id))  # fmt: skip
    assert order.state == "cancelled" and shop.get(towel.code).stock_left == 5
    # the 20 yuan paid are due back, as the goods are back on the shelf
    assert order.outcome.get("cash_refund_due_fen") == 2000, order.outcome


# --------------------------------------------------------------------------- the voucher expiry run


def test_a_voucher_expiry_run_goes_on_past_a_chunk_with_a_voucher_used_before_the_lock(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The voucher expiry run is over when a chunk's search finds fewer than its limit, not
    when it expires fewer (as the order sweeps are): a chunk one of whose vouchers a till
    accepted between the search and the members' locks does not end the run, and the
    vouchers after it do not wait for the next day's run."""
    shop = Shop.open(db)
    members_ = shop.member(5000, count=3)
    wash = shop.reward(kind="service", points=1000)
    orders = [shop.redeem(member, wash.code) for member in members_]
    clock(db).advance(timedelta(days=91))
    lock_members = rewards._lock_members
    used: list[str] = []

    def used_meanwhile(uow: Any, member_ids: set[int]) -> None:
        if not used:  # a till accepts the first voucher between the search and the lock
            assert orders[0].voucher is not None
            used.append(orders[0].voucher.code)
            uow.conn.execute(
                update(vouchers).where(vouchers.c.code == orders[0].voucher.code)
                .values(state="used", used_at=clock(db).now())
            )  # fmt: skip
        lock_members(uow, member_ids)

    monkeypatch.setattr(rewards, "_lock_members", used_meanwhile)
    run = jobs.run(db, "rewards.expire_vouchers", program_id=shop.program_id, size=2)
    assert run.state == "done"
    states = [
        db.run(lambda uow, o=o: uow.conn.execute(
            select(vouchers.c.state).where(vouchers.c.order_id == o.id)).scalar_one())
        for o in orders
    ]  # fmt: skip
    # the third voucher expires in the same run: its points do not stay out a day more
    assert states == ["used", "expired", "expired"]


# ------------------------------------------------------------------------------- a lottery's budget


def test_a_lottery_budget_bounds_the_points_its_prizes_credit(db: Database) -> None:
    """A prize costs the budget the larger of its ``value`` and the points it credits
    (rewards.schemas.Prize.cost), so a prize of 1,000 points valued at 1 does not fit a
    budget of 10: its draws are not sold, and nothing beyond the budget is credited."""
    shop = Shop.open(db)
    (member,) = shop.member(100_000, tier="金卡")
    prize = {"code": "p", "name": {"en": "1000"}, "chance_ppm": 1_000_000, "points": 1000,
             "value": 1}  # fmt: skip
    wheel = shop.reward(kind="lottery", points=10, lottery={"budget": 10, "prizes": [prize]})
    credited = 0
    for _ in range(5):
        # the budget cannot pay the prize, so no draw is sold (a draw that cannot win)
        with contextlib.suppress(NotOnSale):
            credited += shop.redeem(member, wheel.code).outcome.get("prize_points", 0)
    budget = select(prize_stock.c.given).where(
        prize_stock.c.reward_id == wheel.id, prize_stock.c.prize_code == "*"
    )
    budget_given = db.run(lambda uow: uow.conn.execute(budget).scalar_one())
    assert_ledger_sound(db, shop.program_id)
    # nothing beyond the budget of 10 is credited
    assert credited <= 10, (credited, budget_given)
