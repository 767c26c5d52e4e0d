"""Events in, points out, through the service on both backends: awards posted through the
ledger, replays, rule versions by event time, caps across events, refunds, bad events."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import IdempotencyConflict, InvalidInput, JifenError, StateConflict
from jifen.events import service
from jifen.events.models import events
from jifen.events.schemas import EventIn, EventResult
from jifen.members import service as members
from jifen.members.schemas import MemberUpdate
from jifen.points import service as points
from jifen.rules import service as rules
from jifen.rules.core import EventRefused
from jifen.rules.schemas import EventTypeDeclare, ProgramCaps, RuleSpec
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef
from tests.factories import assert_ledger_sound, new_members, new_program

RATES = {"kind": "spend_rate", "rate": "1", "category_rates": {"日用品": "1", "家电": "3"}}
TIERS = [
    TierDef(code="普通", name="普通", rank=0),
    TierDef(code="银卡", name="银卡", rank=1),
    TierDef(code="金卡", name="金卡", rank=2),
]


def activate(
    db: Database,
    program_id: int,
    code: str,
    params: dict[str, Any],
    events_: tuple[str, ...] = ("order.paid",),
    **spec: Any,
) -> int:
    """A rule version drafted, submitted and approved: live from now."""
    body = RuleSpec.model_validate(
        {"code": code, "name": code, "event_types": list(events_), "params": params, **spec}
    )

    def go(uow: UnitOfWork) -> int:
        draft = rules.create_version(uow, program_id=program_id, spec=body, created_by="maker")
        rules.submit(uow, program_id=program_id, version_id=draft.id, approval_id=None)
        return rules.approve(
            uow, program_id=program_id, version_id=draft.id, approved_by="checker"
        ).id

    return db.run(go)


def send(
    db: Database,
    program_id: int,
    member: int,
    kind: str,
    when: datetime,
    external_id: str,
    *,
    move_clock: bool = True,
    **payload: Any,
) -> EventResult:
    """Ingest one event; the clock first moves on to the event's time if it is behind (an
    event cannot come from the future)."""
    if move_clock and isinstance(db.clock, ManualClock) and when > db.clock.now():
        db.clock.set(when)
    event = EventIn(
        source="pos",
        external_id=external_id,
        type=kind,
        occurred_at=when,
        member_id=member,
        payload=payload,
    )
    return db.run(lambda uow: service.ingest(uow, program_id=program_id, event=event))


def lines(*items: tuple[str, str, int]) -> list[dict[str, Any]]:
    return [{"sku": s, "category": c, "amount_fen": yuan * 100} for s, c, yuan in items]


def balance(db: Database, member: int) -> Any:
    return db.run(lambda uow: points.balance(uow, member_id=member), read_only=True)


def setup_tiers(db: Database, program_id: int, **member_tiers: str) -> None:
    def go(uow: UnitOfWork) -> None:
        tiers.set_tiers(uow, program_id=program_id, definitions=TIERS)
        for member, tier in member_tiers.items():
            tiers.set_member_tier(
                uow,
                program_id=program_id,
                member_id=int(member[1:]),
                tier=tier,
                reason="test",
                set_by="test",
            )

    db.run(go)


def test_an_order_earns_by_category_and_tier_pending_for_the_return_window(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    setup_tiers(db, program.id, **{f"m{member}": "金卡"})
    activate(db, program.id, "base", RATES)
    activate(
        db,
        program.id,
        "tier",
        {"kind": "multiplier", "by_tier": {"银卡": "1.2", "金卡": "1.5"}},
        priority=150,
    )
    now = db.clock.now()
    result = send(
        db,
        program.id,
        member,
        "order.paid",
        now,
        "o1",
        order_id="A1",
        lines=lines(("T1", "日用品", 200), ("TV", "家电", 1000)),
    )
    assert [(a.rule, a.points) for a in result.awards] == [("base", 3200), ("tier", 1600)]
    assert result.points == 4800
    summary = balance(db, member)
    assert (summary.balance, summary.pending, summary.available) == (4800, 4800, 0)
    assert isinstance(db.clock, ManualClock)
    db.clock.advance(timedelta(days=7, seconds=1))
    assert balance(db, member).available == 4800
    assert_ledger_sound(db, program.id)


def test_sending_an_event_twice_changes_nothing(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", RATES)
    now = db.clock.now()
    first = send(
        db,
        program.id,
        member,
        "order.paid",
        now,
        "o1",
        order_id="A1",
        lines=lines(("T1", "日用品", 200)),
    )
    again = send(
        db,
        program.id,
        member,
        "order.paid",
        now,
        "o1",
        order_id="A1",
        lines=lines(("T1", "日用品", 200)),
    )
    assert again.replayed and again.awards == first.awards and again.id == first.id
    assert again.skipped == first.skipped  # the why is kept with the event
    assert balance(db, member).balance == 200
    with pytest.raises(InvalidInput, match="order 'A1' was already sent as event pos:o1"):
        send(
            db,
            program.id,
            member,
            "order.paid",
            now,
            "o1-again",
            order_id="A1",
            lines=lines(("T1", "日用品", 200)),
        )
    with pytest.raises(IdempotencyConflict):
        send(
            db,
            program.id,
            member,
            "order.paid",
            now,
            "o1",
            order_id="A1",
            lines=lines(("T1", "日用品", 300)),
        )


def test_events_meet_the_rule_versions_live_at_their_own_time(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    clock = db.clock
    assert isinstance(clock, ManualClock)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    before = clock.now() + timedelta(hours=1)
    clock.advance(timedelta(hours=2))
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "2"})  # version 2
    clock.advance(timedelta(hours=1))
    late = send(
        db,
        program.id,
        member,
        "order.paid",
        before,
        "late",
        order_id="L",
        lines=lines(("A", "x", 100)),
    )
    fresh = send(
        db,
        program.id,
        member,
        "order.paid",
        clock.now(),
        "fresh",
        order_id="F",
        lines=lines(("A", "x", 100)),
    )
    assert [(a.version, a.points) for a in late.awards] == [(1, 100)]
    assert [(a.version, a.points) for a in fresh.awards] == [(2, 200)]


def test_tier_day_cap_across_events_and_the_next_day(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    setup_tiers(db, program.id, **{f"m{member}": "普通"})
    caps = ProgramCaps.model_validate({"by_tier": {"普通": {"day": 1000, "month": 5000}}})
    db.run(lambda uow: rules.set_caps(uow, program_id=program.id, caps=caps))
    activate(db, program.id, "base", RATES)
    noon = datetime(2026, 1, 5, 4, 0, tzinfo=UTC)  # 12:00 in Shanghai
    first = send(
        db, program.id, member, "order.paid", noon, "o1", order_id="1", lines=lines(("A", "x", 800))
    )
    second = send(
        db,
        program.id,
        member,
        "order.paid",
        noon + timedelta(hours=1),
        "o2",
        order_id="2",
        lines=lines(("A", "x", 800)),
    )
    next_day = send(
        db,
        program.id,
        member,
        "order.paid",
        noon + timedelta(days=1),
        "o3",
        order_id="3",
        lines=lines(("A", "x", 800)),
    )
    assert [a.points for a in first.awards] == [800]
    (capped,) = second.awards
    assert (capped.points, capped.wanted, capped.cap) == (200, 800, "tier_day (普通: 1000)")
    assert [a.points for a in next_day.awards] == [800]


def test_members_without_a_tier_or_in_a_tier_the_caps_do_not_name_are_capped(
    db: Database,
) -> None:
    program = new_program(db)
    untiered, gold = new_members(db, program.id, 2)
    setup_tiers(db, program.id, **{f"m{gold}": "金卡"})
    caps = ProgramCaps.model_validate({"by_tier": {"普通": {"day": 1000}, "银卡": {"day": 1500}}})
    db.run(lambda uow: rules.set_caps(uow, program_id=program.id, caps=caps))
    activate(db, program.id, "base", RATES)
    noon = datetime(2026, 1, 5, 4, 0, tzinfo=UTC)
    got = {
        member: send(db, program.id, member, "order.paid", noon, f"o{member}",
                     order_id=str(member), lines=lines(("A", "x", 3000))).awards[0]
        for member in (untiered, gold)
    }  # fmt: skip
    assert (got[untiered].points, got[untiered].cap) == (1000, "tier_day (普通: 1000)")
    assert (got[gold].points, got[gold].cap) == (1500, "tier_day (金卡: 1500)")


def test_a_refund_gives_back_to_the_budgets_what_it_takes_back(db: Database) -> None:
    program = new_program(db)
    first, second = new_members(db, program.id, 2)
    db.run(
        lambda uow: rules.set_caps(
            uow, program_id=program.id, caps=ProgramCaps.model_validate({"budget": 1500})
        )
    )
    activate(db, program.id, "promo", {"kind": "spend_rate", "rate": "1"}, caps={"budget": 1000})
    now = db.clock.now()
    paid = send(db, program.id, first, "order.paid", now, "o1", order_id="1",
                lines=lines(("A", "x", 1000)))  # fmt: skip
    assert paid.points == 1000
    later = now + timedelta(minutes=1)
    send(db, program.id, first, "order.refunded", later, "r1", order_id="1",
         lines=[{"sku": "A", "amount_fen": 40_000}])  # fmt: skip
    spent = db.run(
        lambda uow: rules.budgets_spent(
            uow, program_id=program.id, codes=["promo", rules.PROGRAM_BUDGET], lock=False
        )
    )
    assert spent == {"promo": 600, rules.PROGRAM_BUDGET: 600}
    # The room the refund gave back is earned again, in a batch after another refund too.
    batch = [
        EventIn(source="pos", external_id="r2", type="order.refunded", occurred_at=later,
                member_id=first, payload={"order_id": "1", "whole": True}),
        EventIn(source="pos", external_id="o2", type="order.paid", occurred_at=later,
                member_id=second, payload={"order_id": "2", "lines": lines(("A", "x", 1200))}),
    ]  # fmt: skip
    outcomes = db.run(lambda uow: service.ingest_many(uow, program_id=program.id, events=batch))
    assert [getattr(o, "points", None) for o in outcomes] == [-600, 1000]
    assert (balance(db, first).balance, balance(db, second).balance) == (0, 1000)


def test_a_refund_takes_back_the_points_in_proportion(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", RATES)
    activate(
        db, program.id, "full", {"kind": "threshold", "min_amount_fen": 100_000, "points": 200}
    )
    now = db.clock.now()
    send(
        db,
        program.id,
        member,
        "order.paid",
        now,
        "o1",
        order_id="A1",
        lines=lines(("T1", "日用品", 600), ("T2", "日用品", 600)),
    )  # 1200 + 200
    part = send(
        db,
        program.id,
        member,
        "order.refunded",
        now,
        "r1",
        order_id="A1",
        lines=[{"sku": "T1", "amount_fen": 60_000}],
    )
    assert part.points == -(600 + 100)
    assert balance(db, member).balance == 700
    rest = send(db, program.id, member, "order.refunded", now, "r2", order_id="A1", whole=True)
    assert rest.points == -700
    assert balance(db, member).balance == 0
    with pytest.raises(InvalidInput, match="nothing left to refund"):
        send(db, program.id, member, "order.refunded", now, "r3", order_id="A1", whole=True)
    assert_ledger_sound(db, program.id)


def test_check_in_streak_kept_between_events(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(
        db,
        program.id,
        "checkin",
        {"kind": "streak", "ladder": {"1": 10, "3": 15, "7": 50}},
        events_=("member.checked_in",),
    )
    start = datetime(2026, 3, 1, 1, 0, tzinfo=UTC)
    got = [
        send(db, program.id, member, "member.checked_in", start + timedelta(days=d), f"c{d}").points
        for d in (0, 1, 2, 3, 5)
    ]
    assert got == [10, 10, 15, 15, 10]


def test_referral_awards_both_members(db: Database) -> None:
    program = new_program(db)
    inviter, invitee = new_members(db, program.id, 2)
    activate(
        db,
        program.id,
        "invite",
        {"kind": "referral", "inviter_points": 200, "invitee_points": 100},
        events_=("referral.completed",),
    )
    send(
        db,
        program.id,
        invitee,
        "referral.completed",
        db.clock.now(),
        "ref1",
        inviter_member_id=inviter,
    )
    assert (balance(db, inviter).balance, balance(db, invitee).balance) == (200, 100)


def _count(db: Database, program_id: int) -> int:
    return db.run(
        lambda uow: uow.conn.execute(
            select(func.count()).where(events.c.program_id == program_id)
        ).scalar_one(),
        read_only=True,
    )


@pytest.mark.parametrize(
    ("kind", "payload", "error", "says"),
    [
        ("order.teleported", {}, InvalidInput, "unknown event type"),
        ("order.paid", {"order_id": "1"}, InvalidInput, "payload.lines"),
        (
            "order.paid",
            {"order_id": "1", "lines": [{"sku": "A", "amount_fen": -5}]},
            InvalidInput,
            "payload.lines.0.amount_fen",
        ),
        ("activity.attended", {"activity_id": "a"}, InvalidInput, "payload.hours"),
        ("member.checked_in", {"_future": True}, InvalidInput, "in the future"),
        # the inviter's id as JSON true or as a string: refused, not read as member 1 or 5
        ("referral.completed", {"inviter_member_id": True}, InvalidInput, "inviter_member_id"),
        ("referral.completed", {"inviter_member_id": "5"}, InvalidInput, "inviter_member_id"),
        # an amount in fen as yuan text, as a float or as JSON true: refused, not read as
        # 100 fen (a hundredth of 100 yuan) or 1 fen
        *(
            (
                "order.paid",
                {"order_id": "1", "lines": [{"sku": "A", "amount_fen": amount}]},
                InvalidInput,
                "payload.lines.0.amount_fen",
            )
            for amount in ("100.00", "100", 100.0, True)
        ),
        (
            "order.paid",
            {"order_id": "1", "lines": [{"sku": "A", "amount_fen": 100, "quantity": "2"}]},
            InvalidInput,
            "payload.lines.0.quantity",
        ),
        # the numbers other events carry, the same: a count as text or true is refused
        ("activity.attended", {"activity_id": "a", "hours": "2"}, InvalidInput, "hours"),
        ("activity.attended", {"activity_id": "a", "hours": True}, InvalidInput, "hours"),
        ("quiz.answered", {"quiz_id": "q", "correct_answers": "3"}, InvalidInput, "correct"),
        ("review.liked", {"review_id": "r", "likes": True}, InvalidInput, "payload.likes"),
    ],
)
def test_bad_events_are_refused_and_leave_nothing(
    db: Database, kind: str, payload: dict[str, Any], error: type[JifenError], says: str
) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", RATES)
    payload = dict(payload)
    when = db.clock.now()
    if payload.pop("_future", False):
        when += timedelta(minutes=6)
    with pytest.raises(error, match=says):
        send(db, program.id, member, kind, when, "bad", move_clock=False, **payload)
    assert _count(db, program.id) == 0


def test_unknown_member_and_failing_condition_are_refused(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    # (a condition that reads a field no order has is not approved: this one reads a field
    # every order has, as a time it is not)
    activate(
        db, program.id, "picky", {"kind": "fixed", "points": 5},
        condition="timestamp(event.order_id) < now",
    )  # fmt: skip
    with pytest.raises(JifenError, match=r"There is no member"):
        send(
            db,
            program.id,
            10**12,
            "order.paid",
            db.clock.now(),
            "u",
            order_id="1",
            lines=lines(("A", "x", 1)),
        )
    with pytest.raises(EventRefused, match=r"picky: its condition failed.*Timestamp"):
        send(
            db,
            program.id,
            member,
            "order.paid",
            db.clock.now(),
            "c",
            order_id="1",
            lines=lines(("A", "x", 1)),
        )
    assert _count(db, program.id) == 0


@pytest.mark.parametrize(
    ("condition", "says"),
    [
        ("event.amount_fen >>> 3", "Syntax error"),
        ('"a" + 1', "no matching overload"),
        ("event.amount_fen + 1", "must be true or false"),
    ],
)
def test_a_rule_whose_condition_cannot_work_is_refused(
    db: Database, condition: str, says: str
) -> None:
    program = new_program(db)
    spec = RuleSpec.model_validate(
        {
            "code": "bad",
            "name": "bad",
            "event_types": ["order.paid"],
            "params": {"kind": "fixed", "points": 1},
            "condition": condition,
        }
    )
    with pytest.raises(InvalidInput, match=says):
        db.run(
            lambda uow: rules.create_version(
                uow, program_id=program.id, spec=spec, created_by="maker"
            )
        )


def test_a_rule_on_refunds_is_refused_as_it_would_never_award(db: Database) -> None:
    # A refund takes back what its order earned; it is evaluated by no rule, so a rule on
    # order.refunded (关怀积分 after a return) would be approved and never pay.
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    care = {"kind": "fixed", "points": 100}
    with pytest.raises(InvalidInput, match=r"no rule awards on order\.refunded") as refused:
        activate(db, program.id, "care", care, events_=("order.refunded", "order.paid"))
    assert refused.value.params["field"] == "event_types"
    assert "custom." in refused.value.message("en") and "custom." in refused.value.message("zh")
    assert (
        db.run(
            lambda uow: rules.list_versions(uow, program_id=program.id, code="care"), read_only=True
        )
        == []
    )
    activate(db, program.id, "base", RATES)
    now = db.clock.now()
    send(db, program.id, member, "order.paid", now, "o1", order_id="A1",
         lines=lines(("T1", "日用品", 200)))  # fmt: skip
    back = send(db, program.id, member, "order.refunded", now, "r1", order_id="A1", whole=True)
    assert back.points == -200
    assert balance(db, member).balance == 0


def test_a_multiplier_of_kinds_no_rule_has_is_refused(db: Database) -> None:
    # A misspelt kind (spend-rate for spend_rate) would make a campaign multiply nothing.
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    for applies_to in (["spend-rate"], [], ["fixed", "reversal"]):
        double = {"kind": "multiplier", "factor": "2", "applies_to": applies_to}
        with pytest.raises(InvalidInput, match="no kind of award") as refused:
            activate(db, program.id, "double", double, priority=200)
        assert refused.value.params["field"] == "params.applies_to"
        assert "spend_rate" in refused.value.message("en")
    activate(db, program.id, "base", RATES)
    double = {"kind": "multiplier", "factor": "2", "applies_to": ["spend_rate", "fixed"]}
    activate(db, program.id, "double", double, priority=200)
    sent = send(db, program.id, member, "order.paid", db.clock.now(), "o1", order_id="A1",
                lines=lines(("T1", "日用品", 200)))  # fmt: skip
    assert sent.points == 400


def test_a_new_version_approved_while_the_rule_is_paused_ends_the_paused_one(
    db: Database,
) -> None:
    # Approving version 2 replaces version 1 even when it was paused: no one can bring
    # version 1 back over the one a second person approved.
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    first = activate(db, program.id, "base", RATES)
    db.run(lambda uow: rules.pause(uow, program_id=program.id, version_id=first))
    activate(db, program.id, "base", {**RATES, "rate": "0.5", "category_rates": {}})
    paused = db.run(lambda uow: rules.get_version(uow, program_id=program.id, version_id=first))
    assert paused.status == "retired"
    with pytest.raises(StateConflict, match="only a paused version"):
        db.run(lambda uow: rules.resume(uow, program_id=program.id, version_id=first))
    sent = send(db, program.id, member, "order.paid", db.clock.now(), "o1", order_id="A1",
                lines=lines(("T1", "日用品", 200)))  # fmt: skip
    assert [(a.version, a.points) for a in sent.awards] == [(2, 100)]


def test_lifecycle_refuses_out_of_order_moves(db: Database) -> None:
    program = new_program(db)
    version = activate(db, program.id, "base", RATES)
    with pytest.raises(StateConflict, match="only a draft version"):
        db.run(
            lambda uow: rules.update_draft(
                uow,
                program_id=program.id,
                version_id=version,
                spec=RuleSpec.model_validate(
                    {"code": "base", "name": "b", "event_types": ["order.paid"], "params": RATES}
                ),
            )
        )
    paused = db.run(lambda uow: rules.pause(uow, program_id=program.id, version_id=version))
    assert paused.status == "paused" and paused.active_to is not None
    with pytest.raises(StateConflict):
        db.run(lambda uow: rules.pause(uow, program_id=program.id, version_id=version))


def test_custom_events_must_match_their_declared_fields(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    tree = {"kind": "per_unit", "field": "trees", "points_per_unit": "20"}
    # A rule on a custom type is approved once the type is declared, with its number.
    with pytest.raises(InvalidInput, match=r"'custom\.tree_planted' is no event type"):
        activate(db, program.id, "tree", tree, events_=("custom.tree_planted",))
    now = db.clock.now()
    with pytest.raises(InvalidInput, match="not declared in this programme"):
        send(db, program.id, member, "custom.tree_planted", now, "t0", trees=2)
    declared = EventTypeDeclare.model_validate(
        {"fields": {"trees": {"type": "integer"}, "site": {"type": "string", "required": False}}}
    )
    db.run(
        lambda uow: rules.declare_event_type(
            uow, program_id=program.id, name="custom.tree_planted", body=declared
        )
    )
    activate(db, program.id, "tree", tree, events_=("custom.tree_planted",))
    for bad, field in (
        ({"trees": "two"}, "payload.trees"),
        ({}, "payload.trees"),
        ({"trees": 2, "colour": "green"}, "payload.colour"),
    ):
        with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
            send(db, program.id, member, "custom.tree_planted", now, "t1", **bad)
    planted = send(db, program.id, member, "custom.tree_planted", now, "t1", trees=3, site="东湖")
    assert planted.points == 60
    assert _count(db, program.id) == 1


def test_custom_fields_may_carry_any_declared_name(db: Database) -> None:
    # Names a payload model reserves for itself (model_dump, model_config, json, ...) are
    # fields like any other: read, checked and kept under the name declared.
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    names = ("model_dump", "model_config", "json", "copy", "schema", "validate")
    declared = EventTypeDeclare.model_validate(
        {"fields": {name: {"type": "integer"} for name in names}}
    )
    db.run(
        lambda uow: rules.declare_event_type(
            uow, program_id=program.id, name="custom.oddly_named", body=declared
        )
    )
    per = {"kind": "per_unit", "field": "model_dump", "points_per_unit": "2"}
    activate(db, program.id, "odd", per, events_=("custom.oddly_named",))
    now = db.clock.now()
    payload = {name: index + 1 for index, name in enumerate(names)}
    with pytest.raises(InvalidInput, match=r"payload\.model_config"):
        send(db, program.id, member, "custom.oddly_named", now, "n0", model_dump=1)
    sent = send(db, program.id, member, "custom.oddly_named", now, "n1", **payload)
    assert sent.points == 2
    stored = db.run(lambda uow: service.get_event(uow, program_id=program.id, event_id=sent.id))
    assert stored.points == 2
    kept = db.run(
        lambda uow: uow.conn.execute(select(events.c.payload).where(events.c.id == sent.id))
    ).scalar_one()
    assert kept == payload


def reviewed_contributions(db: Database, program_id: int) -> None:
    """``custom.contribution`` events asking for ``requested_points``, which a reviewer
    decides (at most 50)."""
    declared = EventTypeDeclare.model_validate(
        {"fields": {"requested_points": {"type": "integer"}}}
    )
    db.run(
        lambda uow: rules.declare_event_type(
            uow, program_id=program_id, name="custom.contribution", body=declared
        )
    )
    reviewed = {"kind": "reviewed", "max_points": 50}
    activate(db, program_id, "contribution", reviewed, events_=("custom.contribution",))


def test_a_held_award_is_approved_for_at_most_what_it_asks(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    reviewed_contributions(db, program.id)
    sent = send(
        db, program.id, member, "custom.contribution", db.clock.now(), "c1", requested_points=20
    )
    (held,) = sent.awards
    award_id = db.run(
        lambda uow: service.held_awards(uow, program_id=program.id)[0].id, read_only=True
    )

    def approve(points: int) -> Any:
        return db.run(
            lambda uow: service.approve_award(
                uow, program_id=program.id, award_id=award_id, decided_by="reviewer",
                points=points,
            )
        )  # fmt: skip

    # within the rule's maximum, yet more than the member asked for: refused
    with pytest.raises(InvalidInput, match="asks for 20") as refused:
        approve(30)
    assert refused.value.params["field"] == "points"
    assert balance(db, member).balance == 0
    assert (held.wanted, held.held) == (20, True)
    approved = approve(15)
    assert (approved.decision, approved.points) == ("approved", 15)
    assert balance(db, member).balance == 15
    assert_ledger_sound(db, program.id)


def test_a_condition_on_an_optional_custom_field_must_test_it_first(db: Database) -> None:
    # An event of a custom type may leave out an optional field: a condition reading it
    # without has(...) would refuse every such event, so the rule is not approved.
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    declared = EventTypeDeclare.model_validate(
        {"fields": {"trees": {"type": "integer"}, "site": {"type": "string", "required": False}}}
    )
    db.run(
        lambda uow: rules.declare_event_type(
            uow, program_id=program.id, name="custom.tree_planted", body=declared
        )
    )
    lake = {"kind": "fixed", "points": 30}
    with pytest.raises(InvalidInput, match=r"'site'.*has\(") as refused:
        activate(db, program.id, "lake", lake, events_=("custom.tree_planted",),
                 condition='event.site == "东湖"')  # fmt: skip
    assert refused.value.params["field"] == "condition"
    activate(db, program.id, "lake", lake, events_=("custom.tree_planted",),
             condition='has(event.site) && event.site == "东湖"')  # fmt: skip
    now = db.clock.now()
    assert send(db, program.id, member, "custom.tree_planted", now, "t1", trees=1).points == 0
    planted = send(db, program.id, member, "custom.tree_planted", now, "t2", trees=1, site="东湖")
    assert planted.points == 30


def test_a_condition_that_cannot_take_an_order_without_a_store_is_refused(
    db: Database,
) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    shanghai = {"kind": "fixed", "points": 10}
    with pytest.raises(InvalidInput, match=r"without store") as refused:
        activate(db, program.id, "sh", shanghai, condition='event.store.startsWith("SH")')
    assert refused.value.params["field"] == "condition"
    assert "event.store != null" in refused.value.message("zh")
    activate(db, program.id, "sh", shanghai,
             condition='event.store != null && event.store.startsWith("SH")')  # fmt: skip
    now = db.clock.now()
    bare = send(db, program.id, member, "order.paid", now, "o1", order_id="A1",
                lines=lines(("T1", "日用品", 20)))  # fmt: skip
    assert bare.points == 0
    there = send(db, program.id, member, "order.paid", now, "o2", order_id="A2", store="SH-1",
                 lines=lines(("T1", "日用品", 20)))  # fmt: skip
    assert there.points == 10


def test_a_custom_type_is_not_declared_again_without_what_its_live_rules_read(
    db: Database,
) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)

    def declare(fields: dict[str, Any]) -> None:
        body = EventTypeDeclare.model_validate({"fields": fields})
        db.run(
            lambda uow: rules.declare_event_type(
                uow, program_id=program.id, name="custom.tree_planted", body=body
            )
        )

    declare({"trees": {"type": "integer"}, "site": {"type": "string"}})
    tree = {"kind": "per_unit", "field": "trees", "points_per_unit": "20"}
    activate(db, program.id, "tree", tree, events_=("custom.tree_planted",),
             condition='event.site == "东湖"')  # fmt: skip
    # the live rule reads trees (a number) and site: neither may go, nor trees become text
    for fields, field in (
        ({"site": {"type": "string"}}, "trees"),
        ({"trees": {"type": "string"}, "site": {"type": "string"}}, "trees"),
        ({"trees": {"type": "integer"}}, "site"),
        ({"trees": {"type": "integer"}, "site": {"type": "string", "required": False}}, "site"),
    ):
        with pytest.raises(InvalidInput, match=f"rule tree.*'{field}'") as refused:
            declare(fields)
        assert refused.value.params["field"] == "fields"
    # more fields are fine; the events go on earning
    declare({"trees": {"type": "integer"}, "site": {"type": "string"},
             "note": {"type": "string", "required": False}})  # fmt: skip
    now = db.clock.now()
    planted = send(db, program.id, member, "custom.tree_planted", now, "t1", trees=2, site="东湖")
    assert planted.points == 40


def test_a_paused_rule_resumes_only_if_its_event_type_still_has_what_it_reads(
    db: Database,
) -> None:
    program = new_program(db)

    def declare(fields: dict[str, Any]) -> None:
        body = EventTypeDeclare.model_validate({"fields": fields})
        db.run(
            lambda uow: rules.declare_event_type(
                uow, program_id=program.id, name="custom.tree_planted", body=body
            )
        )

    declare({"trees": {"type": "integer"}})
    tree = {"kind": "per_unit", "field": "trees", "points_per_unit": "20"}
    version = activate(db, program.id, "tree", tree, events_=("custom.tree_planted",))
    db.run(lambda uow: rules.pause(uow, program_id=program.id, version_id=version))
    declare({"saplings": {"type": "integer"}})  # paused, the rule is not live: allowed
    with pytest.raises(InvalidInput, match="no number 'trees'"):
        db.run(lambda uow: rules.resume(uow, program_id=program.id, version_id=version))
    paused = db.run(lambda uow: rules.get_version(uow, program_id=program.id, version_id=version))
    assert paused.status == "paused"
    declare({"trees": {"type": "integer"}, "saplings": {"type": "integer"}})
    resumed = db.run(lambda uow: rules.resume(uow, program_id=program.id, version_id=version))
    assert resumed.status == "active"


def test_birthdays_are_raised_once_a_year_by_the_programme_calendar(db: Database) -> None:
    program = new_program(db)
    june, leap, other = new_members(db, program.id, 3)
    for member, born in (
        (june, date(1990, 6, 2)),
        (leap, date(2000, 2, 29)),
        (other, date(1985, 6, 3)),
    ):
        db.run(
            lambda uow, m=member, b=born: members.update_profile(
                uow, program_id=program.id, member_id=m, body=MemberUpdate(birthday=b)
            )
        )
    activate(
        db,
        program.id,
        "gift",
        {"kind": "birthday_gift", "by_tier": {}, "default": 200},
        events_=("member.birthday",),
    )
    assert isinstance(db.clock, ManualClock)
    db.clock.set(datetime(2026, 6, 2, 9, 0, tzinfo=UTC))
    assert service.raise_birthdays(db, program_id=program.id, day=date(2026, 6, 2), chunk=1) == 1
    assert service.raise_birthdays(db, program_id=program.id, day=date(2026, 6, 2)) == 0
    assert (balance(db, june).balance, balance(db, other).balance) == (200, 0)
    db.clock.set(datetime(2027, 3, 1, 9, 0, tzinfo=UTC))
    assert service.raise_birthdays(db, program_id=program.id, day=date(2027, 2, 28)) == 1
    assert balance(db, leap).balance == 200
    # A source may send a birthday too, but only of the year it happens in and, where the
    # member's birthday is known, in its month: another year would pay a second gift.
    now = db.clock.now()
    for year, member, problem in (
        (2030, june, "payload.year"),
        (1950, june, "payload.year"),
        (2027, june, "birthday is in month 6, not in month 3"),
    ):
        with pytest.raises(InvalidInput, match=problem):
            send(db, program.id, member, "member.birthday", now, f"crm-{year}", year=year)
    assert balance(db, june).balance == 200
    db.clock.set(datetime(2027, 6, 10, 9, 0, tzinfo=UTC))
    sent = send(db, program.id, june, "member.birthday", db.clock.now(), "crm-2027", year=2027)
    assert sent.points == 200 and balance(db, june).balance == 400


def test_late_events_keep_the_validity_they_would_have_had(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", RATES)
    assert isinstance(db.clock, ManualClock)
    earned_at = db.clock.now() + timedelta(hours=1)
    db.clock.set(earned_at + timedelta(days=200))  # sent 200 days late: still valid
    late = send(
        db,
        program.id,
        member,
        "order.paid",
        earned_at,
        "late",
        order_id="L1",
        lines=lines(("T1", "日用品", 100)),
    )
    (lot,) = db.run(lambda uow: points.member_lots(uow, member_id=member))
    assert late.points == 100 and lot.expires_at is not None
    shanghai = ZoneInfo("Asia/Shanghai")  # the end of the programme's day, a year after
    assert (
        lot.expires_at.astimezone(shanghai).date()
        == (earned_at.astimezone(shanghai) + timedelta(days=7 + 365 + 1)).date()
    )
    db.clock.set(earned_at + timedelta(days=400))  # past its validity: nothing to post
    stale = send(
        db,
        program.id,
        member,
        "order.paid",
        earned_at,
        "stale",
        order_id="S1",
        lines=lines(("T1", "日用品", 100)),
    )
    (award,) = stale.awards
    assert (stale.points, award.points, award.cap) == (0, 0, "expired before it was recorded")
    assert balance(db, member).balance == 100


def test_a_late_event_sees_what_its_month_already_earned(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", RATES, caps={"per_member": {"month": 100}})
    day20 = datetime(2026, 1, 20, 4, 0, tzinfo=UTC)
    first = send(
        db,
        program.id,
        member,
        "order.paid",
        day20,
        "o20",
        order_id="20",
        lines=lines(("T1", "日用品", 100)),
    )
    late = send(
        db,
        program.id,
        member,
        "order.paid",
        day20 - timedelta(days=10),
        "o10",
        order_id="10",
        lines=lines(("T1", "日用品", 100)),
    )
    assert (first.points, late.points) == (100, 0)
    assert late.awards[0].cap == "rule_month (base: 100)"


def test_a_refund_gives_no_room_under_todays_cap(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", RATES, caps={"per_member": {"day": 100}})
    yesterday = datetime(2026, 1, 5, 4, 0, tzinfo=UTC)
    today = yesterday + timedelta(days=1)
    send(
        db,
        program.id,
        member,
        "order.paid",
        yesterday,
        "o1",
        order_id="1",
        lines=lines(("T1", "日用品", 100)),
    )
    send(
        db,
        program.id,
        member,
        "order.paid",
        today,
        "o2",
        order_id="2",
        lines=lines(("T1", "日用品", 100)),
    )
    send(db, program.id, member, "order.refunded", today, "r1", order_id="1", whole=True)
    again = send(
        db,
        program.id,
        member,
        "order.paid",
        today,
        "o3",
        order_id="3",
        lines=lines(("T1", "日用品", 100)),
    )
    assert again.points == 0 and again.awards[0].cap == "rule_day (base: 100)"


def test_text_with_a_nul_byte_is_refused_before_it_reaches_the_database() -> None:
    with pytest.raises(ValueError, match="external_id"):
        EventIn(
            source="pos",
            external_id="a\x00b",
            type="member.checked_in",
            occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
            member_id=1,
        )


def _concurrently(count: int, work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:  # the test reports what each thread met
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_one_order_sent_at_once_under_eight_event_ids_earns_once(pg: Database) -> None:
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    activate(pg, program.id, "base", RATES)
    now = pg.clock.now()
    errors = _concurrently(
        8,
        lambda n: send(
            pg,
            program.id,
            member,
            "order.paid",
            now,
            f"retry-{n}",
            order_id="SAME",
            lines=lines(("T1", "日用品", 100)),
        ),
    )
    assert len(errors) == 7 and all(isinstance(e, InvalidInput) for e in errors), errors
    assert balance(pg, member).balance == 100
    assert_ledger_sound(pg, program.id)


def test_a_budget_holds_from_its_first_spend_under_concurrency(pg: Database) -> None:
    program = new_program(pg)
    members_ = new_members(pg, program.id, 6)
    activate(
        pg,
        program.id,
        "launch",
        {"kind": "fixed", "points": 60},
        caps={"budget": 100},
        events_=("member.checked_in",),
    )
    now = pg.clock.now()
    errors = _concurrently(
        6, lambda n: send(pg, program.id, members_[n], "member.checked_in", now, f"c{n}")
    )
    assert errors == []
    assert sum(balance(pg, m).balance for m in members_) == 100  # 60 + 40, then nothing
    assert_ledger_sound(pg, program.id)


def test_versions_of_one_rule_approved_at_once_leave_one_live(pg: Database) -> None:
    program = new_program(pg)
    (member,) = new_members(pg, program.id, 1)
    body = RuleSpec.model_validate(
        {"code": "welcome", "name": "welcome", "event_types": ["member.checked_in"],
         "params": {"kind": "fixed", "points": 10}}
    )  # fmt: skip

    def drafted(uow: UnitOfWork) -> list[int]:
        ids = []
        for _ in range(8):
            draft = rules.create_version(uow, program_id=program.id, spec=body, created_by="m")
            rules.submit(uow, program_id=program.id, version_id=draft.id, approval_id=None)
            ids.append(draft.id)
        return ids

    versions = pg.run(drafted)
    start = threading.Barrier(len(versions))

    def approve(n: int) -> None:
        start.wait()  # each approval in a transaction of its own, all at once
        pg.run(
            lambda uow: rules.approve(
                uow, program_id=program.id, version_id=versions[n], approved_by="c"
            )
        )

    errors = _concurrently(len(versions), approve)
    assert all(isinstance(e, StateConflict) for e in errors), errors
    live = pg.run(lambda uow: rules.rules_at(uow, program_id=program.id, moment=pg.clock.now()))
    assert [r.spec.code for r in live.rules] == ["welcome"]
    sent = send(pg, program.id, member, "member.checked_in", pg.clock.now(), "c1")
    assert sent.points == 10


def test_a_refund_takes_back_what_its_lines_earned(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", {**RATES, "excluded_categories": ["烟酒"]})
    activate(db, program.id, "full", {"kind": "threshold", "min_amount_fen": 30_000, "points": 200})
    now = db.clock.now()
    # 日用品 100 yuan (100 points), 家电 100 yuan (300), 烟酒 100 yuan (nothing); 满300 +200
    send(
        db,
        program.id,
        member,
        "order.paid",
        now,
        "o1",
        order_id="A1",
        lines=lines(("T1", "日用品", 100), ("TV", "家电", 100), ("W1", "烟酒", 100)),
    )
    assert balance(db, member).balance == 600
    # the tobacco back: the spend award loses nothing, the bonus a third (its money share)
    tobacco = send(
        db,
        program.id,
        member,
        "order.refunded",
        now,
        "r1",
        order_id="A1",
        lines=[{"sku": "W1", "amount_fen": 10_000}],
    )
    assert {a.rule: a.points for a in tobacco.awards} == {"full": -67}
    # the television back: its 300 points, and the bonus's second third
    tv = send(
        db,
        program.id,
        member,
        "order.refunded",
        now,
        "r2",
        order_id="A1",
        lines=[{"sku": "TV", "amount_fen": 10_000}],
    )
    assert {a.rule: a.points for a in tv.awards} == {"base": -300, "full": -66}
    # a line the order does not have, or more than a line cost, is refused
    with pytest.raises(InvalidInput, match="not a line of order"):
        send(
            db,
            program.id,
            member,
            "order.refunded",
            now,
            "r3",
            order_id="A1",
            lines=[{"sku": "XX", "amount_fen": 1}],
        )
    with pytest.raises(InvalidInput, match="more than the 10000 it cost"):
        send(
            db,
            program.id,
            member,
            "order.refunded",
            now,
            "r4",
            order_id="A1",
            lines=[{"sku": "TV", "amount_fen": 1}],
        )
    rest = send(db, program.id, member, "order.refunded", now, "r5", order_id="A1", whole=True)
    assert rest.points == -(100 + 67)
    assert balance(db, member).balance == 0
    assert_ledger_sound(db, program.id)
