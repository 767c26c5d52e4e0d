"""The worker's schedules: each job of each programme at its time in the programme's zone,
and two workers firing the same schedule share one run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select

from jifen.db.uow import Database
from jifen.jobs import core
from jifen.jobs import scheduler as jobs_scheduler
from jifen.jobs.models import job_runs
from jifen.points import service as points
from tests.factories import new_members, new_program


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
    # Tier evaluation fires nightly and runs on the scheme's dates (see the tiers tests).
    assert next_fire(f"tiers.evaluate:{shanghai}").hour == 2
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
