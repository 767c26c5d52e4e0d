"""An event earns at the tier its member held at the event's own time, on both backends: a
late order from before an upgrade earns at the old tier's multiplier and under the old
tier's cap, one from after at the new tier's; a downgrade likewise; an event at the very
moment of a change at the new tier; a member with no tier then as one without a tier; a
temporary upgrade that has ended by the time the event arrives, for the time it covered;
a batch mixing members and times; and rule conditions and birthday gifts by tier."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event as sa_event

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.events import service
from jifen.events.schemas import EventIn, EventResult
from jifen.points import service as points_service
from jifen.programs import service as programs_service
from jifen.rules import service as rules
from jifen.rules.schemas import RuleSpec
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef
from tests.factories import assert_ledger_sound, new_members, new_program
from tests.tiers.scheme import TIERS, scheme

BENEFITS = {
    "银卡": {"earn_multiplier": "1.2", "daily_earn_cap": 1500, "birthday_gift": 500},
    "金卡": {"earn_multiplier": "1.5", "daily_earn_cap": 5000, "birthday_gift": 1000},
}
CAMPAIGN = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 12, tzinfo=UTC))
PLACED = datetime(2026, 1, 5, tzinfo=UTC)
CHANGED = datetime(2026, 1, 10, 4, tzinfo=UTC)  # noon in Shanghai
BEFORE = datetime(2026, 1, 8, 4, tzinfo=UTC)
AFTER = datetime(2026, 1, 11, 4, tzinfo=UTC)
ARRIVES = datetime(2026, 1, 12, 4, tzinfo=UTC)


class Shop:
    """A programme of the four tiers whose matrix multiplies and caps 银卡 and 金卡 and gives
    them birthday gifts (no upgrade at once: only staff and 双11 move tiers), earning a
    point a yuan, and 100 more on an order of a 金卡 member (a condition on the tier)."""

    def __init__(self, db: Database, members: int) -> None:
        self.db = db
        assert isinstance(db.clock, ManualClock)
        self.clock = db.clock
        self.program = new_program(db)
        self.members = new_members(db, self.program.id, members)
        matrix = scheme(upgrade_at_once=False, campaigns=[CAMPAIGN], benefits=BENEFITS)

        def configure(uow: UnitOfWork) -> None:
            program_id = self.program.id
            tiers.set_tiers(uow, program_id=program_id, definitions=[TierDef(**t) for t in TIERS])
            settings = programs_service.get_settings(uow, program_id=program_id)
            programs_service.set_settings(
                uow, program_id=program_id,
                settings=settings.model_copy(update={"tier_scheme": matrix}),
            )  # fmt: skip
            for code, params, condition in (
                ("base", {"kind": "spend_rate", "rate": "1"}, None),
                ("gold", {"kind": "fixed", "points": 100}, 'member.tier == "金卡"'),
            ):
                spec = RuleSpec.model_validate({
                    "code": code, "name": code, "event_types": ["order.paid"],
                    "params": params, "condition": condition,
                })  # fmt: skip
                draft = rules.create_version(
                    uow, program_id=program_id, spec=spec, created_by="maker"
                )
                rules.submit(uow, program_id=program_id, version_id=draft.id, approval_id=None)
                rules.approve(
                    uow, program_id=program_id, version_id=draft.id, approved_by="checker"
                )

        db.run(configure)

    def set_tier(self, member_id: int, tier: str, at: datetime) -> None:
        self.clock.set(at)
        self.db.run(
            lambda uow: tiers.set_member_tier(
                uow, program_id=self.program.id, member_id=member_id, tier=tier,
                reason="by hand", set_by="staff",
            )
        )  # fmt: skip

    def order(self, member_id: int, at: datetime, yuan: int = 1000) -> EventIn:
        order_id = uuid.uuid4().hex[:12]
        return EventIn(
            source="pos", external_id=order_id, type="order.paid", occurred_at=at,
            member_id=member_id,
            payload={"order_id": order_id, "lines": [{"sku": "s", "amount_fen": yuan * 100}]},
        )  # fmt: skip

    def take(self, *events: EventIn) -> list[EventResult]:
        """The events taken in together, now."""
        outcomes = self.db.run(
            lambda uow: service.ingest_many(uow, program_id=self.program.id, events=events)
        )
        assert all(isinstance(o, EventResult) for o in outcomes), outcomes
        return outcomes  # type: ignore[return-value]

    def tiers_at(self, moment: datetime) -> dict[int, str]:
        return self.db.run(
            lambda uow: tiers.tiers_at(uow, member_ids=self.members, moment=moment),
            read_only=True,
        )


def awards(result: EventResult) -> list[tuple[str, int, str | None]]:
    return [(a.rule, a.points, a.cap) for a in result.awards]


def test_a_late_order_from_before_an_upgrade_earns_and_is_capped_at_the_old_tier(
    db: Database,
) -> None:
    shop = Shop(db, members=1)
    (alice,) = shop.members
    shop.set_tier(alice, "银卡", PLACED)
    shop.set_tier(alice, "金卡", CHANGED)
    shop.clock.set(ARRIVES)
    # two orders of the day before the upgrade, sent late: 银卡's 1.2, and its daily cap of
    # 1,500 leaves the second 300 of the 1,200 it asks; no 金卡 award
    first, second = shop.take(shop.order(alice, BEFORE), shop.order(alice, BEFORE))
    assert awards(first) == [("base", 1000, None), ("tier_benefit", 200, None)]
    assert second.points == 300
    assert {a.cap for a in second.awards} >= {"tier_day (银卡: 1500)"}
    # the order of the upgrade's very moment, and one after, earn as 金卡: 1.5 and the
    # condition on the tier, under 金卡's cap of 5,000
    (at_change,) = shop.take(shop.order(alice, CHANGED))
    (after,) = shop.take(shop.order(alice, AFTER))
    for result in (at_change, after):
        assert sorted(awards(result)) == [
            ("base", 1000, None), ("gold", 100, None), ("tier_benefit", 500, None),
        ]  # fmt: skip
    # the late day's room is 银卡's: nothing more that day, whatever the tier now
    (third,) = shop.take(shop.order(alice, BEFORE + timedelta(hours=1)))
    assert third.points == 0
    assert_ledger_sound(db, shop.program.id)


def test_a_late_order_from_before_a_downgrade_earns_at_the_old_tier(db: Database) -> None:
    shop = Shop(db, members=1)
    (bob,) = shop.members
    shop.set_tier(bob, "金卡", PLACED)
    shop.set_tier(bob, "银卡", CHANGED)
    shop.clock.set(ARRIVES)
    before, after = shop.take(shop.order(bob, BEFORE, 4000), shop.order(bob, AFTER, 4000))
    # 金卡 then: 4,000 + 2,000 + 100, under its cap of 5,000
    assert before.points == 5000 and "gold" in {a.rule for a in before.awards}
    # 银卡 now: 4,000 × 1.2 = 4,800, cut to its cap of 1,500
    assert after.points == 1500 and "gold" not in {a.rule for a in after.awards}
    # a birthday the day before, sent late: 金卡's gift
    (gift,) = shop.take(
        EventIn(
            source="crm", external_id="birthday", type="member.birthday",
            occurred_at=BEFORE - timedelta(days=1), member_id=bob, payload={"year": 2026},
        )
    )  # fmt: skip
    assert awards(gift) == [("tier_benefit", 1000, None)]


def test_a_batch_of_members_and_times_reads_each_tier_at_each_events_time(
    db: Database,
) -> None:
    shop = Shop(db, members=5)
    up, down, new, steady, none = shop.members
    shop.set_tier(up, "银卡", PLACED)
    shop.set_tier(down, "金卡", PLACED)
    shop.set_tier(steady, "银卡", PLACED)
    shop.set_tier(up, "金卡", CHANGED)
    shop.set_tier(down, "银卡", CHANGED)
    shop.set_tier(new, "银卡", CHANGED)  # no tier before
    shop.clock.set(ARRIVES)
    sent: list[tuple[int, datetime]] = [
        (up, AFTER), (down, BEFORE), (new, BEFORE), (steady, BEFORE), (none, BEFORE),
        (up, BEFORE), (down, AFTER), (new, AFTER), (steady, AFTER), (none, AFTER),
        (new, CHANGED), (down, CHANGED - timedelta(microseconds=1)),
    ]  # fmt: skip
    results = shop.take(*(shop.order(m, at) for m, at in sent))
    got = [r.points for r in results]
    gold, silver, plain = 1600, 1200, 1000
    assert got == [
        gold, gold, plain, silver, plain,
        silver, silver, silver, silver, plain,
        silver, gold,
    ]  # fmt: skip
    # the events of members whose tier changed after them were evaluated with what
    # tiers_at answers
    assert shop.tiers_at(BEFORE) == {up: "银卡", down: "金卡", steady: "银卡"}
    assert shop.tiers_at(CHANGED) == {up: "金卡", down: "银卡", new: "银卡", steady: "银卡"}
    assert_ledger_sound(db, shop.program.id)


def test_a_temporary_upgrade_counts_for_the_time_it_covered_after_it_ended(
    db: Database,
) -> None:
    shop = Shop(db, members=2)
    lent, untiered = shop.members
    shop.set_tier(lent, "普通", PLACED)
    # 双11: 4,000 points earned (campaign score 160 ≥ 1.2 × 101) lend 银卡 for a month, to a
    # member of 普通 and to one with no tier
    shop.clock.set(datetime(2026, 11, 11, 10, tzinfo=UTC))

    def earn(uow: UnitOfWork) -> None:
        for member_id in shop.members:
            points_service.earn(uow, member_id=member_id, amount=4000, key=uuid.uuid4().hex)
        tiers.after_earning(
            uow, program_id=shop.program.id, member_ids=shop.members, now=uow.clock.now()
        )

    db.run(earn)
    assert shop.tiers_at(shop.clock.now()) == {lent: "银卡", untiered: "银卡"}
    # it is due on 11 December at 10:00; the job ends it two hours later
    shop.clock.set(datetime(2026, 12, 11, 12, tzinfo=UTC))
    ended = db.run(
        lambda uow: tiers.end_temporary(uow, program_id=shop.program.id, now=uow.clock.now())
    )
    assert ended == 2
    shop.clock.set(datetime(2026, 12, 20, tzinfo=UTC))
    during, due, after, before = shop.take(
        shop.order(lent, datetime(2026, 11, 20, tzinfo=UTC)),
        # past its end but before the job ended it: what earnings read then, 银卡
        shop.order(lent, datetime(2026, 12, 11, 11, tzinfo=UTC)),
        shop.order(lent, datetime(2026, 12, 12, 4, tzinfo=UTC)),
        shop.order(untiered, datetime(2026, 11, 11, 9, tzinfo=UTC)),
    )
    assert [during.points, due.points, after.points, before.points] == [1200, 1200, 1000, 1000]


def test_events_of_now_read_no_tier_change(db: Database) -> None:
    """Members whose tier was last written before their events' time cost no query of the
    changes; one changed since costs one, for the whole batch."""
    shop = Shop(db, members=3)
    for member_id in shop.members:
        shop.set_tier(member_id, "银卡", PLACED)
    shop.clock.set(ARRIVES)
    read: list[str] = []

    def watch(*args: Any) -> None:
        statement = args[2]
        if "tier_changes" in statement and statement.lstrip().upper().startswith("SELECT"):
            read.append(statement)

    sa_event.listen(db.engine, "before_cursor_execute", watch)
    try:
        shop.take(*(shop.order(m, ARRIVES) for m in shop.members))
        assert read == []
        # the next day, one member is upgraded an hour after the batch's orders
        day = ARRIVES + timedelta(days=1)
        shop.set_tier(shop.members[0], "金卡", day + timedelta(hours=1))
        shop.clock.set(day + timedelta(hours=2))
        results = shop.take(*(shop.order(m, day) for m in shop.members))
        assert len(read) == 1
        assert [r.points for r in results] == [1200, 1200, 1200]
    finally:
        sa_event.remove(db.engine, "before_cursor_execute", watch)
