"""A backtest replays stored events under proposed rules and compares with what they earned,
changing nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.events import service
from jifen.events.schemas import BacktestIn
from jifen.rules.schemas import RuleSpec
from jifen.tiers import service as tiers
from tests.events.test_service import activate, balance, lines, send, setup_tiers
from tests.factories import new_members, new_program

BASE = {
    "code": "base",
    "name": "base",
    "event_types": ["order.paid"],
    "params": {"kind": "spend_rate", "rate": "1"},
}


def test_a_proposal_is_compared_per_rule_tier_day_and_member(db: Database) -> None:
    program = new_program(db)
    plain, gold = new_members(db, program.id, 2)
    setup_tiers(db, program.id, **{f"m{plain}": "普通", f"m{gold}": "金卡"})
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    start = datetime(2026, 1, 2, 4, 0, tzinfo=UTC)
    for day in range(3):
        for member, yuan in ((plain, 100), (gold, 300)):
            send(
                db,
                program.id,
                member,
                "order.paid",
                start + timedelta(days=day),
                f"o{day}-{member}",
                order_id=f"{day}-{member}",
                lines=lines(("A", "x", yuan)),
            )
    before = (balance(db, plain).balance, balance(db, gold).balance)
    proposal = BacktestIn(
        since=start,
        until=start + timedelta(days=2),  # the first two days only
        rules=[
            RuleSpec.model_validate({**BASE, "params": {"kind": "spend_rate", "rate": "2"}}),
            RuleSpec.model_validate(
                {
                    "code": "gold-bonus",
                    "name": "g",
                    "event_types": ["order.paid"],
                    "condition": 'member.tier == "金卡"',
                    "params": {"kind": "fixed", "points": 10},
                }
            ),
        ],
    )
    report = db.run(
        lambda uow: service.backtest(uow, program_id=program.id, request=proposal), read_only=True
    )
    assert report.events == 4
    assert (report.actual, report.proposed) == (800, 1600 + 20)
    assert [(c.key, c.actual, c.proposed) for c in report.by_rule] == [
        ("base", 800, 1600),
        ("gold-bonus", 0, 20),
    ]
    assert [(c.key, c.actual, c.proposed) for c in report.by_tier] == [
        ("普通", 200, 400),
        ("金卡", 600, 1220),
    ]
    assert [c.key for c in report.by_day] == ["2026-01-02", "2026-01-03"]
    assert [(c.key, c.difference) for c in report.members] == [(str(gold), 620), (str(plain), 200)]
    assert (balance(db, plain).balance, balance(db, gold).balance) == before  # nothing posted


def test_dropping_a_rule_shows_what_it_cost(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    activate(db, program.id, "full", {"kind": "threshold", "min_amount_fen": 50_000, "points": 200})
    when = datetime(2026, 1, 3, 4, 0, tzinfo=UTC)
    send(
        db, program.id, member, "order.paid", when, "o1", order_id="1", lines=lines(("A", "x", 600))
    )
    proposal = BacktestIn(
        since=when - timedelta(hours=1), until=when + timedelta(hours=1), drop=["full"]
    )
    report = db.run(
        lambda uow: service.backtest(uow, program_id=program.id, request=proposal), read_only=True
    )
    assert [(c.key, c.actual, c.proposed, c.difference) for c in report.by_rule] == [
        ("base", 600, 600, 0),
        ("full", 200, 0, -200),
    ]


def test_the_tier_matrix_counts_in_a_backtest_as_it_did_when_earning(db: Database) -> None:
    from jifen.programs import service as programs
    from tests.tiers.scheme import scheme

    program = new_program(db)
    (gold,) = new_members(db, program.id, 1)
    setup_tiers(db, program.id, **{f"m{gold}": "金卡"})
    matrix = scheme(benefits={"金卡": {"earn_multiplier": "1.5"}}, upgrade_at_once=False)

    def configure(uow: UnitOfWork) -> None:
        settings = programs.get_settings(uow, program_id=program.id)
        changed = settings.model_copy(update={"tier_scheme": matrix})
        programs.set_settings(uow, program_id=program.id, settings=changed)

    db.run(configure)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    when = datetime(2026, 1, 3, 4, 0, tzinfo=UTC)
    send(db, program.id, gold, "order.paid", when, "o1", order_id="1", lines=lines(("A", "x", 200)))
    unchanged = BacktestIn(since=when - timedelta(hours=1), until=when + timedelta(hours=1))
    report = db.run(
        lambda uow: service.backtest(uow, program_id=program.id, request=unchanged), read_only=True
    )
    assert [(c.key, c.actual, c.proposed) for c in report.by_rule] == [
        ("base", 200, 200),
        ("tier_benefit", 100, 100),
    ]


def test_a_backtest_takes_each_member_at_the_tier_it_held_when_the_event_happened(
    db: Database, clock: ManualClock
) -> None:
    """A member moved up between two orders earned the first as 普通 and the second as 金卡;
    the rules left unchanged, the replay earns each as it was earned and files it under
    the tier of its time (not the member's tier of today)."""
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    setup_tiers(db, program.id, **{f"m{member}": "普通"})
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    activate(db, program.id, "tier", {"kind": "multiplier", "by_tier": {"金卡": "1.5"}})
    start = datetime(2026, 1, 2, 4, 0, tzinfo=UTC)
    order = lines(("A", "x", 100))
    send(db, program.id, member, "order.paid", start, "o1", order_id="1", lines=order)
    clock.set(start + timedelta(days=1))
    db.run(
        lambda uow: tiers.set_member_tier(
            uow, program_id=program.id, member_id=member, tier="金卡", reason="up", set_by="t"
        )
    )
    later = start + timedelta(days=2)
    send(db, program.id, member, "order.paid", later, "o2", order_id="2", lines=order)
    unchanged = BacktestIn(since=start - timedelta(hours=1), until=later + timedelta(hours=1))
    report = db.run(
        lambda uow: service.backtest(uow, program_id=program.id, request=unchanged), read_only=True
    )
    by_tier = {c.key: (c.actual, c.proposed) for c in report.by_tier}
    assert set(by_tier) == {"普通", "金卡"}
    assert by_tier["普通"] == (100, 100)
    assert by_tier["金卡"][0] == by_tier["金卡"][1] > 100  # the multiplier counted, as it did
    assert report.actual == report.proposed == balance(db, member).balance  # as earned
    assert all(c.actual == c.proposed for c in report.by_rule)
