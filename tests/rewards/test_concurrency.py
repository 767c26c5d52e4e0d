"""Races on PostgreSQL: many members after little stock, one member after its own balance,
one voucher at two tills. SQLite serialises every writer, so it cannot show a race."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy import func, select

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.errors import (
    DuplicateReference,
    InsufficientPoints,
    LimitReached,
    NotOnSale,
    OutOfStock,
    StateConflict,
    VoucherNotUsable,
)
from jifen.jobs import service as jobs_service
from jifen.points import service as points_service
from jifen.points.models import accounts, lines
from jifen.rewards import service as rewards
from jifen.rewards.models import reward_orders
from jifen.rewards.schemas import RedemptionCreate, RewardCreate, RewardDef
from tests.factories import assert_ledger_sound
from tests.points.test_at_once_races import while_held
from tests.points.test_concurrency import run_together
from tests.rewards.shop import Shop


def test_64_members_race_for_100_in_stock_and_exactly_100_orders_are_made(pg: Database) -> None:
    shop = Shop.open(pg)
    members = shop.member(100_000, tier="金卡", count=64)
    scarce = shop.reward(points=1000, stock=100)

    def buy_until_gone(i: int) -> int:
        bought = 0
        while True:
            try:
                shop.redeem(members[i], scarce.code, key=f"{i}-{uuid.uuid4().hex}")
            except OutOfStock:
                return bought
            bought += 1

    bought = run_together(64, buy_until_gone)
    assert all(isinstance(b, int) for b in bought), [b for b in bought if not isinstance(b, int)]
    assert sum(bought) == 100
    after = shop.get(scarce.code)
    assert (after.stock_left, after.sold) == (0, 100)
    orders = pg.run(lambda uow: uow.conn.execute(
        select(func.count(), func.sum(reward_orders.c.points))
        .where(reward_orders.c.reward_id == scarce.id)).one())  # fmt: skip
    spent = pg.run(lambda uow: uow.conn.execute(
        select(func.sum(accounts.c.balance))
        .where(accounts.c.member_id.in_(members))).scalar_one())  # fmt: skip
    assert orders[0] == 100
    assert spent == 64 * 100_000 - orders[1]  # every point of every order, and no other
    assert_ledger_sound(pg, shop.program_id)


def test_one_payment_sent_for_8_redemptions_at_once_makes_one_order(pg: Database) -> None:
    shop = Shop.open(pg)
    members = shop.member(10_000, tier="金卡", count=8)
    kettle = shop.reward(points=1000, cash_fen=9000)
    results = run_together(8, lambda i: shop.redeem(members[i], kettle.code, payment_ref="p"))
    outcome = Counter(type(r).__name__ for r in results)
    assert outcome == {"OrderRead": 1, "PaymentUsed": 7}, results
    assert sum(shop.available(m) for m in members) == 8 * 10_000 - 800
    assert_ledger_sound(pg, shop.program_id)


def test_20_redemptions_by_one_member_only_the_ones_that_fit_succeed(pg: Database) -> None:
    shop = Shop.open(pg)
    (member,) = shop.member(10_000, tier="金卡")
    big = shop.reward(points=7500)  # 6,000 for 金卡: most of the balance
    results = run_together(20, lambda i: shop.redeem(member, big.code, key=f"k{i}"))
    outcome = Counter(type(r).__name__ for r in results)
    assert outcome == {"OrderRead": 1, "InsufficientPoints": 19}
    assert all(isinstance(r, InsufficientPoints) for r in results if not hasattr(r, "points"))
    assert shop.available(member) == 4000
    assert_ledger_sound(pg, shop.program_id)


def test_monthly_limit_holds_under_concurrency(pg: Database) -> None:
    shop = Shop.open(pg)
    (member,) = shop.member(10_000, tier="普通")  # 3 redemptions a month
    small = shop.reward(points=100)
    results = run_together(20, lambda i: shop.redeem(member, small.code, key=f"k{i}"))
    assert sum(1 for r in results if isinstance(r, LimitReached)) == 17
    assert shop.available(member) == 10_000 - 300


def test_a_voucher_used_at_two_tills_at_once_is_accepted_once(pg: Database) -> None:
    shop = Shop.open(pg)
    (member,) = shop.member(5000, tier="金卡")
    wash = shop.reward(kind="service", points=100)
    code = shop.redeem(member, wash.code).voucher.code  # type: ignore[union-attr]
    for attempt in range(5):  # several rounds: a race that is lost once in a while shows
        fresh = shop.redeem(member, wash.code, key=f"round-{attempt}")
        assert fresh.voucher is not None
        results = run_together(
            8,
            lambda i, c=fresh.voucher.code: pg.run(lambda uow: rewards.use_voucher(
                uow, program_id=shop.program_id, code=c, store=f"till-{i}", actor="cashier")),
        )  # fmt: skip
        accepted = [r for r in results if not isinstance(r, Exception)]
        assert len(accepted) == 1
        assert all(isinstance(r, VoucherNotUsable) for r in results if r not in accepted)
    assert code


def test_the_ledger_total_is_zero_after_the_races(pg: Database) -> None:
    shop = Shop.open(pg)
    members = shop.member(50_000, tier="金卡", count=16)
    reward = shop.reward(points=500, stock=40)

    def churn(i: int) -> None:
        for n in range(6):
            try:
                order = shop.redeem(members[i], reward.code, key=f"{i}-{n}")
            except OutOfStock:
                continue
            if n % 2:
                shop.move(order.id, "cancel")

    results = run_together(16, churn)
    assert [r for r in results if r is not None] == []
    total = pg.run(lambda uow: uow.conn.execute(
        select(func.sum(lines.c.amount)).join(accounts, accounts.c.id == lines.c.account_id)
        .where(accounts.c.program_id == shop.program_id)).scalar_one())  # fmt: skip
    assert total == 0
    after = shop.get(reward.code)
    live = pg.run(lambda uow: uow.conn.execute(
        select(func.coalesce(func.sum(reward_orders.c.quantity), 0))
        .where(reward_orders.c.reward_id == reward.id,
               reward_orders.c.state.not_in(["cancelled", "returned"]))).scalar_one())  # fmt: skip
    assert after.sold == live and after.stock_left == 40 - live
    assert_ledger_sound(pg, shop.program_id)


# Interleavings made on purpose: one transaction is held open at the moment of the race
# while a second request runs in a thread and waits on it; then the first commits.


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_a_voucher_accepted_at_a_till_cannot_be_cancelled_at_the_same_moment(
    pg: Database,
) -> None:
    shop = Shop.open(pg)
    (member,) = shop.member(10_000, tier="金卡")
    goods = shop.reward(points=1000, stock=5, pickup=True)
    order = shop.redeem(member, goods.code)
    assert order.voucher is not None
    before = shop.available(member)
    with pg.transaction() as till:  # the till accepts it and has not committed yet
        rewards.use_voucher(till, program_id=shop.program_id, code=order.voucher.code,
                            store="S1", actor="cashier")  # fmt: skip
        thread, box = in_background(lambda: shop.move(order.id, "cancel"))
        time.sleep(0.5)  # the cancel waits on the voucher's row
    thread.join()
    assert isinstance(box.get("error"), StateConflict), box
    after = pg.run(lambda uow: rewards.get_order(uow, program_id=shop.program_id,
                                                 order_id=order.id))  # fmt: skip
    assert after.state == "delivered" and after.voucher and after.voucher.state == "used"
    assert shop.available(member) == before and shop.get(goods.code).stock_left == 4


@pytest.mark.parametrize(
    ("tier", "fields", "points_", "locks_first"),
    [
        # A limit per member is counted under the member's lock, taken before the checks.
        ("金卡", {"limit_per_member": 1}, 100, True),
        # No count: admitted before the lock; the debit takes it as it writes.
        ("金卡", {}, 100, False),
        # No count, and held for a cooling-off: the hold takes the lock as it writes.
        ("钻石", {}, 8000, False),
        # The same, for goods with stock: the order takes the stock after the debit.
        ("金卡", {"stock": 10}, 100, False),
    ],
)
@pytest.mark.parametrize("twin_actor", ["m", "till"])
def test_a_twin_that_waited_for_the_first_gets_its_order_not_a_refusal(
    pg: Database, monkeypatch: pytest.MonkeyPatch, tier: str, fields: dict[str, Any],
    points_: int, locks_first: bool, twin_actor: str,
) -> None:  # fmt: skip
    """The twin (same key, same request; sent again by the till or by a member's app, so
    not always by the same actor) waited for the first's lock and sees nothing of it until
    the first commits: it answers the first's order, whichever path the redemption took."""
    shop = Shop.open(pg)
    (member,) = shop.member(10_000, tier=tier)
    once = shop.reward(points=points_, **fields)
    body = RedemptionCreate.model_validate({"reward": once.code})
    locked: list[int] = []
    lock_account = points_service.lock_account

    def spy(uow: Any, **kwargs: Any) -> bool:
        locked.append(kwargs["member_id"])
        return lock_account(uow, **kwargs)

    monkeypatch.setattr(points_service, "lock_account", spy)

    def redeem(uow: Any, actor: str = "m") -> Any:
        return rewards.redeem(uow, program_id=shop.program_id, member_id=member, body=body,
                              key="twin", actor=actor)  # fmt: skip

    with pg.transaction() as first:
        made = redeem(first)
        thread, box = in_background(lambda: pg.run(partial(redeem, actor=twin_actor)))
        time.sleep(0.5)  # the twin waits on the member's lock
    thread.join()
    assert "error" not in box, box
    assert box["result"].id == made.id and box["result"].replayed
    assert bool(locked) is locks_first
    assert shop.available(member) == 10_000 - made.points
    count = pg.run(lambda uow: uow.conn.execute(
        select(func.count()).where(reward_orders.c.program_id == shop.program_id)
    ).scalar_one())  # fmt: skip
    assert count == 1
    assert_ledger_sound(pg, shop.program_id)


def test_a_hold_confirmed_while_the_lapse_job_runs_is_left_alone(pg: Database) -> None:
    shop = Shop.open(pg)
    (member,) = shop.member(50_000, tier="钻石")
    watch = shop.reward(points=10_000)  # 7,000 for 钻石: held
    order = shop.redeem(member, watch.code)
    assert isinstance(pg.clock, ManualClock)
    pg.clock.advance(timedelta(days=9))  # past the cooling-off and the 7 days to confirm
    with pg.transaction() as uow:
        rewards.confirm_held(uow, program_id=shop.program_id, member_id=member,
                             order_id=order.id, actor="m")  # fmt: skip
        thread, box = in_background(
            lambda: pg.run(lambda u: rewards.expire_holds(u, program_id=shop.program_id))
        )
        time.sleep(0.5)
    thread.join()
    assert box.get("result") is not None and box["result"].cancelled == 0, box
    after = pg.run(lambda uow: rewards.get_order(uow, program_id=shop.program_id,
                                                 order_id=order.id))  # fmt: skip
    assert after.state == "created"


def test_editing_a_lottery_during_a_draw_never_gives_a_prize_twice(pg: Database) -> None:
    shop = Shop.open(pg)
    (member,) = shop.member(50_000, tier="金卡")
    terms: dict[str, Any] = {
        "kind": "lottery", "points": 10,
        "lottery": {"prizes": [{"code": "p", "name": {"en": "P"}, "chance_ppm": 1_000_000,
                                "quantity": 1, "value": 1}]},
    }  # fmt: skip
    wheel = shop.reward(**terms)
    edit = RewardDef.model_validate({"code": wheel.code, "name": {"en": "Wheel"}, **terms})
    with pg.transaction() as uow:
        draw = RedemptionCreate(reward=wheel.code)
        first = rewards.redeem(uow, program_id=shop.program_id, member_id=member, body=draw,
                               key="d1", actor="m")  # fmt: skip
        assert first.outcome["prize"] == "p"
        thread, box = in_background(lambda: pg.run(lambda u: rewards.update_reward(
            u, program_id=shop.program_id, code=wheel.code, body=edit)))  # fmt: skip
        time.sleep(0.5)
    thread.join()
    assert "error" not in box, box
    with pytest.raises(NotOnSale, match="sold out"):  # its one prize is gone, given once
        shop.redeem(member, wheel.code, key="d2")


@pytest.mark.parametrize("pickup", [False, True], ids=["shipped", "voucher"])
def test_a_redemption_that_read_the_reward_before_a_pause_committed_is_refused(
    pg: Database, pickup: bool
) -> None:
    """Staff pause a reward while a redemption is under way: the redemption read the reward
    on sale, but its stock is taken only if the reward still is at that moment, so nothing
    is sold after the pause committed."""
    shop = Shop.open(pg)
    (member,) = shop.member(10_000, tier="金卡")
    goods = shop.reward(points=1000, stock=5, pickup=pickup)
    with pg.transaction() as staff:  # the pause holds the reward's row, not committed yet
        rewards.set_state(staff, program_id=shop.program_id, code=goods.code, state="paused")
        thread, box = in_background(lambda: shop.redeem(member, goods.code))
        time.sleep(0.5)  # the redemption read it active and waits to take the stock
    thread.join()
    assert isinstance(box.get("error"), NotOnSale), box
    assert shop.available(member) == 10_000
    after = shop.get(goods.code)
    assert (after.stock_left, after.sold) == (5, 0)


@pytest.mark.parametrize("stock", [None, 5], ids=["unlimited", "limited"])
@pytest.mark.parametrize("pickup", [False, True], ids=["shipped", "voucher"])
def test_a_pause_that_commits_while_a_redemption_waits_for_the_member_is_obeyed(
    pg: Database, stock: int | None, pickup: bool
) -> None:
    """A redemption reads the reward on sale, then waits for the member's lock; staff pause
    the reward and commit meanwhile. Once the lock is free the redemption must not sell the
    paused reward, whether its stock is counted or not: it runs again and is refused."""
    shop = Shop.open(pg)
    (member,) = shop.member(10_000, tier="金卡")
    goods = shop.reward(points=1000, stock=stock, pickup=pickup)
    body = RedemptionCreate.model_validate({"reward": goods.code})

    def pause() -> None:
        pg.run(lambda uow: rewards.set_state(uow, program_id=shop.program_id, code=goods.code,
                                             state="paused"))  # fmt: skip

    def redeem(uow: Any) -> Any:
        return rewards.redeem(uow, program_id=shop.program_id, member_id=member, body=body,
                              key="r", actor="m")  # fmt: skip

    def busy(uow: Any) -> None:  # the member's account is held by another request
        points_service.lock_account(uow, member_id=member)

    result = while_held(pg, busy, redeem, meanwhile=pause)
    assert isinstance(result, NotOnSale), result
    assert shop.available(member) == 10_000 and shop.counts()[0] == 0
    after = shop.get(goods.code)
    assert (after.state, after.stock_left, after.sold) == ("paused", stock, 0)


@pytest.mark.parametrize(
    ("tier", "points_"), [("钻石", 8000), ("金卡", 1000)], ids=["held", "spent"]
)
def test_a_member_frozen_while_its_redemption_waits_gets_no_hold_and_no_debit(
    pg: Database, tier: str, points_: int
) -> None:
    """Staff freeze the member while its redemption waits for the member's account: the
    redemption read the member active before, but its hold (a cooling-off) or its debit
    reads the state the account carries under the lock, and is refused."""
    from jifen.members import service as members

    shop = Shop.open(pg)
    (member,) = shop.member(20_000, tier=tier)
    goods = shop.reward(points=points_)
    body = RedemptionCreate.model_validate({"reward": goods.code})

    def freeze_member(uow: Any) -> None:
        members.change_state(uow, program_id=shop.program_id, member_id=member, state="frozen")

    def redeem(uow: Any) -> Any:
        return rewards.redeem(uow, program_id=shop.program_id, member_id=member, body=body,
                              key="r", actor="m")  # fmt: skip

    result = while_held(pg, freeze_member, redeem)
    assert isinstance(result, StateConflict) and "frozen" in str(result), result
    assert shop.counts()[0] == 0
    summary = pg.run(lambda uow: points_service.balance(uow, member_id=member), read_only=True)
    assert (summary.balance, summary.frozen) == (20_000, 0)
    assert_ledger_sound(pg, shop.program_id)


def _pay(pg: Database, shop: Shop, order_id: int, payment_ref: str) -> Any:
    return pg.run(
        lambda uow: rewards.pay_order(
            uow, program_id=shop.program_id, order_id=order_id, payment_ref=payment_ref,
            amount_fen=9000, actor="key:pay",
        )
    )  # fmt: skip


def test_a_payment_and_the_lapse_job_racing_for_an_order_one_wins_each_round(
    pg: Database,
) -> None:
    """Each round an order's time to pay has just passed when its payment arrives and the
    lapse job runs, at the same instant: the order is either paid (the job leaves it) or
    cancelled (the payment is refused, to be refunded), never both, never half of either.
    Every other round the job's chunk runs alone, without the runner's own transactions
    before it, so that it comes first more often."""
    rounds = 40
    shop = Shop.open(pg, payment_minutes=1)
    (member,) = shop.member(100_000, tier="金卡")
    stock = 1000  # far from the dynamic rise: every round costs 800 points (金卡)
    kettle = shop.reward(points=1000, cash_fen=9000, stock=stock)
    assert isinstance(pg.clock, ManualClock)
    paid = lapsed = 0
    for n in range(rounds):
        order = shop.redeem(member, kettle.code, key=f"race-{n}")
        pg.clock.advance(timedelta(minutes=2))  # past pay_by; the job's moment is its own

        def race(i: int, order_id: int = order.id, n: int = n) -> Any:
            if i == 0:
                return _pay(pg, shop, order_id, f"wx-{n}")
            if n % 2:
                return pg.run(lambda uow: rewards.lapse_payments(uow, program_id=shop.program_id))
            return jobs_service.run(pg, "rewards.lapse_payments", program_id=shop.program_id)

        payment, run = run_together(2, race)
        assert not isinstance(run, Exception), run
        cancelled = run.cancelled if n % 2 else run.figures["cancelled"]
        if isinstance(payment, Exception):
            assert isinstance(payment, StateConflict), payment
            assert f"Refund payment 'wx-{n}' of 9000 fen" in str(payment)
            assert cancelled == 1
            lapsed += 1
        else:
            assert (payment.state, payment.payment_ref, cancelled) == ("created", f"wx-{n}", 0)
            paid += 1
        after = pg.run(lambda uow, o=order.id: rewards.get_order(
            uow, program_id=shop.program_id, order_id=o), read_only=True)  # fmt: skip
        assert after.state == ("created" if after.payment_ref else "cancelled")
    assert paid + lapsed == rounds
    summary = pg.run(lambda uow: points_service.balance(uow, member_id=member), read_only=True)
    assert (summary.balance, summary.frozen) == (100_000 - 800 * paid, 0)
    left = shop.get(kettle.code)
    assert (left.stock_left, left.sold) == (stock - paid, paid)
    assert_ledger_sound(pg, shop.program_id)


@pytest.mark.parametrize("first", ["payment", "lapse"])
def test_of_a_payment_and_the_lapse_job_the_one_that_waited_sees_the_other(
    pg: Database, first: str
) -> None:
    """One holds the member's account (uncommitted) while the other waits for it: a lapse
    that waited for a payment leaves the paid order alone; a payment that waited for the
    lapse is refused, with the amount to refund."""
    shop = Shop.open(pg, payment_minutes=1)
    (member,) = shop.member(10_000, tier="金卡")
    kettle = shop.reward(points=1000, cash_fen=9000, stock=1)
    order = shop.redeem(member, kettle.code)
    assert isinstance(pg.clock, ManualClock)
    pg.clock.advance(timedelta(minutes=2))

    def pay(uow: Any) -> Any:
        return rewards.pay_order(uow, program_id=shop.program_id, order_id=order.id,
                                 payment_ref="wx", amount_fen=9000, actor="key:pay")  # fmt: skip

    def lapse(uow: Any) -> Any:
        return rewards.lapse_payments(uow, program_id=shop.program_id)

    held, waiting = (pay, lapse) if first == "payment" else (lapse, pay)
    with pg.transaction() as uow:
        held(uow)
        thread, box = in_background(lambda: pg.run(waiting))
        time.sleep(0.5)  # the other waits on the member's account
    thread.join()
    after = pg.run(lambda uow: rewards.get_order(uow, program_id=shop.program_id,
                                                 order_id=order.id))  # fmt: skip
    summary = pg.run(lambda uow: points_service.balance(uow, member_id=member), read_only=True)
    if first == "payment":
        assert box.get("result") is not None and box["result"].cancelled == 0, box
        assert (after.state, summary.balance, summary.frozen) == ("created", 9200, 0)
        assert shop.get(kettle.code).stock_left == 0
    else:
        assert isinstance(box.get("error"), StateConflict), box
        assert "Refund payment 'wx' of 9000 fen" in str(box["error"])
        assert (after.state, summary.balance, summary.frozen) == ("cancelled", 10_000, 0)
        assert shop.get(kettle.code).stock_left == 1
    assert_ledger_sound(pg, shop.program_id)


def test_one_reward_added_twice_at_once_is_made_once_and_the_other_is_told_so(
    pg: Database,
) -> None:
    shop = Shop.open(pg)
    body = RewardCreate.model_validate(
        {"code": "mug", "kind": "physical", "name": {"zh": "马克杯"}, "points": 1000, "stock": 5}
    )

    def add(uow: Any) -> Any:
        return rewards.create_reward(uow, program_id=shop.program_id, body=body)

    second = while_held(pg, add, add)
    assert isinstance(second, DuplicateReference), second
    assert shop.get("mug").stock_left == 5
