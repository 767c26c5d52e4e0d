"""Points + cash redeemed before the cash is paid, on both backends: the order awaits its
payment with the points frozen and the stock taken; the payment system's confirmation moves
it on (fulfilled, or held for a cooling-off), once; an order not paid in time lapses by the
scheduled job; a payment that cannot be taken is refused with the amount to refund, and
changes nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError
from sqlalchemy import update

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.errors import NotOnSale, PaymentAmountMismatch, PaymentUsed, StateConflict
from jifen.jobs import service as jobs
from jifen.points import service as points
from jifen.points.schemas import BalanceSummary
from jifen.rewards import service as rewards
from jifen.rewards.models import reward_orders
from jifen.rewards.schemas import OrderRead, RedemptionPolicy
from tests.factories import assert_ledger_sound
from tests.rewards.shop import Shop

SHANGHAI = ZoneInfo("Asia/Shanghai")
"""The time zone of the shop's programme, in which its refusals name their times."""

KETTLE: dict[str, Any] = {"points": 1000, "cash_fen": 9000, "stock": 5}
"""90 yuan + 1,000 points (800 for 金卡), goods shipped."""


def clock(db: Database) -> ManualClock:
    assert isinstance(db.clock, ManualClock)
    return db.clock


def balance(db: Database, member_id: int) -> BalanceSummary:
    return db.run(lambda uow: points.balance(uow, member_id=member_id), read_only=True)


def pay(shop: Shop, order_id: int, payment_ref: str, amount_fen: int = 9000) -> OrderRead:
    """The payment system confirms the payment of the order's cash part."""
    return shop.db.run(
        lambda uow: rewards.pay_order(
            uow, program_id=shop.program_id, order_id=order_id, payment_ref=payment_ref,
            amount_fen=amount_fen, actor="key:pay",
        )
    )  # fmt: skip


def order_of(shop: Shop, order_id: int) -> OrderRead:
    return shop.db.run(
        lambda uow: rewards.get_order(uow, program_id=shop.program_id, order_id=order_id),
        read_only=True,
    )


def test_points_plus_cash_without_its_payment_awaits_it_with_points_frozen_and_stock_taken(
    db: Database,
) -> None:
    # given a member of 金卡 with 5,000 points and a kettle of 90 yuan + 1,000 points
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    kettle = shop.reward(**KETTLE)
    # when the member redeems it in its app, naming no payment
    order = shop.redeem(member, kettle.code)
    # then the order awaits 9,000 fen by 30 minutes from now, its points frozen, one unit
    # of stock taken, nothing fulfilled yet
    now = clock(db).now()
    assert (order.state, order.points, order.cash_fen, order.payment_ref) == (
        "awaiting_payment", 800, 9000, None
    )  # fmt: skip
    assert order.pay_by == now + timedelta(minutes=30)
    assert order.hold_posting_id is not None and order.spend_posting_id is None
    assert order.voucher is None and order.hold_until is None
    assert order.steps[0].state == "awaiting_payment" and "9000 fen" in order.steps[0].note
    summary = balance(db, member)
    assert (summary.available, summary.frozen) == (4200, 800)
    assert shop.get(kettle.code).stock_left == 4
    assert order_of(shop, order.id) == order
    unfinished = db.run(lambda uow: rewards.unfinished_orders(
        uow, program_id=shop.program_id, member_id=member), read_only=True)  # fmt: skip
    assert unfinished == [order.id]  # the member's account cannot be closed meanwhile
    assert_ledger_sound(db, shop.program_id)


def test_the_payment_completes_the_order_once_and_a_replay_answers_it(db: Database) -> None:
    # given an order awaiting its payment, for goods collected with a voucher
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    kettle = shop.reward(**KETTLE, pickup=True)
    order = shop.redeem(member, kettle.code)
    assert order.state == "awaiting_payment"
    # when the payment system confirms its payment
    paid = pay(shop, order.id, "wx-1")
    # then the frozen points are released and debited, and the voucher issued
    assert (paid.state, paid.payment_ref, paid.pay_by) == ("created", "wx-1", order.pay_by)
    assert paid.spend_posting_id is not None and paid.voucher is not None
    assert [step.state for step in paid.steps] == ["awaiting_payment", "created"]
    assert "wx-1" in paid.steps[1].note
    summary = balance(db, member)
    assert (summary.balance, summary.available, summary.frozen) == (4200, 4200, 0)
    assert shop.get(kettle.code).stock_left == 4  # taken once, by the redemption
    # and the same payment sent again answers the order as it is, writing nothing
    before = shop.counts()
    again = pay(shop, order.id, "wx-1")
    assert again.replayed and again.model_copy(update={"replayed": False}) == order_of(
        shop, order.id
    )
    assert shop.counts() == before and balance(db, member) == summary
    assert_ledger_sound(db, shop.program_id)


def test_a_paid_order_waits_for_the_members_cooling_off_where_its_tier_has_one(
    db: Database,
) -> None:
    # given a member of 钻石 (cooling-off above 5,000 points) redeeming 7,000 + 90 yuan
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    watch = shop.reward(points=10000, cash_fen=9000, stock=3)
    order = shop.redeem(member, watch.code)
    assert order.state == "awaiting_payment" and order.hold_until is None
    # when it is paid
    clock(db).advance(timedelta(minutes=10))
    held = pay(shop, order.id, "wx-7")
    # then it is held for the member's confirmation, its points still frozen
    assert (held.state, held.payment_ref) == ("held", "wx-7")
    assert held.hold_until == clock(db).now() + timedelta(hours=24)
    assert held.hold_posting_id == order.hold_posting_id and held.spend_posting_id is None
    assert (balance(db, member).available, balance(db, member).frozen) == (13000, 7000)
    # and the member confirms it after the cooling-off, as any held redemption
    clock(db).advance(timedelta(hours=24))
    done = db.run(lambda uow: rewards.confirm_held(
        uow, program_id=shop.program_id, member_id=member, order_id=order.id, actor="m",
    ))  # fmt: skip
    assert (done.state, done.payment_ref) == ("created", "wx-7")
    assert (balance(db, member).balance, balance(db, member).frozen) == (13000, 0)
    # cancelled now, its cash is to be refunded
    cancelled = shop.move(order.id, "cancel")
    assert cancelled.outcome["cash_refund_due_fen"] == 9000
    assert_ledger_sound(db, shop.program_id)


def test_a_payment_of_another_amount_or_of_a_used_reference_is_refused_and_changes_nothing(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    kettle = shop.reward(**KETTLE)
    at_till = shop.redeem(member, kettle.code, payment_ref="pos-1")  # paid at the till
    order = shop.redeem(member, kettle.code)
    before = (shop.counts(), balance(db, member), shop.get(kettle.code).stock_left)
    with pytest.raises(PaymentAmountMismatch) as wrong:
        pay(shop, order.id, "wx-2", amount_fen=900)
    assert f"Order {order.id} is due 9000 fen in cash; payment 'wx-2' says 900 fen" in str(
        wrong.value
    )
    assert "应付现金 9000 分" in wrong.value.message("zh") and "900 分" in wrong.value.message("zh")
    with pytest.raises(PaymentUsed, match=f"already paid for order {at_till.id}"):
        pay(shop, order.id, "pos-1")
    assert (shop.counts(), balance(db, member), shop.get(kettle.code).stock_left) == before
    assert order_of(shop, order.id) == order
    # the payment of the right amount, with its own reference, is then taken
    assert pay(shop, order.id, "wx-2").state == "created"
    # and that reference then pays for no other order
    other = shop.redeem(member, kettle.code)
    with pytest.raises(PaymentUsed, match=f"already paid for order {order.id}"):
        pay(shop, other.id, "wx-2")
    assert_ledger_sound(db, shop.program_id)


def test_a_payment_for_an_order_not_awaiting_one_is_refused_with_the_amount_to_refund(
    db: Database,
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    kettle = shop.reward(**KETTLE)
    mug = shop.reward(points=100)
    # the member cancels its own order before paying: the points and the stock come back,
    # and nothing is to be refunded (nothing was paid)
    order = shop.redeem(member, kettle.code)
    cancelled = db.run(lambda uow: rewards.move(
        uow, program_id=shop.program_id, order_id=order.id, action="cancel",
        actor=f"member:{member}", member_id=member))  # fmt: skip
    assert cancelled.state == "cancelled" and "cash_refund_due_fen" not in cancelled.outcome
    assert (balance(db, member).available, balance(db, member).frozen) == (5000, 0)
    assert shop.get(kettle.code).stock_left == 5
    paid = shop.redeem(member, kettle.code)
    pay(shop, paid.id, "wx-1")
    plain = shop.redeem(member, mug.code)
    before = (shop.counts(), balance(db, member))
    due = order.pay_by.astimezone(SHANGHAI).isoformat() if order.pay_by else ""
    refusals = [
        (order.id, "wx-9", f"was cancelled before it was paid (its payment was due by {due})"),
        (paid.id, "wx-9", "is already paid, by payment 'wx-1'"),
        (plain.id, "wx-9", "is created, not awaiting payment"),
    ]  # fmt: skip
    for order_id, ref, why in refusals:
        with pytest.raises(StateConflict) as refused:
            pay(shop, order_id, ref)
        assert why in str(refused.value)
        assert "Refund payment 'wx-9' of 9000 fen." in str(refused.value)
        assert "请退还支付 'wx-9' 的 9000 分" in refused.value.message("zh")
    assert (shop.counts(), balance(db, member)) == before
    # staff cancel one awaiting payment too
    other = shop.redeem(member, kettle.code)
    assert shop.move(other.id, "cancel").state == "cancelled"
    assert_ledger_sound(db, shop.program_id)


def test_an_order_not_paid_in_time_lapses_by_the_job_once(db: Database) -> None:
    # given two orders awaiting payment (the programme gives 10 minutes to pay)
    shop = Shop.open(db, payment_minutes=10)
    alice, bob = shop.member(5000, tier="金卡", count=2)
    kettle = shop.reward(**KETTLE)
    late = shop.redeem(alice, kettle.code)
    lapsing = shop.redeem(bob, kettle.code)
    assert late.pay_by == clock(db).now() + timedelta(minutes=10)
    # when 11 minutes pass: a payment arriving before the job ran is still taken
    clock(db).advance(timedelta(minutes=11))
    assert pay(shop, late.id, "wx-late").state == "created"
    # a dry run says what the job would cancel, and changes nothing
    before = (shop.counts(), balance(db, bob), shop.get(kettle.code).stock_left)
    dry = jobs.run(db, "rewards.lapse_payments", program_id=shop.program_id, dry_run=True)
    assert dry.figures == {"cancelled": 1}
    service_dry = db.run(
        lambda uow: rewards.lapse_payments(uow, program_id=shop.program_id, dry_run=True)
    )
    assert (service_dry.dry_run, service_dry.order_ids) == (True, [lapsing.id])
    assert (shop.counts(), balance(db, bob), shop.get(kettle.code).stock_left) == before
    assert order_of(shop, lapsing.id).state == "awaiting_payment"
    # then the job cancels the one not paid: its points are released, its stock returns
    run = jobs.run(db, "rewards.lapse_payments", program_id=shop.program_id)
    assert (run.state, run.figures) == ("done", {"cancelled": 1})
    lapsed = order_of(shop, lapsing.id)
    assert (lapsed.state, lapsed.steps[-1].by) == ("cancelled", "system")
    assert "not paid in time" in lapsed.steps[-1].note
    assert "cash_refund_due_fen" not in lapsed.outcome
    assert (balance(db, bob).available, balance(db, bob).frozen) == (5000, 0)
    assert shop.get(kettle.code).stock_left == 4  # the paid one's unit stays taken
    # run again for the same moment, or later, it does nothing
    after = (shop.counts(), balance(db, bob), shop.get(kettle.code).stock_left)
    again = jobs.run(db, "rewards.lapse_payments", program_id=shop.program_id)
    assert again.state == "already-done"
    clock(db).advance(timedelta(minutes=5))
    later = jobs.run(db, "rewards.lapse_payments", program_id=shop.program_id)
    assert (later.state, later.figures) == ("done", {"cancelled": 0})
    assert (shop.counts(), balance(db, bob), shop.get(kettle.code).stock_left) == after
    # and its payment, arriving now, is refused: it is to be refunded
    with pytest.raises(StateConflict, match="Refund payment 'wx-bob' of 9000 fen"):
        pay(shop, lapsing.id, "wx-bob")
    assert order_of(shop, late.id).state == "created"  # the paid one is left alone
    assert_ledger_sound(db, shop.program_id)


def test_the_time_to_pay_is_part_of_the_redemption_policy() -> None:
    assert RedemptionPolicy().payment_minutes == 30
    assert RedemptionPolicy(payment_minutes=1440).payment_minutes == 1440
    for wrong in (0, 1441):
        with pytest.raises(ValidationError, match="payment_minutes"):
            RedemptionPolicy(payment_minutes=wrong)


def test_the_command_lapses_orders_not_paid_in_time_after_a_dry_run(db: Database) -> None:
    """``jifen rewards lapse-payments`` runs the sweep at the real time: an order made at
    the tests' clock (early 2026) is long past its time to pay."""
    from tests.test_cli import jifen

    shop = Shop.open(db)
    (member,) = shop.member(5000)
    kettle = shop.reward(**KETTLE)
    order = shop.redeem(member, kettle.code)
    code, said = jifen(db, "rewards", "lapse-payments", "--program", shop.code,
                       "--dry-run")  # fmt: skip
    assert (code, said.strip()) == (0, "1 redemptions not paid in time would be cancelled")
    assert order_of(shop, order.id).state == "awaiting_payment"
    code, said = jifen(db, "rewards", "lapse-payments", "--program", shop.code)
    assert (code, said.strip()) == (0, "1 redemptions not paid in time cancelled")
    assert order_of(shop, order.id).state == "cancelled"
    assert (balance(db, member).frozen, shop.get(kettle.code).stock_left) == (0, 5)
    code, said = jifen(db, "rewards", "lapse-payments", "--program", shop.code)
    assert (code, said.strip()) == (0, "0 redemptions not paid in time cancelled")
    assert_ledger_sound(db, shop.program_id)


def test_a_dry_run_counts_every_order_a_run_would_cancel_beyond_one_chunk(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jifen import cli
    from tests.test_cli import jifen

    # given three orders past their time to pay, and a command that cancels one a chunk
    jobs.jobs()  # the job catalogue, loaded first, keeps the sweep as it is
    sweep = rewards.lapse_payments
    monkeypatch.setattr(cli, "SWEEP_CHUNK", 1)
    monkeypatch.setattr(rewards, "lapse_payments",
                        lambda uow, **given: sweep(uow, **{**given, "limit": 1}))  # fmt: skip
    shop = Shop.open(db)
    kettle = shop.reward(**KETTLE)
    orders = [shop.redeem(member, kettle.code) for member in shop.member(5000, count=3)]
    # when it is run dry, then for real
    code, said = jifen(db, "rewards", "lapse-payments", "--program", shop.code, "--dry-run")
    # then the dry run counts all three, changing nothing, as the run then cancels
    assert (code, said.strip()) == (0, "3 redemptions not paid in time would be cancelled")
    assert {order_of(shop, order.id).state for order in orders} == {"awaiting_payment"}
    code, said = jifen(db, "rewards", "lapse-payments", "--program", shop.code)
    assert (code, said.strip()) == (0, "3 redemptions not paid in time cancelled")
    assert_ledger_sound(db, shop.program_id)


@pytest.mark.parametrize("paid_at_till", [True, False])
def test_points_whose_lots_lapse_while_the_order_awaits_payment_still_pay_for_it(
    db: Database, paid_at_till: bool
) -> None:
    """Paid later, the order costs the member what it costs paid at the till: the frozen
    points pay for it even where their lots lapse before the payment comes, and the
    member's later points stay whole."""
    # given a member with 1,000 points lapsing in 20 minutes and 1,000 in 400 days
    shop = Shop.open(db)
    (member,) = shop.member(0)
    for key, lasts in (("soon", timedelta(minutes=20)), ("late", timedelta(days=400))):
        db.run(lambda uow, k=key, t=lasts: points.earn(
            uow, member_id=member, amount=1000, key=k, expires_at=uow.clock.now() + t))  # fmt: skip
    kettle = shop.reward(**KETTLE)
    # when it redeems the kettle (paid at the till, or in its app and paid 25 minutes
    # later, after an expiry run)
    if paid_at_till:
        order = shop.redeem(member, kettle.code, payment_ref=f"pos-{member}")
    else:
        order = shop.redeem(member, kettle.code)
    clock(db).advance(timedelta(minutes=25))
    db.run(lambda uow: points.expire_due(uow, program_id=shop.program_id))
    if not paid_at_till:
        assert pay(shop, order.id, f"wx-{member}").state == "created"
    db.run(lambda uow: points.expire_due(uow, program_id=shop.program_id))
    # then the member keeps its 1,000 later points either way
    summary = balance(db, member)
    assert (summary.available, summary.frozen, summary.overdue) == (1000, 0, 0)
    assert_ledger_sound(db, shop.program_id)


def test_a_payment_for_a_member_frozen_since_it_redeemed_is_refused_with_the_refund(
    db: Database,
) -> None:
    from jifen.members import service as members

    shop = Shop.open(db)
    (member,) = shop.member(5000)
    order = shop.redeem(member, shop.reward(**KETTLE).code)
    db.run(lambda uow: members.change_state(
        uow, program_id=shop.program_id, member_id=member, state="frozen"))  # fmt: skip
    before = shop.counts()
    with pytest.raises(StateConflict) as refused:
        pay(shop, order.id, "wx-frozen")
    said = str(refused.value)
    assert f"Member {member} is frozen" in said and "refund payment 'wx-frozen' of 9000" in said
    assert "请退还支付 'wx-frozen' 的 9000 分" in refused.value.message("zh")
    assert shop.counts() == before
    assert order_of(shop, order.id).state == "awaiting_payment"


def test_a_lapse_run_goes_on_past_a_chunk_whose_order_was_paid_before_the_lock(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk that found its full size of lapsed orders, one of which was paid between the
    search and the members' locks, cancels fewer than it found: the run is not over for
    that, and the next chunk takes the orders after them."""
    shop = Shop.open(db)
    members_ = shop.member(5000, count=3)
    kettle = shop.reward(**KETTLE)
    orders = [shop.redeem(member, kettle.code) for member in members_]
    clock(db).advance(timedelta(minutes=31))
    lock_members = rewards._lock_members
    paid: list[int] = []

    def paid_meanwhile(uow: Any, member_ids: set[int]) -> None:
        if not paid:  # the payment system's word lands between the search and the lock
            paid.append(orders[0].id)
            uow.conn.execute(
                update(reward_orders)
                .where(reward_orders.c.id == orders[0].id)
                .values(state="held", payment_ref="wx-meanwhile", hold_until=clock(db).now())
            )
        lock_members(uow, member_ids)

    monkeypatch.setattr(rewards, "_lock_members", paid_meanwhile)
    run = jobs.run(db, "rewards.lapse_payments", program_id=shop.program_id, size=2)
    assert run.state == "done" and run.figures == {"cancelled": 2}
    states = [order_of(shop, order.id).state for order in orders]
    assert states == ["held", "cancelled", "cancelled"]


@pytest.mark.parametrize("tier", [None, "钻石"])
def test_a_payment_after_the_event_started_is_refused_with_the_refund_and_changes_nothing(
    db: Database, tier: str | None
) -> None:
    """A registration awaiting its payment, paid after the event started, is refused as its
    redemption now would be, whether it would be completed or held for a cooling-off: the
    payment is to be refunded, nothing is recorded, and the order lapses as one unpaid."""
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier=tier)
    starts = clock(db).now() + timedelta(minutes=20)
    points_ = 8000 if tier else 1000  # 5,600 for 钻石: held for a cooling-off once paid
    talk = shop.reward(kind="event", points=points_, cash_fen=1000, event={"starts_at": starts})
    order = shop.redeem(member, talk.code)
    assert order.state == "awaiting_payment"
    clock(db).advance(timedelta(minutes=25))
    before = (shop.counts(), balance(db, member))
    with pytest.raises(NotOnSale, match="the event started") as refused:
        pay(shop, order.id, "wx-late", 1000)
    said = str(refused.value)
    assert "refund payment 'wx-late' of 1000 fen" in said, said
    assert f"lapses at {order.pay_by.astimezone(SHANGHAI).isoformat()}" in said  # type: ignore[union-attr]
    assert "请退还支付 'wx-late' 的 1000 分" in refused.value.message("zh")
    assert (shop.counts(), balance(db, member)) == before
    assert order_of(shop, order.id).state == "awaiting_payment"
    clock(db).advance(timedelta(minutes=6))  # past its pay_by
    run = jobs.run(db, "rewards.lapse_payments", program_id=shop.program_id)
    assert run.figures == {"cancelled": 1}
    lapsed = order_of(shop, order.id)
    assert lapsed.state == "cancelled" and "cash_refund_due_fen" not in lapsed.outcome
    assert (balance(db, member).available, balance(db, member).frozen) == (20000, 0)
    assert_ledger_sound(db, shop.program_id)


def test_a_paid_registration_held_past_the_start_of_its_event_is_refused_and_its_cash_is_due(
    db: Database,
) -> None:
    """Paid in time but held for the cooling-off until after the event started: its
    confirmation is refused (nothing spent, the cash still to be refunded), and its cancel
    gives the points back and says the cash is due."""
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    starts = clock(db).now() + timedelta(hours=12)
    gala = shop.reward(kind="event", points=8000, cash_fen=1000, event={"starts_at": starts})
    order = shop.redeem(member, gala.code)
    assert pay(shop, order.id, "wx-gala", 1000).state == "held"  # 5,600 for 钻石
    clock(db).advance(timedelta(hours=25))
    before = (shop.counts(), balance(db, member))
    with pytest.raises(NotOnSale, match="the event started") as refused:
        db.run(
            lambda uow: rewards.confirm_held(
                uow, program_id=shop.program_id, member_id=member, order_id=order.id, actor="m"
            )
        )
    assert "Its cash part (1000 fen) is due back then." in str(refused.value)
    assert (shop.counts(), balance(db, member)) == before
    cancelled = shop.move(order.id, "cancel")
    assert cancelled.outcome["cash_refund_due_fen"] == 1000
    assert (balance(db, member).available, balance(db, member).frozen) == (20000, 0)
    assert_ledger_sound(db, shop.program_id)
