"""The jobs of other domains through the runner: tier evaluation on the scheme's dates,
restock alerts told once, and the outbox sent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from jifen.db.uow import Database, UnitOfWork
from jifen.jobs import service as jobs
from jifen.notify import service as notify
from jifen.notify.models import outbox
from jifen.tiers import service as tiers
from tests.factories import new_program
from tests.notify.helpers import outbox_rows, settle
from tests.rewards.shop import Shop
from tests.tiers.scheme import scheme
from tests.tiers.test_service import World

SHANGHAI_OFFSET = timedelta(hours=-8)


def test_tier_evaluation_runs_on_the_schemes_dates_through_the_runner(db: Database) -> None:
    world = World(db, scheme(upgrade_at_once=False), members=5)
    alice, bob, *_ = world.members
    job = jobs.get("tiers.evaluate")
    assert job.due is not None

    def due() -> bool:
        return db.run(lambda uow: job.due(uow, world.program.id), read_only=True)  # type: ignore[misc]

    # the quarter that began on 1 January has had no evaluation yet: due until one is done
    assert due()
    assert jobs.run(db, "tiers.evaluate", program_id=world.program.id).state == "done"
    assert not due()
    world.at(datetime(2026, 2, 10, tzinfo=UTC))
    world.order(alice, 3000)  # 3 × 40 = 120 × 40 % weight … see the scheme: 银卡 at 101
    world.order(bob, 20000)
    evaluation_day = datetime(2026, 4, 1, tzinfo=UTC) + SHANGHAI_OFFSET  # 00:00 in Shanghai
    world.at(evaluation_day - timedelta(days=3))
    assert not due()
    world.at(evaluation_day + timedelta(hours=2))
    assert due()
    report = jobs.run(db, "tiers.evaluate", program_id=world.program.id, size=2)
    assert (report.state, report.chunks, report.figures["evaluated"]) == ("done", 3, 5)
    assert world.tier(bob) is not None and world.tier(bob) != "普通"
    changes, _ = db.run(
        lambda uow: tiers.history(
            uow, program_id=world.program.id, member_id=bob, before_id=None, limit=10
        ),
        read_only=True,
    )
    assert changes[0].kind == "evaluation"
    assert changes[0].reason.startswith("evaluation of 2026-04-01")
    again = jobs.run(db, "tiers.evaluate", program_id=world.program.id, size=2)
    assert again.state == "already-done"
    assert not due()
    # a worker down on 1 July fires first on 3 July: the evaluation is due then, not after
    world.at(datetime(2026, 7, 3, 2, tzinfo=UTC) + SHANGHAI_OFFSET)
    assert due()
    late = jobs.run(db, "tiers.evaluate", program_id=world.program.id, size=2)
    assert (late.state, late.figures["evaluated"]) == ("done", 5)
    world.at(datetime(2026, 7, 4, 2, tzinfo=UTC) + SHANGHAI_OFFSET)
    assert not due()


def test_a_scheme_never_evaluated_waits_for_its_next_date(db: Database) -> None:
    # given a scheme set in mid-February (tiers imported from another system, say)
    db.clock.set(datetime(2026, 2, 10, tzinfo=UTC))  # type: ignore[attr-defined]
    world = World(db, scheme(upgrade_at_once=False), members=2)
    job = jobs.get("tiers.evaluate")
    assert job.due is not None

    def due() -> bool:
        return db.run(lambda uow: job.due(uow, world.program.id), read_only=True)  # type: ignore[misc]

    # then the quarter's date it was not there for is not caught up: nobody is re-tiered
    # the next night from a history jifen never saw
    assert not due()
    world.at(datetime(2026, 3, 31, tzinfo=UTC))
    assert not due()
    # and its first date is kept
    world.at(datetime(2026, 4, 1, 2, tzinfo=UTC) + SHANGHAI_OFFSET)
    assert due()


def test_restock_alerts_reach_staff_once_and_the_outbox_is_sent(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    reward = shop.reward(stock=3, safety_stock=2)
    shop.redeem(member, reward.code)
    first = jobs.run(db, "rewards.restock_alerts", program_id=shop.program_id)
    assert first.figures == {"alerts": 1}
    db.clock.advance(timedelta(minutes=30))  # type: ignore[attr-defined]
    assert jobs.run(db, "rewards.restock_alerts", program_id=shop.program_id).figures == {
        "alerts": 0
    }
    rows = db.run(
        lambda uow: uow.conn.execute(
            select(outbox.c.template, outbox.c.body).where(
                outbox.c.program_id == shop.program_id, outbox.c.template == "stock.low"
            )
        ).all(),
        read_only=True,
    )
    assert len(rows) == 1 and reward.code in rows[0].body

    def text_ops(uow: UnitOfWork) -> int:
        return notify.notify(uow, notify.Notification(
            program_id=shop.program_id, member_id=None, template="stock.low",
            data={"phone": "13800138000", "reward": reward.code, "left": 2, "safety_stock": 2},
            key="sms-ops-1", channels=("sms",),
        ))  # fmt: skip

    assert db.run(text_ops) == 1
    sent = jobs.run_global(db, "notify.deliver")
    assert sent["sent"] >= 1 and sent["dead"] == 0
    assert jobs.run_global(db, "notify.deliver")["sent"] == 0


def test_the_outbox_job_run_for_a_programme_sends_only_that_programmes_messages(
    db: Database,
) -> None:
    """Run for one programme (``jifen jobs run notify.deliver --program CODE``) the outbox
    job sends that programme's messages and leaves the others' due; the worker's run sends
    every programme's."""
    settle(db)
    ours, theirs = new_program(db).id, new_program(db).id

    def text_ops(program_id: int) -> None:
        db.run(lambda uow: notify.notify(uow, notify.Notification(
            program_id=program_id, member_id=None, template="stock.low",
            data={"phone": "13800138000", "reward": "r1", "left": 1, "safety_stock": 2},
            key="ops-text", channels=("sms",),
        )))  # fmt: skip

    text_ops(ours)
    text_ops(theirs)

    def statuses(program_id: int) -> list[str]:
        return [row.status for row in outbox_rows(db, program_id)]  # type: ignore[attr-defined]

    report = jobs.run(db, "notify.deliver", program_id=ours)
    assert report.figures["sent"] == 1
    assert (statuses(ours), statuses(theirs)) == (["sent"], ["pending"])
    assert jobs.run_global(db, "notify.deliver")["sent"] == 1
    assert statuses(theirs) == ["sent"]


def test_the_tier_jobs_leave_a_programme_without_a_scheme_alone(db: Database) -> None:
    shop = Shop.open(db)
    report = jobs.run(db, "tiers.evaluate", program_id=shop.program_id)
    assert report.figures == {"evaluated": 0}
    assert jobs.run(db, "tiers.end_temporary", program_id=shop.program_id).figures == {"ended": 0}


def test_reconciliation_beside_live_earnings_reports_no_difference(pg: Database) -> None:
    """The nightly reconciliation reads lines, lots and accounts one after the other while
    members keep earning: it sees them all at one moment, so an earning committed between two
    of its reads is no difference (on PostgreSQL a statement of a transaction at READ
    COMMITTED sees what committed before it)."""
    from sqlalchemy import event

    from jifen.points import service as points
    from tests.factories import new_members, new_program

    program_id = new_program(pg).id
    (alice,) = new_members(pg, program_id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=alice, amount=100, key="a1"))
    earned: list[int] = []

    def earn_between(conn: object, cursor: object, statement: str, *args: object) -> None:
        # once the lines are summed by account, before the lots and the accounts are read
        if not earned and "GROUP BY lines.account_id" in statement:
            earned.append(1)
            pg.run(lambda uow: points.earn(uow, member_id=alice, amount=50, key="a2"))

    event.listen(pg.engine, "after_cursor_execute", earn_between)
    try:
        report = jobs.run(pg, "ledger.reconcile", program_id=program_id)
    finally:
        event.remove(pg.engine, "after_cursor_execute", earn_between)
    assert earned == [1]
    assert report.figures == {"accounts": 1, "lots": 1, "problems": 0}
    # what it read is the ledger as it stood when it began; the next run sees the earning
    pg.clock.advance(timedelta(minutes=1))  # type: ignore[attr-defined]
    again = jobs.run(pg, "ledger.reconcile", program_id=program_id)
    assert again.figures == {"accounts": 1, "lots": 2, "problems": 0}


def test_a_reconciliation_that_finds_differences_alerts_staff_once_a_run(db: Database) -> None:
    """日终全量对账, 差异告警: differences reach staff (the outbox) and subscribers (webhook
    ``ledger.differences``), not only the worker's log."""
    from jifen.points import service as points
    from jifen.points.models import accounts
    from tests.factories import new_members, new_program

    program_id = new_program(db).id
    (alice,) = new_members(db, program_id, 1)
    db.run(lambda uow: points.earn(uow, member_id=alice, amount=100, key="a1"))
    assert jobs.run(db, "ledger.reconcile", program_id=program_id).figures["problems"] == 0

    def alerts() -> list[tuple[str, str]]:
        rows = db.run(
            lambda uow: uow.conn.execute(
                select(outbox.c.subject, outbox.c.body).where(
                    outbox.c.program_id == program_id, outbox.c.template == "ledger.differences"
                )
            ).all(),
            read_only=True,
        )
        return [(row.subject, row.body) for row in rows]

    assert alerts() == []
    with db.engine.begin() as conn:  # a balance changed outside jifen
        conn.execute(accounts.update().where(accounts.c.member_id == alice).values(balance=150))
    db.clock.advance(timedelta(minutes=1))  # type: ignore[attr-defined]
    report = jobs.run(db, "ledger.reconcile", program_id=program_id)
    assert report.figures["problems"] == 2  # its lines and its lots say 100
    assert jobs.run(db, "ledger.reconcile", program_id=program_id).state == "already-done"
    ((title, body),) = alerts()
    assert title == "对账发现 2 处差异"
    assert "balance (stored) vs its lines: 150 != 100" in body


def test_birthdays_missed_while_the_worker_was_down_are_raised_at_its_next_run(
    db: Database,
) -> None:
    from datetime import date

    from jifen.members import service as members
    from jifen.members.schemas import MemberUpdate
    from jifen.points import service as points
    from tests.events.test_service import activate
    from tests.factories import new_members, new_program

    program_id = new_program(db).id  # Asia/Shanghai
    first, second, third, later = new_members(db, program_id, 4)
    for member, day in ((first, 10), (second, 11), (third, 12), (later, 14)):
        born = MemberUpdate(birthday=date(1990, 6, day))
        db.run(
            lambda uow, m=member, b=born: members.update_profile(
                uow, program_id=program_id, member_id=m, body=b
            )
        )
    activate(db, program_id, "gift", {"kind": "birthday_gift", "by_tier": {}, "default": 50},
             events_=("member.birthday",))  # fmt: skip

    def run_on(day: int) -> dict[str, int]:
        moment = datetime(2026, 6, day, 0, 5, tzinfo=UTC) + SHANGHAI_OFFSET
        return jobs.run(db, "events.birthdays", program_id=program_id, now=moment).figures

    def balances() -> list[int]:
        return [
            db.run(lambda uow, m=m: points.balance(uow, member_id=m), read_only=True).balance
            for m in (first, second, third, later)
        ]

    # given the run of 10 June, the worker down on the 11th and the 12th
    assert run_on(10) == {"events": 1, "days": 1}
    # when it runs again on the 13th, the two days missed are raised with it
    assert run_on(13) == {"events": 2, "days": 3}
    assert balances() == [50, 50, 50, 0]
    # and a run again, or of a day done before, raises nothing twice
    assert run_on(13) == {"events": 0, "days": 1}
    assert run_on(11) == {"events": 0, "days": 1}
    assert run_on(14)["events"] == 1
    assert balances() == [50, 50, 50, 50]
