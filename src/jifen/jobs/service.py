"""The job runner: every periodic task of jifen, run in chunks that each commit on their
own, recorded so a run is idempotent, resumable and safe with several workers.

A run is identified by (job, programme, moment): the "now" it works for. Each chunk is one
transaction that locks the run's row, does the next piece of work and moves the run's
cursor — together, so a crash loses at most the chunk in flight, which the next attempt
does again. A second worker on the same run waits on that lock and then continues from
the cursor: one worker does each chunk. A finished run is not run again.

Jobs whose work keys itself (events keyed by member and year, notifications by their
key) run whole, without a run record: running them twice changes nothing either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.db.upsert import insert_missing
from jifen.errors import InvalidInput
from jifen.jobs import core
from jifen.jobs.models import job_runs

ChunkFn = Callable[[UnitOfWork, int, int, int], core.Chunk]
"""(unit of work, programme id, cursor, chunk size) → what the chunk did."""
WholeFn = Callable[[Database, int], dict[str, int]]
"""(database with its clock at the run's moment, programme id) → figures."""


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    title_zh: str
    chunk: ChunkFn | None = None
    whole: WholeFn | None = None
    size: int = 500
    changes: bool = True
    """Whether the job changes anything (a dry run of one that does not is just a run)."""
    due: Callable[[UnitOfWork, int], bool] | None = None
    """For the worker: whether a firing of the schedule should run the job now (a tier
    evaluation fires daily and runs on the scheme's own dates); ``None``: always."""


_JOBS: dict[str, Job] = {}


def register(job: Job) -> Job:
    _JOBS[job.name] = job
    return job


def jobs() -> dict[str, Job]:
    from jifen.jobs import catalogue  # noqa: F401  (registers the jobs)

    return dict(sorted(_JOBS.items()))


def get(name: str) -> Job:
    known = jobs()
    if name not in known:
        raise InvalidInput(
            field="job", problem=f"there is no job {name!r}; the jobs are {', '.join(known)}"
        )
    return known[name]


@dataclass
class RunReport:
    job: str
    program_id: int
    run_at: datetime
    state: str
    """done, or already-done when an earlier run for the same moment finished it."""
    chunks: int
    figures: dict[str, int]
    dry_run: bool = False


class _DryRun(Exception):
    """Rolls a dry run's transaction back once it has counted what it would do."""


def _at(uow: UnitOfWork, moment: datetime) -> UnitOfWork:
    return replace(uow, clock=ManualClock(moment))


def run(
    db: Database,
    name: str,
    *,
    program_id: int,
    now: datetime | None = None,
    size: int | None = None,
    dry_run: bool = False,
    progress: Callable[[int, dict[str, int]], None] | None = None,
) -> RunReport:
    """Run job ``name`` for the programme as of ``now`` (default: the database clock, to the
    minute). ``dry_run`` does the whole work in one transaction, counts it and rolls it
    back: the figures say what a real run would change."""
    job = get(name)
    moment = core.run_moment(now if now is not None else db.clock.now())
    limit = size or job.size
    if dry_run and job.changes:
        return _dry_run(db, job, program_id, moment, limit)
    if job.whole is not None:
        figures = job.whole(db.with_clock(ManualClock(moment)), program_id)
        return RunReport(job.name, program_id, moment, "done", 1, figures)
    assert job.chunk is not None
    chunk_fn = job.chunk
    db.run(lambda uow: _open_run(uow, job.name, program_id, moment))
    while True:

        def step(uow: UnitOfWork) -> tuple[str, int, dict[str, int]]:
            row = _lock_run(uow, job.name, program_id, moment)
            figures = json.loads(row.figures)
            if row.state == "done":
                return "already-done", row.chunks, figures
            chunk = chunk_fn(_at(uow, moment), program_id, row.cursor, limit)
            figures = core.add(figures, chunk.figures)
            state = "done" if chunk.finished else "running"
            uow.conn.execute(
                job_runs.update()
                .where(job_runs.c.id == row.id)
                .values(
                    cursor=chunk.cursor, chunks=row.chunks + 1, figures=json.dumps(figures),
                    state=state, updated_at=uow.clock.now(),
                    finished_at=uow.clock.now() if chunk.finished else None,
                )
            )  # fmt: skip
            return state, row.chunks + 1, figures

        state, chunks, figures = db.run(step)
        if state != "running":
            return RunReport(job.name, program_id, moment, state, chunks, figures)
        if progress is not None:
            progress(chunks, figures)


def _dry_run(db: Database, job: Job, program_id: int, moment: datetime, limit: int) -> RunReport:
    found: dict[str, Any] = {}
    try:
        with db.transaction() as uow:
            timed = _at(uow, moment)
            cursor, chunks = 0, 0
            figures: dict[str, int] = {}
            if job.chunk is None:
                raise InvalidInput(field="dry_run", problem=f"{job.name} has no dry run")
            while True:
                chunk = job.chunk(timed, program_id, cursor, limit)
                chunks += 1
                figures = core.add(figures, chunk.figures)
                cursor = chunk.cursor
                if chunk.finished:
                    break
            found.update(chunks=chunks, figures=figures)
            raise _DryRun
    except _DryRun:
        pass
    return RunReport(
        job.name, program_id, moment, "dry-run", found["chunks"], found["figures"], dry_run=True
    )


def _open_run(uow: UnitOfWork, name: str, program_id: int, moment: datetime) -> None:
    now = uow.clock.now()
    insert_missing(
        uow,
        job_runs,
        [{"name": name, "program_id": program_id, "run_at": moment, "state": "running",
          "cursor": 0, "chunks": 0, "figures": "{}", "started_at": now, "updated_at": now}],
    )  # fmt: skip


def _lock_run(uow: UnitOfWork, name: str, program_id: int, moment: datetime) -> Any:
    query = select(job_runs).where(
        job_runs.c.name == name, job_runs.c.program_id == program_id, job_runs.c.run_at == moment
    )
    if uow.dialect == "postgresql":
        query = query.with_for_update()
    return uow.conn.execute(query).one()


def run_global(db: Database, name: str) -> dict[str, int]:
    """Run a job that serves every programme at once (the outbox)."""
    job = get(name)
    if job.whole is None:
        raise InvalidInput(field="job", problem=f"{name} runs for one programme at a time")
    return job.whole(db, 0)


def runs(
    uow: UnitOfWork, *, program_id: int, name: str | None = None, limit: int = 20
) -> list[Any]:
    """The latest runs of the programme's jobs, newest first."""
    query = select(job_runs).where(job_runs.c.program_id == program_id)
    if name is not None:
        query = query.where(job_runs.c.name == name)
    return list(uow.conn.execute(query.order_by(job_runs.c.id.desc()).limit(limit)).all())
