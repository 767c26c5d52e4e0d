"""The worker's clock: APScheduler 3 fires each job of each programme at its schedule, in
the programme's time zone; the job runner does the rest.

APScheduler only decides *when*. What makes a run safe is the runner: a run is recorded
per (job, programme, minute), so several workers firing the same schedule share one run
(one does each chunk), and a worker that dies mid-run leaves a run the next firing of the
job finishes (on any worker) before it starts its own.
The schedules live in memory; programmes created later are picked up every few minutes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from zoneinfo import ZoneInfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from jifen.db.uow import Database
from jifen.jobs import core
from jifen.jobs import service as jobs_service
from jifen.programs import service as programs_service

log = logging.getLogger("jifen.jobs")

REFRESH_SECONDS = 300
GLOBAL_JOBS = frozenset({"notify.deliver"})
"""Jobs that serve every programme at once (the outbox)."""


def fire(db: Database, name: str, program_id: int | None, pause: float = 0.0) -> None:
    """Run one scheduled job (paced by ``pause``, as :func:`jobs_service.run` says), after
    finishing any run of it an earlier firing left unfinished (while other workers still
    hold parts of one, the job's own run waits for the next firing); a failure is logged
    and left for the next firing. The run is for the firing's minute, or for the moment
    the job names for it (``Job.moment``: a tier evaluation's due date)."""
    try:
        if program_id is None:
            figures = jobs_service.run_global(db, name)
            if any(figures.values()):
                log.info("%s: %s", name, figures)
            return
        resumed = jobs_service.resume(db, name, program_id=program_id, pause=pause)
        for report in resumed:
            log.info(
                "%s programme %s: resumed the run for %s: %s %s", name, program_id,
                report.run_at.isoformat(), report.state, report.figures,
            )  # fmt: skip
        if any(report.state == "running" for report in resumed):
            return
        job = jobs_service.get(name)
        if job.due is not None and not db.run(
            lambda uow: job.due(uow, program_id) if job.due else True, read_only=True
        ):
            return
        moment = None
        if job.moment is not None:
            fired = core.run_moment(db.clock.now())
            moment = db.run(
                lambda uow: job.moment(uow, program_id, fired) if job.moment else fired,
                read_only=True,
            )
        report = jobs_service.run(db, name, program_id=program_id, now=moment, pause=pause)
        log.info("%s programme %s: %s %s", name, program_id, report.state, report.figures)
    except Exception:
        log.exception("%s programme %s failed; the next run continues it", name, program_id)


class Scheduler:
    """Every job of every programme on its schedule, in a background thread."""

    def __init__(
        self, db: Database, *, only: Callable[[str], bool] = lambda name: True, pause: float = 0.0
    ) -> None:
        self.db = db
        self.only = only
        self.pause = pause
        self.scheduler = BackgroundScheduler(
            timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1}
        )
        self.scheduled: set[tuple[str, int | None]] = set()
        self._lock = threading.Lock()

    def refresh(self) -> int:
        """Schedule the jobs of programmes not scheduled yet; answers how many were added."""
        known = self.db.run(programs_service.list_programs, read_only=True)
        added = 0
        with self._lock:
            for name, schedule in core.SCHEDULES.items():
                if not self.only(name):
                    continue
                targets: list[tuple[int | None, str]] = (
                    [(None, "UTC")] if name in GLOBAL_JOBS
                    else [(p.id, p.time_zone) for p in known]
                )  # fmt: skip
                for program_id, zone in targets:
                    if (name, program_id) in self.scheduled:
                        continue
                    trigger = (
                        CronTrigger.from_crontab(schedule.cron, timezone=ZoneInfo(zone))
                        if schedule.cron
                        else IntervalTrigger(seconds=schedule.seconds or 60)
                    )
                    self.scheduler.add_job(
                        fire, trigger, args=(self.db, name, program_id, self.pause),
                        id=f"{name}:{program_id}", replace_existing=True,
                    )  # fmt: skip
                    self.scheduled.add((name, program_id))
                    added += 1
        return added

    def start(self) -> None:
        self.refresh()
        self.scheduler.add_job(self.refresh, IntervalTrigger(seconds=REFRESH_SECONDS), id="refresh")
        self.scheduler.start()

    def next_runs(self) -> dict[str, object]:
        """When each scheduled job fires next (for a look at what the worker will do)."""
        return {job.id: job.next_run_time for job in self.scheduler.get_jobs()}

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)
