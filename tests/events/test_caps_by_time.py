"""The programme's caps by the event's own time, on both backends: an event sent late is
capped by the caps in force when it happened, alone, in a batch beside events of later caps,
in a dry run and when its held award is approved; the budget figure of its time bounds the
running total."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event as sa_event

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.events import service
from jifen.events.schemas import BacktestIn, EventIn, EventResult
from jifen.rules import service as rules
from jifen.rules.schemas import ProgramCaps
from tests.events.test_service import (
    activate,
    balance,
    lines,
    reviewed_contributions,
    send,
    setup_tiers,
)
from tests.factories import new_members, new_program


def set_caps(db: Database, program_id: int, caps: dict[str, Any]) -> None:
    """Caps in force from the clock's time."""
    body = ProgramCaps.model_validate(caps)
    db.run(lambda uow: rules.set_caps(uow, program_id=program_id, caps=body))


def order(member: int, when: datetime, key: str, yuan: int) -> EventIn:
    return EventIn(
        source="pos", external_id=key, type="order.paid", occurred_at=when, member_id=member,
        payload={"order_id": key, "lines": lines(("A", "x", yuan))},
    )  # fmt: skip


def clock_of(db: Database) -> ManualClock:
    assert isinstance(db.clock, ManualClock)
    return db.clock


def two_earning(db: Database) -> tuple[Any, int, int, ManualClock]:
    """A programme earning a point a yuan, two of its members, and the clock."""
    program = new_program(db)
    first, second = new_members(db, program.id, 2)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    return program, first, second, clock_of(db)


def program_spent(db: Database, program_id: int) -> int:
    spent = db.run(
        lambda uow: rules.budgets_spent(
            uow, program_id=program_id, codes=[rules.PROGRAM_BUDGET], lock=False
        )
    )
    return spent.get(rules.PROGRAM_BUDGET, 0)


def test_an_event_sent_late_is_capped_by_the_caps_of_its_own_time(db: Database) -> None:
    # given day caps of 1000 for 普通, tightened to 300 two hours later
    program = new_program(db)
    early, fresh = new_members(db, program.id, 2)
    setup_tiers(db, program.id, **{f"m{early}": "普通", f"m{fresh}": "普通"})
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    clock = clock_of(db)
    before_caps = clock.now() - timedelta(minutes=1)
    set_caps(db, program.id, {"by_tier": {"普通": {"day": 1000}}})
    between = clock.now() + timedelta(hours=1)
    clock.advance(timedelta(hours=2))
    set_caps(db, program.id, {"by_tier": {"普通": {"day": 300}}})
    clock.advance(timedelta(hours=1))
    # when an order of the first caps' time comes in now, and one of now
    late = send(db, program.id, early, "order.paid", between, "late", order_id="L",
                lines=lines(("A", "x", 800)))  # fmt: skip
    now = send(db, program.id, fresh, "order.paid", clock.now(), "now", order_id="N",
               lines=lines(("A", "x", 800)))  # fmt: skip
    # then each is capped by the caps of its time
    assert [(a.points, a.cap) for a in late.awards] == [(800, None)]
    assert [(a.points, a.cap) for a in now.awards] == [(300, "tier_day (普通: 300)")]
    # and every version stays on record: the current one answers without a time
    caps = {
        moment: db.run(lambda uow, at=moment: rules.get_caps(uow, program_id=program.id, at=at))
        for moment in (before_caps, between, clock.now(), None)
    }
    assert caps[before_caps] == ProgramCaps()
    assert caps[between].by_tier["普通"].day == 1000
    assert caps[clock.now()].by_tier["普通"].day == caps[None].by_tier["普通"].day == 300


def test_a_batch_meets_the_caps_and_budget_figure_of_each_events_time(db: Database) -> None:
    # given a programme budget of 1000, 600 of it awarded, raised to 5000 two hours later
    program, first, second, clock = two_earning(db)
    start = clock.now()
    set_caps(db, program.id, {"budget": 1000})
    send(db, program.id, first, "order.paid", start, "o0", order_id="0",
         lines=lines(("A", "x", 600)))  # fmt: skip
    clock.advance(timedelta(hours=2))
    set_caps(db, program.id, {"budget": 5000})
    clock.advance(timedelta(hours=1))
    # when one batch brings orders of the old budget's time and of now
    batch = [
        order(first, start + timedelta(hours=1), "late", 800),
        order(second, clock.now(), "now", 800),
        order(second, start + timedelta(minutes=30), "later-still", 100),
    ]
    outcomes = db.run(lambda uow: service.ingest_many(uow, program_id=program.id, events=batch))
    # then the late ones are held to 1000 for the running total, the one of now to 5000
    results = [o for o in outcomes if isinstance(o, EventResult)]
    assert [r.points for r in results] == [400, 800, 0]
    assert [a.cap for a in results[0].awards] == ["program_budget (1000)"]
    assert program_spent(db, program.id) == 1800
    assert (balance(db, first).balance, balance(db, second).balance) == (1000, 800)


def test_a_refund_gives_back_only_to_the_budgets_its_points_counted_in(db: Database) -> None:
    # given an order earned under caps without a budget, then a budget of 1000 used up
    program, first, second, clock = two_earning(db)
    set_caps(db, program.id, {})
    send(db, program.id, first, "order.paid", clock.now(), "o1", order_id="A",
         lines=lines(("A", "x", 500)))  # fmt: skip
    clock.advance(timedelta(hours=1))
    set_caps(db, program.id, {"budget": 1000})
    send(db, program.id, second, "order.paid", clock.now(), "o2", order_id="B",
         lines=lines(("A", "x", 1000)))  # fmt: skip
    assert program_spent(db, program.id) == 1000
    # when the first order is refunded
    clock.advance(timedelta(hours=1))
    refund = send(db, program.id, first, "order.refunded", clock.now(), "r1", order_id="A",
                  whole=True)  # fmt: skip
    # then its points come back, but not into a budget they never counted in
    assert refund.points == -500 and balance(db, first).balance == 0
    assert program_spent(db, program.id) == 1000
    # and a refund of an order that counted gives its budget back
    send(db, program.id, second, "order.refunded", clock.now(), "r2", order_id="B",
         lines=[{"sku": "A", "amount_fen": 40_000}])  # fmt: skip
    assert program_spent(db, program.id) == 600


def test_a_refund_gives_back_to_the_budgets_the_award_counted_in_whatever_came_after(
    db: Database,
) -> None:
    """An order may be stamped a few minutes ahead of its intake, and caps set in between
    take effect before its time: the refund follows what the award counted in when it was
    posted (its detail says so), not what the caps at the order's time say now."""
    program, first, second, clock = two_earning(db)
    set_caps(db, program.id, {})
    ahead = send(db, program.id, first, "order.paid", clock.now() + timedelta(minutes=4), "o1",
                 order_id="A", lines=lines(("A", "x", 500)), move_clock=False)  # fmt: skip
    assert [a.detail["budgets"] for a in ahead.awards] == [[]]
    clock.advance(timedelta(minutes=1))
    set_caps(db, program.id, {"budget": 1000})  # in force before the order's own time
    send(db, program.id, second, "order.paid", clock.now(), "o2", order_id="B",
         lines=lines(("A", "x", 1000)))  # fmt: skip
    clock.advance(timedelta(minutes=5))
    send(db, program.id, first, "order.refunded", clock.now(), "r1", order_id="A", whole=True)
    assert program_spent(db, program.id) == 1000
    # and the other way: counted in a budget that caps set in between no longer have
    set_caps(db, program.id, {"budget": 100_000})
    counted = send(db, program.id, first, "order.paid", clock.now() + timedelta(minutes=4),
                   "o3", order_id="C", lines=lines(("A", "x", 500)), move_clock=False)  # fmt: skip
    assert [a.detail["budgets"] for a in counted.awards] == [["*"]]
    assert program_spent(db, program.id) == 1500
    clock.advance(timedelta(minutes=1))
    set_caps(db, program.id, {})
    clock.advance(timedelta(minutes=5))
    send(db, program.id, first, "order.refunded", clock.now(), "r3", order_id="C", whole=True)
    assert program_spent(db, program.id) == 1000


def test_a_batch_under_the_current_caps_reads_no_earlier_ones(db: Database) -> None:
    # given caps changed once
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    clock = clock_of(db)
    start = clock.now()
    set_caps(db, program.id, {"budget": 1000})
    clock.advance(timedelta(hours=1))
    set_caps(db, program.id, {"budget": 2000})
    clock.advance(timedelta(hours=1))
    read: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        """The reads of every version (the current one is read with LIMIT 1; on PostgreSQL
        it goes to the driver, with the batch's other first reads, unseen here)."""
        if "earning_caps" in statement and "LIMIT" not in statement:
            read.append(statement)

    def batch(*events: EventIn) -> int:
        read.clear()
        sa_event.listen(db.engine, "before_cursor_execute", count)
        try:
            db.run(lambda uow: service.ingest_many(uow, program_id=program.id, events=events))
        finally:
            sa_event.remove(db.engine, "before_cursor_execute", count)
        return len(read)

    # when a batch's events are all of the current caps' time, no earlier caps are read
    now = clock.now()
    assert batch(*(order(member, now, f"n{i}", 10) for i in range(5))) == 0
    # and older events bring them in, once
    assert batch(order(member, start, "old", 10), order(member, start, "old2", 10)) == 1


def test_a_dry_run_meets_the_caps_of_the_events_time(db: Database) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    clock = clock_of(db)
    set_caps(db, program.id, {"budget": 1000})
    between = clock.now() + timedelta(hours=1)
    clock.advance(timedelta(hours=2))
    set_caps(db, program.id, {"budget": 100})

    def dry(when: datetime) -> list[tuple[int, str | None]]:
        evaluated = db.run(
            lambda uow: service.dry_run(
                uow, program_id=program.id, event=order(member, when, "dry", 800)
            )
        )
        return [(a.points, a.cap) for a in evaluated.awards]

    assert dry(between) == [(800, None)]
    assert dry(clock.now()) == [(100, "program_budget (100)")]


def test_a_held_award_is_released_under_the_caps_of_its_events_time(db: Database) -> None:
    # given a reviewed award held under a budget of 1000, which then falls to 10
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    reviewed_contributions(db, program.id)
    clock = clock_of(db)
    set_caps(db, program.id, {"budget": 1000})
    send(db, program.id, member, "custom.contribution", clock.now(), "c1", requested_points=20)
    clock.advance(timedelta(hours=1))
    set_caps(db, program.id, {"budget": 10})
    award_id = db.run(
        lambda uow: service.held_awards(uow, program_id=program.id)[0].id, read_only=True
    )
    # when it is approved, then it is capped as its event's time was: not at all
    approved = db.run(
        lambda uow: service.approve_award(
            uow, program_id=program.id, award_id=award_id, decided_by="reviewer"
        )
    )
    assert (approved.points, approved.cap) == (20, None)
    assert approved.detail["budgets"] == ["*"]  # what a refund would give back to
    assert balance(db, member).balance == 20


def test_a_backtest_counts_the_budgets_as_the_earning_did(db: Database) -> None:
    # given an order earned under caps without a budget, then one under a budget of 1000
    program, first, second, clock = two_earning(db)
    start = clock.now()
    set_caps(db, program.id, {})
    clock.advance(timedelta(hours=1))
    send(db, program.id, first, "order.paid", clock.now(), "o1", order_id="A",
         lines=lines(("A", "x", 500)))  # fmt: skip
    clock.advance(timedelta(hours=1))
    set_caps(db, program.id, {"budget": 1000})
    clock.advance(timedelta(hours=1))
    send(db, program.id, second, "order.paid", clock.now(), "o2", order_id="B",
         lines=lines(("A", "x", 1000)))  # fmt: skip
    # when the rules as they are are replayed over the period
    unchanged = BacktestIn(since=start, until=clock.now() + timedelta(minutes=1))
    report = db.run(
        lambda uow: service.backtest(uow, program_id=program.id, request=unchanged),
        read_only=True,
    )
    # then the first order's points count in no budget, as they did not when earned
    assert (report.events, report.actual, report.proposed) == (2, 1500, 1500)
