"""The job runner: runs are idempotent, resumable after a crash (SIGKILL included), and
safe with several workers; every due lot is expired exactly once and nothing else moves."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from jifen.db.uow import Database, UnitOfWork
from jifen.errors import InvalidInput
from jifen.jobs import core
from jifen.jobs import service as jobs
from jifen.jobs.models import job_runs
from jifen.ledger import Kind
from jifen.points import service as points
from jifen.points.models import accounts, allocations, lots, postings
from tests.factories import assert_ledger_sound, new_members, new_program


def seed(db: Database, members: int, *, due: int = 60, later: int = 40) -> tuple[int, str]:
    """A programme whose members each hold a lot due in ten days and one due in a year."""
    program = new_program(db)
    program_id = program.id
    ids = new_members(db, program_id, members)
    now = db.clock.now()

    def earn_all(uow: UnitOfWork) -> None:
        for member_id in ids:
            points.earn(uow, member_id=member_id, amount=due, key=f"soon-{member_id}",
                        expires_at=now + timedelta(days=10))  # fmt: skip
            points.earn(uow, member_id=member_id, amount=later, key=f"later-{member_id}",
                        expires_at=now + timedelta(days=400))  # fmt: skip

    db.run(earn_all)
    return program_id, program.code


def expire_allocations(db: Database, program_id: int) -> dict[int, list[int]]:
    """For every lot of the programme: the amounts expiry postings took from it."""

    def read(uow: UnitOfWork) -> dict[int, list[int]]:
        rows = uow.conn.execute(
            select(lots.c.id, allocations.c.amount)
            .select_from(
                lots.join(accounts, accounts.c.id == lots.c.account_id)
                .outerjoin(allocations, allocations.c.lot_id == lots.c.id)
                .outerjoin(postings, postings.c.id == allocations.c.posting_id)
            )
            .where(accounts.c.program_id == program_id)
            .where((postings.c.kind == Kind.EXPIRE.value) | (postings.c.id.is_(None)))
        ).all()
        found: dict[int, list[int]] = {}
        for lot_id, amount in rows:
            found.setdefault(lot_id, [])
            if amount is not None:
                found[lot_id].append(amount)
        return found

    return db.run(read, read_only=True)


def lot_amounts(db: Database, program_id: int) -> dict[int, tuple[int, int]]:
    rows = db.run(
        lambda uow: uow.conn.execute(
            select(lots.c.id, lots.c.amount, lots.c.remaining)
            .join(accounts, accounts.c.id == lots.c.account_id)
            .where(accounts.c.program_id == program_id)
        ).all(),
        read_only=True,
    )
    return {lot_id: (amount, remaining) for lot_id, amount, remaining in rows}


def assert_each_due_lot_expired_once(db: Database, program_id: int, members: int) -> None:
    taken = expire_allocations(db, program_id)
    amounts = lot_amounts(db, program_id)
    due = {lot for lot, (amount, _) in amounts.items() if amount == 60}
    assert len(due) == members
    for lot_id, (amount, remaining) in amounts.items():
        if lot_id in due:
            assert taken[lot_id] == [-60] and remaining == 0, lot_id
        else:
            assert taken[lot_id] == [] and remaining == amount == 40, lot_id
    assert_ledger_sound(db, program_id)


@pytest.fixture
def crashing_job() -> Iterator[dict[str, int]]:
    """``test.expire``: the expiry job, made to fail at a given chunk while ``fail_at`` is set."""
    state = {"calls": 0, "fail_at": 0}
    real = jobs.get("points.expire").chunk
    assert real is not None

    def chunk(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> core.Chunk:
        state["calls"] += 1
        done = real(uow, program_id, cursor, size)  # the work is done, then the crash
        if state["calls"] == state["fail_at"]:
            raise RuntimeError("worker lost in the middle of a chunk")
        return done

    jobs.register(jobs.Job("test.expire", "test", "测试", chunk, size=3))
    yield state
    jobs._JOBS.pop("test.expire")


def test_a_run_cut_short_continues_where_it_stopped_and_never_runs_twice(
    db: Database, crashing_job: dict[str, int]
) -> None:
    program_id, _ = seed(db, 10)
    db.clock.advance(timedelta(days=11))  # type: ignore[attr-defined]
    crashing_job["fail_at"] = 3
    with pytest.raises(RuntimeError, match="worker lost"):
        jobs.run(db, "test.expire", program_id=program_id)
    # this programme's run of the job (other tests' runs share the table; rows come in no
    # set order without one)
    newest = (
        select(job_runs)
        .where(job_runs.c.program_id == program_id, job_runs.c.name == "test.expire")
        .order_by(job_runs.c.id.desc())
        .limit(1)
    )
    run = db.run(lambda uow: uow.conn.execute(newest).one(), read_only=True)
    # Two chunks of three accounts committed with the cursor; the third rolled back whole.
    assert (run.state, run.chunks) == ("running", 2)
    assert sum(1 for taken in expire_allocations(db, program_id).values() if taken) == 6
    crashing_job["fail_at"] = 0
    report = jobs.run(db, "test.expire", program_id=program_id)
    assert report.state == "done"
    assert report.figures == {"accounts": 10, "lots": 10, "points": 600}
    assert jobs.run(db, "test.expire", program_id=program_id).state == "already-done"
    assert_each_due_lot_expired_once(db, program_id, 10)


def test_a_paced_run_rests_after_each_chunk_in_proportion_and_does_the_same_work(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    program_id, _ = seed(db, 10)
    db.clock.advance(timedelta(days=11))  # type: ignore[attr-defined]
    rests: list[float] = []
    monkeypatch.setattr(jobs.time, "sleep", rests.append)
    chunks: list[int] = []
    report = jobs.run(db, "points.expire", program_id=program_id, size=4, pause=2.5,
                      progress=lambda n, _: chunks.append(n))  # fmt: skip
    assert report.state == "done"
    assert report.figures == {"accounts": 10, "lots": 10, "points": 600}
    # A rest after every chunk but the last, each 2.5 times a chunk's time (never nothing).
    assert len(rests) == len(chunks) == report.chunks - 1 >= 2
    assert all(rest > 0 for rest in rests)
    assert_each_due_lot_expired_once(db, program_id, 10)
    with pytest.raises(InvalidInput, match="pause"):
        jobs.run(db, "points.expire", program_id=program_id, pause=-1)


def in_threads(count: int, run: Callable[[], jobs.RunReport]) -> list[jobs.RunReport]:
    """``run`` in ``count`` threads at once, as that many workers; their reports (any
    error in one fails the test)."""
    reports: list[jobs.RunReport] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            reports.append(run())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return reports


def test_two_workers_on_one_run_share_it_chunk_by_chunk(pg: Database) -> None:
    program_id, _ = seed(pg, 80)
    moment = pg.clock.now() + timedelta(days=11)
    reports = in_threads(
        4, lambda: jobs.run(pg, "points.expire", program_id=program_id, now=moment, size=7)
    )
    assert {r.state for r in reports} <= {"done", "already-done"}
    assert {r.figures["points"] for r in reports} == {80 * 60}
    assert_each_due_lot_expired_once(pg, program_id, 80)


def test_an_expiry_run_passes_over_an_account_another_worker_holds(pg: Database) -> None:
    """Workers side by side: a chunk takes the accounts nobody holds and leaves the held
    one; the run is over only once the held one is expired too."""
    program_id, _ = seed(pg, 10)
    moment = pg.clock.now() + timedelta(days=11)
    held = pg.run(
        lambda uow: uow.conn.execute(
            select(accounts.c.id)
            .where(accounts.c.program_id == program_id, accounts.c.member_id.is_not(None))
            .order_by(accounts.c.id)
            .limit(1)
        ).scalar_one(),
        read_only=True,
    )

    def expired() -> int:
        return sum(1 for taken in expire_allocations(pg, program_id).values() if taken)

    reports: list[jobs.RunReport] = []
    with pg.transaction() as holder:  # as another worker's chunk would, until it commits
        holder.conn.execute(select(accounts.c.id).where(accounts.c.id == held).with_for_update())
        worker = threading.Thread(
            target=lambda: reports.append(
                jobs.run(pg, "points.expire", program_id=program_id, now=moment, size=4)
            )
        )
        worker.start()
        deadline = time.monotonic() + 30
        while expired() < 9:
            assert time.monotonic() < deadline, "the run waited instead of passing over"
            time.sleep(0.01)
        time.sleep(0.3)
        assert worker.is_alive(), "the run ended while a due account was held"
        assert expired() == 9
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert reports[0].state == "done"
    assert reports[0].figures == {"accounts": 10, "lots": 10, "points": 600}
    assert_each_due_lot_expired_once(pg, program_id, 10)


def test_expiry_killed_with_sigkill_then_run_again_expires_each_due_lot_once(
    pg: Database, postgres_url: str, tmp_path: Path
) -> None:
    members = 1500
    program_id, code = seed(pg, members)
    moment = (pg.clock.now() + timedelta(days=11)).isoformat()
    command = [
        sys.executable, "-m", "jifen", "--database-url", postgres_url, "jobs", "run",
        "points.expire", "--program", code, "--now", moment, "--allow-future", "--size", "10",
    ]  # fmt: skip
    env = {**os.environ, "JIFEN_DATA_DIR": str(tmp_path)}
    log = (tmp_path / "job.log").open("wb")
    # The first run paced (a rest after each chunk), as one beside live traffic would be.
    paced = [*command, "--pause", "0.2"]
    process = subprocess.Popen(paced, env=env, stdout=log, stderr=log, start_new_session=True)

    def chunks_done() -> int:
        return int(
            pg.run(
                lambda uow: uow.conn.execute(
                    select(func.coalesce(func.max(job_runs.c.chunks), 0)).where(
                        job_runs.c.program_id == program_id
                    )
                ).scalar_one(),
                read_only=True,
            )
        )

    deadline = time.monotonic() + 60
    while chunks_done() < 5:
        assert process.poll() is None, (tmp_path / "job.log").read_text()
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    log.close()
    interrupted = chunks_done()
    assert interrupted < members // 10, "the job finished before it could be killed"
    partly = sum(1 for taken in expire_allocations(pg, program_id).values() if taken)
    assert 0 < partly < members
    # Run again for the same moment: it continues from its cursor and finishes.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "done" in again.stdout
    assert_each_due_lot_expired_once(pg, program_id, members)


def test_the_schedules_name_only_jobs_that_exist() -> None:
    assert set(core.SCHEDULES) == set(jobs.jobs())
    assert core.run_moment(datetime(2027, 1, 1, 0, 10, 42, 5)) == datetime(2027, 1, 1, 0, 10)  # noqa: DTZ001
