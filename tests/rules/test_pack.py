"""The demo's rule pack, loaded through the rules service, gives the scheme documents'
numbers for each kind of event; a pack with a bad rule changes nothing."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from importlib import resources
from zoneinfo import ZoneInfo

import pytest

from jifen.db.uow import Database, UnitOfWork
from jifen.errors import InvalidInput
from jifen.members import service as members
from jifen.members.schemas import MemberUpdate
from jifen.rules import service as rules
from jifen.rules.schemas import RulePack
from jifen.tiers import service as tiers
from tests.events.test_service import balance, lines, send
from tests.factories import assert_ledger_sound, new_members, new_program

SHANGHAI = ZoneInfo("Asia/Shanghai")


def demo_pack() -> RulePack:
    text = resources.files("jifen.demo").joinpath("rules.json").read_text(encoding="utf-8")
    return RulePack.model_validate(json.loads(text))


def load(db: Database, program_id: int) -> None:
    db.run(
        lambda uow: rules.load_pack(
            uow, program_id=program_id, pack=demo_pack(), actor="installer", activate=True
        )
    )


def set_tier(db: Database, program_id: int, member: int, tier: str) -> None:
    db.run(
        lambda uow: tiers.set_member_tier(
            uow, program_id=program_id, member_id=member, tier=tier, reason="test", set_by="test"
        )
    )


def test_the_pack_installs_tiers_caps_and_live_rules(db: Database) -> None:
    program = new_program(db)
    load(db, program.id)
    versions = db.run(lambda uow: rules.list_versions(uow, program_id=program.id, limit=200))
    assert len(versions) == len(demo_pack().rules) >= 20
    assert {v.status for v in versions} == {"active"}
    assert [t.code for t in db.run(lambda uow: tiers.list_tiers(uow, program_id=program.id))] == [
        "普通",
        "银卡",
        "金卡",
        "钻石",
    ]
    caps = db.run(lambda uow: rules.get_caps(uow, program_id=program.id))
    assert caps.by_tier["银卡"].day == 1500


def test_documents_numbers_through_the_pack(db: Database) -> None:
    program = new_program(db)
    load(db, program.id)
    gold, plain, friend = new_members(db, program.id, 3)
    set_tier(db, program.id, gold, "金卡")
    set_tier(db, program.id, plain, "普通")
    day = datetime(2026, 6, 10, 12, 0, tzinfo=SHANGHAI)  # inside the 618 window

    # 金卡: 1000 yuan of 日用品 collected in store: 1000 + 50 (pickup) + 200 (满1000加200)
    # + 500 (1.5×, on the points for spending) = 1750, under the 2000 a day of 金卡.
    order = send(
        db,
        program.id,
        gold,
        "order.paid",
        day,
        "o1",
        order_id="A1",
        pickup=True,
        lines=lines(("T1", "日用品", 1000)),
    )
    assert {a.rule: a.points for a in order.awards} == {
        "spend": 1000,
        "pickup": 50,
        "promo-618": 200,
        "tier-multiplier": 500,
    }
    # 普通: 家电 at 3 a yuan, 500 yuan → 1500, but 普通 may earn 1000 a day.
    capped = send(
        db,
        program.id,
        plain,
        "order.paid",
        day,
        "o2",
        order_id="A2",
        lines=lines(("TV", "家电", 500)),
    )
    (award,) = capped.awards
    assert (award.wanted, award.points, award.cap) == (1500, 1000, "tier_day (普通: 1000)")

    later = day + timedelta(days=1)
    referral = send(
        db, program.id, friend, "referral.completed", later, "r1", inviter_member_id=plain
    )
    assert sorted((a.member_id, a.points) for a in referral.awards) == sorted(
        [(plain, 200), (friend, 100), (plain, 50)]
    )
    assert (
        send(
            db, program.id, plain, "review.posted", later, "rv1", review_id="R1", media="image"
        ).points
        == 30
    )
    assert (
        send(db, program.id, plain, "review.liked", later, "rv2", review_id="R1", likes=25).points
        == 50
    )
    assert (
        send(db, program.id, plain, "review.liked", later, "rv3", review_id="R2", likes=10).points
        == 0
    )
    assert (
        send(
            db,
            program.id,
            plain,
            "quiz.answered",
            later,
            "q1",
            quiz_id="Q",
            correct_answers=4,
            completed=True,
        ).points
        == 90
    )
    assert (
        send(
            db, program.id, plain, "activity.attended", later, "v1", activity_id="V", hours=3
        ).points
        == 15
    )
    assert send(db, program.id, gold, "member.birthday", later, "b1", year=2026).points == 1000
    held = send(db, program.id, plain, "custom.contribution", later, "c1", requested_points=80)
    assert [(a.points, a.held) for a in held.awards] == [(50, True)] and held.points == 0
    assert_ledger_sound(db, program.id)


def test_the_welcome_is_paid_once_however_often_registration_is_sent(db: Database) -> None:
    program = new_program(db)
    load(db, program.id)
    (member,) = new_members(db, program.id, 1)
    day = datetime(2026, 3, 2, 9, 0, tzinfo=SHANGHAI)
    first = send(db, program.id, member, "member.registered", day, "crm:1")
    assert [a.points for a in first.awards] == [100]
    # the same registration from another source, under another id: refused as sent twice
    with pytest.raises(InvalidInput, match=r"registration of this member.*crm:1"):
        send(db, program.id, member, "member.registered", day, "app:1")
    assert balance(db, member).balance == 100
    assert_ledger_sound(db, program.id)


def test_check_in_ladder_and_surprises(db: Database) -> None:
    program = new_program(db)
    load(db, program.id)
    (member,) = new_members(db, program.id, 1)
    start = datetime(2026, 3, 1, 8, 0, tzinfo=SHANGHAI)
    ladder, surprises = [], []
    for n in range(8):
        result = send(
            db, program.id, member, "member.checked_in", start + timedelta(days=n), f"c{n}"
        )
        for award in result.awards:
            (ladder if award.rule == "check-in" else surprises).append(award.points)
    assert ladder == [10, 10, 15, 15, 15, 15, 50, 50]
    assert all(50 <= p <= 200 for p in surprises)
    assert balance(db, member).balance == sum(ladder) + sum(surprises)


def test_birthday_month_doubles_outside_campaigns(db: Database) -> None:
    program = new_program(db)
    load(db, program.id)
    (member,) = new_members(db, program.id, 1)
    db.run(
        lambda uow: members.update_profile(
            uow,
            program_id=program.id,
            member_id=member,
            body=MemberUpdate(birthday=date(1990, 4, 2)),
        )
    )
    april = datetime(2026, 4, 20, 12, 0, tzinfo=SHANGHAI)
    result = send(
        db,
        program.id,
        member,
        "order.paid",
        april,
        "o",
        order_id="B",
        lines=lines(("T1", "日用品", 300)),
    )
    assert {a.rule: a.points for a in result.awards} == {"spend": 300, "birthday-month": 300}


def test_a_pack_with_a_bad_rule_changes_nothing(db: Database) -> None:
    program = new_program(db)
    pack = demo_pack().model_copy(deep=True)
    bad = pack.rules[-1].model_copy(update={"condition": "event.x >>> 1"})
    pack = pack.model_copy(update={"rules": [*pack.rules[:-1], bad]})

    def go(uow: UnitOfWork) -> None:
        rules.load_pack(uow, program_id=program.id, pack=pack, actor="x", activate=True)

    with pytest.raises(InvalidInput, match=r"rules\.contribution\.condition"):
        db.run(go)
    assert db.run(lambda uow: rules.list_versions(uow, program_id=program.id)) == []
    assert db.run(lambda uow: tiers.list_tiers(uow, program_id=program.id)) == []
