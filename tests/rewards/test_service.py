"""Redemption end to end on both backends: prices, limits, early access, cooling-off,
cancellation and return, vouchers and their expiry, lotteries, donations, partner exchanges,
votes, "what can I get", and refusals that change nothing."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.errors import (
    IdempotencyConflict,
    InsufficientPoints,
    InvalidInput,
    JifenError,
    LimitReached,
    NotOnSale,
    OutOfStock,
    PaymentUsed,
    PriceChanged,
    StateConflict,
    TierNotAllowed,
    UnknownReward,
    UnknownVoucher,
    VoucherNotUsable,
)
from jifen.ledger import SystemAccount
from jifen.members.models import members as members_table
from jifen.notify import service as notify
from jifen.points import integrity
from jifen.points import service as points
from jifen.points.models import accounts, lots
from jifen.rewards import core
from jifen.rewards import service as rewards
from jifen.rewards.models import prize_stock, reward_orders, vouchers
from jifen.rewards.models import rewards as rewards_table
from jifen.rewards.schemas import RedemptionCreate
from tests.factories import assert_ledger_sound
from tests.rewards.shop import Shop

SHANGHAI = ZoneInfo("Asia/Shanghai")


def clock(db: Database) -> ManualClock:
    assert isinstance(db.clock, ManualClock)
    return db.clock


def open_lots(db: Database, member_id: int) -> list[tuple[int, int]]:
    return [(lot.id, lot.remaining) for lot in db.run(
        lambda uow: points.member_lots(uow, member_id=member_id), read_only=True)]  # fmt: skip


def edit_reward(db: Database, shop: Shop, reward: Any, **changes: Any) -> Any:
    """An operator's edit of the reward's terms."""
    body = rewards.RewardDef.model_validate(
        {**reward.model_dump(include=set(rewards.RewardDef.model_fields)), **changes}
    )
    return db.run(lambda uow: rewards.update_reward(uow, program_id=shop.program_id,
                                                    code=reward.code, body=body))  # fmt: skip


def test_a_redemption_debits_points_fifo_takes_stock_and_makes_an_order(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(0, tier="银卡")
    db.run(lambda uow: [points.earn(uow, member_id=member, amount=600, key=f"e{i}",
                                    expires_at=uow.clock.now() + timedelta(days=30 * (i + 1)))
                        for i in range(3)])  # fmt: skip
    mug = shop.reward(points=1000, stock=5, safety_stock=1)
    order = shop.redeem(member, mug.code)
    assert (order.state, order.points, order.kind) == ("created", 900, "physical")
    assert [step.factor for step in order.price] == ["1", "0.9"]
    assert shop.available(member) == 900
    # the earliest-expiring lot went first
    assert [remaining for _, remaining in open_lots(db, member)] == [300, 600]
    assert shop.get(mug.code).stock_left == 4
    assert order.steps[0].state == "created"
    assert_ledger_sound(db, shop.program_id)


def test_points_plus_cash_paid_at_the_till_records_the_payment(db: Database) -> None:
    """A redemption that names its payment is paid already: made at once, no payment
    awaited (one without is made awaiting its payment: see test_payment.py)."""
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    kettle = shop.reward(points=1000, cash_fen=9000)
    order = shop.redeem(member, kettle.code, payment_ref="pay-123")
    assert (order.points, order.cash_fen, order.payment_ref) == (800, 9000, "pay-123")
    assert (order.state, order.pay_by) == ("created", None)
    assert order.spend_posting_id is not None
    cancelled = shop.move(order.id, "cancel")
    assert cancelled.outcome["cash_refund_due_fen"] == 9000  # for the payment system to refund


def test_a_payment_at_the_till_of_another_amount_than_the_cash_due_is_refused(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    kettle = shop.reward(points=1000, cash_fen=9000, stock=5, max_quantity=2)
    # the till took 90 yuan; the operator has since made the cash part 120 yuan
    edit_reward(db, shop, kettle, cash_fen=12000)
    before = (shop.counts(), shop.available(member), shop.get(kettle.code).stock_left)
    with pytest.raises(JifenError, match="due 12000 fen in cash; payment 'pos-1' says 9000") as no:
        shop.redeem(member, kettle.code, payment_ref="pos-1", amount_fen=9000)
    assert no.value.code == "payment_amount_mismatch"
    assert "应付现金 12000 分" in no.value.message("zh")
    assert (shop.counts(), shop.available(member), shop.get(kettle.code).stock_left) == before
    two = shop.redeem(member, kettle.code, payment_ref="pos-1", amount_fen=24000, quantity=2)
    assert (two.cash_fen, two.payment_ref, two.state) == (24000, "pos-1", "created")
    assert shop.move(two.id, "cancel").outcome["cash_refund_due_fen"] == 24000
    with pytest.raises(ValidationError, match="give payment_ref"):
        RedemptionCreate.model_validate({"reward": kettle.code, "amount_fen": 9000})


def test_a_payment_named_for_a_reward_without_a_cash_part_is_refused(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    kettle = shop.reward(points=1000, cash_fen=9000, stock=5)
    # the till took 90 yuan; the operator has since made it a points-only reward
    edit_reward(db, shop, kettle, cash_fen=0)
    before = (shop.counts(), shop.available(member), shop.get(kettle.code).stock_left)
    for paid in ({}, {"amount_fen": 9000}, {"amount_fen": 0}):
        with pytest.raises(InvalidInput, match="no cash part") as no:
            shop.redeem(member, kettle.code, payment_ref="pos-1", **paid)
        assert no.value.params["field"] == "payment_ref"
        assert "refund payment 'pos-1'" in no.value.message("en")
        assert "没有现金部分" in no.value.message(
            "zh"
        ) and "请退还支付 'pos-1'" in no.value.message("zh")
    assert (shop.counts(), shop.available(member), shop.get(kettle.code).stock_left) == before
    order = shop.redeem(member, kettle.code)  # without a payment: points only
    assert (order.cash_fen, order.payment_ref) == (0, None)


def test_a_payment_pays_for_one_redemption(db: Database) -> None:
    shop = Shop.open(db)
    alice, bob = shop.member(5000, tier="金卡", count=2)
    kettle = shop.reward(points=1000, cash_fen=9000, stock=5)
    paid = shop.redeem(alice, kettle.code, payment_ref="pay-1")
    before = (shop.counts(), shop.available(alice), shop.available(bob))
    for member in (alice, bob):  # the same member again, or another: one payment, one order
        with pytest.raises(PaymentUsed, match=f"'pay-1' already paid for order {paid.id}") as no:
            shop.redeem(member, kettle.code, payment_ref="pay-1")
        assert f"已用于订单 {paid.id}" in no.value.message("zh")
    assert (shop.counts(), shop.available(alice), shop.available(bob)) == before
    shop.move(paid.id, "cancel")  # its cash is refunded: the reference stays spent
    with pytest.raises(PaymentUsed):
        shop.redeem(bob, kettle.code, payment_ref="pay-1")
    assert shop.redeem(bob, kettle.code, payment_ref="pay-2").payment_ref == "pay-2"


def test_birthday_month_and_category_coefficient(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="普通")
    today = clock(db).now()
    db.run(lambda uow: uow.conn.execute(
        members_table.update().where(members_table.c.id == member)
        .values(birthday=date(1990, today.month, 15))))  # fmt: skip
    phone = shop.reward(points=1000, category="数码")
    quoted = db.run(lambda uow: rewards.quote(uow, program_id=shop.program_id, member_id=member,
                                              code=phone.code))  # fmt: skip
    assert quoted.points == 1042  # 1000 / 0.8 / 1.2 = 1041.67 → 1042
    assert [s.factor for s in quoted.steps] == ["1", "1/0.8", "1/1.2"]


def test_dynamic_price_rises_after_80_percent_is_redeemed(db: Database) -> None:
    shop = Shop.open(db)
    buyers = shop.member(10000, tier="金卡", count=9)
    scarce = shop.reward(points=1000, stock=10)
    paid = [shop.redeem(m, scarce.code).points for m in buyers]
    assert paid == [800] * 8 + [960]  # 8 of 10 gone: +20 %
    order = shop.redeem(buyers[0], scarce.code, expected_points=960)
    assert order.points == 960
    with pytest.raises(OutOfStock):
        shop.redeem(buyers[1], scarce.code)


def test_a_changed_price_is_refused_when_the_caller_expected_another(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="银卡")
    mug = shop.reward(points=1000)
    before = shop.counts()
    with pytest.raises(PriceChanged, match="900 points, not the 1000"):
        shop.redeem(member, mug.code, expected_points=1000)
    assert shop.counts() == before


def test_limits_by_tier_per_redemption_and_per_month(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="普通")
    small = shop.reward(points=500)
    big = shop.reward(points=2500)
    with pytest.raises(LimitReached, match="at most 2000 points"):
        shop.redeem(member, big.code)
    for _ in range(3):
        shop.redeem(member, small.code)
    before = shop.counts()
    with pytest.raises(LimitReached, match="3 times a month"):
        shop.redeem(member, small.code)
    assert shop.counts() == before
    # a cancelled redemption does not count, and a new month starts afresh
    orders, _ = db.run(lambda uow: rewards.list_orders(uow, program_id=shop.program_id))
    shop.move(orders[0].id, "cancel")
    shop.redeem(member, small.code)
    clock(db).advance(timedelta(days=31))
    shop.redeem(member, small.code)


def test_per_member_limit_of_a_reward(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="金卡")
    once = shop.reward(points=100, limit_per_member=2, limit_period="ever", max_quantity=3)
    with pytest.raises(LimitReached, match="has 2 left"):
        shop.redeem(member, once.code, quantity=3)
    shop.redeem(member, once.code, quantity=2)
    with pytest.raises(LimitReached, match="has 0 left"):
        shop.redeem(member, once.code)


def test_early_access_for_gold_and_diamond_and_the_sales_window(db: Database) -> None:
    shop = Shop.open(db)
    (gold,) = shop.member(5000, tier="金卡")
    (plain,) = shop.member(5000, tier="普通")
    start = clock(db).now() + timedelta(hours=12)
    drop = shop.reward(points=100, sales_start=start, sales_end=start + timedelta(days=2),
                       early_access={"金卡": 24, "钻石": 24})  # fmt: skip
    shop.redeem(gold, drop.code)
    with pytest.raises(NotOnSale, match="opens at"):
        shop.redeem(plain, drop.code)
    clock(db).advance(timedelta(hours=12))
    shop.redeem(plain, drop.code)
    clock(db).advance(timedelta(days=2))
    with pytest.raises(NotOnSale, match="ended"):
        shop.redeem(gold, drop.code)


def test_times_a_member_is_told_are_in_the_programmes_time_zone(db: Database) -> None:
    """An Asia/Shanghai programme's refusals, order notes and messages name their times at
    +08:00, as its members and staff read a clock, not in UTC."""
    shop = Shop.open(db)  # Asia/Shanghai
    (diamond,) = shop.member(20000, tier="钻石")
    (plain,) = shop.member(5000, tier="普通")

    def local(moment: Any) -> str:
        return str(moment.astimezone(SHANGHAI).isoformat())

    def said(refused: pytest.ExceptionInfo[Any]) -> str:
        return f"{refused.value.message('en')} {refused.value.message('zh')}"

    # a reward that opens later: when it opens
    start = clock(db).now() + timedelta(hours=12)
    drop = shop.reward(points=100, sales_start=start, sales_end=start + timedelta(days=2))
    with pytest.raises(NotOnSale) as refused:
        shop.redeem(plain, drop.code)
    assert said(refused).count(f"{local(start)}") == 2 and "+08:00" in local(start)
    assert "+00:00" not in said(refused)
    # a redemption in its cooling-off: until when, in the refusal and the order's note
    watch = shop.reward(points=10000, stock=3)
    order = shop.redeem(diamond, watch.code)
    until = local(order.hold_until)
    assert order.steps[0].note == f"cooling-off until {until}"
    with pytest.raises(StateConflict) as early:
        db.run(lambda uow: rewards.confirm_held(
            uow, program_id=shop.program_id, member_id=diamond, order_id=order.id, actor="m"
        ))  # fmt: skip
    assert said(early).count(until) == 2 and "+00:00" not in said(early)
    # a voucher past its validity: when it expired, refused and told to the member
    coupon = shop.reward(kind="coupon", points=500, coupon={"amount_fen": 2000})
    voucher = shop.redeem(plain, coupon.code).voucher
    assert voucher is not None
    clock(db).advance(timedelta(days=91))
    with pytest.raises(VoucherNotUsable) as lapsed:
        shop.use(voucher.code, None)
    assert said(lapsed).count(local(voucher.valid_until)) == 2
    assert "+00:00" not in said(lapsed)
    db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))
    (told,), _ = db.run(lambda uow: notify.list_inbox(
        uow, program_id=shop.program_id, member_id=plain, limit=5
    ))  # fmt: skip
    assert f"已于 {local(voucher.valid_until)} 过期" in told.body  # Chinese: its language
    assert "+08:00" in told.body and "+00:00" not in told.body


def test_a_reward_for_some_tiers_only(db: Database) -> None:
    shop = Shop.open(db)
    (plain,) = shop.member(5000, tier="普通")
    vip = shop.reward(points=100, visible_tiers=["金卡", "钻石"])
    with pytest.raises(TierNotAllowed, match="金卡, 钻石"):
        shop.redeem(plain, vip.code)
    # nor is it priced for that member, as if it were on offer to it
    with pytest.raises(TierNotAllowed, match="金卡, 钻石"):
        db.run(lambda uow: rewards.quote(uow, program_id=shop.program_id, member_id=plain,
                                          code=vip.code))  # fmt: skip
    (gold,) = shop.member(5000, tier="金卡")
    assert (
        db.run(
            lambda uow: rewards.quote(
                uow, program_id=shop.program_id, member_id=gold, code=vip.code
            )
        ).points
        > 0
    )


def test_a_quote_for_more_units_than_one_redemption_takes_is_refused_as_it_would_be(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(50_000, tier="金卡")
    wash = shop.reward(kind="service", points=300)
    cups = shop.reward(points=100, max_quantity=2)

    def quote(code: str, quantity: int) -> Any:
        return db.run(lambda uow: rewards.quote(uow, program_id=shop.program_id,
                                                member_id=member, code=code,
                                                quantity=quantity))  # fmt: skip

    assert quote(cups.code, 2).points == 160
    for code, quantity, said in ((wash.code, 3, "used once"), (cups.code, 3, "At most 2")):
        with pytest.raises(LimitReached, match=said):
            quote(code, quantity)
        with pytest.raises(LimitReached, match=said):
            shop.redeem(member, code, quantity=quantity)


def test_cooling_off_holds_a_large_diamond_redemption_until_confirmed(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    watch = shop.reward(points=10000, stock=3)  # 7,000 points for 钻石: above 5,000
    order = shop.redeem(member, watch.code)
    assert order.state == "held" and order.hold_posting_id and order.spend_posting_id is None
    assert order.hold_until == clock(db).now() + timedelta(hours=24)
    summary = db.run(lambda uow: points.balance(uow, member_id=member))
    assert (summary.available, summary.frozen) == (13000, 7000)
    assert shop.get(watch.code).stock_left == 2  # reserved while held

    def confirm() -> Any:
        return db.run(
            lambda uow: rewards.confirm_held(
                uow, program_id=shop.program_id, member_id=member, order_id=order.id, actor="m"
            )
        )

    with pytest.raises(StateConflict, match="cooling-off period until"):
        confirm()
    clock(db).advance(timedelta(hours=24))
    done = confirm()
    assert done.state == "created" and done.spend_posting_id is not None
    summary = db.run(lambda uow: points.balance(uow, member_id=member))
    assert (summary.available, summary.frozen) == (13000, 0)
    with pytest.raises(StateConflict, match="not waiting"):
        confirm()
    assert_ledger_sound(db, shop.program_id)


def test_a_redemption_held_for_its_cooling_off_is_activity_for_dormancy(db: Database) -> None:
    from jifen.expiry import service as expiry

    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    watch = shop.reward(points=10000, stock=3)

    def last_active() -> Any:
        return db.run(lambda uow: expiry.last_activity(uow, member_ids=[member])).get(member)

    earned_at = last_active()
    clock(db).advance(timedelta(days=300))
    # the member redeems; the redemption waits for its cooling-off, nothing spent yet
    assert shop.redeem(member, watch.code).state == "held"
    assert last_active() == clock(db).now() != earned_at


def test_a_member_frozen_during_its_cooling_off_cannot_complete_the_held_redemption(
    db: Database,
) -> None:
    from jifen.members import service as members

    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    wheel = shop.reward(
        kind="lottery", points=8000, discounts=True,  # 5,600 for 钻石: held
        lottery={"prizes": [{"code": "p", "name": {"en": "P"}, "chance_ppm": 1_000_000,
                             "points": 1000}]},
    )  # fmt: skip
    order = shop.redeem(member, wheel.code)
    assert order.state == "held"
    db.run(lambda uow: members.change_state(uow, program_id=shop.program_id, member_id=member,
                                            state="frozen"))  # fmt: skip
    clock(db).advance(timedelta(hours=25))
    before = (shop.counts(), db.run(lambda uow: points.balance(uow, member_id=member)))
    with pytest.raises(StateConflict, match="frozen") as refused:
        db.run(
            lambda uow: rewards.confirm_held(
                uow, program_id=shop.program_id, member_id=member, order_id=order.id, actor="m"
            )
        )
    assert "不能获取或使用积分" in refused.value.message("zh")
    assert (shop.counts(), db.run(lambda uow: points.balance(uow, member_id=member))) == before
    # neither spent nor drawn: the order still waits, and can be cancelled by staff
    assert shop.move(order.id, "cancel").state == "cancelled"
    assert shop.available(member) == 20000
    assert_ledger_sound(db, shop.program_id)


def test_a_held_registration_confirmed_after_its_event_started_is_refused_and_changes_nothing(
    db: Database,
) -> None:
    """Confirming a held redemption checks the reward as it is now, as a redemption does:
    refused, nothing is spent or issued, the points stay frozen (the order still waits) and
    a cancel gives them back."""
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    starts = clock(db).now() + timedelta(hours=12)
    gala = shop.reward(kind="event", points=8000, event={"starts_at": starts})  # 5,600: held
    order = shop.redeem(member, gala.code)
    assert order.state == "held"
    clock(db).advance(timedelta(hours=25))
    before = (shop.counts(), db.run(lambda uow: points.balance(uow, member_id=member)))
    with pytest.raises(NotOnSale, match="the event started") as refused:
        db.run(
            lambda uow: rewards.confirm_held(
                uow, program_id=shop.program_id, member_id=member, order_id=order.id, actor="m"
            )
        )
    lapses = (order.hold_until + timedelta(days=7)).astimezone(SHANGHAI).isoformat()  # type: ignore[operator]
    said = str(refused.value)
    assert f"Order {order.id} was not completed and nothing was spent" in said
    assert f"5600 points stay frozen until it lapses at {lapses}" in said
    said_zh = refused.value.message("zh")
    assert "报名已截止" in said_zh and "5600 积分仍冻结" in said_zh
    assert (shop.counts(), db.run(lambda uow: points.balance(uow, member_id=member))) == before
    waiting = db.run(lambda uow: rewards.get_order(uow, program_id=shop.program_id,
                                                   order_id=order.id))  # fmt: skip
    assert waiting.state == "held" and waiting.voucher is None
    assert shop.move(order.id, "cancel").state == "cancelled"
    assert shop.available(member) == 20000
    assert_ledger_sound(db, shop.program_id)


def test_a_held_redemption_can_be_cancelled_or_lapses(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(30000, tier="钻石")
    watch = shop.reward(points=10000, stock=3)
    first = shop.redeem(member, watch.code)
    second = shop.redeem(member, watch.code)
    cancelled = shop.move(first.id, "cancel")
    assert cancelled.state == "cancelled"
    clock(db).advance(timedelta(days=8, hours=1))  # 24 h cooling-off + 7 hold days
    dry = db.run(lambda uow: rewards.expire_holds(uow, program_id=shop.program_id, dry_run=True))
    assert dry.order_ids == [second.id]
    assert shop.get(watch.code).stock_left == 2
    report = db.run(lambda uow: rewards.expire_holds(uow, program_id=shop.program_id))
    assert report.order_ids == [second.id]
    assert shop.available(member) == 30000
    assert shop.get(watch.code).stock_left == 3
    assert_ledger_sound(db, shop.program_id)


def test_cancel_and_return_restore_the_same_lots_and_the_stock(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(0, tier="金卡")
    db.run(lambda uow: [points.earn(uow, member_id=member, amount=700, key=f"e{i}",
                                    expires_at=uow.clock.now() + timedelta(days=60 * (i + 1)))
                        for i in range(3)])  # fmt: skip
    before = open_lots(db, member)
    lamp = shop.reward(points=2000, stock=2)  # 1,600 for 金卡: takes two lots and part of one
    order = shop.redeem(member, lamp.code)
    assert open_lots(db, member) != before
    cancelled = shop.move(order.id, "cancel", note="changed mind")
    assert cancelled.refund_posting_id is not None
    assert open_lots(db, member) == before
    assert shop.get(lamp.code).stock_left == 2
    # shipped, delivered, then returned
    order = shop.redeem(member, lamp.code)
    shop.move(order.id, "ship", tracking="SF123")
    with pytest.raises(StateConflict, match="cannot be cancelled"):
        shop.move(order.id, "cancel")
    delivered = shop.move(order.id, "deliver")
    assert delivered.outcome["tracking"] == "SF123"
    returned = shop.move(order.id, "return")
    assert [s.state for s in returned.steps] == [
        "created", "shipped", "delivered", "returned"
    ]  # fmt: skip
    assert open_lots(db, member) == before
    lamp_now = shop.get(lamp.code)
    assert (lamp_now.stock_left, lamp_now.sold) == (2, 0)
    with pytest.raises(StateConflict):
        shop.move(order.id, "return")
    assert_ledger_sound(db, shop.program_id)


def test_a_voucher_code_typed_with_spaces_or_dashes_is_found(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(10000, tier="普通")
    wash = shop.reward(kind="service", points=100)
    codes = [shop.redeem(member, wash.code).voucher for _ in range(2)]
    assert codes[0] is not None and codes[1] is not None
    first, second = codes[0].code, codes[1].code
    scanned = f" {first}\n"  # a scanner's trailing newline, a pasted leading space
    read = db.run(lambda uow: rewards.get_voucher(uow, program_id=shop.program_id, code=scanned))
    assert read.code == first
    assert shop.use(scanned).voucher.state == "used"
    grouped = "-".join([second[:4].lower(), second[4:8], second[8:]])  # as printed in groups
    assert shop.use(grouped.replace("-", " ", 1)).voucher.code == second
    with pytest.raises(UnknownVoucher):
        shop.use(" ")


def test_vouchers_are_used_once_at_a_store_and_expire_with_a_fee(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(10000, tier="普通")
    wash = shop.reward(kind="service", points=1000, name={"zh": "洗车券"})
    used = shop.redeem(member, wash.code)
    kept = shop.redeem(member, wash.code)
    assert used.state == "delivered" and used.voucher is not None
    assert used.voucher.valid_until == clock(db).now() + timedelta(days=90)
    code = used.voucher.code

    def use(c: str, store: str = "S1") -> Any:
        return db.run(
            lambda uow: rewards.use_voucher(
                uow, program_id=shop.program_id, code=c, store=store, actor="cashier"
            )
        )

    result = use(code.lower())  # codes are read aloud: case does not matter
    assert (result.voucher.state, result.voucher.used_store) == ("used", "S1")
    with pytest.raises(VoucherNotUsable, match="already used at S1"):
        use(code, "S2")
    with pytest.raises(UnknownVoucher):
        use("NOSUCHCODE")
    # the other one expires unused: 90 % comes back, to the lots it came from
    assert kept.voucher is not None
    clock(db).advance(timedelta(days=91))
    available = shop.available(member)
    with pytest.raises(VoucherNotUsable, match="expired"):
        use(kept.voucher.code)
    assert shop.available(member) == available  # the refusal changed nothing
    dry = db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id,
                                                     dry_run=True))  # fmt: skip
    assert (dry.vouchers, dry.points_returned, dry.fees) == (1, 900, 100)
    assert shop.available(member) == available
    report = db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))
    assert (report.vouchers, report.points_returned, report.fees) == (1, 900, 100)
    assert shop.available(member) == available + 900
    again = db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))
    assert again.vouchers == 0
    voucher = db.run(lambda uow: rewards.get_voucher(uow, program_id=shop.program_id,
                                                     code=kept.voucher.code))  # fmt: skip
    assert voucher.state == "expired" and voucher.refund_posting_id is not None
    assert_ledger_sound(db, shop.program_id)


def _coupon_off_20_yuan_from_100(db: Database) -> tuple[Shop, Any, Any]:
    """A shop, a member with 5,000 points and a coupon of 20 yuan off an order of at least
    100 yuan, for 500 points."""
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    coupon = shop.reward(kind="coupon", points=500,
                         coupon={"amount_fen": 2000, "min_spend_fen": 10000})  # fmt: skip
    return shop, member, coupon


def test_a_coupon_checks_its_minimum_spend_and_says_what_it_takes_off(db: Database) -> None:
    shop, member, coupon = _coupon_off_20_yuan_from_100(db)
    order = shop.redeem(member, coupon.code)
    assert order.voucher is not None and order.voucher.coupon is not None
    code = order.voucher.code
    with pytest.raises(VoucherNotUsable, match="at least 10000 fen"):
        shop.use(code, 9000)
    assert shop.use(code, 15000).discount_fen == 2000


def test_a_used_or_expired_coupon_shown_for_a_small_order_is_refused_as_used_or_expired(
    db: Database,
) -> None:
    shop, member, coupon = _coupon_off_20_yuan_from_100(db)
    used, lapsed = (shop.redeem(member, coupon.code).voucher for _ in range(2))
    assert used is not None and lapsed is not None
    shop.use(used.code, 15000, store="S1")
    # a second till, with an order below the minimum: the coupon is spent, whatever the order
    with pytest.raises(VoucherNotUsable, match="already used at S1") as refused:
        shop.use(used.code, 9000, store="S2")
    assert "至少" not in refused.value.params["problem_zh"] and "须满" not in str(refused.value)
    clock(db).advance(timedelta(days=91))
    with pytest.raises(VoucherNotUsable, match="expired at"):
        shop.use(lapsed.code, 9000)


def test_a_used_or_expired_coupon_shown_without_an_order_amount_is_refused_as_such(
    db: Database,
) -> None:
    shop, member, coupon = _coupon_off_20_yuan_from_100(db)
    used, lapsed, fresh = (shop.redeem(member, coupon.code).voucher for _ in range(3))
    assert used is not None and lapsed is not None and fresh is not None
    shop.use(used.code, 15000, store="S1")
    # a till that asks before it rings up the order: a spent coupon is said to be spent
    with pytest.raises(VoucherNotUsable, match="already used at S1"):
        shop.use(used.code, None, store="S2")
    clock(db).advance(timedelta(days=91))
    with pytest.raises(VoucherNotUsable, match="expired at"):
        shop.use(lapsed.code, None)
    # one that could be used is asked for the order's amount, as before
    clock(db).set(clock(db).now() - timedelta(days=91))
    with pytest.raises(InvalidInput, match="order amount") as asked:
        shop.use(fresh.code, None)
    assert asked.value.params["field"] == "order_amount_fen"


def test_a_voucher_of_a_returned_order_is_refused_saying_it_was_returned(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    wash = shop.reward(kind="service", points=300)
    towel = shop.reward(points=300, pickup=True)
    returned, cancelled = shop.redeem(member, wash.code), shop.redeem(member, towel.code)
    shop.move(returned.id, "return")
    shop.move(cancelled.id, "cancel")
    assert returned.voucher is not None and cancelled.voucher is not None
    with pytest.raises(VoucherNotUsable, match=f"its order {returned.id} was returned") as no:
        shop.use(returned.voucher.code)
    assert f"订单 {returned.id} 已退货" in no.value.message("zh")
    with pytest.raises(VoucherNotUsable, match=f"its order {cancelled.id} was cancelled") as no:
        shop.use(cancelled.voucher.code)
    assert f"订单 {cancelled.id} 已取消" in no.value.message("zh")


def test_a_coupon_held_for_its_cooling_off_is_issued_with_the_terms_it_was_bought_with(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    coupon = shop.reward(kind="coupon", points=8000,  # 5,600 for 钻石: above 5,000, held
                         coupon={"amount_fen": 20000, "min_spend_fen": 50000})  # fmt: skip
    held = shop.redeem(member, coupon.code)
    assert (held.state, held.points, held.voucher) == ("held", 5600, None)
    edit_reward(db, shop, coupon, coupon={"amount_fen": 5000, "min_spend_fen": 80000})
    clock(db).advance(timedelta(hours=24))
    done = db.run(
        lambda uow: rewards.confirm_held(
            uow, program_id=shop.program_id, member_id=member, order_id=held.id, actor="m"
        )
    )
    assert done.voucher is not None and done.voucher.coupon is not None
    assert (done.voucher.coupon.amount_fen, done.voucher.coupon.min_spend_fen) == (20000, 50000)
    assert shop.use(done.voucher.code, 60000).discount_fen == 20000


def test_an_issued_coupon_keeps_the_terms_it_was_bought_with(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    ten = shop.reward(kind="coupon", points=500,
                      coupon={"amount_fen": 1000, "min_spend_fen": 5000})  # fmt: skip
    bought = shop.redeem(member, ten.code)
    assert bought.voucher is not None
    old = bought.voucher.code
    # the operator makes the coupon 500 yuan off with no minimum, for new buyers
    edit_reward(db, shop, ten, coupon={"amount_fen": 50000})
    new = shop.redeem(member, ten.code).voucher
    assert new is not None and new.coupon is not None and new.coupon.amount_fen == 50000

    def read(code: str) -> Any:
        return db.run(lambda uow: rewards.get_voucher(uow, program_id=shop.program_id,
                                                      code=code))  # fmt: skip

    kept = read(old).coupon
    assert kept is not None and (kept.amount_fen, kept.min_spend_fen) == (1000, 5000)
    with pytest.raises(VoucherNotUsable, match="at least 5000 fen"):
        shop.use(old, 4000)
    assert shop.use(old, 60000).discount_fen == 1000
    assert shop.use(new.code, 60000).discount_fen == 50000
    # a voucher issued before the terms were kept on it reads the reward's, as it did
    third = shop.redeem(member, ten.code).voucher
    assert third is not None
    db.run(lambda uow: uow.conn.execute(
        vouchers.update().where(vouchers.c.code == third.code).values(coupon=None)))  # fmt: skip
    fallback = read(third.code).coupon
    assert fallback is not None and fallback.amount_fen == 50000
    assert shop.use(third.code, 100).discount_fen == 100


def test_a_voucher_reward_is_redeemed_one_voucher_at_a_time(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    for kind, terms in [("service", {}), ("virtual", {}), ("event", {"event": {
            "starts_at": clock(db).now() + timedelta(days=30)}}),
            ("coupon", {"coupon": {"percent_off": 10}})]:  # fmt: skip
        with pytest.raises(ValidationError, match="voucher is used once") as refused:
            shop.reward(kind=kind, max_quantity=3, **terms)
        assert "只能使用一次" in str(refused.value.errors()[0]["ctx"]["error"].zh)
    wash = shop.reward(kind="service", points=300)
    # one stored before the rule (3 washes a redemption) is still read, and redeemed singly
    stored = {**wash.model_dump(mode="json", include=set(rewards.RewardDef.model_fields)),
              "max_quantity": 3}  # fmt: skip
    stamp = clock(db).now() + timedelta(seconds=1)  # a version of its own, not cached
    db.run(lambda uow: uow.conn.execute(rewards_table.update().where(
        rewards_table.c.id == wash.id).values(terms=stored, updated_at=stamp)))  # fmt: skip
    assert shop.get(wash.code).max_quantity == 3
    before = (shop.counts(), shop.available(member))
    with pytest.raises(LimitReached, match="is used once: redeem one at a time") as no:
        shop.redeem(member, wash.code, quantity=3)
    assert "每次兑换 1 件" in no.value.message("zh")
    assert (shop.counts(), shop.available(member)) == before
    order = shop.redeem(member, wash.code)
    assert order.quantity == 1 and order.voucher is not None


def test_goods_for_pickup_are_delivered_when_the_voucher_is_used(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    towel = shop.reward(points=300, pickup=True, stock=10)
    order = shop.redeem(member, towel.code)
    assert order.state == "created" and order.voucher is not None
    assert order.voucher.valid_until == clock(db).now() + timedelta(days=30)
    code = order.voucher.code
    db.run(lambda uow: rewards.use_voucher(uow, program_id=shop.program_id, code=code,
                                           store="S9", actor="c"))  # fmt: skip
    after = db.run(lambda uow: rewards.get_order(uow, program_id=shop.program_id,
                                                 order_id=order.id))  # fmt: skip
    assert after.state == "delivered" and after.steps[-1].note == "collected at S9"
    # a towel never collected: its points come back less the fee, and it goes back on the shelf
    lapsed = shop.redeem(member, towel.code)
    assert shop.get(towel.code).stock_left == 8
    clock(db).advance(timedelta(days=31))
    db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))
    final = db.run(lambda uow: rewards.get_order(uow, program_id=shop.program_id,
                                                 order_id=lapsed.id))  # fmt: skip
    assert final.state == "cancelled" and final.voucher and final.voucher.state == "expired"
    assert shop.get(towel.code).stock_left == 9
    assert shop.available(member) == 5000 - 300 - 30


def test_goods_collected_with_a_voucher_can_be_returned_a_used_voucher_of_another_kind_not(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    towel = shop.reward(points=300, pickup=True, stock=3)
    order = shop.redeem(member, towel.code)
    assert order.voucher is not None
    shop.use(order.voucher.code)  # collected at S1
    # the member brings it back: the points and the unit come back, the voucher stays used
    returned = shop.move(order.id, "return", note="faulty")
    assert returned.state == "returned" and returned.refund_posting_id is not None
    assert returned.voucher is not None and returned.voucher.state == "used"
    assert (shop.available(member), shop.get(towel.code).stock_left) == (5000, 3)
    with pytest.raises(StateConflict):  # once
        shop.move(order.id, "return")
    with pytest.raises(VoucherNotUsable, match="already used"):
        shop.use(order.voucher.code)
    for kind, terms in [("service", {}), ("coupon", {"coupon": {"percent_off": 10}})]:
        bought = shop.redeem(member, shop.reward(kind=kind, points=100, **terms).code)
        assert bought.voucher is not None
        shop.use(bought.voucher.code, 1000)
        with pytest.raises(StateConflict, match="only an unused voucher can be given back"):
            shop.move(bought.id, "return")
    assert shop.available(member) == 4800
    assert_ledger_sound(db, shop.program_id)


def test_a_lapsed_voucher_is_given_back_by_the_expiry_run_less_its_fee_only(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    towel = shop.reward(points=300, pickup=True, stock=3)  # valid 30 days
    coupon = shop.reward(kind="coupon", points=100, coupon={"amount_fen": 500})  # 90 days
    orders = [shop.redeem(member, towel.code), shop.redeem(member, coupon.code)]
    clock(db).advance(timedelta(days=91))  # both lapsed; the expiry run has not come yet
    before = (shop.counts(), shop.available(member), shop.get(towel.code).stock_left)
    for attempt in (
        lambda: shop.move(orders[0].id, "cancel"),
        lambda: db.run(lambda uow: rewards.move(
            uow, program_id=shop.program_id, order_id=orders[0].id, action="cancel",
            actor="member", member_id=member)),
        lambda: shop.move(orders[1].id, "return"),
    ):  # fmt: skip
        with pytest.raises(StateConflict, match=r"lapsed at .* less the programme's fee") as no:
            attempt()
        assert "扣除手续费" in no.value.message("zh")
    assert (shop.counts(), shop.available(member), shop.get(towel.code).stock_left) == before
    report = db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))
    assert (report.vouchers, report.points_returned, report.fees) == (2, 360, 40)
    assert shop.available(member) == 5000 - 40
    assert_ledger_sound(db, shop.program_id)


def test_goods_are_either_shipped_or_collected_never_both(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    towel = shop.reward(points=300, pickup=True, stock=10)
    assert edit_reward(db, shop, towel, pickup=False).pickup is False  # no orders yet
    edit_reward(db, shop, towel, pickup=True)
    order = shop.redeem(member, towel.code)
    assert order.voucher is not None
    with pytest.raises(InvalidInput, match="orders made to be collected at a store") as no:
        edit_reward(db, shop, towel, pickup=False)
    assert "不能更改交付方式" in no.value.message("zh")
    mug = shop.reward(points=300, stock=10)
    shop.redeem(member, mug.code)
    with pytest.raises(InvalidInput, match="orders made to be shipped"):
        edit_reward(db, shop, mug, pickup=True)
    assert edit_reward(db, shop, mug, points=400).points == 400  # other terms still change
    # a voucher whose order went another way (shipped before this rule) is not collected
    for state in ("shipped", "delivered", "cancelled", "returned"):
        db.run(lambda uow, s=state: uow.conn.execute(reward_orders.update().where(
            reward_orders.c.id == order.id).values(state=s)))  # fmt: skip
        with pytest.raises(VoucherNotUsable, match=f"its order {order.id} is {state}"):
            shop.use(order.voucher.code)
    db.run(lambda uow: uow.conn.execute(reward_orders.update().where(
        reward_orders.c.id == order.id).values(state="created")))  # fmt: skip
    assert shop.use(order.voucher.code).voucher.state == "used"


def test_one_key_draws_apart_in_two_programmes_and_the_same_again_in_one(
    db: Database,
) -> None:
    """A draw's seed is a keyed hash of the programme, the lottery and the order's key: a
    till sending the same key to two programmes (or two lotteries) does not draw the same
    numbers in both, while a draw can still be worked out again from what it was of."""
    lottery = {"budget": 100_000, "prizes": [
        {"code": "p20", "name": {"zh": "20分"}, "chance_ppm": 300_000, "points": 20},
    ]}  # fmt: skip
    drawn = []
    for shop in (Shop.open(db), Shop.open(db)):
        (player,) = shop.member(1000, tier="金卡")
        wheel = shop.reward(kind="lottery", points=10, max_quantity=1, lottery=lottery)
        order = shop.redeem(player, wheel.code, key="till-7-receipt-42")
        drawn.append((shop.program_id, wheel.id, order.outcome["draw"]))
    assert drawn[0][2]["seed"] != drawn[1][2]["seed"]
    for program_id, reward_id, draw in drawn:
        assert draw["seed"] == rewards.draw_seed(program_id, reward_id, "till-7-receipt-42")
        assert draw["roll"] == core.roll(draw["seed"])
        assert rewards.draw_seed(program_id, reward_id + 1, "till-7-receipt-42") != draw["seed"]


def test_a_lottery_never_gives_beyond_its_budget_and_records_each_draw(db: Database) -> None:
    shop = Shop.open(db)
    players = shop.member(100_000, tier="金卡", count=3)
    wheel = shop.reward(
        kind="lottery", points=10, max_quantity=1,
        lottery={"budget": 2000, "prizes": [
            {"code": "p500", "name": {"zh": "500分"}, "chance_ppm": 100_000, "points": 500},
            {"code": "p20", "name": {"zh": "20分"}, "chance_ppm": 300_000, "points": 20},
            {"code": "cup", "name": {"zh": "杯子"}, "chance_ppm": 100_000, "quantity": 2,
             "value": 100},
        ]},
    )  # fmt: skip
    orders = []
    for i in range(300):  # until no prize can be paid: then a draw is no longer sold
        try:
            orders.append(shop.redeem(players[i % 3], wheel.code, key=f"draw-{i}"))
        except NotOnSale:
            break
    with pytest.raises(NotOnSale, match="sold out: no prize is left") as sold_out:
        shop.redeem(players[0], wheel.code)
    assert "已售罄" in sold_out.value.message("zh")
    cost = {"p500": 500, "p20": 20, "cup": 100}
    won = [o.outcome["prize"] for o in orders if o.outcome["prize"]]
    assert 2000 - 20 < sum(cost[p] for p in won) <= 2000  # not even a p20 is left
    assert won.count("cup") <= 2
    assert any(o.outcome.get("missed") for o in orders)  # p500 drawn with less than 500 left
    assert [a.reward.code for a in db.run(lambda uow: rewards.what_can_i_get(
        uow, program_id=shop.program_id, member_id=players[0])).now] == []  # fmt: skip
    for order in orders:  # each draw replays from its seed
        draw = order.outcome["draw"]
        assert core.roll(draw["seed"]) == draw["roll"]
        if order.outcome["prize"] == "cup":
            assert order.state == "created"  # staff hand it over
        elif order.outcome["prize"]:
            assert order.state == "delivered" and order.outcome["prize_points"] > 0
    given = dict(db.run(lambda uow: uow.conn.execute(
        select(prize_stock.c.prize_code, prize_stock.c.given)
        .where(prize_stock.c.reward_id == wheel.id)).all()))  # fmt: skip
    assert given["*"] == sum(cost[p] for p in won)
    with pytest.raises(StateConflict):  # a draw is final
        shop.move(orders[0].id, "cancel")
    assert_ledger_sound(db, shop.program_id)


def test_a_prize_staff_hand_over_is_delivered_without_being_shipped(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(1000, tier="金卡")
    cup = {"code": "cup", "name": {"zh": "杯子"}, "chance_ppm": 1_000_000, "value": 100}
    wheel = shop.reward(kind="lottery", points=10, lottery={"prizes": [cup]})
    won = shop.redeem(member, wheel.code)
    assert (won.outcome["prize"], won.state) == ("cup", "created")
    handed = shop.move(won.id, "deliver", note="handed over at the counter")
    assert handed.state == "delivered" and [s.state for s in handed.steps][-1] == "delivered"
    assert "shipped" not in [s.state for s in handed.steps]  # the member is told of no parcel
    # goods to ship are still shipped before they are delivered
    mug = shop.reward(points=10)
    order = shop.redeem(member, mug.code)
    with pytest.raises(StateConflict, match="cannot be delivered"):
        shop.move(order.id, "deliver")


def test_a_points_prize_valued_below_its_points_costs_the_budget_its_points(
    db: Database,
) -> None:
    """A prize's value set below the points it credits (as terms stored before the budget
    counted the larger may have it) takes its points from the budget: the budget bounds
    the points the prizes credit."""
    shop = Shop.open(db)
    (member,) = shop.member(100_000, tier="金卡")
    prize = {"code": "p", "name": {"en": "500"}, "chance_ppm": 1_000_000, "points": 500,
             "value": 1}  # fmt: skip
    wheel = shop.reward(kind="lottery", points=10, lottery={"budget": 1200, "prizes": [prize]})
    won = [shop.redeem(member, wheel.code).outcome["prize_points"] for _ in range(2)]
    assert won == [500, 500]
    with pytest.raises(NotOnSale, match="sold out"):  # 200 left: not a prize of 500
        shop.redeem(member, wheel.code)
    budget = select(prize_stock.c.given).where(
        prize_stock.c.reward_id == wheel.id, prize_stock.c.prize_code == "*"
    )
    given = db.run(lambda uow: uow.conn.execute(budget).scalar_one())
    assert given == 1000
    assert_ledger_sound(db, shop.program_id)


def test_a_lottery_prize_counts_against_its_budget_and_draws_stop_when_none_is_left(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(100_000, tier="金卡")
    tv = {"code": "tv", "name": {"en": "TV"}, "chance_ppm": 1_000_000}  # staff hand it over
    with pytest.raises(ValidationError, match="prize 'tv' would cost the lottery's budget"):
        shop.reward(kind="lottery", points=10, lottery={"budget": 0, "prizes": [tv]})
    # with its value it counts: a budget of 0 gives none, and no draw is sold
    none = shop.reward(kind="lottery", points=10,
                       lottery={"budget": 0, "prizes": [{**tv, "value": 3000}]})  # fmt: skip
    with pytest.raises(NotOnSale, match="sold out"):
        shop.redeem(member, none.code)
    # two prizes of 500 in a budget of 1,000: two draws win, the third is not sold
    pts = {"code": "pts", "name": {"en": "500"}, "chance_ppm": 1_000_000, "points": 500}
    wheel = shop.reward(kind="lottery", points=10, lottery={"budget": 1000, "prizes": [pts]})
    assert [shop.redeem(member, wheel.code).outcome["prize"] for _ in range(2)] == ["pts"] * 2
    before = (shop.counts(), shop.available(member))
    with pytest.raises(NotOnSale, match="sold out"):
        shop.redeem(member, wheel.code)
    assert (shop.counts(), shop.available(member)) == before
    # a prize's quantity, without a budget, likewise; a draw with a losing slice still sells
    # while a prize is left
    one = shop.reward(kind="lottery", points=10, lottery={"prizes": [
        {**tv, "quantity": 1, "chance_ppm": 500_000}]})  # fmt: skip
    for _ in range(100):  # until it is won (a draw in two wins it)
        if shop.redeem(member, one.code).outcome["prize"] == "tv":
            break
    with pytest.raises(NotOnSale, match="sold out"):
        shop.redeem(member, one.code)
    assert_ledger_sound(db, shop.program_id)


def test_an_event_takes_registrations_until_it_starts(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    starts = clock(db).now() + timedelta(days=2)
    salon = shop.reward(kind="event", points=100, event={"starts_at": starts, "venue": "旗舰店"})
    shop.redeem(member, salon.code)
    clock(db).advance(timedelta(days=2))  # it starts
    before = (shop.counts(), shop.available(member))
    with pytest.raises(NotOnSale, match="the event started at") as closed:
        shop.redeem(member, salon.code)
    assert "报名已截止" in closed.value.message("zh")
    assert (shop.counts(), shop.available(member)) == before
    offer = db.run(lambda uow: rewards.what_can_i_get(uow, program_id=shop.program_id,
                                                      member_id=member))  # fmt: skip
    assert salon.code not in [a.reward.code for a in offer.now]


def test_a_reward_for_no_tier_is_refused(db: Database) -> None:
    shop = Shop.open(db)
    with pytest.raises(ValidationError, match="names no tier"):
        shop.reward(points=100, visible_tiers=[])


def test_a_donation_moves_points_to_the_charity_account_with_a_receipt(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="钻石")
    gift = shop.reward(kind="charity", points=100, max_quantity=50,
                       charity={"charity": "希望工程"})  # fmt: skip
    order = shop.redeem(member, gift.code, quantity=30)
    receipt = order.outcome["receipt"]
    assert (receipt["charity"], receipt["points"], receipt["value_fen"]) == ("希望工程", 3000, 3000)
    assert receipt["number"].startswith("JF-")
    reconciled = db.run(lambda uow: integrity.reconcile(uow, program_id=shop.program_id))
    assert reconciled.system_balances[SystemAccount.CHARITY.value] == 3000


def test_a_donation_of_points_and_cash_has_both_on_its_receipt(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    gift = shop.reward(kind="charity", points=1000, cash_fen=5000, max_quantity=2,
                       charity={"charity": "希望工程"})  # fmt: skip
    at_till = shop.redeem(member, gift.code, quantity=2, payment_ref="pos-7")
    receipt = at_till.outcome["receipt"]
    assert (receipt["points"], receipt["value_fen"], receipt["cash_fen"]) == (2000, 2000, 10000)
    assert receipt["payment_ref"] == "pos-7"
    in_app = shop.redeem(member, gift.code)  # its cash is paid afterwards
    paid = db.run(lambda uow: rewards.pay_order(uow, program_id=shop.program_id,
                                                order_id=in_app.id, payment_ref="wx-8",
                                                amount_fen=5000, actor="key:pay"))  # fmt: skip
    receipt = paid.outcome["receipt"]
    assert (receipt["cash_fen"], receipt["payment_ref"]) == (5000, "wx-8")
    points_only = shop.reward(kind="charity", points=100, charity={"charity": "希望工程"})
    receipt = shop.redeem(member, points_only.code).outcome["receipt"]
    assert "cash_fen" not in receipt and "payment_ref" not in receipt


def test_a_partner_exchange_1000_points_for_100_km(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    miles = shop.reward(kind="partner", points=1000, max_quantity=5,
                        partner={"partner": "东方航空", "unit": "公里", "units": 100})  # fmt: skip
    with pytest.raises(InvalidInput, match="account at 东方航空"):
        shop.redeem(member, miles.code)
    order = shop.redeem(member, miles.code, quantity=3, partner_account="MU-778899")
    assert order.points == 3000  # an exchange rate is not discounted by tier
    assert (order.outcome["units"], order.outcome["unit"]) == (300, "公里")
    reconciled = db.run(lambda uow: integrity.reconcile(uow, program_id=shop.program_id))
    assert reconciled.system_balances[SystemAccount.PARTNERS.value] == 3000


def test_a_partner_exchange_held_or_awaiting_payment_gives_the_units_of_its_redemption(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    miles = shop.reward(kind="partner", points=6000,  # above 钻石's 5,000: held
                        partner={"partner": "东方航空", "unit": "公里", "units": 600})  # fmt: skip
    held = shop.redeem(member, miles.code, partner_account="MU-1")
    assert (held.state, held.points) == ("held", 6000)
    # the operator halves the rate for new exchanges while this one waits
    edit_reward(db, shop, miles, partner={"partner": "东方航空", "unit": "公里", "units": 300})
    clock(db).advance(timedelta(hours=24))
    done = db.run(
        lambda uow: rewards.confirm_held(
            uow, program_id=shop.program_id, member_id=member, order_id=held.id, actor="m"
        )
    )
    assert (done.state, done.points, done.outcome["units"]) == ("delivered", 6000, 600)
    assert shop.redeem(member, miles.code, partner_account="MU-1").outcome["units"] == 300


def test_a_donation_held_for_its_cooling_off_goes_to_the_charity_the_member_chose(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    gift = shop.reward(kind="charity", points=6000, charity={"charity": "希望工程"})
    held = shop.redeem(member, gift.code)
    assert (held.state, held.points) == ("held", 6000)
    edit_reward(db, shop, gift, charity={"charity": "另一基金会"})
    clock(db).advance(timedelta(hours=24))
    done = db.run(
        lambda uow: rewards.confirm_held(
            uow, program_id=shop.program_id, member_id=member, order_id=held.id, actor="m"
        )
    )
    receipt = done.outcome["receipt"]
    assert (receipt["charity"], receipt["points"]) == ("希望工程", 6000)


def test_votes_are_tallied(db: Database) -> None:
    shop = Shop.open(db)
    voters = shop.member(1000, count=3)
    poll = shop.reward(kind="vote", points=10, vote={"options": ["红", "蓝"]})
    with pytest.raises(InvalidInput, match="红, 蓝"):
        shop.redeem(voters[0], poll.code, choice="绿")
    for member, choice in zip(voters, ["红", "蓝", "红"], strict=True):
        shop.redeem(member, poll.code, choice=choice)
    tally = db.run(lambda uow: rewards.vote_tally(uow, program_id=shop.program_id,
                                                  code=poll.code))  # fmt: skip
    assert tally == {"红": 2, "蓝": 1}


def test_what_can_i_get_dearest_first_then_nearest(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(1500, tier="银卡")
    cheap = shop.reward(points=500)  # 450
    mid = shop.reward(points=1500)  # 1,350
    near = shop.reward(points=1800)  # 1,620: 120 short
    far = shop.reward(points=5000)  # 4,500: 3,000 short
    shop.reward(points=100, stock=0)  # sold out: left out
    shop.reward(points=100, visible_tiers=["钻石"])  # not for this tier
    answer = db.run(lambda uow: rewards.what_can_i_get(uow, program_id=shop.program_id,
                                                       member_id=member))  # fmt: skip
    assert answer.available == 1500
    assert [a.reward.code for a in answer.now] == [mid.code, cheap.code]
    assert [(a.reward.code, a.short) for a in answer.within_reach] == [
        (near.code, 120), (far.code, 3000)
    ]  # fmt: skip


def test_restock_alert_at_safety_stock_clears_on_restock(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(10000, tier="金卡")
    cup = shop.reward(points=100, stock=3, safety_stock=1, max_quantity=2)
    shop.redeem(member, cup.code, quantity=2)
    alerts, more = db.run(lambda uow: rewards.open_alerts(uow, program_id=shop.program_id))
    assert [(a.reward, a.stock_left) for a in alerts] == [(cup.code, 1)]
    assert more is None
    db.run(lambda uow: rewards.restock(uow, program_id=shop.program_id, code=cup.code, add=10))
    assert db.run(lambda uow: rewards.open_alerts(uow, program_id=shop.program_id)) == ([], None)
    restocked = shop.get(cup.code)
    assert (restocked.stock_left, restocked.stock_total, restocked.sold) == (11, 13, 2)


def test_one_open_restock_alert_a_reward_raised_also_by_creation_and_edits(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(10000, tier="金卡")

    def alerts() -> list[tuple[str, int, int]]:
        found, _ = db.run(lambda uow: rewards.open_alerts(uow, program_id=shop.program_id))
        return [(a.reward, a.stock_left, a.safety_stock) for a in found]

    mug = shop.reward(points=100, stock=1, safety_stock=5, max_quantity=10)
    assert alerts() == [(mug.code, 1, 5)]  # created at or below its safety line
    db.run(lambda uow: rewards.restock(uow, program_id=shop.program_id, code=mug.code, add=10))
    assert alerts() == []
    order = shop.redeem(member, mug.code, quantity=6)  # 11 -> 5
    shop.move(order.id, "cancel")  # back to 11: the alert stays until restocked
    shop.redeem(member, mug.code, quantity=7)  # 11 -> 4: down across the line again
    assert alerts() == [(mug.code, 5, 5)]  # still one
    assert edit_reward(db, shop, mug, safety_stock=2).stock_left == 4
    assert alerts() == []  # the line moved below the stock
    edit_reward(db, shop, mug, safety_stock=4)
    assert alerts() == [(mug.code, 4, 4)]


def test_a_retired_reward_leaves_the_restock_alerts(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(10000, tier="金卡")
    kept, dropped = (shop.reward(points=100, stock=2, safety_stock=1) for _ in range(2))
    for reward in (kept, dropped):
        shop.redeem(member, reward.code)

    def alerted() -> list[str]:
        found, _ = db.run(lambda uow: rewards.open_alerts(uow, program_id=shop.program_id))
        return [a.reward for a in found]

    assert alerted() == [kept.code, dropped.code]
    db.run(lambda uow: rewards.set_state(uow, program_id=shop.program_id, code=kept.code,
                                         state="paused"))  # fmt: skip
    db.run(lambda uow: rewards.set_state(uow, program_id=shop.program_id, code=dropped.code,
                                         state="retired"))  # fmt: skip
    assert alerted() == [kept.code]  # a paused reward may come back: still to restock
    edit_reward(db, shop, dropped, safety_stock=5)  # an edit of it raises none again
    assert alerted() == [kept.code]


def test_a_redemption_twice_with_one_key_is_one_order(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    mug = shop.reward(points=100, stock=5)
    first = shop.redeem(member, mug.code, key="k1")
    again = shop.redeem(member, mug.code, key="k1")
    assert again.id == first.id and again.replayed
    assert shop.get(mug.code).stock_left == 4
    with pytest.raises(IdempotencyConflict):
        shop.redeem(member, mug.code, key="k1", quantity=1, payment_ref="other")


@pytest.mark.parametrize("tier", ["普通", "金卡"])  # its limits counted (lock first) or not
@pytest.mark.parametrize(
    "edit",
    [
        {"vote": {"options": ["蓝", "绿"]}},  # the option voted for is no longer offered
        {"cash_fen": 500},  # a cash part added: its order would now await the payment
    ],
)
def test_a_redemption_sent_again_after_its_reward_was_edited_answers_its_order(
    db: Database, tier: str, edit: dict[str, Any]
) -> None:
    """The key was seen: the order it made is the answer, whatever the reward's terms say
    now (before the member's lock or after it, a replay is not checked again)."""
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier=tier)
    poll = shop.reward(kind="vote", points=10, vote={"options": ["红", "蓝"]})
    first = shop.redeem(member, poll.code, key="k1", choice="红")
    edit_reward(db, shop, shop.get(poll.code), **edit)
    before = (shop.counts(), shop.available(member))
    again = shop.redeem(member, poll.code, key="k1", choice="红")
    assert again.id == first.id and again.replayed
    assert (shop.counts(), shop.available(member)) == before


@pytest.mark.parametrize("tier", ["普通", "金卡"])
def test_a_redemption_with_a_key_an_earning_used_is_a_conflict_even_if_refused(
    db: Database, tier: str
) -> None:
    """A key another posting made is a conflict, as it is when the redemption would pass;
    not the refusal the redemption would get with a fresh key."""
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier=tier)
    mug = shop.reward(points=100, stock=5)
    db.run(lambda uow: points.earn(uow, member_id=member, amount=10, key="used",
                                   expires_at=None))  # fmt: skip
    db.run(lambda uow: rewards.set_state(uow, program_id=shop.program_id, code=mug.code,
                                         state="paused"))  # fmt: skip
    before = (shop.counts(), shop.available(member))
    with pytest.raises(IdempotencyConflict):
        shop.redeem(member, mug.code, key="used")
    assert (shop.counts(), shop.available(member)) == before


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        ({"stock": 0}, OutOfStock, "has 0 left"),
        ({"state": "paused"}, NotOnSale, "paused"),
        ({"ended": True}, NotOnSale, "ended"),
        ({"visible_tiers": ["钻石"]}, TierNotAllowed, "钻石"),
        ({"points": 900, "limit_per_member": 1, "again": True}, LimitReached, "has 0 left"),
        ({"points": 1900}, InsufficientPoints, "needed"),
        ({"code": "missing"}, UnknownReward, "no reward"),
    ],
)
def test_bad_redemptions_are_refused_with_a_reason_and_change_nothing(
    db: Database, setup: dict[str, Any], error: type[JifenError], message: str
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(1000, tier="普通")
    fields: dict[str, Any] = {"points": setup.get("points", 100), "stock": setup.get("stock", 5)}
    if "visible_tiers" in setup:
        fields["visible_tiers"] = setup["visible_tiers"]
    if "limit_per_member" in setup:
        fields["limit_per_member"] = setup["limit_per_member"]
    if setup.get("ended"):
        fields["sales_start"] = clock(db).now() - timedelta(days=10)
        fields["sales_end"] = clock(db).now() - timedelta(days=1)
    reward = shop.reward(**fields)
    if "state" in setup:
        db.run(lambda uow: rewards.set_state(uow, program_id=shop.program_id, code=reward.code,
                                             state=setup["state"]))  # fmt: skip
    if setup.get("again"):
        shop.redeem(member, reward.code)
    before = (shop.counts(), shop.available(member), shop.get(reward.code).stock_left)
    with pytest.raises(error, match=message) as refused:
        shop.redeem(member, setup.get("code", reward.code))
    assert refused.value.message("zh") != refused.value.message("en")
    assert (shop.counts(), shop.available(member), shop.get(reward.code).stock_left) == before


def test_a_retired_reward_cannot_return_and_a_kind_cannot_change(db: Database) -> None:
    shop = Shop.open(db)
    mug = shop.reward(points=100)

    def set_state(state: str) -> Any:
        return db.run(
            lambda uow: rewards.set_state(
                uow, program_id=shop.program_id, code=mug.code, state=state
            )
        )

    set_state("retired")
    with pytest.raises(StateConflict, match="retired"):
        set_state("active")
    body = rewards.RewardDef.model_validate({**mug.model_dump(include=set(
        rewards.RewardDef.model_fields)), "kind": "virtual"})  # fmt: skip
    with pytest.raises(InvalidInput, match="cannot become virtual"):
        db.run(lambda uow: rewards.update_reward(uow, program_id=shop.program_id,
                                                 code=mug.code, body=body))  # fmt: skip


def test_cancelled_points_go_back_even_to_lots_that_expired_meanwhile(db: Database) -> None:
    """A refund restores the lots a redemption took; a lot past its date comes back
    overdue and the expiry run takes it, as the ledger does for any refund."""
    shop = Shop.open(db)
    (member,) = shop.member(0, tier="金卡")
    db.run(lambda uow: points.earn(uow, member_id=member, amount=1000, key="short",
                                   expires_at=uow.clock.now() + timedelta(days=5)))  # fmt: skip
    mug = shop.reward(points=1000, stock=1)
    order = shop.redeem(member, mug.code)
    clock(db).advance(timedelta(days=6))
    shop.move(order.id, "cancel")
    summary = db.run(lambda uow: points.balance(uow, member_id=member))
    assert (summary.available, summary.overdue) == (0, 1000)
    remaining = db.run(lambda uow: uow.conn.execute(
        select(lots.c.remaining).join(accounts, accounts.c.id == lots.c.account_id)
        .where(accounts.c.member_id == member)).scalars().all())  # fmt: skip
    assert remaining == [1000]
    assert_ledger_sound(db, shop.program_id)


def test_a_hold_whose_lots_lapsed_meanwhile_still_pays_with_its_own_points(db: Database) -> None:
    """The points were valid when the member redeemed; the cooling-off is the programme's
    wait, not the member's: confirmed after their lots' date, the held points pay, and the
    member's other points are left alone (they used to pay instead, while the held ones
    came back overdue and lapsed at the next expiry run)."""
    shop = Shop.open(db)
    (member,) = shop.member(0, tier="钻石")
    db.run(lambda uow: points.earn(uow, member_id=member, amount=8000, key="short",
                                   expires_at=uow.clock.now() + timedelta(hours=12)))  # fmt: skip
    db.run(lambda uow: points.earn(uow, member_id=member, amount=9000, key="long",
                                   expires_at=uow.clock.now() + timedelta(days=400)))  # fmt: skip
    watch = shop.reward(points=10000, stock=1)  # 7,000 for 钻石: held 24 hours
    order = shop.redeem(member, watch.code)
    clock(db).advance(timedelta(hours=25))
    db.run(lambda uow: points.expire_due(uow, program_id=shop.program_id))
    confirmed = db.run(
        lambda uow: rewards.confirm_held(
            uow, program_id=shop.program_id, member_id=member, order_id=order.id, actor="m"
        )
    )
    assert confirmed.state in ("created", "confirmed")
    db.run(lambda uow: points.expire_due(uow, program_id=shop.program_id))
    summary = db.run(lambda uow: points.balance(uow, member_id=member), read_only=True)
    # 1,000 of the short lot were not held and lapsed; the long lot is whole
    assert (summary.available, summary.frozen, summary.overdue) == (9000, 0, 0)
    assert_ledger_sound(db, shop.program_id)


def test_the_tier_matrix_gives_early_access_where_the_reward_names_none(db: Database) -> None:
    from jifen.programs import service as programs
    from jifen.tiers.schemas import TierScheme
    from tests.tiers.scheme import scheme_json

    shop = Shop.open(db)

    def matrix(uow: Any) -> None:
        settings = programs.get_settings(uow, program_id=shop.program_id)
        benefits = {"银卡": {"early_access_hours": 6}, "金卡": {"early_access_hours": 48}}
        tiers = TierScheme.model_validate(scheme_json(benefits=benefits))
        programs.set_settings(
            uow,
            program_id=shop.program_id,
            settings=settings.model_copy(update={"tier_scheme": tiers}),
        )

    db.run(matrix)
    (silver,) = shop.member(5000, tier="银卡")
    (gold,) = shop.member(5000, tier="金卡")
    (plain,) = shop.member(5000, tier="普通")
    start = clock(db).now() + timedelta(hours=12)
    drop = shop.reward(points=100, sales_start=start)  # names no early access: the matrix's
    own = shop.reward(points=100, sales_start=start, early_access={"金卡": 1})  # its own for 金卡
    shop.redeem(gold, drop.code)  # 48 hours early
    with pytest.raises(NotOnSale, match="opens at"):
        shop.redeem(gold, own.code)
    with pytest.raises(NotOnSale, match="opens at"):
        shop.redeem(silver, drop.code)
    clock(db).advance(timedelta(hours=6))
    shop.redeem(silver, drop.code)  # 6 hours early
    shop.redeem(silver, own.code)  # the reward names only 金卡: 银卡 keeps the matrix's
    with pytest.raises(NotOnSale, match="opens at"):
        shop.redeem(plain, drop.code)
    clock(db).advance(timedelta(hours=6))
    shop.redeem(plain, drop.code)


def test_a_reward_read_and_saved_back_keeps_following_the_tier_matrix(db: Database) -> None:
    """A reward reads back the early access it names itself: an operator's edit of what it
    read (its name, say) does not copy the tier matrix's hours into it, so a later change of
    the matrix still opens it."""
    from jifen.programs import service as programs
    from jifen.tiers.schemas import TierScheme
    from tests.tiers.scheme import scheme_json

    shop = Shop.open(db)

    def matrix(gold_hours: int) -> None:
        def change(uow: Any) -> None:
            settings = programs.get_settings(uow, program_id=shop.program_id)
            benefits = {"金卡": {"early_access_hours": gold_hours}}
            tiers = TierScheme.model_validate(scheme_json(benefits=benefits))
            changed = settings.model_copy(update={"tier_scheme": tiers})
            programs.set_settings(uow, program_id=shop.program_id, settings=changed)

        db.run(change)

    matrix(6)
    (gold,) = shop.member(5000, tier="金卡")
    start = clock(db).now() + timedelta(hours=24)
    drop = shop.reward(points=100, sales_start=start, early_access={"钻石": 30})
    assert drop.early_access == {"钻石": 30}  # as the operator wrote it
    edited = edit_reward(db, shop, drop, name={"zh": "新品", "en": "New"})
    assert edited.early_access == {"钻石": 30}
    matrix(48)
    assert shop.redeem(gold, drop.code).state == "created"  # 48 hours early, as the matrix says


def test_terms_the_same_for_every_tier_are_said_to_be_for_every_member(db: Database) -> None:
    """A programme whose redemption terms name no tier gives every member its default: a
    member of a tier is not told it has none, and its quote and its order say the same."""
    shop = Shop.open(db, tiers={}, default={"discount_pct": 95, "per_month": 1,
                                            "max_points": 1000})  # fmt: skip
    (silver,) = shop.member(100_000, tier="银卡")
    (plain,) = shop.member(100_000)
    mug = shop.reward(points=1000)
    for member in (silver, plain):
        quoted = db.run(
            lambda uow, m=member: rewards.quote(
                uow, program_id=shop.program_id, member_id=m, code=mug.code
            )
        )
        order = shop.redeem(member, mug.code)
        for steps in (quoted.steps, order.price):
            assert (steps[-1].what, steps[-1].what_zh) == (
                "every member: pays 95 %",
                "所有会员:按 95% 计价",
            )
        with pytest.raises(LimitReached) as monthly:
            shop.redeem(member, mug.code)
        assert monthly.value.message("en").startswith("A member may redeem 1 times a month")
        assert monthly.value.message("zh").startswith("会员每月可兑换 1 次")
    tv = shop.reward(points=2000)
    with pytest.raises(LimitReached) as dear:
        shop.redeem(silver, tv.code)
    assert "no tier" not in dear.value.message("en") and "无等级" not in dear.value.message("zh")
    assert dear.value.message("en").startswith("One redemption may cost at most 1000 points")
    assert dear.value.message("zh").startswith("单次兑换最多 1000 积分")
