"""Points given back take the dates tier changes gave the member's lots, a temporary tier that
becomes the member's own re-dates its lots, and a dormant member's own event wakes it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jifen.db.uow import Database, UnitOfWork
from jifen.expiry.schemas import Dormancy, ExpiryPolicy, Validity
from jifen.points import service as points
from jifen.programs import service as programs
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef
from tests.expiry.test_service import at, earn, job, move, summary, with_policy
from tests.factories import assert_ledger_sound
from tests.tiers.scheme import TIERS, scheme


def open_lots(db: Database, member: int) -> list[tuple[int, datetime | None]]:
    lots = db.run(lambda uow: points.member_lots(uow, member_id=member), read_only=True)
    return [(lot.remaining, lot.expires_at) for lot in lots if lot.remaining > 0]


def set_tier(db: Database, program_id: int, member: int, tier: str) -> None:
    db.run(
        lambda uow: tiers.set_member_tier(
            uow, program_id=program_id, member_id=member, tier=tier, reason="t", set_by="ops"
        )
    )


def two_tiers(db: Database, program_id: int) -> None:
    definitions = [
        TierDef(code="普通", name="普通", rank=0),
        TierDef(code="金卡", name="金卡", rank=1),
    ]
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program_id, definitions=definitions))


# ---------------------------------------------------------------------------


def test_points_held_by_dormancy_when_the_tier_extends_lots_come_back_with_the_new_date(
    db: Database,
) -> None:
    """A tier change renews only lots that hold points, so a lot wholly held by a dormancy
    decay is passed over. When the member is active again and the decay comes back,
    expiry.service.tier_dates_missed replays the tier changes the lot missed: the points
    take 金卡's date (never) and do not lapse on the lot's old one."""
    policy = ExpiryPolicy(
        by_tier={"普通": Validity(kind="rolling", months=24), "金卡": Validity(kind="never")},
        on_tier_change="extend",
        dormancy=Dormancy(after_months=12, decay_pct=10),
    )
    program_id, (alice, *_) = with_policy(db, policy)
    two_tiers(db, program_id)
    set_tier(db, program_id, alice, "普通")
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 50, "a1")  # lapses 2028-01-11
    move(db, at(2026, 1, 11, 9))
    earn(db, program_id, alice, 1000, "a2")  # lapses 2028-01-12
    # dormant from 2027-01-11 09:00: 10 % of 1,050 = 105 held back, the 50 lot first
    assert job(db, "points.dormancy", program_id, at(2027, 1, 11, 10)).figures["decayed"] == 105
    # staff make her 金卡 (长期有效): her open lots never lapse now
    move(db, at(2027, 2, 1, 12))
    set_tier(db, program_id, alice, "金卡")
    assert open_lots(db, alice) == [(945, None)]
    # she spends a point: the next run gives the 105 back
    move(db, at(2027, 2, 5, 12))
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=1, key="s1"))
    assert job(db, "points.dormancy", program_id, at(2027, 2, 6, 1)).figures["restored"] == 105
    assert summary(db, alice).available == 1049
    # A 金卡 member's points never lapse: nothing lapses on the 50 lot's old date.
    lapsed = job(db, "points.expire", program_id, at(2028, 1, 11, 0, 10)).figures["points"]
    assert (lapsed, summary(db, alice).balance) == (0, 1049), open_lots(db, alice)


# ---------------------------------------------------------------------------


def test_a_temporary_tier_that_becomes_the_members_own_extends_its_lots(db: Database) -> None:
    """When an evaluation finds that a temporarily upgraded member's own score holds the tier
    it was lent, tiers.core.decide makes the tier the member's own and tiers.service._apply
    records that as a tier change, so expiry.on_tier_changes extends the member's lots as it
    does for a member reaching the same tier by evaluation."""
    campaign = (datetime(2026, 12, 20, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC))
    policy = ExpiryPolicy(
        by_tier={"普通": Validity(kind="rolling", months=12),
                 "银卡": Validity(kind="rolling", months=36)},
        on_tier_change="extend",
    )  # fmt: skip
    program_id, (carol, dave, _) = with_policy(db, policy)

    def configure(uow: UnitOfWork) -> None:
        tiers.set_tiers(uow, program_id=program_id, definitions=[TierDef(**t) for t in TIERS])
        settings = programs.get_settings(uow, program_id=program_id)
        tier_scheme = scheme(upgrade_at_once=False, campaigns=[campaign])
        programs.set_settings(
            uow, program_id=program_id,
            settings=settings.model_copy(update={"tier_scheme": tier_scheme}),
        )  # fmt: skip

    db.run(configure)
    set_tier(db, program_id, carol, "普通")
    set_tier(db, program_id, dave, "普通")
    move(db, at(2026, 3, 1, 10))
    for member in (carol, dave):
        earn(db, program_id, member, 500, f"old-{member}")  # 普通: lapses 2027-03-02

    def earn_and_check(member: int, amount: int, key: str) -> Any:
        earn(db, program_id, member, amount, key)
        db.run(lambda uow: tiers.after_earning(
            uow, program_id=program_id, member_ids=[member], now=uow.clock.now()))  # fmt: skip

    # carol earns 4,000 points in the campaign: 160 ≥ 1.2 × 101, 银卡 lent for a month;
    # dave earns as much the day before it starts
    move(db, at(2026, 12, 19, 10))
    earn_and_check(dave, 4000, "d1")
    move(db, at(2026, 12, 25, 10))
    earn_and_check(carol, 4000, "c1")
    assert db.run(lambda uow: tiers.member_tier(
        uow, program_id=program_id, member_id=carol)).temporary_until is not None  # fmt: skip
    # the evaluation of 1 January: both hold 银卡 by their own score of 160
    move(db, datetime(2026, 12, 31, 16, tzinfo=UTC))
    db.run(lambda uow: tiers.evaluate(uow, program_id=program_id, member_ids=[carol, dave],
                                      now=uow.clock.now(), reason="2026-Q4"))  # fmt: skip
    held = db.run(lambda uow: tiers.member_tier(uow, program_id=program_id, member_id=carol))
    assert (held.tier, held.temporary_until) == ("银卡", None)  # her own now
    # dave's 500 of March move to 银卡's 36 months, and so do carol's
    assert (500, at(2029, 3, 2)) in open_lots(db, dave)
    assert (500, at(2029, 3, 2)) in open_lots(db, carol), open_lots(db, carol)
    assert_ledger_sound(db, program_id)


# ---------------------------------------------------------------------------


def test_a_dormant_members_own_event_that_earns_nothing_wakes_it(db: Database) -> None:
    """任意行为激活后恢复: any behaviour of the member wakes it. expiry.service.last_activity
    takes the later of its own postings and its latest own event, so a check-in (or an order
    that earns nothing) gives the decay back at the next run and stops further decay."""
    from jifen.events import service as events_service
    from jifen.events.schemas import EventIn

    policy = ExpiryPolicy(
        validity=Validity(kind="never"), dormancy=Dormancy(after_months=12, decay_pct=10)
    )
    program_id, (alice, *_) = with_policy(db, policy)
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 1000, "a1")
    assert job(db, "points.dormancy", program_id, at(2027, 1, 10, 10)).figures["decayed"] == 100
    # she checks in on 2027-01-20 (the programme has no check-in rule: 0 points)
    move(db, at(2027, 1, 20, 8))
    checked = EventIn(source="app", external_id="c1", type="member.checked_in",
                      occurred_at=at(2027, 1, 20, 8), member_id=alice)  # fmt: skip
    db.run(lambda uow: events_service.ingest(uow, program_id=program_id, event=checked))
    figures = job(db, "points.dormancy", program_id, at(2027, 2, 10, 10)).figures
    assert (figures["restored"], figures["decays"]) == (100, 0), figures


def test_a_refund_to_a_lot_its_spend_emptied_takes_the_renewal_of_a_better_tier(
    db: Database,
) -> None:
    """The same with a spend: a redemption empties the earliest lot, the member moves to a
    tier whose points never lapse (the renewal passes over the empty lot), and the
    redemption is cancelled: the points given back take that tier's date (never), not the
    lot's old one."""
    policy = ExpiryPolicy(
        by_tier={"普通": Validity(kind="rolling", months=12), "金卡": Validity(kind="never")},
        on_tier_change="extend",
    )
    program_id, (alice, *_) = with_policy(db, policy)
    two_tiers(db, program_id)
    set_tier(db, program_id, alice, "普通")
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 300, "a1")  # lapses 2027-01-11
    move(db, at(2026, 2, 10, 9))
    earn(db, program_id, alice, 700, "a2")  # lapses 2027-02-11
    spent = db.run(lambda uow: points.spend(uow, member_id=alice, amount=300, key="s1"))
    move(db, at(2026, 3, 1, 9))
    set_tier(db, program_id, alice, "金卡")
    assert open_lots(db, alice) == [(700, None)]
    move(db, at(2026, 3, 2, 9))
    db.run(lambda uow: points.refund(uow, spend_id=spent.id, key="r1", reason="cancelled",
                                     actor="staff"))  # fmt: skip
    # 金卡: none of her points lapse
    assert all(when is None for _, when in open_lots(db, alice)), open_lots(db, alice)
