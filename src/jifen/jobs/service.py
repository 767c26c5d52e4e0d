"""The job runner: every periodic task of jifen, run in chunks that each commit on their
own, recorded so a run is idempotent, resumable and safe with several workers.

A run is identified by (job, programme, moment): the "now" it works for. Each chunk is one
transaction that locks the run's row, does the next piece of work and moves the run's
cursor — together, so a crash loses at most the chunk in flight, which the next attempt
does again. A second worker on the same run waits on that lock and then continues from
the cursor: one worker does each chunk. A finished run is not run again.

A job whose chunks find their own work (expiry: the accounts with due lots that no other
worker holds, ``SKIP LOCKED``) is ``shared``: its chunk does its work first and locks the
run's row only to add itself up, so several workers do chunks of one run side by side.
Such a chunk reports the run over only when nothing is left to do, waiting for what
other workers hold if need be.

A job over the programme's members (tier evaluation) can instead share its members out:
when its run starts, the members are cut into parts of a chunk's size (one row each in
``job_parts``), and each worker takes the next part no other worker holds (``FOR UPDATE
SKIP LOCKED``), does it and marks it done in the same transaction. Several workers then
work side by side, each on its own part; one that dies leaves its part to do, unlocked.
The run is done when its last part is.

Jobs whose work keys itself (events keyed by member and year, notifications by their
key) run whole, without a run record: running them twice changes nothing either.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from jifen.clock import ManualClock
from jifen.db import bulk
from jifen.db.uow import Database, UnitOfWork
from jifen.db.upsert import insert_missing
from jifen.errors import InvalidInput
from jifen.jobs import core
from jifen.jobs.models import job_parts, job_runs

ChunkFn = Callable[[UnitOfWork, int, int, int], core.Chunk]
"""(unit of work, programme id, cursor, chunk size) → what the chunk did."""
WholeFn = Callable[[Database, int], dict[str, int]]
"""(database with its clock at the run's moment, programme id) → figures. A job that
serves every programme at once (the outbox) is given :data:`EVERY_PROGRAMME` by
:func:`run_global`, and a programme's id when it is run for that programme alone."""

EVERY_PROGRAMME = 0
"""The programme id :func:`run_global` runs a job for: every programme (ids start at 1)."""
PartEndsFn = Callable[[UnitOfWork, int, int], list[int]]
"""(unit of work, programme id, part size) → the key each part but the last ends at
(keys are positive: the first part starts after 0, the last has no end)."""
PartFn = Callable[[UnitOfWork, int, int, int | None], dict[str, int]]
"""(unit of work, programme id, after key, last key or None) → what the part did."""


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    title_zh: str
    chunk: ChunkFn | None = None
    whole: WholeFn | None = None
    size: int = 500
    due: Callable[[UnitOfWork, int], bool] | None = None
    """For the worker: whether a firing of the schedule should run the job now (a tier
    evaluation fires daily and runs on the scheme's own dates); ``None``: always."""
    moment: Callable[[UnitOfWork, int, datetime], datetime] | None = None
    """For the worker: the moment a firing at the given minute runs the job for (a tier
    evaluation: the scheme's date it is due for, however late the worker fires, so that a
    run after a worker was down scores the window that ended at that date, and a second
    firing finds that date's run done); ``None``: the firing's minute."""
    part_ends: PartEndsFn | None = None
    part: PartFn | None = None
    """Both given: runs share the keys out in parts among the workers (``chunk`` still
    serves dry runs)."""
    dry: ChunkFn | None = None
    """What a dry run does for a chunk when the job can count its work without doing it (no
    writes, no locks held on what live traffic needs); ``None``: ``chunk``, rolled back."""
    shared: bool = False
    """Each chunk takes work no other worker holds (``SKIP LOCKED``) instead of following
    the cursor, so the run's row is locked only to add the chunk up, after its work: the
    workers on a run do their chunks side by side. The chunk is given the cursor 0 and
    answers how far it moved it."""


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
            field="job",
            problem=f"there is no job {name!r}; the jobs are {', '.join(known)}",
            problem_zh=f"不存在任务 {name!r};现有任务:{', '.join(known)}",
        )
    return known[name]


@dataclass
class RunReport:
    job: str
    program_id: int
    run_at: datetime
    state: str
    """done; already-done when an earlier run for the same moment finished it; running
    when this worker found nothing left to take but others still hold parts of it."""
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
    pause: float = 0.0,
) -> RunReport:
    """Run job ``name`` for the programme as of ``now`` (default: the database clock, to the
    minute). ``dry_run`` does the whole work in one transaction, counts it and rolls it
    back: the figures say what a real run would change. ``pause`` paces a run beside live
    traffic: after each chunk it waits ``pause`` times as long as the chunk took (at 1.0 the
    run takes about twice as long and leaves about half of what it used to the traffic)."""
    if not 0 <= pause <= 100:
        raise InvalidInput(
            field="pause",
            problem="give a pause from 0 (none) to 100",
            problem_zh="请给出 0(不暂停)到 100 之间的暂停倍数",
        )
    job = get(name)
    moment = core.run_moment(now if now is not None else db.clock.now())
    limit = size or job.size
    if dry_run:  # a job that changes nothing too: its run is not recorded as done
        return _dry_run(db, job, program_id, moment, limit, progress)
    if job.whole is not None:
        figures = job.whole(db.with_clock(ManualClock(moment)), program_id)
        return RunReport(job.name, program_id, moment, "done", 1, figures)
    db.run(lambda uow: _open_run(uow, job.name, program_id, moment))
    if job.part_ends is not None and job.part is not None:
        return _run_parts(db, job, program_id, moment, limit, progress, pause)
    assert job.chunk is not None
    chunk_fn = job.chunk
    while True:

        def step(uow: UnitOfWork) -> tuple[str, int, dict[str, int]]:
            row = _lock_run(uow, job.name, program_id, moment, lock=not job.shared)
            if row.state == "done":
                return "already-done", row.chunks, json.loads(row.figures)
            chunk = chunk_fn(_at(uow, moment), program_id, 0 if job.shared else row.cursor, limit)
            cursor = chunk.cursor
            if job.shared:  # the run as it is now, with the chunks other workers added
                row = _lock_run(uow, job.name, program_id, moment)
                cursor += row.cursor
            figures = core.add(json.loads(row.figures), chunk.figures)
            finished = chunk.finished or row.state == "done"
            state = "done" if finished else "running"
            uow.conn.execute(
                job_runs.update()
                .where(job_runs.c.id == row.id)
                .values(
                    cursor=cursor, chunks=row.chunks + 1, figures=json.dumps(figures),
                    state=state, updated_at=uow.clock.now(),
                    finished_at=(row.finished_at or uow.clock.now()) if finished else None,
                )
            )  # fmt: skip
            return state, row.chunks + 1, figures

        started = time.monotonic()
        state, chunks, figures = db.run(step)
        if state != "running":
            return RunReport(job.name, program_id, moment, state, chunks, figures)
        if progress is not None:
            progress(chunks, figures)
        if pause:
            time.sleep(pause * (time.monotonic() - started))


def _run_parts(
    db: Database,
    job: Job,
    program_id: int,
    moment: datetime,
    size: int,
    progress: Callable[[int, dict[str, int]], None] | None,
    pause: float,
) -> RunReport:
    """Take parts of the run until none is left to take (see the module's docstring)."""
    part_ends, part_fn = job.part_ends, job.part
    assert part_ends is not None
    assert part_fn is not None

    def share_out(uow: UnitOfWork) -> tuple[int, str]:
        row = _lock_run(uow, job.name, program_id, moment)
        if row.state == "done":
            return row.id, "already-done"
        made = select(job_parts.c.after_key).where(job_parts.c.run_id == row.id).limit(1)
        if uow.conn.execute(made).first() is None:
            ends = part_ends(_at(uow, moment), program_id, size)
            bulk.insert_many(uow.conn, job_parts, [
                {"run_id": row.id, "after_key": after, "last_key": last, "state": "todo"}
                for after, last in zip([0, *ends], [*ends, None], strict=True)
            ])  # fmt: skip
        return row.id, "running"

    run_id, state = db.run(share_out)
    taken, mine = 0, dict[str, int]()
    while state == "running":
        started = time.monotonic()

        def take(uow: UnitOfWork) -> dict[str, int] | None:
            query = (
                select(job_parts.c.after_key, job_parts.c.last_key)
                .where(job_parts.c.run_id == run_id, job_parts.c.state == "todo")
                .order_by(job_parts.c.after_key)
                .limit(1)
            )
            if uow.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            part = uow.conn.execute(query).first()
            if part is None:
                return None
            figures = part_fn(_at(uow, moment), program_id, part.after_key, part.last_key)
            uow.conn.execute(
                job_parts.update()
                .where(job_parts.c.run_id == run_id, job_parts.c.after_key == part.after_key)
                .values(state="done", figures=json.dumps(figures), done_at=uow.clock.now())
            )
            return figures

        figures = db.run(take)
        if figures is None:
            break
        taken, mine = taken + 1, core.add(mine, figures)
        if progress is not None:
            progress(taken, mine)
        if pause:
            time.sleep(pause * (time.monotonic() - started))

    def finish(uow: UnitOfWork) -> RunReport:
        row = _lock_run(uow, job.name, program_id, moment)
        if row.state == "done":
            state = "already-done" if taken == 0 else "done"
            return RunReport(job.name, program_id, moment, state, row.chunks,
                             json.loads(row.figures))  # fmt: skip
        parts = uow.conn.execute(
            select(job_parts.c.state, job_parts.c.figures).where(job_parts.c.run_id == run_id)
        ).all()
        totals: dict[str, int] = {}
        for part in parts:
            totals = core.add(totals, json.loads(part.figures))
        done = sum(1 for part in parts if part.state == "done")
        if done < len(parts):
            return RunReport(job.name, program_id, moment, "running", done, totals)
        now = uow.clock.now()
        uow.conn.execute(
            job_runs.update()
            .where(job_runs.c.id == row.id)
            .values(state="done", chunks=done, figures=json.dumps(totals), updated_at=now,
                    finished_at=now)
        )  # fmt: skip
        return RunReport(job.name, program_id, moment, "done", done, totals)

    return db.run(finish)


def _dry_run(
    db: Database,
    job: Job,
    program_id: int,
    moment: datetime,
    limit: int,
    progress: Callable[[int, dict[str, int]], None] | None = None,
) -> RunReport:
    """The whole run in one transaction, rolled back; ``progress`` hears of each chunk but
    the last, as in a real run."""
    found: dict[str, Any] = {}
    try:
        with db.transaction() as uow:
            timed = _at(uow, moment)
            cursor, chunks = 0, 0
            figures: dict[str, int] = {}
            chunk_fn = job.dry or job.chunk
            if chunk_fn is None:
                raise InvalidInput(
                    field="dry_run",
                    problem=f"{job.name} has no dry run",
                    problem_zh=f"{job.name} 不支持演练",
                )
            while True:
                chunk = chunk_fn(timed, program_id, cursor, limit)
                chunks += 1
                figures = core.add(figures, chunk.figures)
                cursor = chunk.cursor
                if chunk.finished:
                    break
                if progress is not None:
                    progress(chunks, figures)
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


def _lock_run(
    uow: UnitOfWork, name: str, program_id: int, moment: datetime, *, lock: bool = True
) -> Any:
    query = select(job_runs).where(
        job_runs.c.name == name, job_runs.c.program_id == program_id, job_runs.c.run_at == moment
    )
    if lock and uow.dialect == "postgresql":
        query = query.with_for_update()
    return uow.conn.execute(query).one()


RESUME_WITHIN = timedelta(days=31)
"""How far back :func:`resume` looks for runs left unfinished. Every job fires at least
daily, each firing finishing what the one before left; a run older than this (a worker
down for weeks) is left alone, its work done by the later runs: expiry, reminders and
dormancy as of their own moment, and a tier evaluation due again while none has finished
since the scheme's last date."""


def resume(db: Database, name: str, *, program_id: int, pause: float = 0.0) -> list[RunReport]:
    """Finish the runs of job ``name`` for the programme left ``running`` before the current
    minute (by a worker killed mid-run, or a failed chunk), oldest first: each continues
    from its cursor or its parts still to do, as a second worker on it would, so no chunk
    is done twice and workers resuming side by side share the work."""
    job = get(name)
    if job.whole is not None:
        return []  # runs whole, with no record: the next firing does it again
    moment = core.run_moment(db.clock.now())
    left = db.run(lambda uow: _unfinished(uow, name, program_id, moment), read_only=True)
    return [run(db, name, program_id=program_id, now=at, pause=pause) for at in left]


def _unfinished(uow: UnitOfWork, name: str, program_id: int, before: datetime) -> list[datetime]:
    """The moments of the job's runs left running before ``before`` (within
    :data:`RESUME_WITHIN`), oldest first."""
    query = (
        select(job_runs.c.run_at)
        .where(
            job_runs.c.name == name,
            job_runs.c.program_id == program_id,
            job_runs.c.run_at >= before - RESUME_WITHIN,
            job_runs.c.run_at < before,
            job_runs.c.state == "running",
        )
        .order_by(job_runs.c.run_at)
    )
    return list(uow.conn.execute(query).scalars())


def finished_since(uow: UnitOfWork, *, name: str, program_id: int, since: datetime) -> bool:
    """Whether a run of job ``name`` for the programme, for a moment at or after ``since``,
    has finished."""
    found = uow.conn.execute(
        select(job_runs.c.id)
        .where(
            job_runs.c.name == name,
            job_runs.c.program_id == program_id,
            job_runs.c.run_at >= since,
            job_runs.c.state == "done",
        )
        .limit(1)
    ).first()
    return found is not None


def last_done(uow: UnitOfWork, *, name: str, program_id: int) -> datetime | None:
    """The moment of the latest finished run of job ``name`` for the programme (None: none)."""
    return uow.conn.execute(
        select(func.max(job_runs.c.run_at)).where(
            job_runs.c.name == name,
            job_runs.c.program_id == program_id,
            job_runs.c.state == "done",
        )
    ).scalar()


def record_done(
    uow: UnitOfWork, *, name: str, program_id: int, moment: datetime, figures: dict[str, int]
) -> None:
    """Record that a job that runs whole did its work for ``moment`` (once: a second worker
    that did the same work records nothing more)."""
    now = uow.clock.now()
    insert_missing(
        uow,
        job_runs,
        [{"name": name, "program_id": program_id, "run_at": moment, "state": "done",
          "cursor": 0, "chunks": 1, "figures": json.dumps(figures), "started_at": now,
          "updated_at": now, "finished_at": now}],
    )  # fmt: skip


def run_global(db: Database, name: str) -> dict[str, int]:
    """Run a job that serves every programme at once (the outbox), for every programme."""
    job = get(name)
    if job.whole is None:
        raise InvalidInput(
            field="job",
            problem=f"{name} runs for one programme at a time",
            problem_zh=f"{name} 每次只能为一个计划运行",
        )
    return job.whole(db, EVERY_PROGRAMME)


def runs(
    uow: UnitOfWork, *, program_id: int, name: str | None = None, limit: int = 20
) -> list[Any]:
    """The latest runs of the programme's jobs, newest first."""
    query = select(job_runs).where(job_runs.c.program_id == program_id)
    if name is not None:
        query = query.where(job_runs.c.name == name)
    return list(uow.conn.execute(query.order_by(job_runs.c.id.desc()).limit(limit)).all())
