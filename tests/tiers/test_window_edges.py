"""Score windows at the edges: refunds count in their order's window, windows start at local
midnight, and an evaluation finished late leaves a later upgrade alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from jifen.db.uow import Database
from jifen.events import service as events_service
from jifen.events.schemas import EventIn
from jifen.tiers import core
from jifen.tiers.schemas import TierScheme
from tests.tiers.scheme import scheme, scheme_json
from tests.tiers.test_service import World, quarter

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_a_refund_of_an_order_before_the_window_leaves_the_windows_spend(
    db: Database,
) -> None:
    """events.service.spend_and_counts counts a refund in the window of the order it refunds:
    a refund inside the score's window of an order paid before the window (never counted in
    it) leaves the spend the member made inside the window whole."""
    world = World(db, scheme(upgrade_at_once=False), members=2)
    alice, bob = world.members

    def pay(member: int, order_id: str, yuan: int, when: datetime) -> None:
        world.at(when)
        event = EventIn(source="pos", external_id=f"p-{order_id}", type="order.paid",
                        occurred_at=when, member_id=member,
                        payload={"order_id": order_id,
                                 "lines": [{"sku": "s", "amount_fen": yuan * 100}]})  # fmt: skip
        db.run(lambda uow: events_service.ingest(uow, program_id=world.program.id, event=event))

    def refund(member: int, order_id: str, when: datetime) -> None:
        world.at(when)
        event = EventIn(source="pos", external_id=f"r-{order_id}", type="order.refunded",
                        occurred_at=when, member_id=member,
                        payload={"order_id": order_id, "whole": True})  # fmt: skip
        db.run(lambda uow: events_service.ingest(uow, program_id=world.program.id, event=event))

    # both buy 10,000 yuan on 20 March 2026 (before the window of the 2027-Q1 evaluation)
    pay(alice, "A-old", 10_000, datetime(2026, 3, 20, tzinfo=UTC))
    pay(bob, "B-old", 10_000, datetime(2026, 3, 20, tzinfo=UTC))
    # alice returns hers on 5 April 2026, inside that window
    refund(alice, "A-old", datetime(2026, 4, 5, tzinfo=UTC))
    # both spend 3,000 yuan in June 2026: 120, 银卡
    pay(alice, "A-new", 3_000, datetime(2026, 6, 1, tzinfo=UTC))
    pay(bob, "B-new", 3_000, datetime(2026, 6, 1, tzinfo=UTC))
    world.at(quarter(2027, 4))
    world.evaluate("2027-Q1")
    # The window (1 April 2026 – 1 April 2027) holds the same spend for both: 3,000 yuan.
    assert world.tiers() == ["银卡", "银卡"]


def test_the_score_window_starts_at_local_midnight_of_its_first_day() -> None:
    """tiers.core.window_start (through add_local_months) counts calendar months in the
    programme's time zone: for a quarterly scheme counting 3 months, the evaluation of 1 July
    00:00 in Shanghai (30 June 16:00 UTC) counts from 1 April 00:00 local, so orders of
    31 March count in the first quarter's evaluation only."""
    three = TierScheme.model_validate({**scheme_json(), "window_months": 3})
    q2 = datetime(2026, 7, 1, tzinfo=SHANGHAI)
    start = core.window_start(three, q2.astimezone(UTC))
    assert start == datetime(2026, 4, 1, tzinfo=SHANGHAI), start.astimezone(SHANGHAI)


def test_an_evaluation_run_finished_after_its_moment_leaves_a_later_upgrade_at_once(
    db: Database,
) -> None:
    """A tier evaluation works "as of" its run's moment (jobs.service runs every part, and a
    resumed run, with the clock at that moment). tiers.service._run leaves out members whose
    tier was set after that moment, so an upgrade at once made before the member's part is
    done (a long run, or one resumed after a crash) stands."""
    from jifen.jobs import service as jobs

    world = World(db, scheme(upgrade_at_once=True), members=1)
    (alice,) = world.members
    world.at(datetime(2026, 2, 10, tzinfo=UTC))
    world.order(alice, 1000)  # 40
    moment = quarter(2026, 4)
    # ten minutes after the evaluation's moment she earns 8,000 points: 40 + 320, 金卡 at once
    world.at(moment + timedelta(minutes=10))
    world.earn(alice, 8000)
    assert world.tier(alice) == "金卡"
    # the evaluation of that moment reaches her part only now (or is resumed now)
    world.at(moment + timedelta(hours=1))
    jobs.run(db, "tiers.evaluate", program_id=world.program.id, now=moment)
    # her tier was set after the moment: she keeps 金卡 (her score of 360 is above 240)
    assert world.tier(alice) == "金卡", world.history(alice)


def test_an_order_at_the_first_instant_of_a_campaign_counts_in_its_score(db: Database) -> None:
    """A campaign of temporary upgrades runs from its ``starts_at`` (included) to its
    ``ends_at``: an order paid at the very moment the 双11 sale opens counts in the campaign
    score (tiers.service._run), as it does in deciding that the campaign is running."""
    opens = datetime(2026, 11, 11, tzinfo=SHANGHAI).astimezone(UTC)
    closes = datetime(2026, 11, 12, tzinfo=SHANGHAI).astimezone(UTC)
    world = World(db, scheme(upgrade_at_once=False, campaigns=[(opens, closes)]), members=1)
    (alice,) = world.members
    world.at(opens)
    # 4,000 yuan at 00:00:00 on 11 November: 160, over 120 % of 银卡's 101
    world.order(alice, 4000)
    world.earn(alice, 1)
    assert world.tier(alice) == "银卡", world.history(alice)


def test_a_window_ending_at_a_skipped_midnight_starts_at_midnight_months_before() -> None:
    """On 1 October 2023 the clocks of Asunción went from 00:00 to 01:00: the quarter's
    evaluation is as of 01:00 that day, its first instant, and its three months start at
    1 July 00:00, where the quarter before ended, not at 01:00."""
    asuncion = ZoneInfo("America/Asuncion")
    three = TierScheme.model_validate({**scheme_json(), "window_months": 3})
    first_instant = datetime(2023, 10, 1, tzinfo=asuncion).astimezone(UTC)
    assert first_instant == datetime(2023, 10, 1, 1, tzinfo=asuncion).astimezone(UTC)
    start = core.window_start(three, first_instant, asuncion)
    assert start == datetime(2023, 7, 1, tzinfo=asuncion), start.astimezone(asuncion)
    # any other moment of the day counts back to the same wall time
    noon = datetime(2023, 10, 1, 12, tzinfo=asuncion).astimezone(UTC)
    assert core.window_start(three, noon, asuncion) == datetime(2023, 7, 1, 12, tzinfo=asuncion)
