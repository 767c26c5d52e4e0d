"""Closing a member account settles its points, on both backends: by the programme's
``closing_policy``, in the closing transaction, with the ledger's invariants kept."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import StateConflict
from jifen.members import service as members
from jifen.members.models import members as members_table
from jifen.points import integrity
from jifen.points import service as points
from jifen.points.models import postings
from jifen.programs import service as programs
from jifen.rewards import service as rewards
from jifen.rewards.models import reward_orders
from tests.factories import assert_ledger_sound, new_members, new_program
from tests.points.test_service import call, snapshot
from tests.rewards.shop import Shop

DAY = timedelta(days=1)


def close(db: Database, program_id: int, member_id: int) -> members.StateMove:
    return db.run(
        lambda uow: members.change_state(
            uow, program_id=program_id, member_id=member_id, state="closed", actor="staff:test"
        )
    )


def set_policy(db: Database, program_id: int, policy: str) -> None:
    def change(uow: UnitOfWork) -> None:
        settings = programs.get_settings(uow, program_id=program_id)
        programs.set_settings(
            uow, program_id=program_id,
            settings=settings.model_copy(update={"closing_policy": policy}),
        )  # fmt: skip

    db.run(change)


def liability(db: Database, program_id: int) -> tuple[int, int]:
    """What the programme's members hold, and what its expired account holds."""
    report = db.run(lambda uow: integrity.reconcile(uow, program_id=program_id), read_only=True)
    return report.member_total, report.system_balances.get("expired", 0)


def state_of(db: Database, member_id: int) -> str:
    found: str = db.run(
        lambda uow: uow.conn.execute(
            select(members_table.c.state).where(members_table.c.id == member_id)
        ).scalar_one(),
        read_only=True,
    )
    return found


@pytest.fixture
def club(db: Database) -> tuple[Database, int, int, int]:
    program = new_program(db)
    alice, bob = new_members(db, program.id, 2)
    return db, program.id, alice, bob


def test_forfeit_clears_available_pending_and_overdue_points_in_one_expiry(club: Any) -> None:
    db, program_id, alice, bob = club
    clock: ManualClock = db.clock
    now = clock.now()
    call(db, points.earn, member_id=alice, amount=100, key="a1", expires_at=now + 30 * DAY)
    call(db, points.earn, member_id=alice, amount=20, key="a2", expires_at=now + DAY)
    call(db, points.earn, member_id=alice, amount=50, key="a3", available_at=now + 10 * DAY)
    call(db, points.earn, member_id=bob, amount=30, key="b1")
    clock.advance(2 * DAY)  # a2 is past its date, the expiry run has not come yet
    held, expired = liability(db, program_id)
    posted = db.run(lambda uow: points.posting_counts(uow, program_id=program_id))

    move = close(db, program_id, alice)

    assert move.after.state == "closed" and move.before.state == "active"
    settled = move.settlement
    assert settled is not None and settled.posting_id is not None
    assert (settled.policy, settled.forfeited) == ("forfeit", 170)
    assert (settled.available, settled.pending, settled.overdue, settled.debt_left) == (
        100, 50, 20, 0,
    )  # fmt: skip
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.available, summary.pending, summary.overdue) == (0, 0, 0, 0)
    assert call(db, points.balance, member_id=bob).balance == 30
    # one settlement posting, an expiry to the expired account, with the closing reason
    after = db.run(lambda uow: points.posting_counts(uow, program_id=program_id))
    assert sum(after.values()) == sum(posted.values()) + 1
    assert after["expire"] == posted.get("expire", 0) + 1
    (entry,) = call(db, points.history, member_id=alice, kinds=["expire"]).items
    assert (entry.posting_id, entry.change, entry.reason) == (
        settled.posting_id, -170, points.CLOSED_REASON,
    )  # fmt: skip
    assert "account closed" in entry.reason and "账户已注销" in entry.reason
    assert [line.account for line in entry.lines if line.amount > 0] == ["expired"]
    # the programme's liability falls by exactly those points
    assert liability(db, program_id) == (held - 170, expired + 170)
    assert_ledger_sound(db, program_id)
    # the expiry run later finds nothing left on the closed account
    assert db.run(lambda uow: points.expire_member(uow, member_id=alice)) is None


def test_closing_an_account_without_points_posts_nothing(club: Any) -> None:
    db, program_id, alice, _ = club
    before = snapshot(db, program_id)
    settled = close(db, program_id, alice).settlement
    assert settled is not None and (settled.forfeited, settled.posting_id) == (0, None)
    assert snapshot(db, program_id) == before


def test_refuse_keeps_an_account_holding_points_open_and_unchanged(club: Any) -> None:
    db, program_id, alice, _ = club
    set_policy(db, program_id, "refuse")
    now = db.clock.now()
    call(db, points.earn, member_id=alice, amount=100, key="a1")
    call(db, points.earn, member_id=alice, amount=40, key="a2", available_at=now + DAY)
    before = snapshot(db, program_id)
    with pytest.raises(StateConflict, match="still holds 140 points") as refused:
        close(db, program_id, alice)
    assert "100 available, 40 pending" in refused.value.message("en")
    assert "仍有 140 积分" in refused.value.message("zh")
    assert snapshot(db, program_id) == before and state_of(db, alice) == "active"
    # once staff have moved the points away (and the pending ones came and went), it closes
    call(db, points.adjust, member_id=alice, amount=-100, key="a3", reason="closing", actor="s")
    db.clock.advance(2 * DAY)
    call(db, points.adjust, member_id=alice, amount=-40, key="a4", reason="closing", actor="s")
    settled = close(db, program_id, alice).settlement
    assert settled is not None and (settled.policy, settled.posting_id) == ("refuse", None)
    assert state_of(db, alice) == "closed"
    assert_ledger_sound(db, program_id)


def test_frozen_points_keep_the_account_open_until_they_are_unfrozen(club: Any) -> None:
    db, program_id, alice, _ = club
    call(db, points.earn, member_id=alice, amount=100, key="a1")
    freeze = call(db, points.freeze, member_id=alice, amount=30, key="f1", reason="review",
                  actor="s")  # fmt: skip
    before = snapshot(db, program_id)
    with pytest.raises(StateConflict, match="30 frozen points") as refused:
        close(db, program_id, alice)
    assert "冻结" in refused.value.message("zh")
    assert snapshot(db, program_id) == before and state_of(db, alice) == "active"
    call(db, points.unfreeze, freeze_id=freeze.id, key="u1", reason="cleared", actor="s")
    settled = close(db, program_id, alice).settlement
    assert settled is not None and settled.forfeited == 100
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.frozen) == (0, 0)
    assert_ledger_sound(db, program_id)


def test_a_debt_stays_on_the_closed_account_and_pending_points_are_forfeited(club: Any) -> None:
    db, program_id, alice, bob = club
    now = db.clock.now()
    earned = call(db, points.earn, member_id=alice, amount=100, key="a1")
    call(db, points.spend, member_id=alice, amount=100, key="s1")
    call(db, points.earn, member_id=alice, amount=40, key="a2", available_at=now + 7 * DAY)
    # all spent: the 40 on the way are taken back, 60 owed
    call(db, points.reverse, earn_id=earned.id, key="r1")
    settled = close(db, program_id, alice).settlement
    assert settled is not None
    assert (settled.forfeited, settled.pending, settled.debt_left) == (0, 0, 60)
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.pending, summary.debt) == (0, 0, 60)
    call(db, points.earn, member_id=bob, amount=40, key="b1", available_at=now + 7 * DAY)
    settled = close(db, program_id, bob).settlement
    assert settled is not None
    assert (settled.forfeited, settled.pending, settled.debt_left) == (40, 40, 0)
    assert call(db, points.balance, member_id=bob).pending == 0
    assert_ledger_sound(db, program_id)


def test_a_closed_member_cannot_be_closed_again_nor_earn(club: Any) -> None:
    db, program_id, alice, _ = club
    call(db, points.earn, member_id=alice, amount=100, key="a1")
    close(db, program_id, alice)
    before = snapshot(db, program_id)
    with pytest.raises(StateConflict, match="stays closed"):
        close(db, program_id, alice)
    with pytest.raises(StateConflict, match="cannot earn"):
        db.run(
            lambda uow: members.require_member(
                uow, program_id=program_id, member_id=alice, transacting=True
            )
        )
    assert snapshot(db, program_id) == before


def test_the_settlement_posting_replays_by_its_key(club: Any) -> None:
    db, program_id, alice, _ = club
    call(db, points.earn, member_id=alice, amount=100, key="a1")
    settled = close(db, program_id, alice).settlement
    assert settled is not None
    again = call(db, points.forfeit_all, member_id=alice, key=f"member-closed:{alice}",
                 reason=points.CLOSED_REASON, actor="staff:test")  # fmt: skip
    assert again is not None and again.replayed and again.id == settled.posting_id
    assert call(db, points.balance, member_id=alice).balance == 0
    assert_ledger_sound(db, program_id)


def test_unfinished_redemptions_keep_the_account_open(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(20000, tier="钻石")
    goods = shop.reward(points=1000)  # 700 for 钻石, shipped by staff
    prize = {"code": "p", "name": {"en": "P"}, "chance_ppm": 1_000_000, "points": 1000}
    wheel = shop.reward(  # 5,600 for 钻石: a cooling-off
        kind="lottery", points=8000, discounts=True, lottery={"prizes": [prize]}
    )
    order = shop.redeem(member, goods.code)
    held = shop.redeem(member, wheel.code)
    assert (order.state, held.state) == ("created", "held")
    before = snapshot(db, shop.program_id)
    with pytest.raises(StateConflict, match=f"not finished \\({order.id}, {held.id}\\)") as no:
        close(db, shop.program_id, member)
    assert "未完成的兑换订单" in no.value.message("zh")
    assert snapshot(db, shop.program_id) == before and state_of(db, member) == "active"
    shop.move(held.id, "cancel")
    shop.move(order.id, "ship")
    with pytest.raises(StateConflict, match="not finished"):
        close(db, shop.program_id, member)
    shop.move(order.id, "deliver")
    settled = close(db, shop.program_id, member).settlement
    assert settled is not None and settled.forfeited == 20000 - 700
    rows = db.run(
        lambda uow: uow.conn.execute(
            select(postings.c.kind, postings.c.amount).where(postings.c.id == settled.posting_id)
        ).one(),
        read_only=True,
    )
    assert tuple(rows) == ("expire", 19300)
    assert_ledger_sound(db, shop.program_id)


# --------------------------------------------------------------------------- after closing


def kinds_of(db: Database, member_id: int) -> list[tuple[str, int, int | None, str]]:
    """The member's postings, oldest first: (kind, change, referred posting, reason)."""
    page = call(db, points.history, member_id=member_id, limit=100)
    return [(e.kind, e.change, e.ref_posting_id, e.reason) for e in reversed(page.items)]


def test_a_refund_to_a_closed_account_is_forfeited_in_the_same_transaction(club: Any) -> None:
    db, program_id, alice, _ = club
    call(db, points.earn, member_id=alice, amount=100, key="a1")
    spent = call(db, points.spend, member_id=alice, amount=60, key="s1")
    close(db, program_id, alice)  # forfeits the 40 left
    held, expired = liability(db, program_id)

    refund = call(db, points.refund, spend_id=spent.id, key="r1", reason="goods returned")

    assert refund.kind == "refund" and refund.amount == 60
    *_, given, forfeit = kinds_of(db, alice)
    assert given == ("refund", 60, spent.id, "goods returned")
    assert forfeit == ("expire", -60, refund.id, points.GIVEN_BACK_FORFEITED)
    assert "账户已注销" in forfeit[3]
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.available, summary.debt) == (0, 0, 0)
    assert liability(db, program_id) == (held, expired + 60)
    # the same request again answers the first refund and forfeits nothing more
    before = snapshot(db, program_id)
    again = call(db, points.refund, spend_id=spent.id, key="r1", reason="goods returned")
    assert again.replayed and again.id == refund.id
    assert snapshot(db, program_id) == before
    assert_ledger_sound(db, program_id)


def test_under_refuse_a_refund_to_a_closed_account_is_refused_and_changes_nothing(
    club: Any,
) -> None:
    db, program_id, alice, _ = club
    set_policy(db, program_id, "refuse")
    call(db, points.earn, member_id=alice, amount=100, key="a1")
    spent = call(db, points.spend, member_id=alice, amount=100, key="s1")
    close(db, program_id, alice)
    before = snapshot(db, program_id)
    with pytest.raises(StateConflict, match="cannot be given back to a closed account") as no:
        call(db, points.refund, spend_id=spent.id, key="r1")
    assert "不能退回已注销的账户" in no.value.message("zh")
    assert snapshot(db, program_id) == before
    # what jifen gives back by itself (a voucher lapsed unused) is forfeited whatever the policy
    call(db, points.refund, spend_id=spent.id, key="r2", amount=90, forfeit_if_closed=True)
    assert call(db, points.balance, member_id=alice).balance == 0
    assert [k[:2] for k in kinds_of(db, alice)][-2:] == [("refund", 90), ("expire", -90)]
    assert_ledger_sound(db, program_id)


def test_under_refuse_a_refund_that_only_pays_a_closed_accounts_debt_is_taken(
    club: Any,
) -> None:
    db, program_id, alice, _ = club
    set_policy(db, program_id, "refuse")
    earned = call(db, points.earn, member_id=alice, amount=100, key="a1")
    call(db, points.earn, member_id=alice, amount=20, key="a2")
    first = call(db, points.spend, member_id=alice, amount=60, key="s1")
    second = call(db, points.spend, member_id=alice, amount=60, key="s2")
    call(db, points.reverse, earn_id=earned.id, key="r1")  # all spent: 100 owed
    assert close(db, program_id, alice).settlement.debt_left == 100  # type: ignore[union-attr]
    # a refund that goes wholly to the debt lands no point on the closed account: taken
    assert call(db, points.refund, spend_id=first.id, key="f1").debt_change == -60
    # one that would leave points on it is refused, and changes nothing
    before = snapshot(db, program_id)
    with pytest.raises(StateConflict, match="cannot be given back to a closed account"):
        call(db, points.refund, spend_id=second.id, key="f2")
    assert snapshot(db, program_id) == before
    assert call(db, points.refund, spend_id=second.id, key="f3", amount=40).debt_change == -40
    summary = call(db, points.balance, member_id=alice)
    assert (summary.balance, summary.debt) == (0, 0)
    assert_ledger_sound(db, program_id)


@pytest.mark.parametrize("policy", ["forfeit", "refuse"])
def test_a_closed_account_earns_spends_and_is_corrected_no_more(club: Any, policy: str) -> None:
    db, program_id, alice, bob = club
    set_policy(db, program_id, policy)
    earned = call(db, points.earn, member_id=alice, amount=100, key="a1")
    call(db, points.spend, member_id=alice, amount=100, key="s1")
    call(db, points.earn, member_id=bob, amount=100, key="b1")
    close(db, program_id, alice)
    before = snapshot(db, program_id)
    refusals = {
        "cannot earn": lambda: call(db, points.earn, member_id=alice, amount=5, key="x1"),
        "cannot earn or spend": lambda: call(db, points.spend, member_id=alice, amount=5, key="x2"),
        "is closed": lambda: call(
            db, points.transfer, from_member_id=bob, to_member_id=alice, amount=5, key="x3"
        ),
        "takes no adjustment": lambda: call(
            db, points.adjust, member_id=alice, amount=5, key="x4", reason="goodwill", actor="s"
        ),
        "takes no claw-back": lambda: call(db, points.reverse, earn_id=earned.id, key="x5"),
    }
    for says, attempt in refusals.items():
        with pytest.raises(StateConflict, match=says) as refused:
            attempt()
        assert "已注销" in refused.value.message("zh")
    assert snapshot(db, program_id) == before
    # a posting made before the closing still answers its key
    assert call(db, points.earn, member_id=alice, amount=100, key="a1").replayed


def test_a_redemption_returned_after_closing_gives_back_nothing_to_use(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000, tier="金卡")
    lamp = shop.reward(points=2000, stock=2)  # 1,600 for 金卡
    order = shop.redeem(member, lamp.code)
    shop.move(order.id, "ship")
    shop.move(order.id, "deliver")
    settled = close(db, shop.program_id, member).settlement
    assert settled is not None and settled.forfeited == 3400
    returned = shop.move(order.id, "return", note="faulty")
    assert returned.state == "returned" and returned.refund_posting_id is not None
    assert shop.get(lamp.code).stock_left == 2
    *_, given, forfeit = kinds_of(db, member)
    assert given[:3] == ("refund", 1600, order.spend_posting_id)
    assert forfeit == ("expire", -1600, returned.refund_posting_id, points.GIVEN_BACK_FORFEITED)
    assert call(db, points.balance, member_id=member).balance == 0
    assert_ledger_sound(db, shop.program_id)


def test_under_refuse_a_redemption_is_not_returned_to_a_closed_account(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(1600, tier="金卡")
    set_policy(db, shop.program_id, "refuse")
    lamp = shop.reward(points=2000, stock=2)
    order = shop.redeem(member, lamp.code)  # every point it held
    shop.move(order.id, "ship")
    shop.move(order.id, "deliver")
    close(db, shop.program_id, member)
    before = (shop.counts(), snapshot(db, shop.program_id), shop.get(lamp.code).stock_left)
    with pytest.raises(StateConflict, match="closed account"):
        shop.move(order.id, "return")
    after = (shop.counts(), snapshot(db, shop.program_id), shop.get(lamp.code).stock_left)
    assert after == before
    state = select(reward_orders.c.state).where(reward_orders.c.id == order.id)
    assert db.run(lambda uow: uow.conn.execute(state).scalar_one(), read_only=True) == "delivered"


@pytest.mark.parametrize("policy", ["forfeit", "refuse"])
def test_a_voucher_lapsing_after_closing_is_forfeited_and_the_run_goes_on(
    db: Database, policy: str
) -> None:
    shop = Shop.open(db)
    set_policy(db, shop.program_id, policy)
    (member,) = shop.member(1000, tier="普通")
    wash = shop.reward(kind="service", points=1000, name={"zh": "洗车券"})
    kept = shop.redeem(member, wash.code)
    assert kept.state == "delivered" and kept.voucher is not None
    close(db, shop.program_id, member)
    clock: ManualClock = db.clock
    clock.advance(timedelta(days=91))
    report = db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))
    assert (report.vouchers, report.points_returned, report.fees) == (1, 900, 100)
    *_, given, forfeit = kinds_of(db, member)
    assert (given[:2], forfeit[:2]) == (("refund", 900), ("expire", -900))
    assert call(db, points.balance, member_id=member).balance == 0
    assert_ledger_sound(db, shop.program_id)
