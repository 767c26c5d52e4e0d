"""A run shared out in parts: several workers evaluate tiers side by side, each member once,
and a worker killed in the middle leaves its part to the next run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from jifen.db.uow import Database, UnitOfWork
from jifen.jobs import service as jobs
from jifen.jobs.models import job_parts, job_runs
from jifen.points import service as points
from jifen.tiers.models import tier_changes
from tests.jobs.test_runner import in_threads
from tests.tiers.scheme import scheme
from tests.tiers.test_service import World


def populated(db: Database, members: int) -> tuple[World, dict[int, str]]:
    """A programme whose members earned 0, 3,000 or 8,000 points (scores 0, 120, 320):
    the tier each one's first evaluation places it at."""
    world = World(db, scheme(upgrade_at_once=False), members=members)
    earned = {m: (0, 3000, 8000)[i % 3] for i, m in enumerate(world.members)}

    def earn_all(uow: UnitOfWork) -> None:
        for member_id, amount in earned.items():
            if amount:
                points.earn(uow, member_id=member_id, amount=amount, key=uuid.uuid4().hex)

    db.run(earn_all)
    tier_of = {0: "普通", 3000: "银卡", 8000: "金卡"}
    return world, {m: tier_of[amount] for m, amount in earned.items()}


def assert_each_member_placed_once(db: Database, world: World, wanted: dict[int, str]) -> None:
    rows = db.run(
        lambda uow: uow.conn.execute(
            select(tier_changes.c.member_id, tier_changes.c.to_tier).where(
                tier_changes.c.program_id == world.program.id
            )
        ).all(),
        read_only=True,
    )
    assert Counter(m for m, _ in rows) == Counter(set(wanted)), "a member placed twice, or never"
    assert {int(m): tier for m, tier in rows} == wanted


def run_state(db: Database, program_id: int) -> tuple[str, dict[str, int], int, int]:
    """(run state, its figures, parts done, parts) of the programme's one run."""

    def read(uow: UnitOfWork) -> tuple[str, dict[str, int], int, int]:
        run = uow.conn.execute(select(job_runs).where(job_runs.c.program_id == program_id)).one()
        done, total = uow.conn.execute(
            select(func.count().filter(job_parts.c.state == "done"), func.count()).where(
                job_parts.c.run_id == run.id
            )
        ).one()
        return run.state, json.loads(run.figures), int(done), int(total)

    return db.run(read, read_only=True)


@pytest.fixture
def side_by_side() -> Iterator[threading.Barrier]:
    """``test.tiers``: tier evaluation whose first two parts wait for each other. Two
    workers get past them only if each holds a part at the same time; one worker alone (or
    workers taking turns) would wait out the barrier and fail."""
    real = jobs.get("tiers.evaluate")
    assert real.part is not None
    part_fn = real.part
    barrier = threading.Barrier(2, timeout=20)
    started = {"parts": 0}
    lock = threading.Lock()

    def part(uow: UnitOfWork, program_id: int, after: int, last: int | None) -> dict[str, int]:
        with lock:
            started["parts"] += 1
            first_two = started["parts"] <= 2
        if first_two:
            barrier.wait()
        return part_fn(uow, program_id, after, last)

    jobs.register(
        jobs.Job("test.tiers", "test", "测试", real.chunk, size=7, part_ends=real.part_ends,
                 part=part)
    )  # fmt: skip
    yield barrier
    jobs._JOBS.pop("test.tiers")


def test_workers_evaluate_tiers_side_by_side_and_each_member_once(
    pg: Database, side_by_side: threading.Barrier
) -> None:
    world, wanted = populated(pg, 120)
    moment = pg.clock.now() + timedelta(days=30)
    reports = in_threads(
        4, lambda: jobs.run(pg, "test.tiers", program_id=world.program.id, now=moment)
    )
    assert not side_by_side.broken
    states = Counter(r.state for r in reports)
    assert states["done"] >= 1 and set(states) <= {"done", "running", "already-done"}, states
    assert_each_member_placed_once(pg, world, wanted)
    state, figures, done, total = run_state(pg, world.program.id)
    assert (state, done, total) == ("done", 18, 18)  # 120 members in parts of 7, and the rest
    assert figures["evaluated"] == 120
    again = jobs.run(pg, "test.tiers", program_id=world.program.id, now=moment)
    assert again.state == "already-done"
    assert_each_member_placed_once(pg, world, wanted)


def test_a_shared_run_on_one_worker_takes_every_part(db: Database) -> None:
    world, wanted = populated(db, 10)
    report = jobs.run(db, "tiers.evaluate", program_id=world.program.id, size=4,
                      now=db.clock.now() + timedelta(days=30))  # fmt: skip
    assert (report.state, report.chunks) == ("done", 3)  # 4 + 4 + the 2 left
    assert report.figures["evaluated"] == 10
    assert_each_member_placed_once(db, world, wanted)


def test_a_tier_evaluation_killed_with_sigkill_then_run_again_places_each_member_once(
    pg: Database, postgres_url: str, tmp_path: Path
) -> None:
    members = 300
    world, wanted = populated(pg, members)
    moment: datetime = pg.clock.now() + timedelta(days=30)
    command = [
        sys.executable, "-m", "jifen", "--database-url", postgres_url, "jobs", "run",
        "tiers.evaluate", "--program", world.program.code, "--now", moment.isoformat(),
        "--allow-future", "--size", "10",
    ]  # fmt: skip
    env = {**os.environ, "JIFEN_DATA_DIR": str(tmp_path)}
    log_path = tmp_path / "job.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--pause", "0.5"], env=env, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while run_parts_done(pg, world.program.id) < 3:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    state, _, done, total = run_state(pg, world.program.id)
    assert state == "running" and 3 <= done < total == members // 10 + 1
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "done" in again.stdout
    state, figures, done, total = run_state(pg, world.program.id)
    assert (state, done) == ("done", total)
    assert figures["evaluated"] == members
    assert_each_member_placed_once(pg, world, wanted)


def run_parts_done(db: Database, program_id: int) -> int:
    return int(
        db.run(
            lambda uow: uow.conn.execute(
                select(func.count())
                .select_from(job_parts.join(job_runs, job_runs.c.id == job_parts.c.run_id))
                .where(job_runs.c.program_id == program_id, job_parts.c.state == "done")
            ).scalar_one(),
            read_only=True,
        )
    )


def test_a_dry_run_of_a_tier_evaluation_holds_no_member_while_it_counts(pg: Database) -> None:
    """A dry run counts the moves an evaluation would make without making them: the members
    it would move stay free for their earnings while it goes on through the programme."""
    from sqlalchemy.exc import OperationalError

    from jifen.members.models import members

    world, _ = populated(pg, 6)
    free: list[bool] = []

    def try_to_hold(chunks: int, figures: dict[str, int]) -> None:
        with pg.engine.connect() as conn:
            try:
                conn.execute(
                    select(members.c.id)
                    .where(members.c.id.in_(world.members))
                    .with_for_update(nowait=True, key_share=True)
                ).all()
                free.append(True)
            except OperationalError:
                free.append(False)
            conn.rollback()

    report = jobs.run(
        pg, "tiers.evaluate", program_id=world.program.id, dry_run=True, size=2,
        progress=try_to_hold,
    )  # fmt: skip
    assert (report.state, report.figures["evaluated"], report.figures["upgraded"]) == (
        "dry-run", 6, 6,
    )  # fmt: skip
    assert free == [True, True, True]
    assert world.tiers() == [None] * 6  # nothing written
