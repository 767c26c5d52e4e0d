"""Expiry policies through the job runner, on both backends, across two simulated years,
with the ledger's invariants checked after every job."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.expiry import service as expiry
from jifen.expiry.schemas import Dormancy, ExpiryPolicy, Reminders, Validity
from jifen.jobs import service as jobs
from jifen.members import service as members
from jifen.points import service as points
from jifen.programs import service as programs
from jifen.rewards.schemas import Texts
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef
from tests.factories import assert_ledger_sound, new_members, new_program

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=SHANGHAI)  # type: ignore[misc]


def with_policy(db: Database, policy: ExpiryPolicy) -> tuple[int, list[int]]:
    """A programme with ``policy`` and three members; the tiers the policy names are the
    programme's (in the order named: a policy names only tiers the programme has)."""
    program_id = new_program(db).id

    def configure(uow: UnitOfWork) -> None:
        if policy.by_tier:
            tiers.set_tiers(uow, program_id=program_id, definitions=[
                TierDef(code=code, name=code, rank=rank) for rank, code in enumerate(policy.by_tier)
            ])  # fmt: skip
        settings = programs.get_settings(uow, program_id=program_id)
        programs.set_settings(
            uow, program_id=program_id, settings=settings.model_copy(update={"expiry": policy})
        )

    db.run(configure)
    return program_id, new_members(db, program_id, 3)


def move(db: Database, to: datetime) -> None:
    assert isinstance(db.clock, ManualClock)
    db.clock.set(to)


def earn(db: Database, program_id: int, member_id: int, amount: int, key: str) -> Any:
    def run(uow: UnitOfWork) -> Any:
        expires_at = expiry.lot_expiries(
            uow, program_id=program_id, start=uow.clock.now(), member_ids=[member_id]
        )[member_id]
        return points.earn(uow, member_id=member_id, amount=amount, key=key, expires_at=expires_at)

    return db.run(run)


def summary(db: Database, member_id: int) -> Any:
    return db.run(lambda uow: points.balance(uow, member_id=member_id), read_only=True)


def job(db: Database, name: str, program_id: int, when: datetime) -> jobs.RunReport:
    move(db, when)
    report = jobs.run(db, name, program_id=program_id)
    assert_ledger_sound(db, program_id)
    return report


def test_calendar_clearing_expires_each_year_at_new_year_exactly_once(db: Database) -> None:
    program_id, (alice, bob, _) = with_policy(
        db, ExpiryPolicy(validity=Validity(kind="calendar", years=1))
    )
    move(db, at(2026, 3, 1, 10))
    earn(db, program_id, alice, 500, "a1")
    move(db, at(2026, 12, 31, 22))
    earn(db, program_id, bob, 300, "b1")
    earn(db, program_id, alice, 200, "a2")
    # The last minute of 2026 takes nothing; ten past midnight clears the year.
    assert job(db, "points.expire", program_id, at(2026, 12, 31, 23, 59)).figures["points"] == 0
    report = job(db, "points.expire", program_id, at(2027, 1, 1, 0, 10))
    assert report.state == "done"
    assert report.figures == {"accounts": 2, "lots": 3, "points": 1000}
    assert summary(db, alice).balance == 0 and summary(db, bob).balance == 0
    # The same moment again: the run is already done; a later one finds nothing.
    assert jobs.run(db, "points.expire", program_id=program_id).state == "already-done"
    assert job(db, "points.expire", program_id, at(2027, 1, 2, 0, 10)).figures["points"] == 0
    # Points of 2027 last until 2028-01-01.
    move(db, at(2027, 6, 1))
    earn(db, program_id, bob, 50, "b2")
    assert job(db, "points.expire", program_id, at(2027, 12, 31, 12)).figures["points"] == 0
    assert job(db, "points.expire", program_id, at(2028, 1, 1, 0, 10)).figures["points"] == 50


def test_rolling_and_tier_dependent_validity_apply_to_new_lots(db: Database) -> None:
    policy = ExpiryPolicy(
        validity=Validity(kind="rolling", months=12),
        by_tier={
            "普通": Validity(kind="calendar"),
            "银卡": Validity(kind="rolling", months=18),
            "金卡": Validity(kind="never"),
        },
    )
    program_id, (plain, silver, gold) = with_policy(db, policy)

    def set_tiers(uow: UnitOfWork) -> None:
        tiers.set_tiers(uow, program_id=program_id, definitions=[
            TierDef(code="普通", name="普通", rank=0), TierDef(code="银卡", name="银卡", rank=1),
            TierDef(code="金卡", name="金卡", rank=2),
        ])  # fmt: skip
        for member, tier in ((silver, "银卡"), (gold, "金卡")):
            tiers.set_member_tier(uow, program_id=program_id, member_id=member, tier=tier,
                                  reason="test", set_by="test")  # fmt: skip

    db.run(set_tiers)
    move(db, at(2026, 5, 10, 12))
    for member in (plain, silver, gold):
        earn(db, program_id, member, 100, f"e{member}")

    def lapses(member: int) -> list[datetime | None]:
        lots = db.run(lambda uow: points.member_lots(uow, member_id=member), read_only=True)
        return [lot.expires_at for lot in lots]

    assert lapses(plain) == [at(2027, 5, 11)]  # no tier: the programme's 12 months
    assert lapses(silver) == [at(2027, 11, 11)]
    assert lapses(gold) == [None]
    # Two years on, only what had a date has gone.
    for day in (at(2027, 5, 11, 0, 10), at(2027, 11, 11, 0, 10), at(2028, 5, 11)):
        job(db, "points.expire", program_id, day)
    assert [summary(db, m).balance for m in (plain, silver, gold)] == [0, 0, 100]


def test_freeze_instead_of_expiry_holds_lapsed_points_until_staff_restore_them(
    db: Database,
) -> None:
    policy = ExpiryPolicy(validity=Validity(kind="rolling", days=30), on_expiry="freeze")
    program_id, (alice, *_) = with_policy(db, policy)
    move(db, at(2026, 1, 5, 9))
    earn(db, program_id, alice, 400, "a1")
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=150, key="s1"))
    report = job(db, "points.expire", program_id, at(2026, 2, 6, 0, 10))
    assert report.figures == {"accounts": 1, "lots": 1, "points": 250}
    after = summary(db, alice)
    assert (after.balance, after.frozen) == (0, 250)
    # Restored as a fresh lot with the validity a new earning gets now.
    move(db, at(2026, 3, 1, 15))

    def restore(uow: UnitOfWork) -> Any:
        return expiry.restore_frozen(
            uow, program_id=program_id, member_id=alice, key="restore-1", actor="staff:1",
            reason="goodwill",
        )  # fmt: skip

    released = db.run(restore)
    assert [r.amount for r in released] == [250]
    assert db.run(restore) == []  # nothing is frozen any more: again changes nothing
    restored = summary(db, alice)
    assert (restored.available, restored.frozen) == (250, 0)
    lots = db.run(lambda uow: points.member_lots(uow, member_id=alice), read_only=True)
    assert [lot.expires_at for lot in lots] == [at(2026, 4, 1)]
    assert_ledger_sound(db, program_id)


def test_dormancy_decays_monthly_and_activity_gives_it_all_back(db: Database) -> None:
    # 连续12个月未使用进入休眠, 每月递减10%, 任意行为激活后恢复.
    policy = ExpiryPolicy(
        validity=Validity(kind="never"), dormancy=Dormancy(after_months=12, decay_pct=10)
    )
    program_id, (alice, bob, _) = with_policy(db, policy)
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 1000, "a1")
    earn(db, program_id, bob, 1000, "b1")
    move(db, at(2026, 6, 1, 9))
    earn(db, program_id, bob, 1, "b2")  # bob stays active longer

    def decays(when: datetime) -> dict[str, int]:
        return job(db, "points.dormancy", program_id, when).figures

    # Monthly runs through the first year: nothing.
    for month in range(2, 13):
        assert decays(at(2026, month, 15, 1))["decays"] == 0
    # 2027-01-10 09:00 alice is dormant: 100, then 90, then 81 held back.
    assert decays(at(2027, 1, 10, 10))["decayed"] == 100
    assert decays(at(2027, 1, 20, 10))["decays"] == 0  # the same month again: nothing
    assert decays(at(2027, 3, 10, 10))["decayed"] == 90 + 81  # a missed month is caught up
    alice_now = summary(db, alice)
    assert (alice_now.available, alice_now.frozen) == (729, 271)
    # She spends 9 points: the next run gives back everything the dormancy held.
    move(db, at(2027, 3, 12, 18))
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=9, key="s1"))
    figures = decays(at(2027, 3, 13, 1))
    assert (figures["restored"], figures["restored_members"]) == (271, 1)  # her three months
    back = summary(db, alice)
    assert (back.available, back.frozen) == (1000 - 9, 0)
    # bob went dormant on 2027-06-01 and decays from then.
    assert decays(at(2027, 6, 1, 10))["decayed"] == 100
    # Nine months later bob's nine more decays are caught up in one run: 10 % each month.
    assert decays(at(2028, 3, 11, 10))["decayed"] == 90 + 81 + 73 + 65 + 59 + 53 + 48 + 43 + 38
    assert summary(db, bob).available == 351
    # Alice's clock restarted with her spend: dormant again from 2028-03-12 18:00.
    assert summary(db, alice).frozen == 0
    assert decays(at(2028, 3, 13, 10))["decayed"] == 99  # 10 % of 991
    assert summary(db, alice).frozen == 99


def test_a_dry_run_reports_what_the_run_would_do_and_changes_nothing(db: Database) -> None:
    program_id, (alice, bob, _) = with_policy(
        db, ExpiryPolicy(validity=Validity(kind="rolling", days=10))
    )
    move(db, at(2026, 1, 1, 12))
    earn(db, program_id, alice, 70, "a1")
    earn(db, program_id, bob, 30, "b1")
    move(db, at(2026, 1, 20))
    preview = jobs.run(db, "points.expire", program_id=program_id, dry_run=True)
    assert (preview.state, preview.figures["points"]) == ("dry-run", 100)
    assert summary(db, alice).balance == 70
    assert jobs.run(db, "points.expire", program_id=program_id).figures["points"] == 100


def test_an_unknown_job_is_refused_with_the_list_of_jobs(db: Database) -> None:
    from jifen.errors import InvalidInput

    program_id = new_program(db).id
    with pytest.raises(InvalidInput, match=r"points\.expire"):
        jobs.run(db, "points.expyre", program_id=program_id)


def test_reminders_at_90_and_30_days_and_from_1_october_list_what_lapses_and_what_to_buy(
    db: Database,
) -> None:
    from jifen.notify import service as notify
    from jifen.rewards import service as rewards
    from jifen.rewards.schemas import RewardCreate

    policy = ExpiryPolicy(
        validity=Validity(kind="calendar"),
        reminders=Reminders(days_before=[90, 30], year_end_from="10-01", suggestions=2),
    )
    program_id, (alice, bob, _) = with_policy(db, policy)
    db.run(lambda uow: rewards.create_reward(uow, program_id=program_id, body=RewardCreate(
        code="mug", kind="physical", name=Texts(zh="马克杯", en="Mug"), points=300)))  # fmt: skip
    move(db, at(2026, 3, 1, 10))
    earn(db, program_id, alice, 500, "a1")
    move(db, at(2026, 9, 1, 10))
    earn(db, program_id, bob, 100, "b1")

    def remind(when: datetime) -> list[str]:
        report = job(db, "points.reminders", program_id, when)
        assert report.figures["reminders"] >= 0
        return [m.title for m in inbox(alice)]

    def inbox(member: int) -> list[Any]:
        return db.run(
            lambda uow: notify.list_inbox(uow, program_id=program_id, member_id=member)[0],
            read_only=True,
        )

    assert remind(at(2026, 9, 30, 10)) == []
    # 1 October: the year-end clearing is announced to both; 3 October is 90 days before.
    assert remind(at(2026, 10, 1, 10)) == ["您有 500 积分将于 2027-01-01 到期"]
    assert len(inbox(bob)) == 1
    assert len(remind(at(2026, 10, 3, 10))) == 2
    assert len(remind(at(2026, 10, 3, 11))) == 2  # later the same day: nothing again
    assert len(remind(at(2026, 11, 1, 10))) == 2
    assert len(remind(at(2026, 12, 2, 10))) == 3  # 30 days before
    body = inbox(alice)[0].body
    assert "2027-01-01  500" in body and "马克杯(300 积分)" in body
    assert "(暂无)" in inbox(bob)[0].body  # 100 points buy nothing yet
    # The year after, the announcement comes again for 2027's points only.
    job(db, "points.expire", program_id, at(2027, 1, 1, 0, 10))
    move(db, at(2027, 2, 1, 10))
    earn(db, program_id, alice, 50, "a2")
    assert len(remind(at(2027, 10, 1, 10))) == 4
    assert "50 积分" in inbox(alice)[0].title


def test_a_better_tier_extends_the_members_open_lots_and_a_worse_one_never_shortens_them(
    db: Database,
) -> None:
    policy = ExpiryPolicy(
        by_tier={"普通": Validity(kind="calendar"), "银卡": Validity(kind="rolling", months=18),
                 "金卡": Validity(kind="never")},
        on_tier_change="extend",
    )  # fmt: skip
    program_id, (alice, *_) = with_policy(db, policy)

    def set_tier(tier: str) -> None:
        def run(uow: UnitOfWork) -> None:
            tiers.set_member_tier(
                uow, program_id=program_id, member_id=alice, tier=tier, reason="t", set_by="t"
            )

        db.run(run)

    db.run(lambda uow: tiers.set_tiers(uow, program_id=program_id, definitions=[
        TierDef(code="普通", name="普通", rank=0), TierDef(code="银卡", name="银卡", rank=1),
        TierDef(code="金卡", name="金卡", rank=2)]))  # fmt: skip
    set_tier("普通")
    move(db, at(2026, 5, 10, 12))
    earn(db, program_id, alice, 300, "a1")
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=100, key="s1"))

    def dates() -> list[tuple[int, datetime | None]]:
        lots = db.run(lambda uow: points.member_lots(uow, member_id=alice), read_only=True)
        return [(lot.remaining, lot.expires_at) for lot in lots]

    assert dates() == [(200, at(2027, 1, 1))]
    move(db, at(2026, 8, 1, 9))
    set_tier("银卡")  # 18 months from when the lot became available
    assert dates() == [(200, at(2027, 11, 11))]
    set_tier("普通")  # a worse tier never takes time away
    assert dates() == [(200, at(2027, 11, 11))]
    set_tier("金卡")
    assert dates() == [(200, None)]
    history = db.run(lambda uow: points.history(uow, member_id=alice), read_only=True)
    assert [p.kind for p in history.items][:2] == ["renew", "renew"]
    assert summary(db, alice).available == 200
    assert_ledger_sound(db, program_id)


def test_points_given_back_to_a_lot_take_the_dates_the_tier_changes_they_missed_gave(
    db: Database,
) -> None:
    """Points away from their lot (spent, frozen) when a tier change extends the member's
    lots come back with the date they would have had on it: every change since the lot was
    made counts, a worse tier since takes nothing away, and a change after the lot's date
    had passed gives it nothing (the points were due already)."""
    policy = ExpiryPolicy(
        by_tier={"普通": Validity(kind="rolling", months=12), "金卡": Validity(kind="never")},
        on_tier_change="extend",
    )
    program_id, (alice, bob, _) = with_policy(db, policy)
    definitions = [TierDef(code="普通", name="普通", rank=0),
                   TierDef(code="金卡", name="金卡", rank=1)]  # fmt: skip
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program_id, definitions=definitions))

    def set_tier(member: int, tier: str) -> None:
        db.run(lambda uow: tiers.set_member_tier(uow, program_id=program_id, member_id=member,
                                                 tier=tier, reason="t", set_by="t"))  # fmt: skip

    def dates(member: int) -> list[tuple[int, datetime | None]]:
        lots = db.run(lambda uow: points.member_lots(uow, member_id=member), read_only=True)
        return [(lot.remaining, lot.expires_at) for lot in lots]

    set_tier(alice, "普通")
    set_tier(bob, "普通")
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 300, "a1")  # lapses 2027-01-11
    earn(db, program_id, bob, 200, "b1")  # lapses 2027-01-11
    move(db, at(2026, 2, 10, 9))
    earn(db, program_id, alice, 700, "a2")
    spent = db.run(lambda uow: points.spend(uow, member_id=alice, amount=300, key="s1"))
    held = db.run(lambda uow: points.freeze(uow, member_id=bob, amount=200, key="f1",
                                            reason="review", actor="risk"))  # fmt: skip
    # alice: 金卡 while her first lot is spent, then 普通 again
    move(db, at(2026, 3, 1, 9))
    set_tier(alice, "金卡")
    move(db, at(2026, 4, 1, 9))
    set_tier(alice, "普通")
    db.run(lambda uow: points.refund(uow, spend_id=spent.id, key="r1"))
    assert dates(alice) == [(700, None), (300, None)]
    # bob: made 金卡 only after his frozen lot's date had passed
    move(db, at(2027, 2, 1, 9))
    set_tier(bob, "金卡")
    db.run(lambda uow: points.unfreeze(uow, freeze_id=held.id, key="u1"))
    assert dates(bob) == [(200, at(2027, 1, 11))]
    assert job(db, "points.expire", program_id, at(2027, 2, 1, 10)).figures["points"] == 200
    assert (summary(db, alice).balance, summary(db, bob).balance) == (1000, 0)


def test_a_birthday_gift_jifen_posts_by_itself_is_no_activity(db: Database) -> None:
    """Dormancy counts what the member did: the birthday gift the events.birthdays job
    posts neither restarts its clock nor gives back what dormancy held back."""
    from jifen.members.schemas import MemberUpdate
    from tests.events.test_service import activate

    policy = ExpiryPolicy(
        validity=Validity(kind="never"), dormancy=Dormancy(after_months=12, decay_pct=10)
    )
    program_id, (alice, bob, _) = with_policy(db, policy)
    born = MemberUpdate(birthday=date(1990, 6, 15))
    db.run(
        lambda uow: members.update_profile(uow, program_id=program_id, member_id=alice, body=born)
    )
    move(db, at(2026, 1, 10, 9))
    activate(db, program_id, "gift", {"kind": "birthday_gift", "by_tier": {}, "default": 10},
             events_=("member.birthday",))  # fmt: skip
    earn(db, program_id, alice, 1000, "a1")
    earn(db, program_id, bob, 1000, "b1")
    # alice's 2026 gift comes; neither does anything else
    assert job(db, "events.birthdays", program_id, at(2026, 6, 15, 0, 5)).figures["events"] == 1
    assert summary(db, alice).available == 1010
    # twelve months after their own earnings both are dormant, alice as much as bob
    figures = job(db, "points.dormancy", program_id, at(2027, 1, 10, 10)).figures
    assert (figures["decays"], figures["decayed"]) == (2, 101 + 100)
    # her 2027 gift gives nothing back and the decay goes on
    job(db, "events.birthdays", program_id, at(2027, 6, 15, 0, 5))
    figures = job(db, "points.dormancy", program_id, at(2027, 6, 16, 10)).figures
    assert (figures["restored"], figures["decays"]) == (0, 2 * 5)
    # six monthly decays each: bob's of 1,000, alice's of 1,010 and then 10 more
    assert (summary(db, alice).frozen, summary(db, bob).frozen) == (
        101 + 91 + 82 + 74 + 67 + 60,
        100 + 90 + 81 + 72 + 65 + 59,
    )
    history = db.run(lambda uow: points.history(uow, member_id=alice, kinds=["earn"]))
    assert [(p.amount, p.actor) for p in history.items] == [(10, "system")] * 2 + [(1000, "")]


def test_a_members_own_event_restarts_the_dormancy_clock_from_its_time(db: Database) -> None:
    """任意行为激活: an event of the member's that earns nothing is activity, and the twelve
    months of dormancy count from it; an event jifen raises by itself is none."""
    from jifen.events import service as events_service
    from jifen.events.schemas import EventIn

    policy = ExpiryPolicy(
        validity=Validity(kind="never"), dormancy=Dormancy(after_months=12, decay_pct=10)
    )
    program_id, (alice, bob, _) = with_policy(db, policy)
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 1000, "a1")
    earn(db, program_id, bob, 1000, "b1")

    def send(member: int, source: str, key: str, when: datetime) -> None:
        move(db, when)
        event = EventIn(source=source, external_id=key, type="member.checked_in",
                        occurred_at=when, member_id=member)  # fmt: skip
        db.run(lambda uow: events_service.ingest(uow, program_id=program_id, event=event))

    # alice checks in (no rule: 0 points) on 2026-06-01; jifen itself sends one for bob
    send(alice, "app", "c1", at(2026, 6, 1, 8))
    send(bob, "jifen", "c2", at(2026, 6, 1, 8))
    # 12 months after his earning bob is dormant; alice is not, until 12 months after hers
    figures = job(db, "points.dormancy", program_id, at(2027, 1, 10, 10)).figures
    assert (figures["decays"], figures["decayed"]) == (1, 100)
    # bob's decays of February to May; alice's first when her 12 months are over
    assert job(db, "points.dormancy", program_id, at(2027, 6, 1, 7)).figures["decays"] == 4
    assert job(db, "points.dormancy", program_id, at(2027, 6, 1, 8)).figures["decays"] == 1
    assert (summary(db, alice).frozen, summary(db, bob).frozen) == (100, 100 + 90 + 81 + 72 + 65)


def test_a_change_of_the_dormancy_months_never_holds_back_a_month_twice(db: Database) -> None:
    """The months a dormancy already held back stay counted when the programme changes after
    how many months members become dormant: 12 → 11 makes the member dormant a month earlier,
    so one more month is due, not three."""
    policy = ExpiryPolicy(
        validity=Validity(kind="never"), dormancy=Dormancy(after_months=12, decay_pct=10)
    )
    program_id, (alice, *_) = with_policy(db, policy)
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 1000, "a1")
    assert job(db, "points.dormancy", program_id, at(2027, 2, 11, 1)).figures["decayed"] == 190

    def shorten(uow: UnitOfWork) -> None:
        settings = programs.get_settings(uow, program_id=program_id)
        shorter = policy.model_copy(update={"dormancy": Dormancy(after_months=11, decay_pct=10)})
        programs.set_settings(
            uow, program_id=program_id, settings=settings.model_copy(update={"expiry": shorter})
        )

    db.run(shorten)
    # dormant since 2026-12-10 now: December, January and February are due, two are held
    figures = job(db, "points.dormancy", program_id, at(2027, 2, 12, 1)).figures
    assert (figures["decays"], figures["decayed"]) == (1, 81)
    assert job(db, "points.dormancy", program_id, at(2027, 2, 20, 1)).figures["decays"] == 0
    assert (summary(db, alice).available, summary(db, alice).frozen) == (729, 271)
    # and the member's next activity gives every month back
    move(db, at(2027, 2, 21, 9))
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=9, key="s1"))
    assert job(db, "points.dormancy", program_id, at(2027, 2, 22, 1)).figures["restored"] == 271
    assert (summary(db, alice).available, summary(db, alice).frozen) == (991, 0)


def test_an_activity_known_late_gives_back_the_decays_made_after_it(db: Database) -> None:
    """An event of the member's that reaches jifen after a decay (a till's batch sent late)
    but happened before it shows the member was not dormant then: the next run gives that
    decay back, and the dormancy counts from the event."""
    from jifen.events import service as events_service
    from jifen.events.schemas import EventIn

    policy = ExpiryPolicy(
        validity=Validity(kind="never"), dormancy=Dormancy(after_months=12, decay_pct=10)
    )
    program_id, (alice, *_) = with_policy(db, policy)
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 1000, "a1")
    assert job(db, "points.dormancy", program_id, at(2027, 1, 10, 10)).figures["decayed"] == 100
    # on 12 January a check-in of 1 March 2026 arrives (no rule: it earns nothing)
    move(db, at(2027, 1, 12, 9))
    event = EventIn(source="pos", external_id="late-1", type="member.checked_in",
                    occurred_at=at(2026, 3, 1, 15), member_id=alice)  # fmt: skip
    db.run(lambda uow: events_service.ingest(uow, program_id=program_id, event=event))
    figures = job(db, "points.dormancy", program_id, at(2027, 1, 13, 1)).figures
    assert (figures["restored"], figures["decays"]) == (100, 0)
    assert (summary(db, alice).available, summary(db, alice).frozen) == (1000, 0)
    # dormant from 1 March 2027 15:00 on
    assert job(db, "points.dormancy", program_id, at(2027, 3, 1, 14)).figures["decays"] == 0
    assert job(db, "points.dormancy", program_id, at(2027, 3, 1, 16)).figures["decayed"] == 100


def test_a_reminder_day_the_worker_missed_is_caught_up_once(db: Database) -> None:
    from jifen.notify import service as notify

    policy = ExpiryPolicy(validity=Validity(kind="never"), reminders=Reminders(days_before=[30]))
    program_id, (alice, _, _) = with_policy(db, policy)
    move(db, at(2026, 2, 10, 12))
    db.run(lambda uow: points.earn(uow, member_id=alice, amount=3000, key="a1",
                                   expires_at=at(2026, 5, 22)))  # fmt: skip

    def reminded(day: int) -> list[str]:
        job(db, "points.reminders", program_id, at(2026, 4, day, 10))
        inbox, _ = db.run(
            lambda uow: notify.list_inbox(uow, program_id=program_id, member_id=alice),
            read_only=True,
        )
        return [m.title for m in inbox]

    assert reminded(21) == []
    # the worker is down on 22 April, 30 days before: its next run sends the reminder
    assert reminded(23) == ["您有 3000 积分将于 2026-05-22 到期"]
    assert reminded(24) == ["您有 3000 积分将于 2026-05-22 到期"]  # once


def test_points_lapsing_at_two_times_of_one_day_are_announced_together(db: Database) -> None:
    """A reminder names a day: every point that lapses that day counts in it, whatever the
    hour of its lot's date (one given by the API at noon beside the programme's midnight)."""
    from jifen.notify import service as notify

    policy = ExpiryPolicy(validity=Validity(kind="never"), reminders=Reminders(days_before=[30]))
    program_id, (alice, _, _) = with_policy(db, policy)
    move(db, at(2026, 2, 10, 12))
    db.run(lambda uow: points.earn(uow, member_id=alice, amount=3000, key="a1",
                                   expires_at=at(2026, 5, 22)))  # fmt: skip
    db.run(lambda uow: points.earn(uow, member_id=alice, amount=200, key="a2",
                                   expires_at=at(2026, 5, 22, 12)))  # fmt: skip
    report = job(db, "points.reminders", program_id, at(2026, 4, 23, 10))
    assert report.figures["reminders"] == 1
    inbox, _ = db.run(
        lambda uow: notify.list_inbox(uow, program_id=program_id, member_id=alice),
        read_only=True,
    )
    assert [m.title for m in inbox] == ["您有 3200 积分将于 2026-05-22 到期"]
    assert "2026-05-22  3,200" in inbox[0].body


def test_decays_held_when_dormancy_is_switched_off_come_back_with_the_next_activity(
    db: Database,
) -> None:
    """A programme that stops decaying dormant balances (its policy's dormancy set to none)
    still gives back what earlier dormancies held as soon as the member is active again
    (任意行为激活后恢复); a member not active since keeps them held."""
    policy = ExpiryPolicy(
        validity=Validity(kind="never"), dormancy=Dormancy(after_months=12, decay_pct=10)
    )
    program_id, (alice, bob, _) = with_policy(db, policy)
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 1000, "a1")
    earn(db, program_id, bob, 1000, "b1")
    assert job(db, "points.dormancy", program_id, at(2027, 2, 11, 1)).figures["decayed"] == 380

    def switch_off(uow: UnitOfWork) -> None:
        settings = programs.get_settings(uow, program_id=program_id)
        without = policy.model_copy(update={"dormancy": None})
        programs.set_settings(
            uow, program_id=program_id, settings=settings.model_copy(update={"expiry": without})
        )

    db.run(switch_off)
    move(db, at(2027, 3, 1, 9))
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=9, key="s1"))
    figures = job(db, "points.dormancy", program_id, at(2027, 3, 2, 1)).figures
    assert (figures["restored"], figures["restored_members"], figures["decays"]) == (190, 1, 0)
    assert (summary(db, alice).available, summary(db, alice).frozen) == (991, 0)
    assert (summary(db, bob).available, summary(db, bob).frozen) == (810, 190)


def test_a_decay_given_back_to_a_member_who_owes_pays_the_debt_first_and_says_so(
    db: Database,
) -> None:
    policy = ExpiryPolicy(
        validity=Validity(kind="never"), dormancy=Dormancy(after_months=12, decay_pct=10)
    )
    program_id, (alice, *_) = with_policy(db, policy)
    move(db, at(2026, 1, 10, 9))
    earn(db, program_id, alice, 1000, "a1")
    assert job(db, "points.dormancy", program_id, at(2027, 1, 10, 10)).figures["decayed"] == 100
    # active again: she earns 50, spends all 950 she can, and the 50 are clawed back
    move(db, at(2027, 1, 11, 9))
    bonus = earn(db, program_id, alice, 50, "bonus")
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=950, key="s1"))
    db.run(lambda uow: points.reverse(uow, earn_id=bonus.id, key="claw-back"))
    assert (summary(db, alice).available, summary(db, alice).debt) == (0, 50)
    # the 100 held back come back: 50 of them pay the debt, 50 are hers to spend
    figures = job(db, "points.dormancy", program_id, at(2027, 1, 12, 1)).figures
    assert (figures["restored"], figures["repaid"], figures["restored_members"]) == (100, 50, 1)
    after = summary(db, alice)
    assert (after.available, after.debt, after.frozen) == (50, 0, 0)
    assert_ledger_sound(db, program_id)


def test_points_frozen_at_expiry_given_back_to_a_member_who_owes_pay_the_debt_first(
    db: Database,
) -> None:
    policy = ExpiryPolicy(validity=Validity(kind="rolling", days=30), on_expiry="freeze")
    program_id, (alice, *_) = with_policy(db, policy)
    move(db, at(2026, 1, 5, 9))
    earn(db, program_id, alice, 400, "a1")
    job(db, "points.expire", program_id, at(2026, 2, 6, 0, 10))  # 400 frozen as they lapse
    move(db, at(2026, 2, 10, 9))
    late = earn(db, program_id, alice, 60, "late")
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=60, key="s1"))
    db.run(lambda uow: points.reverse(uow, earn_id=late.id, key="claw-back"))
    assert (summary(db, alice).debt, summary(db, alice).frozen) == (60, 400)

    def restore(uow: UnitOfWork) -> Any:
        return expiry.restore_frozen(
            uow, program_id=program_id, member_id=alice, key="restore", actor="staff:1",
            reason="goodwill",
        )  # fmt: skip

    released = db.run(restore)
    assert [(r.amount, r.debt_change) for r in released] == [(400, -60)]
    after = summary(db, alice)
    assert (after.available, after.debt, after.frozen) == (340, 0, 0)
    assert_ledger_sound(db, program_id)
