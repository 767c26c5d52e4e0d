"""Tiers by score over time, on both backends: two simulated years of quarterly
evaluations moving members up and down, upgrades at once, a temporary upgrade during a
campaign ending by itself, and every change recorded with its reason."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.events import service as events_service
from jifen.events.schemas import EventIn
from jifen.members import service as members_service
from jifen.points import service as points_service
from jifen.programs import service as programs_service
from jifen.tiers import service
from jifen.tiers.models import member_tiers
from jifen.tiers.schemas import TierDef, TierScheme
from tests.factories import new_members, new_program
from tests.tiers.scheme import TIERS, scheme, scheme_json

SHANGHAI_MIDNIGHT = timedelta(hours=-8)


def quarter(year: int, month: int) -> datetime:
    """The first of ``month`` at 00:00 in Shanghai, in UTC."""
    return datetime(year, month, 1, tzinfo=UTC) + SHANGHAI_MIDNIGHT


class World:
    def __init__(
        self,
        db: Database,
        tier_scheme: TierScheme,
        members: int = 3,
        *,
        time_zone: str = "Asia/Shanghai",
    ) -> None:
        self.db = db
        self.clock = db.clock
        assert isinstance(self.clock, ManualClock)
        self.program = new_program(db, time_zone=time_zone)
        self.members = new_members(db, self.program.id, members)

        def configure(uow: UnitOfWork) -> None:
            service.set_tiers(
                uow, program_id=self.program.id, definitions=[TierDef(**t) for t in TIERS]
            )
            settings = programs_service.get_settings(uow, program_id=self.program.id)
            programs_service.set_settings(
                uow,
                program_id=self.program.id,
                settings=settings.model_copy(update={"tier_scheme": tier_scheme}),
            )

        db.run(configure)

    def at(self, moment: datetime) -> None:
        self.clock.set(moment)

    def order(self, member_id: int, yuan: int, *, earn: bool = False) -> None:
        """An order paid now (no earning rule: it counts as spend only)."""
        order_id = uuid.uuid4().hex[:12]
        event = EventIn(
            source="pos", external_id=order_id, type="order.paid",
            occurred_at=self.clock.now(), member_id=member_id,
            payload={"order_id": order_id, "lines": [{"sku": "s", "amount_fen": yuan * 100}]},
        )  # fmt: skip
        self.db.run(lambda uow: events_service.ingest(uow, program_id=self.program.id, event=event))

    def check_in(self, member_id: int) -> None:
        event = EventIn(
            source="app", external_id=uuid.uuid4().hex, type="member.checked_in",
            occurred_at=self.clock.now(), member_id=member_id,
        )  # fmt: skip
        self.db.run(lambda uow: events_service.ingest(uow, program_id=self.program.id, event=event))

    def earn(self, member_id: int, points: int) -> None:
        """Points earned now, then what the events service does after an earning."""

        def work(uow: UnitOfWork) -> None:
            points_service.earn(uow, member_id=member_id, amount=points, key=uuid.uuid4().hex)
            service.after_earning(
                uow, program_id=self.program.id, member_ids=[member_id], now=uow.clock.now()
            )

        self.db.run(work)

    def evaluate(self, reason: str, chunk: int = 2) -> dict[str, int]:
        """What a job runner does: the programme chunk by chunk, one transaction each."""
        now = self.clock.now()
        totals = {"evaluated": 0, "upgraded": 0, "downgraded": 0, "unchanged": 0}
        after = 0
        while True:

            def step(uow: UnitOfWork, after: int = after) -> Any:
                ids = service.member_ids_page(
                    uow, program_id=self.program.id, after_member_id=after, limit=chunk
                )
                return service.evaluate(
                    uow, program_id=self.program.id, member_ids=ids, now=now, reason=reason
                )

            report = self.db.run(step)
            if report.last_member_id is None:
                return totals
            for name in totals:
                totals[name] += getattr(report, name)
            after = report.last_member_id

    def tier(self, member_id: int) -> str | None:
        return self.db.run(
            lambda uow: service.member_tier(uow, program_id=self.program.id, member_id=member_id),
            read_only=True,
        ).tier

    def tiers(self) -> list[str | None]:
        return [self.tier(m) for m in self.members]

    def history(self, member_id: int) -> list[tuple[str | None, str, str]]:
        items, _ = self.db.run(
            lambda uow: service.history(
                uow, program_id=self.program.id, member_id=member_id, before_id=None, limit=100
            ),
            read_only=True,
        )
        return [(c.from_tier, c.to_tier, c.kind) for c in reversed(items)]


def test_two_years_of_quarterly_evaluations(db: Database) -> None:
    campaign = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 12, tzinfo=UTC))
    world = World(db, scheme(upgrade_at_once=False, campaigns=[campaign]))
    alice, bob, carol = world.members

    # Q1 2026: alice spends 3,000 yuan (120), bob 8,000 (320), carol nothing
    world.at(datetime(2026, 2, 10, tzinfo=UTC))
    world.order(alice, 3000)
    world.order(bob, 8000)
    # without upgrade_at_once nobody moves before the evaluation
    world.earn(bob, 100)
    assert world.tiers() == [None, None, None]
    world.at(quarter(2026, 4))
    assert world.evaluate("2026-Q1") == {
        "evaluated": 3, "upgraded": 3, "downgraded": 0, "unchanged": 0,
    }  # fmt: skip
    assert world.tiers() == ["银卡", "金卡", "普通"]
    # evaluating again changes nothing, and writes nothing
    assert world.evaluate("again")["unchanged"] == 3

    # Q2: bob earns 5,000 points (200): 320 + 200 = 520, still 金卡
    world.at(datetime(2026, 5, 10, tzinfo=UTC))
    world.earn(bob, 4900)
    world.at(quarter(2026, 7))
    world.evaluate("2026-Q2")
    assert world.tiers() == ["银卡", "金卡", "普通"]

    # Q3: bob spends 2,500 yuan (80) and checks in once: 601, 钻石
    world.at(datetime(2026, 8, 15, tzinfo=UTC))
    world.order(bob, 2500)
    world.check_in(bob)
    world.at(quarter(2026, 10))
    world.evaluate("2026-Q3")
    assert world.tiers() == ["银卡", "钻石", "普通"]

    # 双11: carol spends 4,000 yuan in the campaign (160 ≥ 120 % of 银卡's 101): 银卡 for a month
    world.at(datetime(2026, 11, 11, 10, tzinfo=UTC))
    world.order(carol, 4000)
    world.earn(carol, 1)  # an earning is what checks
    assert world.tier(carol) == "银卡"
    lent = db.run(
        lambda uow: service.member_tier(uow, program_id=world.program.id, member_id=carol)
    )
    assert lent.temporary_until == datetime(2026, 12, 11, 10, tzinfo=UTC)
    assert lent.returns_to == "普通"
    # it ends by itself a month later, not before
    ended = lambda: db.run(  # noqa: E731
        lambda uow: service.end_temporary(uow, program_id=world.program.id, now=uow.clock.now())
    )
    world.at(datetime(2026, 12, 11, 9, tzinfo=UTC))
    assert ended() == 0
    world.at(datetime(2026, 12, 11, 10, tzinfo=UTC))
    assert ended() == 1
    assert ended() == 0
    assert world.tier(carol) == "普通"

    # 2026-Q4: carol's 160 counts at evaluation: 银卡, her own now
    world.at(quarter(2027, 1))
    world.evaluate("2026-Q4")
    assert world.tiers() == ["银卡", "钻石", "银卡"]

    # 2027-Q1: February 2026 leaves the 12-month window. alice: 0, below 银卡's 80: 普通.
    # bob spends 7,000 yuan in March (280): 80 + 160 + 1 + 280 = 521, below 钻石's 601 but
    # above its retention line 480: kept
    world.at(datetime(2027, 3, 20, tzinfo=UTC))
    world.order(bob, 7000)
    world.at(quarter(2027, 4))
    assert world.evaluate("2027-Q1")["downgraded"] == 1
    assert world.tiers() == ["普通", "钻石", "银卡"]

    # 2027-Q2: bob's 4,900 points of May 2026 leave: 361, below 480: down to 金卡, the tier
    # 361 reaches
    world.at(quarter(2027, 7))
    world.evaluate("2027-Q2")
    assert world.tiers() == ["普通", "金卡", "银卡"]

    # 2027-Q3: bob's August 2026 spend and check-in leave: 280, above 金卡's line 240: kept
    world.at(quarter(2027, 10))
    world.evaluate("2027-Q3")
    assert world.tiers() == ["普通", "金卡", "银卡"]

    # 2027-Q4: carol's 双11 spend leaves: 0, below 银卡's 80
    world.at(quarter(2028, 1))
    world.evaluate("2027-Q4")
    assert world.tiers() == ["普通", "金卡", "普通"]

    # every change was recorded, with its kind and its reason
    assert world.history(alice) == [(None, "银卡", "evaluation"), ("银卡", "普通", "evaluation")]
    assert world.history(bob) == [
        (None, "金卡", "evaluation"),
        ("金卡", "钻石", "evaluation"),
        ("钻石", "金卡", "evaluation"),
    ]
    assert world.history(carol) == [
        (None, "普通", "evaluation"),
        ("普通", "银卡", "temporary"),
        ("银卡", "普通", "temporary_end"),
        ("普通", "银卡", "evaluation"),
        ("银卡", "普通", "evaluation"),
    ]
    items, _ = db.run(
        lambda uow: service.history(
            uow, program_id=world.program.id, member_id=bob, before_id=None, limit=1
        )
    )
    assert items[0].reason == "2027-Q2; score 361 is below 钻石's retention line 480"
    assert items[0].score == 361 and items[0].actor == "tiers"


def test_an_evaluation_leaves_closed_members_alone(db: Database) -> None:
    """A closed account is done with: evaluations neither move its tier nor announce it (a
    webhook naming the member, a note in its inbox) quarter after quarter."""
    world = World(db, scheme(upgrade_at_once=False), members=2)
    alice, bob = world.members
    for member_id in (alice, bob):
        db.run(
            lambda uow, m=member_id: service.set_member_tier(
                uow, program_id=world.program.id, member_id=m, tier="银卡", reason="", set_by="t"
            )
        )
    db.run(
        lambda uow: members_service.change_state(
            uow, program_id=world.program.id, member_id=bob, state="closed"
        )
    )
    world.at(quarter(2027, 1))
    assert world.evaluate("2027-Q1")["downgraded"] == 1  # alice's score of 0 is below 80
    assert world.tiers() == ["普通", "银卡"]
    assert world.history(bob) == [(None, "银卡", "manual")]


def test_staff_cannot_change_the_tier_of_a_closed_member(db: Database) -> None:
    from jifen.errors import StateConflict

    world = World(db, scheme(), members=1)
    (bob,) = world.members

    def set_tier(tier: str) -> Any:
        return db.run(
            lambda uow: service.set_member_tier(
                uow, program_id=world.program.id, member_id=bob, tier=tier, reason="", set_by="t"
            )
        )

    set_tier("银卡")
    db.run(
        lambda uow: members_service.change_state(
            uow, program_id=world.program.id, member_id=bob, state="closed"
        )
    )
    with pytest.raises(StateConflict) as caught:
        set_tier("钻石")
    assert "is closed" in str(caught.value)
    assert world.tier(bob) == "银卡"
    assert world.history(bob) == [(None, "银卡", "manual")]


def test_a_claw_back_counts_in_the_window_of_the_earning_it_takes_back(db: Database) -> None:
    world = World(db, scheme(upgrade_at_once=False), members=2)
    alice, bob = world.members

    def earn(member_id: int, points: int) -> int:
        return db.run(
            lambda uow: (
                points_service.earn(
                    uow, member_id=member_id, amount=points, key=uuid.uuid4().hex
                ).id
            )
        )

    # both earn 5,000 points on 20 March 2026, before the window of the 2027-Q1 evaluation
    world.at(datetime(2026, 3, 20, tzinfo=UTC))
    alices = earn(alice, 5000)
    earn(bob, 5000)
    # alice's are clawed back on 5 April 2026, inside that window
    world.at(datetime(2026, 4, 5, tzinfo=UTC))
    db.run(lambda uow: points_service.reverse(uow, earn_id=alices, key="cb", reason="fraud"))
    # both earn 3,000 points in June 2026: 120, 银卡
    world.at(datetime(2026, 6, 1, tzinfo=UTC))
    earn(alice, 3000)
    earn(bob, 3000)
    world.at(quarter(2027, 4))
    world.evaluate("2027-Q1")
    # the window (1 April 2026 – 1 April 2027) holds the same earnings for both: 3,000
    assert world.tiers() == ["银卡", "银卡"]
    # and a claw-back in the window of an earning in it takes it off: 5,000 - 2,000
    world.at(datetime(2027, 5, 1, tzinfo=UTC))
    bobs = earn(bob, 5000)
    world.at(datetime(2027, 5, 2, tzinfo=UTC))
    db.run(lambda uow: points_service.reverse(uow, earn_id=bobs, key="cb2", amount=2000))
    score = db.run(
        lambda uow: service.member_score(
            uow, program_id=world.program.id, member_id=bob, now=uow.clock.now()
        )
    )
    assert score.earned_points == 3000 + 3000


def test_an_earning_upgrades_at_once_and_only_evaluation_downgrades(db: Database) -> None:
    world = World(db, scheme(upgrade_at_once=True), members=2)
    alice, bob = world.members
    world.at(datetime(2026, 2, 1, tzinfo=UTC))
    world.earn(alice, 2000)  # 80: not yet
    assert world.tier(alice) is None
    world.earn(alice, 600)  # 2,000 + 600 = 2 blocks of 1,000 points: still 80
    assert world.tier(alice) is None
    # +40 = 120: the order's spend crosses 银卡's threshold, though it earns nothing
    world.order(alice, 1000)
    assert world.tier(alice) == "银卡"
    world.earn(alice, 1)
    assert world.history(alice) == [(None, "银卡", "upgrade")]
    # bob is set by hand to 钻石; no earning takes him down, an evaluation does
    db.run(
        lambda uow: service.set_member_tier(
            uow, program_id=world.program.id, member_id=bob, tier="钻石", reason="VIP", set_by="ops"
        )
    )
    world.earn(bob, 10)
    assert world.tier(bob) == "钻石"
    world.at(quarter(2026, 4))
    report = db.run(
        lambda uow: service.dry_run(uow, program_id=world.program.id, now=uow.clock.now())
    )
    assert (report.evaluated, report.upgraded, report.downgraded) == (2, 0, 1)
    assert world.tier(bob) == "钻石"  # a dry run writes nothing
    world.evaluate("2026-Q1")
    assert world.tiers() == ["银卡", "普通"]
    assert world.history(bob) == [(None, "钻石", "manual"), ("钻石", "普通", "evaluation")]


def test_an_evaluation_needs_a_scheme_that_fits_the_tiers(db: Database) -> None:
    from jifen.errors import InvalidInput, StateConflict

    world = World(db, scheme(), members=1)
    three = TierScheme.model_validate(
        {**scheme().model_dump(mode="json"), "levels": scheme().model_dump()["levels"][:3]}
    )
    with pytest.raises(InvalidInput) as caught:
        db.run(
            lambda uow: service.settings_with_scheme(uow, program_id=world.program.id, scheme=three)
        )
    assert "must be the programme's tiers in rank order" in str(caught.value)
    bare = new_program(db)
    with pytest.raises(StateConflict):
        db.run(
            lambda uow: service.evaluate(
                uow, program_id=bare.id, member_ids=[], now=uow.clock.now()
            )
        )


def test_the_tiers_cannot_stop_fitting_the_live_scheme(db: Database) -> None:
    from jifen.errors import StateConflict

    world = World(db, scheme(), members=1)
    program_id = world.program.id

    def put(definitions: list[dict[str, Any]]) -> list[str]:
        return [
            t.code
            for t in db.run(
                lambda uow: service.set_tiers(
                    uow, program_id=program_id, definitions=[TierDef(**d) for d in definitions]
                )
            )
        ]

    # a fifth tier, a dropped one, or two swapped would stop every evaluation: refused
    fifth = [*TIERS, {"code": "黑金", "name": "黑金会员", "rank": 4}]
    swapped = [{**TIERS[1], "rank": 2}, {**TIERS[2], "rank": 1}, TIERS[0], TIERS[3]]
    for definitions in (fifth, TIERS[:3], swapped):
        with pytest.raises(StateConflict) as caught:
            put(definitions)
        assert "普通, 银卡, 金卡, 钻石" in caught.value.message("en")
    assert put(TIERS) == ["普通", "银卡", "金卡", "钻石"]
    # names may change, and ranks too while the order stays
    renamed = [{**t, "name": f"{t['name']}+", "rank": t["rank"] * 10} for t in TIERS]
    assert put(renamed) == ["普通", "银卡", "金卡", "钻石"]
    # without a scheme the tiers are free to change
    db.run(
        lambda uow: programs_service.set_settings(
            uow, program_id=program_id,
            settings=programs_service.get_settings(uow, program_id=program_id).model_copy(
                update={"tier_scheme": None}
            ),
        )
    )  # fmt: skip
    assert put(fifth) == ["普通", "银卡", "金卡", "钻石", "黑金"]
    assert db.run(lambda uow: service.scheme_of(uow, program_id=program_id)) is None


def test_pricing_reads_the_matrix_discount_unless_the_policy_names_the_tier(db: Database) -> None:
    from jifen.rewards.schemas import RedemptionPolicy, TierTerms

    matrix = {"银卡": {"discount_pct": 90}, "金卡": {"discount_pct": 80, "earn_multiplier": "1.5"}}
    world = World(db, scheme(benefits=matrix), members=1)

    def policy(uow: UnitOfWork) -> RedemptionPolicy:
        return service.redemption_policy(uow, program_id=world.program.id)

    read = db.run(policy, read_only=True)
    assert read.for_tier("银卡").discount_pct == 90 and read.for_tier("金卡").discount_pct == 80
    assert read.for_tier("普通").discount_pct == 100

    def explicit(uow: UnitOfWork) -> RedemptionPolicy:
        settings = programs_service.get_settings(uow, program_id=world.program.id)
        redemption = settings.redemption.model_copy(
            update={"tiers": {"金卡": TierTerms(discount_pct=75, per_month=9)}}
        )
        programs_service.set_settings(
            uow,
            program_id=world.program.id,
            settings=settings.model_copy(update={"redemption": redemption}),
        )
        return policy(uow)

    changed = db.run(explicit)
    assert changed.for_tier("金卡").discount_pct == 75 and changed.for_tier("金卡").per_month == 9
    assert changed.for_tier("银卡").discount_pct == 90
    multipliers, caps = db.run(
        lambda uow: service.earning_terms(uow, program_id=world.program.id), read_only=True
    )
    assert multipliers == {"金卡": 1.5} and caps == {}


def test_the_matrix_gives_validity_and_birthday_gifts_unless_policy_or_rule_say_otherwise(
    db: Database,
) -> None:
    from jifen.rules import service as rules_service
    from jifen.rules.schemas import RuleSpec

    matrix = {
        "银卡": {"validity_months": 18, "birthday_gift": 500},
        "金卡": {"birthday_gift": 1000},
    }
    world = World(db, scheme(benefits=matrix), members=3)
    silver, gold, plain = world.members
    world.at(datetime(2026, 6, 10, 4, tzinfo=UTC))  # noon in Shanghai

    def place(uow: UnitOfWork) -> None:
        for member, tier in ((silver, "银卡"), (gold, "金卡"), (plain, "普通")):
            service.set_member_tier(
                uow, program_id=world.program.id, member_id=member, tier=tier, reason="t",
                set_by="t",
            )  # fmt: skip

    db.run(place)

    def birthday(member_id: int, year: int) -> tuple[int, list[tuple[str, str, int]]]:
        event = EventIn(
            source="jifen", external_id=f"birthday:{member_id}:{year}", type="member.birthday",
            occurred_at=world.clock.now(), member_id=member_id, payload={"year": year},
        )  # fmt: skip
        result = db.run(
            lambda uow: events_service.ingest(uow, program_id=world.program.id, event=event)
        )
        return result.points, [(a.rule, a.kind, a.points) for a in result.awards]

    def expiries(member_id: int) -> list[datetime | None]:
        page = db.run(lambda uow: points_service.lots_page(uow, member_id=member_id),
                      read_only=True)  # fmt: skip
        return [lot.expires_at for lot in page.items]

    # the matrix's gift by tier; 银卡's points valid 18 months (to the end of 10 Dec 2027)
    assert birthday(silver, 2026) == (500, [("tier_benefit", "birthday_gift", 500)])
    assert birthday(gold, 2026) == (1000, [("tier_benefit", "birthday_gift", 1000)])
    assert birthday(plain, 2026) == (0, [])
    assert expiries(silver) == [datetime(2027, 12, 10, 16, tzinfo=UTC)]
    assert expiries(gold) != expiries(silver)

    # a policy that names 银卡's validity wins over the matrix; a live birthday rule too
    def configure(uow: UnitOfWork) -> None:
        settings = programs_service.get_settings(uow, program_id=world.program.id)
        expiry = type(settings.expiry).model_validate(
            {**settings.expiry.model_dump(), "by_tier": {"银卡": {"kind": "never"}}}
        )
        programs_service.set_settings(
            uow,
            program_id=world.program.id,
            settings=settings.model_copy(update={"expiry": expiry}),
        )
        spec = RuleSpec.model_validate({
            "code": "birthday", "name": "birthday", "event_types": ["member.birthday"],
            "params": {"kind": "birthday_gift", "by_tier": {"银卡": 200}},
        })  # fmt: skip
        draft = rules_service.create_version(
            uow, program_id=world.program.id, spec=spec, created_by="maker"
        )
        rules_service.submit(
            uow, program_id=world.program.id, version_id=draft.id, approval_id=None
        )
        rules_service.approve(
            uow, program_id=world.program.id, version_id=draft.id, approved_by="checker"
        )

    db.run(configure)
    world.at(datetime(2027, 6, 10, 4, tzinfo=UTC))
    assert birthday(silver, 2027) == (200, [("birthday", "birthday_gift", 200)])
    assert birthday(gold, 2027)[0] == 0  # the rule gives 金卡 nothing: the matrix stays out
    assert expiries(silver) == [datetime(2027, 12, 10, 16, tzinfo=UTC), None]


def lend_silver_in_double_eleven(db: Database, members: int) -> World:
    """Members of a programme whose 双11 lends 银卡 for a month, each earning 4,000 points
    (campaign score 160 ≥ 120 % of 101) on 11 November 2026; the first has no tier before,
    the others hold 普通."""
    campaign = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 12, tzinfo=UTC))
    world = World(db, scheme(upgrade_at_once=False, campaigns=[campaign]), members=members)
    for member_id in world.members[1:]:
        db.run(
            lambda uow, m=member_id: service.set_member_tier(
                uow, program_id=world.program.id, member_id=m, tier="普通", reason="", set_by="t"
            )
        )
    world.at(datetime(2026, 11, 11, 10, tzinfo=UTC))
    for member_id in world.members:
        world.earn(member_id, 4000)
    assert world.tiers() == ["银卡"] * members
    return world


def forget_what_it_returns_to(db: Database, member_id: int) -> None:
    """A temporary upgrade as jifen stored it for a member with no tier before the tier it
    returns to was recorded: none."""
    with db.engine.begin() as conn:
        conn.execute(
            member_tiers.update()
            .where(member_tiers.c.member_id == member_id)
            .values(base_tier_code=None)
        )


def test_a_member_with_no_tier_lent_one_goes_back_to_the_entry_tier(db: Database) -> None:
    world = lend_silver_in_double_eleven(db, members=3)
    alice, bob, carol = world.members

    def returns_to(member_id: int) -> str | None:
        return db.run(
            lambda uow: service.member_tier(uow, program_id=world.program.id, member_id=member_id)
        ).returns_to

    # alice had no tier: she returns to the entry tier, as bob (普通) does
    assert [returns_to(alice), returns_to(bob)] == ["普通", "普通"]
    # carol's upgrade was lent before that was recorded: it names no tier to go back to
    forget_what_it_returns_to(db, carol)
    # when the month is over, one chunk ends all three: carol too, to the entry tier
    world.at(datetime(2026, 12, 11, 10, tzinfo=UTC))
    ended = db.run(
        lambda uow: service.end_temporary(uow, program_id=world.program.id, now=uow.clock.now())
    )
    assert ended == 3
    assert world.tiers() == ["普通", "普通", "普通"]
    assert world.history(alice) == [(None, "银卡", "temporary"), ("银卡", "普通", "temporary_end")]
    assert world.history(carol)[-1] == ("银卡", "普通", "temporary_end")


def test_a_tier_members_return_to_after_a_temporary_upgrade_cannot_be_removed(
    db: Database,
) -> None:
    from jifen.errors import StateConflict

    world = lend_silver_in_double_eleven(db, members=2)
    without_entry = [TierDef(**t) for t in TIERS if t["code"] != "普通"]
    with pytest.raises(StateConflict) as caught:
        db.run(
            lambda uow: service.set_tiers(
                uow, program_id=world.program.id, definitions=without_entry
            )
        )
    assert "tier '普通' when it ends" in str(caught.value)
    listed = db.run(lambda uow: service.list_tiers(uow, program_id=world.program.id))
    assert [t.code for t in listed] == [t["code"] for t in TIERS]
    # when the month is over the members go back to a tier the programme has
    world.at(datetime(2026, 12, 11, 10, tzinfo=UTC))
    db.run(lambda uow: service.end_temporary(uow, program_id=world.program.id, now=uow.clock.now()))
    assert world.tiers() == ["普通", "普通"]


def test_a_temporary_tier_the_members_score_holds_becomes_its_own_as_a_recorded_change(
    db: Database,
) -> None:
    from jifen.notify.models import inbox_messages

    world = lend_silver_in_double_eleven(db, members=2)
    alice, bob = world.members
    # an evaluation before the month is over: their own score of 160 holds 银卡
    world.at(datetime(2026, 12, 1, tzinfo=UTC))
    world.evaluate("on demand")
    assert world.tiers() == ["银卡", "银卡"]
    held = db.run(lambda uow: service.member_tier(uow, program_id=world.program.id, member_id=bob))
    assert (held.temporary_until, held.returns_to) == (None, None)
    assert world.history(bob) == [
        (None, "普通", "manual"), ("普通", "银卡", "temporary"), ("银卡", "银卡", "evaluation"),
    ]  # fmt: skip
    items, _ = db.run(
        lambda uow: service.history(
            uow, program_id=world.program.id, member_id=bob, before_id=None, limit=1
        )
    )
    assert items[0].reason == (
        "on demand; temporary 银卡 is the member's own now: score 160 reaches 银卡 (from 101)"
    )
    # the member hears that the tier is its own, not that it changed from 银卡 to 银卡
    with db.engine.connect() as conn:
        notes = conn.execute(
            select(inbox_messages.c.template, inbox_messages.c.title)
            .where(inbox_messages.c.member_id == bob)
            .order_by(inbox_messages.c.id)
        ).all()
    assert [(template, title) for template, title in notes][-1] == (
        "tier.kept",
        "您的 银卡 等级已转为正式等级",
    )
    # evaluating again changes nothing: the tier is its own already
    world.evaluate("again")
    assert len(world.history(bob)) == 3 and len(world.history(alice)) == 2


def test_the_tier_at_a_moment_walks_back_the_recorded_changes(db: Database) -> None:
    world = lend_silver_in_double_eleven(db, members=3)
    alice, bob, carol = world.members  # alice had no tier; bob and carol 普通 from the start
    never = db.run(
        lambda uow: (
            members_service.register_member(
                uow, program_id=world.program.id, external_ref="never"
            ).id
        )
    )
    placed = db.run(
        lambda uow: service.history(
            uow, program_id=world.program.id, member_id=bob, before_id=None, limit=100
        ),
        read_only=True,
    )[0][-1].at
    lent = datetime(2026, 11, 11, 10, tzinfo=UTC)
    # due on 11 December at 10:00, the upgrades are ended by the job at 12:00; bob is then
    # put in 金卡 by hand
    world.at(datetime(2026, 12, 11, 12, tzinfo=UTC))
    assert (
        db.run(
            lambda uow: service.end_temporary(uow, program_id=world.program.id, now=uow.clock.now())
        )
        == 3
    )
    moved = datetime(2026, 12, 15, tzinfo=UTC)
    world.at(moved)
    db.run(
        lambda uow: service.set_member_tier(
            uow, program_id=world.program.id, member_id=bob, tier="金卡", reason="", set_by="t"
        )
    )
    world.at(datetime(2027, 1, 1, tzinfo=UTC))

    def at(moment: datetime) -> dict[int, str]:
        return db.run(
            lambda uow: service.tiers_at(uow, member_ids=[*world.members, never], moment=moment),
            read_only=True,
        )

    second = timedelta(seconds=1)
    assert at(placed - second) == {}
    assert at(placed) == {bob: "普通", carol: "普通"}
    assert at(lent - second) == {bob: "普通", carol: "普通"}
    # a change's own time is when its tier begins
    assert at(lent) == {alice: "银卡", bob: "银卡", carol: "银卡"}
    assert at(datetime(2026, 11, 30, tzinfo=UTC)) == {alice: "银卡", bob: "银卡", carol: "银卡"}
    # past its end, until the job ended it, the upgrade was what earnings read
    assert at(datetime(2026, 12, 11, 11, tzinfo=UTC))[alice] == "银卡"
    assert at(datetime(2026, 12, 11, 12, tzinfo=UTC)) == {alice: "普通", bob: "普通", carol: "普通"}
    assert at(moved) == {alice: "普通", bob: "金卡", carol: "普通"}
    assert at(world.clock.now()) == at(moved)


def validity_by_tier(world: World) -> None:
    """The programme's points last 12 months for 普通, 36 for 银卡 and 60 for 金卡, and a
    tier change gives the member's lots its tier's validity (``extend``)."""
    from jifen.expiry.schemas import ExpiryPolicy, Validity

    policy = ExpiryPolicy(
        by_tier={
            tier: Validity(kind="rolling", months=months)
            for tier, months in (("普通", 12), ("银卡", 36), ("金卡", 60))
        },
        on_tier_change="extend",
    )

    def configure(uow: UnitOfWork) -> None:
        settings = programs_service.get_settings(uow, program_id=world.program.id)
        settings = settings.model_copy(update={"expiry": policy})
        programs_service.set_settings(uow, program_id=world.program.id, settings=settings)

    world.db.run(configure)


def lots_valid_as(world: World, member_id: int, tier: str) -> bool:
    """Whether each open lot of the member lapses when a lot of ``tier`` made then would."""
    from jifen.expiry import service as expiry_service

    def check(uow: UnitOfWork) -> bool:
        lots = points_service.member_lots(uow, member_id=member_id)
        return bool(lots) and all(
            lot.expires_at
            == expiry_service.lot_expiry(
                uow, program_id=world.program.id, start=lot.available_at, tier=tier
            )
            for lot in lots
        )

    return world.db.run(check, read_only=True)


def earn_valid(world: World, member_id: int, points: int, key: str) -> int:
    """Points earned now, lapsing as the programme's policy dates them for the member's
    tier, then what the events service does after an earning; the earn's id."""
    from jifen.expiry import service as expiry_service

    def work(uow: UnitOfWork) -> int:
        now = uow.clock.now()
        tier = service.tiers_of(uow, member_ids=[member_id]).get(member_id)
        expires_at = expiry_service.lot_expiry(
            uow, program_id=world.program.id, start=now, tier=tier
        )
        earned = points_service.earn(
            uow, member_id=member_id, amount=points, key=key, expires_at=expires_at
        )
        service.after_earning(uow, program_id=world.program.id, member_ids=[member_id], now=now)
        return earned.id

    return world.db.run(work)


def test_a_raise_of_the_tier_a_temporary_upgrade_returns_to_is_recorded_and_extends_lots(
    db: Database,
) -> None:
    campaign = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 12, tzinfo=UTC))
    world = World(db, scheme(upgrade_at_once=False, campaigns=[campaign]), members=1)
    (bob,) = world.members
    validity_by_tier(world)
    db.run(
        lambda uow: service.set_member_tier(
            uow, program_id=world.program.id, member_id=bob, tier="普通", reason="", set_by="t"
        )
    )
    # 双11: bob earns 10,000 points (campaign score 400 ≥ 1.2 × 301): 金卡 for a month
    world.at(datetime(2026, 11, 11, 10, tzinfo=UTC))
    earn_id = earn_valid(world, bob, 10_000, "big")
    assert world.tier(bob) == "金卡" and lots_valid_as(world, bob, "普通")
    # 6,000 of them are clawed back: his own score is 160, 银卡's
    world.at(datetime(2026, 11, 20, tzinfo=UTC))
    db.run(lambda uow: points_service.reverse(uow, earn_id=earn_id, key="cb", amount=6000))
    # an evaluation while 金卡 lasts: he keeps 金卡 and goes back to 银卡, not 普通
    world.at(datetime(2026, 12, 1, tzinfo=UTC))
    assert world.evaluate("on demand")["unchanged"] == 1
    held = db.run(lambda uow: service.member_tier(uow, program_id=world.program.id, member_id=bob))
    assert (held.tier, held.returns_to) == ("金卡", "银卡")
    # recorded as an evaluation of his own tier, which re-dates his lots as 银卡's
    assert world.history(bob)[-1] == ("金卡", "金卡", "evaluation")
    items, _ = db.run(
        lambda uow: service.history(
            uow, program_id=world.program.id, member_id=bob, before_id=None, limit=1
        )
    )
    assert items[0].reason == (
        "on demand; the tier to return to is now 银卡: score 160 reaches 银卡 (from 101)"
    )
    assert items[0].returns_to == "银卡"
    assert lots_valid_as(world, bob, "银卡")
    # points given back to them replay that change with 银卡's validity too, not 金卡's
    from jifen.expiry import service as expiry_service

    def missed(uow: UnitOfWork) -> dict[int, datetime | None]:
        lots = [lot.id for lot in points_service.member_lots(uow, member_id=bob)]
        return expiry_service.tier_dates_missed(
            uow, program_id=world.program.id, member_id=bob, lot_ids=lots
        )

    assert db.run(missed, read_only=True) == {}
    # he hears which tier he goes back to, not that 金卡 changed to 金卡
    from jifen.notify.models import inbox_messages

    with db.engine.connect() as conn:
        titles = conn.execute(
            select(inbox_messages.c.template, inbox_messages.c.title)
            .where(inbox_messages.c.member_id == bob)
            .order_by(inbox_messages.c.id)
        ).all()
    assert tuple(titles[-1]) == ("tier.returns", "您的临时 金卡 等级结束后将回到 银卡")
    # evaluating again records nothing more
    world.evaluate("again")
    assert len(world.history(bob)) == 3
    # the upgrade ends: back to 银卡, the lots keep 银卡's dates
    world.at(datetime(2026, 12, 11, 10, tzinfo=UTC))
    db.run(lambda uow: service.end_temporary(uow, program_id=world.program.id, now=uow.clock.now()))
    assert world.tier(bob) == "银卡"
    assert world.history(bob)[-1] == ("金卡", "银卡", "temporary_end")
    assert lots_valid_as(world, bob, "银卡")


def test_staff_making_a_lent_tier_the_members_own_is_a_recorded_change_that_extends_lots(
    db: Database,
) -> None:
    campaign = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 12, tzinfo=UTC))
    world = World(db, scheme(upgrade_at_once=False, campaigns=[campaign]), members=1)
    (bob,) = world.members
    validity_by_tier(world)
    db.run(
        lambda uow: service.set_member_tier(
            uow, program_id=world.program.id, member_id=bob, tier="普通", reason="", set_by="t"
        )
    )
    # 双11 lends bob 金卡 for a month; his lots keep 普通's twelve months
    world.at(datetime(2026, 11, 11, 10, tzinfo=UTC))
    earn_valid(world, bob, 10_000, "big")
    assert world.tier(bob) == "金卡" and lots_valid_as(world, bob, "普通")
    # staff keep him in 金卡 for good: the tier code stays, his standing changes
    world.at(datetime(2026, 11, 20, tzinfo=UTC))
    db.run(
        lambda uow: service.set_member_tier(
            uow,
            program_id=world.program.id,
            member_id=bob,
            tier="金卡",
            reason="VIP",
            set_by="staff:1",
        )
    )
    held = db.run(lambda uow: service.member_tier(uow, program_id=world.program.id, member_id=bob))
    assert (held.tier, held.temporary_until, held.returns_to) == ("金卡", None, None)
    assert world.history(bob)[-1] == ("金卡", "金卡", "manual")
    assert lots_valid_as(world, bob, "金卡")
    # the month's end takes nothing back
    world.at(datetime(2026, 12, 11, 10, tzinfo=UTC))
    db.run(lambda uow: service.end_temporary(uow, program_id=world.program.id, now=uow.clock.now()))
    assert world.tier(bob) == "金卡" and lots_valid_as(world, bob, "金卡")


def test_a_decision_that_makes_a_tier_the_members_own_and_lends_a_higher_one_records_both(
    db: Database,
) -> None:
    # a one-month score window, and a campaign of two months that lends for two months
    tier_scheme = scheme_json(
        upgrade_at_once=False,
        campaigns=[(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC))],
    )
    tier_scheme["window_months"] = 1
    tier_scheme["temporary_upgrades"][0]["months"] = 2
    world = World(db, TierScheme.model_validate(tier_scheme), members=1)
    (bob,) = world.members
    validity_by_tier(world)
    db.run(
        lambda uow: service.set_member_tier(
            uow, program_id=world.program.id, member_id=bob, tier="普通", reason="", set_by="t"
        )
    )
    # 5 November: 7,000 points (campaign score 280 ≥ 1.2 × 101): 银卡 lent until 5 January
    world.at(datetime(2026, 11, 5, tzinfo=UTC))
    earn_valid(world, bob, 7000, "e1")
    assert world.tier(bob) == "银卡" and lots_valid_as(world, bob, "普通")
    # 20 November: 3,000 points (120) posted straight to the ledger, where no upgrade at
    # once looks at them (an order would lend 金卡 at once)
    world.at(datetime(2026, 11, 20, tzinfo=UTC))

    def post_straight(uow: UnitOfWork) -> None:
        from jifen.expiry import service as expiry_service

        expires_at = expiry_service.lot_expiry(
            uow, program_id=world.program.id, start=uow.clock.now(), tier="银卡"
        )
        points_service.earn(uow, member_id=bob, amount=3000, key="e2", expires_at=expires_at)

    db.run(post_straight)
    # the evaluation of 10 December: his own score over the month is 120, 银卡's: his own
    # now; the campaign's 400 reaches 1.2 × 301: 金卡 lent, going back to 银卡
    world.at(datetime(2026, 12, 10, tzinfo=UTC))
    world.evaluate("on demand")
    held = db.run(lambda uow: service.member_tier(uow, program_id=world.program.id, member_id=bob))
    assert (held.tier, held.returns_to) == ("金卡", "银卡")
    # both recorded, in the order they were made: 银卡 his own, then 金卡 lent
    assert world.history(bob)[-2:] == [
        ("银卡", "银卡", "evaluation"), ("银卡", "金卡", "temporary"),
    ]  # fmt: skip
    items, _ = db.run(
        lambda uow: service.history(
            uow, program_id=world.program.id, member_id=bob, before_id=None, limit=2
        )
    )
    assert items[1].reason == (
        "on demand; temporary 银卡 is the member's own now: score 120 reaches 银卡 (from 101)"
    )
    assert items[1].score == 120 and items[0].score == 400
    assert items[0].reason.startswith("on demand; 双11: campaign score 400 reaches")
    # the lots take 银卡's validity, not the lent 金卡's
    assert lots_valid_as(world, bob, "银卡")
    # the tier held at a moment just before is the lent 银卡
    before = db.run(
        lambda uow: service.tiers_at(
            uow, member_ids=[bob], moment=datetime(2026, 12, 9, tzinfo=UTC)
        ),
        read_only=True,
    )
    assert before == {bob: "银卡"}


def test_a_temporary_upgrade_of_a_closed_member_is_left_as_it_is(db: Database) -> None:
    """A closed account is done with: the end of its temporary upgrade is neither recorded
    nor announced (a webhook naming the member, a note in its inbox), and it keeps no other
    member's upgrade from ending, however small the chunks."""
    world = lend_silver_in_double_eleven(db, members=3)
    alice, bob, _ = world.members
    db.run(
        lambda uow: members_service.change_state(
            uow, program_id=world.program.id, member_id=alice, state="closed"
        )
    )
    world.at(datetime(2026, 12, 11, 10, tzinfo=UTC))

    def end_one() -> int:
        return db.run(
            lambda uow: service.end_temporary(
                uow, program_id=world.program.id, now=uow.clock.now(), limit=1
            )
        )

    assert [end_one(), end_one(), end_one()] == [1, 1, 0]
    assert world.tiers() == ["银卡", "普通", "普通"]
    assert world.history(alice) == [(None, "银卡", "temporary")]
    assert world.history(bob)[-1] == ("银卡", "普通", "temporary_end")


def test_a_check_in_that_earns_nothing_still_upgrades_at_once(db: Database) -> None:
    """The activity part counts events of its types whatever they earn: the check-in that
    takes a member's score over a threshold moves it up at once."""
    world = World(db, scheme(upgrade_at_once=True), members=1)
    (alice,) = world.members
    world.at(datetime(2026, 2, 1, tzinfo=UTC))
    world.order(alice, 2500)  # 2 blocks of 1,000 yuan: 80
    assert world.tier(alice) is None
    for day in range(21):  # a check-in a day for three weeks: 101
        world.at(datetime(2026, 2, 2 + day, tzinfo=UTC))
        world.check_in(alice)
    assert world.tier(alice) == "银卡"
    assert world.history(alice) == [(None, "银卡", "upgrade")]


def test_points_a_reviewer_approves_upgrade_at_once(db: Database) -> None:
    """A held award approved by a reviewer is an earning like any other: when its points
    take the member's score over a threshold, the member moves up at once."""
    from jifen.rules import service as rules_service
    from jifen.rules.schemas import EventTypeDeclare
    from tests.events.test_service import activate, send

    world = World(db, scheme(upgrade_at_once=True), members=1)
    (alice,) = world.members
    program_id = world.program.id
    declared = EventTypeDeclare.model_validate(
        {"fields": {"requested_points": {"type": "integer"}}}
    )
    db.run(
        lambda uow: rules_service.declare_event_type(
            uow, program_id=program_id, name="custom.contribution", body=declared
        )
    )
    activate(db, program_id, "contribution", {"kind": "reviewed", "max_points": 5000},
             events_=("custom.contribution",))  # fmt: skip
    send(db, program_id, alice, "custom.contribution", db.clock.now(), "c1",
         requested_points=3000)  # fmt: skip
    assert world.tier(alice) is None  # held: nothing earned yet
    award_id = db.run(
        lambda uow: events_service.held_awards(uow, program_id=program_id)[0].id, read_only=True
    )
    db.run(
        lambda uow: events_service.approve_award(
            uow, program_id=program_id, award_id=award_id, decided_by="reviewer"
        )
    )
    # 3,000 points: 3 blocks of 1,000, 120: 银卡
    assert world.tier(alice) == "银卡"
    assert world.history(alice) == [(None, "银卡", "upgrade")]
