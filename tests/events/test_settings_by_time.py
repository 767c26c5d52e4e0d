"""The benefits matrix by the event's own time, on both backends: an order or a birthday sent
late earns by the multiplier, the cap and the gift of the matrix in force when it happened,
beside events of the matrix of now in the same batch; a dry run reads it the same way; and
the policies replaced stay on record with when."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from jifen.db.uow import Database, UnitOfWork
from jifen.events import service
from jifen.events.schemas import EventIn
from jifen.programs import service as programs_service
from tests.events.test_tier_at import AFTER, ARRIVES, BEFORE, CHANGED, PLACED, Shop, awards


def change_matrix(shop: Shop, tier: str, **benefit: Any) -> None:
    """From the clock's time on, ``tier``'s benefits in the matrix are changed by ``benefit``."""

    def change(uow: UnitOfWork) -> None:
        program_id = shop.program.id
        settings = programs_service.get_settings(uow, program_id=program_id)
        scheme = settings.tier_scheme
        assert scheme is not None
        benefits = dict(scheme.benefits)
        benefits[tier] = benefits[tier].model_copy(update=benefit)
        changed = scheme.model_copy(update={"benefits": benefits})
        programs_service.set_settings(
            uow, program_id=program_id,
            settings=settings.model_copy(update={"tier_scheme": changed}),
        )  # fmt: skip

    shop.db.run(change)


def birthday(member_id: int, at: Any, key: str) -> EventIn:
    return EventIn(source="crm", external_id=key, type="member.birthday", occurred_at=at,
                   member_id=member_id, payload={"year": 2026})  # fmt: skip


def gold_pair_across_a_change(db: Database, **benefit: Any) -> tuple[Shop, int, int]:
    """Two 金卡 members since PLACED, 金卡's benefits changed by ``benefit`` at CHANGED, and
    the clock at ARRIVES: (the shop, the two members)."""
    shop = Shop(db, members=2)
    alice, bob = shop.members
    for member in (alice, bob):
        shop.set_tier(member, "金卡", PLACED)
    shop.clock.set(CHANGED)
    change_matrix(shop, "金卡", **benefit)
    shop.clock.set(ARRIVES)
    return shop, alice, bob


def test_a_late_order_earns_by_the_matrix_in_force_at_its_own_time(db: Database) -> None:
    # given two 金卡 members, and the matrix raising 金卡's multiplier from 1.5 to 2 and its
    # daily cap from 5,000 to 8,000 at CHANGED
    shop, alice, bob = gold_pair_across_a_change(
        db, earn_multiplier=Decimal("2"), daily_earn_cap=8000
    )
    # when an order of the day before comes in late, in one batch with one of after
    before, after = shop.take(shop.order(alice, BEFORE, 4000), shop.order(bob, AFTER, 4000))
    # then each earns by the matrix of its time: 1.5 under 5,000, and 2 under 8,000
    assert sorted(awards(before)) == [
        ("base", 4000, None), ("gold", 100, None), ("tier_benefit", 900, "tier_day (金卡: 5000)"),
    ]  # fmt: skip
    assert sorted(awards(after)) == [
        ("base", 4000, None), ("gold", 100, None), ("tier_benefit", 3900, "tier_day (金卡: 8000)"),
    ]  # fmt: skip

    # and a dry run of an order of a day before the change reads the matrix of its time
    def dry(uow: UnitOfWork) -> Any:
        return service.dry_run(
            uow, program_id=shop.program.id, event=shop.order(alice, BEFORE - timedelta(days=1))
        )

    evaluation = db.run(dry)
    assert [(a.rule, a.points) for a in evaluation.awards if a.rule == "tier_benefit"] == [
        ("tier_benefit", 500)
    ]


def test_a_late_birthday_gets_the_gift_of_its_own_time(db: Database) -> None:
    shop, alice, bob = gold_pair_across_a_change(db, birthday_gift=2000)
    late, now = shop.take(birthday(alice, BEFORE, "b-late"), birthday(bob, AFTER, "b-now"))
    assert [a.points for a in late.awards] == [1000]
    assert [a.points for a in now.awards] == [2000]


def test_the_policies_replaced_stay_on_record_with_when(db: Database) -> None:
    shop = Shop(db, members=0)
    program_id = shop.program.id
    shop.clock.set(CHANGED)
    change_matrix(shop, "金卡", earn_multiplier=Decimal("2"))
    change_matrix(
        shop, "金卡", earn_multiplier=Decimal("3")
    )  # replaced at the same instant: never in force

    def at(moment: Any) -> tuple[Any, str | None]:
        replaced, settings = db.run(
            lambda uow: programs_service.settings_at(uow, program_id=program_id, at=moment),
            read_only=True,
        )
        scheme = settings.tier_scheme
        return replaced, None if scheme is None else str(scheme.benefits["金卡"].earn_multiplier)

    assert at(BEFORE) == (CHANGED, "1.5")
    assert at(CHANGED) == (None, "3")  # what is set at a time is in force from it
    assert at(AFTER) == (None, "3")
