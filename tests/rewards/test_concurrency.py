"""Races on PostgreSQL: many members after little stock, one member after its own balance,
one voucher at two tills. SQLite serialises every writer, so it cannot show a race."""

from __future__ import annotations

import uuid
from collections import Counter

from sqlalchemy import func, select

from jifen.db.uow import Database
from jifen.errors import InsufficientPoints, LimitReached, OutOfStock, VoucherNotUsable
from jifen.points.models import accounts, lines
from jifen.rewards import service as rewards
from jifen.rewards.models import reward_orders
from tests.factories import assert_ledger_sound
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
