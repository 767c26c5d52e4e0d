"""The worker's schedules: each job of each programme at its time in the programme's zone,
and two workers firing the same schedule share one run."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from jifen.db.uow import Database, UnitOfWork
from jifen.expiry.schemas import ExpiryPolicy, Reminders, Validity
from jifen.jobs import core
from jifen.jobs import scheduler as jobs_scheduler
from jifen.jobs import service as jobs_service
from jifen.jobs.models import job_runs
from jifen.notify import service as notify
from jifen.points import service as points
from jifen.programs import service as programs
from tests.factories import new_members, new_program
from tests.jobs.test_parts import assert_each_member_placed_once, populated
from tests.tiers.test_service import World


def test_each_programme_gets_every_job_at_its_local_time(db: Database) -> None:
    shanghai = new_program(db).id
    london = new_program(db, time_zone="Europe/London").id
    scheduler = jobs_scheduler.Scheduler(db)
    assert scheduler.refresh() >= 2 * (len(core.SCHEDULES) - 1) + 1
    assert scheduler.refresh() == 0  # nothing new to add
    jobs = {job.id: job for job in scheduler.scheduler.get_jobs()}
    start = datetime(2026, 7, 1, 12, tzinfo=UTC)

    def next_fire(job_id: str) -> datetime:
        return jobs[job_id].trigger.get_next_fire_time(None, start)  # type: ignore[no-any-return]

    # The nightly expiry runs at 00:10 where the programme is.
    assert next_fire(f"points.expire:{shanghai}") == datetime(
        2026, 7, 2, 0, 10, tzinfo=ZoneInfo("Asia/Shanghai")
    )
    assert next_fire(f"points.expire:{london}") == datetime(
        2026, 7, 2, 0, 10, tzinfo=ZoneInfo("Europe/London")
    )
    # Tier evaluation fires at each local midnight and runs on the scheme's dates (see the
    # tiers tests).
    assert next_fire(f"tiers.evaluate:{shanghai}") == datetime(
        2026, 7, 2, tzinfo=ZoneInfo("Asia/Shanghai")
    )
    assert "notify.deliver:None" in jobs


def test_two_workers_firing_in_the_same_minute_share_one_run(db: Database) -> None:
    program_id = new_program(db).id
    (member,) = new_members(db, program_id, 1)
    now = db.clock.now()
    db.run(lambda uow: points.earn(uow, member_id=member, amount=10, key="e",
                                   expires_at=now + timedelta(days=1)))  # fmt: skip
    db.clock.advance(timedelta(days=2))  # type: ignore[attr-defined]
    jobs_scheduler.fire(db, "points.expire", program_id)
    db.clock.advance(timedelta(seconds=20))  # type: ignore[attr-defined]
    jobs_scheduler.fire(db, "points.expire", program_id)  # the same minute
    runs = db.run(
        lambda uow: uow.conn.execute(
            select(job_runs.c.state, job_runs.c.figures).where(job_runs.c.program_id == program_id)
        ).all(),
        read_only=True,
    )
    assert [r.state for r in runs] == ["done"]
    assert '"points": 10' in runs[0].figures
    assert db.run(lambda uow: points.balance(uow, member_id=member)).balance == 0


class Killed(BaseException):
    """The worker killed there (SIGKILL): nothing after it runs, not even its error log."""


def fired_and_killed(
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    program_id: int,
    *,
    at_call: int,
    size: int,
) -> None:
    """A firing of job ``name`` in chunks (or parts) of ``size``, its worker killed in call
    ``at_call`` of the chunk (or part) function; the worker started again runs the job as
    it is, in chunks of that size."""
    real = replace(jobs_service.get(name), size=size)
    calls = {"n": 0}

    def killed_at(work: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == at_call:
                raise Killed
            return work(*args)

        return step

    if real.part is not None:
        dying = replace(real, part=killed_at(real.part))
    else:
        assert real.chunk is not None
        dying = replace(real, chunk=killed_at(real.chunk))
    monkeypatch.setitem(jobs_service._JOBS, name, dying)
    with pytest.raises(Killed):
        jobs_scheduler.fire(db, name, program_id)
    monkeypatch.setitem(jobs_service._JOBS, name, real)


def runs_of(db: Database, program_id: int) -> list[tuple[str, datetime, str, dict[str, int]]]:
    rows = db.run(
        lambda uow: uow.conn.execute(
            select(job_runs.c.name, job_runs.c.run_at, job_runs.c.state, job_runs.c.figures)
            .where(job_runs.c.program_id == program_id)
            .order_by(job_runs.c.id)
        ).all(),
        read_only=True,
    )
    return [(r.name, r.run_at, r.state, json.loads(r.figures)) for r in rows]


APRIL_1 = datetime(2026, 3, 31, 18, tzinfo=UTC)  # 02:00 on 1 April in Shanghai, a quarter's first
DUE = datetime(2026, 3, 31, 16, tzinfo=UTC)
"""00:00 on 1 April in Shanghai: the moment the evaluation fired on that day works for."""


def evaluation_killed_on_april_1(
    db: Database, monkeypatch: pytest.MonkeyPatch, members: int, *, size: int
) -> tuple[World, dict[int, str]]:
    """The members of :func:`populated`, whose evaluation of 1 April (in parts of ``size``)
    lost its worker in its second part."""
    world, wanted = populated(db, members)
    world.at(APRIL_1)
    fired_and_killed(db, monkeypatch, "tiers.evaluate", world.program.id, at_call=2, size=size)
    return world, wanted


def test_the_next_firing_finishes_a_tier_evaluation_a_killed_worker_left(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, wanted = evaluation_killed_on_april_1(db, monkeypatch, 6, size=2)  # of 3 parts
    assert [(r[1], r[2]) for r in runs_of(db, world.program.id)] == [(DUE, "running")]
    # the worker started again fires the next night: it finishes the run of 1 April, from
    # the parts still to do, and starts none of its own (an evaluation has finished since)
    world.at(APRIL_1 + timedelta(days=1))
    jobs_scheduler.fire(db, "tiers.evaluate", world.program.id)
    ((_, run_at, state, figures),) = runs_of(db, world.program.id)
    assert (run_at, state, figures["evaluated"]) == (DUE, "done", 6)
    assert_each_member_placed_once(db, world, wanted)
    world.at(APRIL_1 + timedelta(days=2))
    jobs_scheduler.fire(db, "tiers.evaluate", world.program.id)
    assert len(runs_of(db, world.program.id)) == 1
    assert_each_member_placed_once(db, world, wanted)


def test_workers_resuming_one_run_side_by_side_do_each_part_once(
    pg: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, wanted = evaluation_killed_on_april_1(pg, monkeypatch, 40, size=3)  # of 14 parts
    world.at(APRIL_1 + timedelta(days=1))
    workers = [
        threading.Thread(target=jobs_scheduler.fire, args=(pg, "tiers.evaluate", world.program.id))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ((_, run_at, state, figures),) = runs_of(pg, world.program.id)
    assert (run_at, state, figures["evaluated"]) == (DUE, "done", 40)
    assert_each_member_placed_once(pg, world, wanted)


def test_the_next_firing_finishes_a_chunked_run_from_its_cursor(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    program_id = new_program(db).id
    members = new_members(db, program_id, 3)
    lapse = datetime(2026, 5, 21, 16, tzinfo=UTC)  # 22 May in Shanghai
    policy = ExpiryPolicy(validity=Validity(kind="never"), reminders=Reminders(days_before=[30]))

    def configure(uow: UnitOfWork) -> None:
        settings = programs.get_settings(uow, program_id=program_id)
        programs.set_settings(
            uow, program_id=program_id, settings=settings.model_copy(update={"expiry": policy})
        )
        for member in members:
            points.earn(uow, member_id=member, amount=100, key=f"e{member}", expires_at=lapse)

    db.run(configure)
    # the worker is killed in the second chunk (a member each) of the 30-day reminders
    reminder_day = datetime(2026, 4, 22, 2, tzinfo=UTC)  # 10:00 in Shanghai
    db.clock.set(reminder_day)  # type: ignore[attr-defined]
    fired_and_killed(db, monkeypatch, "points.reminders", program_id, at_call=2, size=1)
    # the next day's firing finishes the run of the 22nd from its cursor, then runs its own
    db.clock.set(reminder_day + timedelta(days=1))  # type: ignore[attr-defined]
    jobs_scheduler.fire(db, "points.reminders", program_id)
    runs = [
        (run_at, state, figures["reminders"])
        for _, run_at, state, figures in runs_of(db, program_id)
    ]
    assert runs == [(reminder_day, "done", 3), (reminder_day + timedelta(days=1), "done", 0)]
    inboxes = db.run(
        lambda uow: [
            notify.list_inbox(uow, program_id=program_id, member_id=m)[0] for m in members
        ],
        read_only=True,
    )
    assert [[m.title for m in inbox] for inbox in inboxes] == [
        ["您有 100 积分将于 2026-05-22 到期"]
    ] * 3


def test_the_quarterly_evaluation_counts_the_quarter_up_to_its_first_midnight(
    db: Database,
) -> None:
    """The worker fires the tier evaluation at the start of the programme's day, so the
    evaluation of 1 April scores the months that end at 1 April 00:00 in Shanghai: an order
    paid at 01:00 on 1 January is in the quarter's window."""
    from jifen.tiers.schemas import TierScheme
    from tests.tiers.scheme import scheme_json

    shanghai = ZoneInfo("Asia/Shanghai")
    three = TierScheme.model_validate({**scheme_json(upgrade_at_once=False), "window_months": 3})
    world = World(db, three, members=2)
    alice, bob = world.members
    world.at(datetime(2027, 1, 1, 1, tzinfo=shanghai).astimezone(UTC))
    world.order(alice, 3000)  # 120: 银卡
    world.at(datetime(2027, 3, 31, 22, tzinfo=shanghai).astimezone(UTC))
    world.order(bob, 2000)  # 80: 普通
    scheduler = jobs_scheduler.Scheduler(db, only=lambda name: name == "tiers.evaluate")
    scheduler.refresh()
    job = scheduler.scheduler.get_job(f"tiers.evaluate:{world.program.id}")
    firing = job.trigger.get_next_fire_time(None, world.clock.now())
    assert firing == datetime(2027, 4, 1, tzinfo=shanghai)
    world.at(firing.astimezone(UTC))
    jobs_scheduler.fire(db, "tiers.evaluate", world.program.id)
    assert world.tiers() == ["银卡", "普通"]


def test_a_firing_days_late_evaluates_the_quarter_that_ended_at_its_date_once(
    db: Database,
) -> None:
    """The worker was down at midnight on 1 April: its first firing, on 3 April, evaluates
    as of 1 April 00:00 in Shanghai (an order paid on 2 April is not in the quarter's
    window), and the firings after it evaluate nothing more."""
    from jifen.tiers.schemas import TierScheme
    from tests.tiers.scheme import scheme_json

    shanghai = ZoneInfo("Asia/Shanghai")
    due = datetime(2026, 4, 1, tzinfo=shanghai).astimezone(UTC)
    three = TierScheme.model_validate({**scheme_json(upgrade_at_once=False), "window_months": 3})
    world = World(db, three, members=2)
    alice, bob = world.members
    world.at(datetime(2026, 1, 1, tzinfo=shanghai).astimezone(UTC))
    jobs_scheduler.fire(db, "tiers.evaluate", world.program.id)  # the evaluation of 1 January
    world.at(datetime(2026, 2, 10, tzinfo=shanghai).astimezone(UTC))
    world.order(alice, 3000)  # 120: 银卡
    world.at(datetime(2026, 4, 2, 10, tzinfo=shanghai).astimezone(UTC))
    world.order(bob, 3000)  # after the quarter's end
    world.at(datetime(2026, 4, 3, tzinfo=shanghai).astimezone(UTC))
    jobs_scheduler.fire(db, "tiers.evaluate", world.program.id)
    assert world.tiers() == ["银卡", "普通"]
    evaluations = [r for r in runs_of(db, world.program.id) if r[1] >= due]
    assert [(run_at, state, figures["upgraded"]) for _, run_at, state, figures in evaluations] == [
        (due, "done", 1)
    ]
    # a second worker firing late, the next night's firing and a run for that date again
    # change nothing
    jobs_scheduler.fire(db, "tiers.evaluate", world.program.id)
    world.at(datetime(2026, 4, 4, tzinfo=shanghai).astimezone(UTC))
    jobs_scheduler.fire(db, "tiers.evaluate", world.program.id)
    again = jobs_service.run(db, "tiers.evaluate", program_id=world.program.id, now=due)
    assert again.state == "already-done"
    assert [r for r in runs_of(db, world.program.id) if r[1] >= due] == evaluations
    assert world.tiers() == ["银卡", "普通"]


def test_an_evaluation_date_whose_midnight_the_clocks_skip_is_evaluated_as_of_its_first_instant(
    db: Database,
) -> None:
    """In Asunción the clocks went from 00:00 to 01:00 on 1 October 2023, a quarter's date:
    the schedule has no midnight that day and fires first at midnight on 2 October. That
    firing evaluates as of 1 October 01:00, the day's first instant, over the quarter from
    1 July 00:00: an order paid at 00:30 on 1 July counts, one paid at noon on 1 October
    does not."""
    from jifen.tiers.schemas import TierScheme
    from tests.tiers.scheme import scheme_json

    asuncion = ZoneInfo("America/Asuncion")
    db.clock.set(datetime(2023, 6, 1, tzinfo=UTC))  # type: ignore[attr-defined]
    three = TierScheme.model_validate({**scheme_json(upgrade_at_once=False), "window_months": 3})
    world = World(db, three, members=2, time_zone="America/Asuncion")
    alice, bob = world.members
    world.at(datetime(2023, 7, 1, 0, 30, tzinfo=asuncion).astimezone(UTC))
    world.order(alice, 3000)  # 120: 银卡
    world.at(datetime(2023, 10, 1, 12, tzinfo=asuncion).astimezone(UTC))
    world.order(bob, 3000)
    scheduler = jobs_scheduler.Scheduler(db, only=lambda name: name == "tiers.evaluate")
    scheduler.refresh()
    job = scheduler.scheduler.get_job(f"tiers.evaluate:{world.program.id}")
    firing = job.trigger.get_next_fire_time(None, datetime(2023, 9, 30, 12, tzinfo=asuncion))
    assert firing == datetime(2023, 10, 2, tzinfo=asuncion)
    world.at(firing.astimezone(UTC))
    jobs_scheduler.fire(db, "tiers.evaluate", world.program.id)
    assert world.tiers() == ["银卡", "普通"]
    first_instant = datetime(2023, 10, 1, 1, tzinfo=asuncion).astimezone(UTC)
    assert [(r[1], r[2]) for r in runs_of(db, world.program.id)] == [(first_instant, "done")]
