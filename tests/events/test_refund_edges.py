"""Refunds at the edges: an order whose points lapsed, and a return within the window after
the order moved its member up at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from jifen.db.uow import Database, UnitOfWork
from jifen.expiry.schemas import ExpiryPolicy, Validity
from jifen.jobs import service as jobs
from jifen.programs import service as programs
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef
from tests.events.test_service import RATES, activate, balance, lines, send
from tests.factories import assert_ledger_sound, new_members, new_program
from tests.tiers.scheme import TIERS, scheme


def test_a_refund_of_an_order_whose_points_lapsed_leaves_the_members_other_points(
    db: Database,
) -> None:
    """points.service.reverse (ledger.plan_reverse) takes an earn back from its own lots, then
    from what of it lapsed (out of the expired account), and only for points the member used
    from its other points or as debt. So a refund of an order whose points lapsed leaves the
    member's other points alone: it never pays twice for points it did not use."""
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", RATES)
    # 1,000 points, usable after the 7-day return window, for 365 days
    send(db, program.id, member, "order.paid", datetime(2026, 1, 2, 2, tzinfo=UTC), "o1",
         order_id="A1", lines=lines(("T1", "日用品", 1000)))  # fmt: skip
    send(db, program.id, member, "order.paid", datetime(2026, 6, 1, 2, tzinfo=UTC), "o2",
         order_id="B1", lines=lines(("T2", "日用品", 500)))  # fmt: skip
    assert db.clock.now() < datetime(2027, 1, 20, tzinfo=UTC)
    db.clock.set(datetime(2027, 1, 20, tzinfo=UTC))  # type: ignore[attr-defined]
    assert jobs.run(db, "points.expire", program_id=program.id).figures["points"] == 1000
    assert balance(db, member).balance == 500  # B1's points only
    # the merchant refunds order A1 in full
    refund = send(db, program.id, member, "order.refunded", datetime(2027, 1, 21, tzinfo=UTC),
                  "r1", order_id="A1", whole=True)  # fmt: skip
    assert_ledger_sound(db, program.id)
    after = balance(db, member)
    # A1's 1,000 points were gone already; B1's 500 have nothing to do with the refund.
    assert (after.balance, after.debt) == (500, 0), (refund.points, after)


def test_a_return_within_the_window_after_an_upgrade_at_once_takes_the_pending_points(
    db: Database,
) -> None:
    """An order whose earning upgrades the member at once, under ``on_tier_change: extend``,
    has its pending points renewed to a new lot in the same transaction. points.service.reverse
    follows the earn's points through the renewals, so a return within the return window
    cancels those pending points and the member owes nothing."""
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)

    def configure(uow: UnitOfWork) -> None:
        tiers.set_tiers(uow, program_id=program.id, definitions=[TierDef(**t) for t in TIERS])
        settings = programs.get_settings(uow, program_id=program.id)
        policy = ExpiryPolicy(
            by_tier={"普通": Validity(kind="rolling", months=12),
                     "银卡": Validity(kind="rolling", months=36)},
            on_tier_change="extend",
        )  # fmt: skip
        programs.set_settings(uow, program_id=program.id, settings=settings.model_copy(
            update={"expiry": policy, "tier_scheme": scheme(upgrade_at_once=True)}))  # fmt: skip

    db.run(configure)
    activate(db, program.id, "base", RATES)
    paid_at = datetime(2026, 3, 2, 2, tzinfo=UTC)
    paid = send(db, program.id, member, "order.paid", paid_at, "o1", order_id="A1",
                lines=lines(("T1", "日用品", 3000)))  # fmt: skip
    assert paid.points == 3000
    tier = db.run(lambda uow: tiers.member_tier(uow, program_id=program.id, member_id=member))
    assert tier.tier == "银卡"  # 3,000 yuan and 3,000 points: upgraded at once
    assert balance(db, member).pending == 3000
    # returned the next day, well within the 7-day return window
    send(db, program.id, member, "order.refunded", paid_at + timedelta(days=1), "r1",
         order_id="A1", whole=True)  # fmt: skip
    assert_ledger_sound(db, program.id)
    after = balance(db, member)
    # 退货冻结: a return within the window cancels the pending points; nothing is owed.
    assert (after.balance, after.pending, after.debt) == (0, 0, 0), after
