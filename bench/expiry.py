"""Expiry at scale, each run against the same work done by one set-based SQL statement.

What it measures, on PostgreSQL, in a schema of its own (``bench_expiry``, dropped at the
end), over ``--scale`` members (default 1,000,000) with ten lots each:

- 2.5 lots a member (2,500,000 at full scale) lapse at the year end (2027-01-01 00:00,
  Asia/Shanghai): calendar clearing; the other 7.5 lapse spread over the following year.
1. ``expiry_yearend_s``: the ``points.expire`` job run at 2027-01-01 00:10 clears the
   year-end lots, while ``--workers`` processes keep earning for random members beside it;
   ``earn_during_clearing``: their earn rate during the run against their rate without it
   (measured first, for ``--seconds``).
2. ``expiry_daily_s``: the job run a day later: one day of lots (≈ 20,500 at full scale),
   after a ``VACUUM ANALYZE`` that stands for the autovacuum of that day.
3. ``tier_eval_s``: ``tiers.evaluate`` over every member of a programme with a tier scheme.

The daily run and the tier evaluation are shared by ``--job-workers`` processes (default
2, one a core), as that many ``jifen worker`` processes share them: expiry chunks take
accounts no other worker holds, tier evaluation takes parts of the members. The year-end
clearing runs beside the earnings on ``--clearing-workers`` (default 1): on two cores a
second worker takes the earnings' CPU (0.29 of their rate instead of 0.52) and gains
little time (268 s instead of 282 s at full scale).

Before each job run, the same expiry is done by one set-based statement (postings, lines,
allocations, lots and balances in one data-modifying CTE, no hash chain) inside a
transaction that is then rolled back: that is the limit each run is compared with, on the
same data in the same run. A ``VACUUM`` (not timed) then clears what the rolled-back
statement left behind, so that the job meets the tables as the statement did, not millions
of dead row versions that no production run would find.
Lines: ``RESULT <name> <value> <unit> ratio=<value/limit>``.
Targets: expiry_daily_s ≤ 5 s, expiry_yearend_s ≤ 180 s, earn_during_clearing ratio ≥ 0.8,
tier_eval_s ≤ 120 s, at full scale.

Run: ``python bench/expiry.py [--database-url URL] [--scale 1000000] [--workers 2]
[--seconds 10] [--pause 0] [--job-workers 2] [--clearing-workers 1]``. ``--scale 20000``
is a quick run.
``--pause`` paces the year-end run as ``jifen jobs run --pause`` does (a rest after each
chunk, that many times as long as the chunk took): it trades a longer clearing for more
room for the earnings.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import sys
import time
import traceback
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import create_engine, text

from jifen.db.migrate import upgrade
from jifen.db.uow import Database, UnitOfWork
from jifen.jobs import service as jobs
from jifen.points import service as points
from jifen.programs import service as programs
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef, TierScheme
from ledger import admin_sql, result, say, vacuum_analyze, with_schema

SCHEMA = "bench_expiry"
ZONE = ZoneInfo("Asia/Shanghai")
YEAR_END = datetime(2027, 1, 1, tzinfo=ZONE)
SEEDED_AT = datetime(2026, 6, 1, tzinfo=ZONE)
TIERS = ("普通", "银卡", "金卡", "钻石")
SCHEME = {
    "parts": {
        "spend": {"per_yuan": 1000, "score": 40}, "earned": {"per_points": 1000, "score": 40},
    },
    "window_months": 12,
    "levels": [
        {"tier": "普通", "min_score": 0}, {"tier": "银卡", "min_score": 101, "retention": 80},
        {"tier": "金卡", "min_score": 301, "retention": 240},
        {"tier": "钻石", "min_score": 601, "retention": 480},
    ],
    "schedule": "quarterly",
    "upgrade_at_once": False,
}  # fmt: skip
"""每1000元40分, 每1000积分40分; 普通0-100, 银卡101-300, 金卡301-600, 钻石601+; retention lines."""


# --------------------------------------------------------------------------- seeding


def seed(url: str, scale: int) -> tuple[int, int]:
    """A programme of ``scale`` members with ten lots of 100 points each; set-based, so a
    million members take minutes, not hours. Returns (programme id, lots)."""
    database = Database(url, pool_size=1)
    upgrade(database.engine)
    program_id = database.run(
        lambda uow: programs.create_program(uow, code="bench", name="bench").id
    )

    def tier_scheme(uow: UnitOfWork) -> None:
        tiers.set_tiers(uow, program_id=program_id, definitions=[
            TierDef(code=code, name=code, rank=rank) for rank, code in enumerate(TIERS)
        ])  # fmt: skip
        settings = programs.get_settings(uow, program_id=program_id)
        programs.set_settings(uow, program_id=program_id, settings=settings.model_copy(
            update={"tier_scheme": TierScheme.model_validate(SCHEME)}))  # fmt: skip

    database.run(tier_scheme)
    database.dispose()
    engine = create_engine(url)
    started = time.perf_counter()
    params = {"p": program_id, "n": scale, "at": SEEDED_AT, "year_end": YEAR_END,
              "rolling": YEAR_END + timedelta(days=1)}  # fmt: skip
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL synchronous_commit = off"))
        conn.execute(text(
            "INSERT INTO members (program_id, external_ref, created_at) "
            "SELECT :p, 'm' || g, :at FROM generate_series(1, :n) g"
        ), params)  # fmt: skip
        conn.execute(text(
            "INSERT INTO accounts (program_id, member_id, currency, balance, created_at) "
            "SELECT :p, id, 'points', 1000, :at FROM members WHERE program_id = :p"
        ), params)  # fmt: skip
        # One earning a member, which its ten lots came from.
        conn.execute(text(
            "INSERT INTO postings (program_id, kind, idempotency_key, request_hash, account_id,"
            " amount, created_at, digest) SELECT :p, 'earn', 'seed-' || id, '', id, 1000, :at,"
            " '' FROM accounts WHERE program_id = :p AND member_id IS NOT NULL"
        ), params)  # fmt: skip
        # Lots 0 and 1 of everyone and lot 2 of even members lapse at the year end; the
        # rest spread over the 365 days after it.
        conn.execute(text(
            "INSERT INTO lots (account_id, posting_id, amount, remaining, available_at,"
            " expires_at) SELECT a.id, p.id, 100, 100, :at, CASE WHEN k < 2 OR (k = 2 AND"
            " a.member_id % 2 = 0) THEN :year_end ELSE CAST(:rolling AS timestamptz) +"
            " ((a.member_id * 7 + k * 37) % 365) * interval '1 day' END FROM accounts a"
            " JOIN postings p ON p.account_id = a.id CROSS JOIN generate_series(0, 9) k"
            " WHERE a.program_id = :p AND a.member_id IS NOT NULL"
        ), params)  # fmt: skip
        # For tier evaluation: one order a member (0 to 5,900 yuan), and everyone at 普通.
        conn.execute(text(
            "INSERT INTO events (program_id, source, external_id, type, member_id, occurred_at,"
            " received_at, payload, request_hash, subject, amount_fen) SELECT :p, 'pos',"
            " 'o' || id, 'order.paid', id, :ordered, :ordered, '{}', '', 'o' || id,"
            " (id * 7919 % 60) * 10000 FROM members WHERE program_id = :p"
        ), {**params, "ordered": SEEDED_AT + timedelta(days=60)})  # fmt: skip
        conn.execute(text(
            "INSERT INTO member_tiers (member_id, program_id, tier_code, since, reason, set_by)"
            " SELECT id, :p, '普通', :at, 'bench', 'bench' FROM members WHERE program_id = :p"
        ), params)  # fmt: skip
    engine.dispose()
    vacuum_analyze(url)
    say(f"seeded {scale:,} members, {scale * 10:,} lots in {time.perf_counter() - started:.0f} s")
    return program_id, scale * 10


# --------------------------------------------------------------------------- the limit

SET_BASED = """
WITH d AS (
    SELECT l.id, l.account_id, l.remaining FROM lots l JOIN accounts a ON a.id = l.account_id
    WHERE a.program_id = :p AND l.remaining > 0 AND l.expires_at <= :now
    FOR UPDATE OF l
), per AS (
    SELECT account_id, sum(remaining) AS total FROM d GROUP BY account_id
), expired AS (
    SELECT id FROM accounts WHERE program_id = :p AND system_code = 'expired'
), p AS (
    INSERT INTO postings (program_id, kind, idempotency_key, request_hash, account_id, amount,
                          reason, actor, created_at, digest)
    SELECT :p, 'expire', 'set-based:' || account_id, '', account_id, total,
           'lots reached their expiry date', 'system', :now, ''
    FROM per
    RETURNING id, account_id, amount
), li AS (
    INSERT INTO lines (posting_id, account_id, amount)
    SELECT p.id, p.account_id, -p.amount FROM p
    UNION ALL SELECT p.id, expired.id, p.amount FROM p, expired
), al AS (
    INSERT INTO allocations (posting_id, lot_id, amount)
    SELECT p.id, d.id, -d.remaining FROM d JOIN p ON p.account_id = d.account_id
), lu AS (
    UPDATE lots SET remaining = 0 FROM d WHERE lots.id = d.id
), au AS (
    UPDATE accounts SET balance = accounts.balance - per.total, head_seq = accounts.head_seq + 1
    FROM per WHERE accounts.id = per.account_id
)
SELECT count(*), coalesce(sum(total), 0) FROM per
"""


def set_based_seconds(url: str, program_id: int, now: datetime) -> tuple[float, int]:
    """The same expiry as one statement, rolled back, then vacuumed away: (seconds,
    accounts)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            transaction = conn.begin()
            started = time.perf_counter()
            accounts, total = conn.execute(text(SET_BASED), {"p": program_id, "now": now}).one()
            seconds = time.perf_counter() - started
            transaction.rollback()
    finally:
        engine.dispose()
    say(f"  set-based: {accounts:,} accounts, {total:,} points in {seconds:.2f} s (rolled back)")
    vacuum_analyze(url)
    return seconds, int(accounts)


TIERS_SET_BASED = """
WITH spent AS (
    SELECT member_id, sum(amount_fen) AS fen FROM events
    WHERE program_id = :p AND type = 'order.paid' AND occurred_at > :since AND occurred_at <= :now
    GROUP BY member_id
), earned AS (
    SELECT a.member_id, sum(p.amount) AS points
    FROM postings p JOIN accounts a ON a.id = p.account_id
    WHERE a.program_id = :p AND p.kind = 'earn' AND p.created_at > :since AND p.created_at <= :now
    GROUP BY a.member_id
), scored AS (
    SELECT m.member_id, m.tier_code AS old,
           div(coalesce(s.fen, 0), 100000) * 40 + div(coalesce(e.points, 0), 1000) * 40 AS score
    FROM member_tiers m LEFT JOIN spent s USING (member_id) LEFT JOIN earned e USING (member_id)
    WHERE m.program_id = :p
), decided AS (
    SELECT member_id, old, score, CASE WHEN score >= 601 THEN '钻石' WHEN score >= 301 THEN '金卡'
           WHEN score >= 101 THEN '银卡' ELSE '普通' END AS new
    FROM scored
), moved AS (
    UPDATE member_tiers SET tier_code = d.new, since = :now, reason = 'set-based'
    FROM decided d WHERE member_tiers.member_id = d.member_id AND d.new <> d.old
), recorded AS (
    INSERT INTO tier_changes (program_id, member_id, from_tier, to_tier, kind, reason, score, at,
                              actor)
    SELECT :p, member_id, old, new, 'evaluation', 'set-based', score, :now, 'bench'
    FROM decided WHERE new <> old
)
SELECT count(*) FILTER (WHERE new <> old), count(*) FROM decided
"""


def tiers_set_based_seconds(url: str, program_id: int, now: datetime) -> float:
    """The quarter's evaluation as one statement (no retention lines needed: everyone
    starts at the entry tier), rolled back."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            transaction = conn.begin()
            started = time.perf_counter()
            moved, members = conn.execute(
                text(TIERS_SET_BASED),
                {"p": program_id, "now": now, "since": now - timedelta(days=365)},
            ).one()
            seconds = time.perf_counter() - started
            transaction.rollback()
    finally:
        engine.dispose()
    say(f"  set-based: {members:,} members, {moved:,} moved in {seconds:.2f} s (rolled back)")
    return seconds


def run_job(
    url: str, program_id: int, now: datetime, name: str = "points.expire", pause: float = 0.0
) -> tuple[float, dict[str, int]]:
    database = Database(url, pool_size=2)
    try:
        started = time.perf_counter()
        report = jobs.run(database, name, program_id=program_id, now=now, pause=pause)
        seconds = time.perf_counter() - started
    finally:
        database.dispose()
    say(f"  jifen job: {report.figures} in {report.chunks} chunks, {seconds:.2f} s")
    return seconds, report.figures


def job_worker(
    url: str, program_id: int, now: datetime, name: str, go: Any, pause: float = 0.0
) -> None:
    """One worker of a shared run: ready, then runs the job when everyone is."""
    database = Database(url, pool_size=2)
    try:
        go.wait()
        jobs.run(database, name, program_id=program_id, now=now, pause=pause)
    finally:
        database.dispose()


def run_job_shared(
    url: str, program_id: int, now: datetime, name: str, workers: int, pause: float = 0.0
) -> tuple[float, dict[str, int]]:
    """The job run by ``workers`` processes side by side, as that many ``jifen worker``s
    would: seconds from the start until the last one is through."""
    if workers <= 1:
        return run_job(url, program_id, now, name, pause=pause)
    context = mp.get_context("spawn")
    go = context.Barrier(workers + 1)
    processes = [
        context.Process(target=job_worker, args=(url, program_id, now, name, go, pause))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    go.wait()
    started = time.perf_counter()
    for process in processes:
        process.join()
    seconds = time.perf_counter() - started
    assert all(process.exitcode == 0 for process in processes), "a job worker failed"
    database = Database(url, pool_size=1)
    try:
        report = jobs.run(database, name, program_id=program_id, now=now)
    finally:
        database.dispose()
    assert report.state == "already-done", report.state
    say(f"  jifen job, {workers} workers: {report.figures} in {report.chunks} parts, "
        f"{seconds:.2f} s")  # fmt: skip
    return seconds, report.figures


# --------------------------------------------------------------------------- earn load


def earner(url: str, scale_ids: tuple[int, int], worker: int, stop: Any, out: Any) -> None:
    """Earn for random members until ``stop`` is set; sends the time of each success."""
    database = Database(url, pool_size=1)
    rng = random.Random(worker)
    first, last = scale_ids
    done: list[float] = []
    n = 0
    try:
        while not stop.is_set():
            n += 1
            member = rng.randint(first, last)
            key = f"earn-{worker}-{n}-{time.time_ns()}"

            def op(uow: UnitOfWork, m: int = member, k: str = key) -> Any:
                return points.earn(uow, member_id=m, amount=5, key=k,
                                   expires_at=YEAR_END + timedelta(days=800))  # fmt: skip

            try:
                database.run(op)
                done.append(time.time())
            except Exception:
                traceback.print_exc(limit=2)
    finally:
        database.dispose()
        out.put(done)


class EarnLoad:
    def __init__(self, url: str, member_range: tuple[int, int], workers: int) -> None:
        context = mp.get_context("spawn")
        self.stop = context.Event()
        self.out: Any = context.Queue()
        self.processes = [
            context.Process(target=earner, args=(url, member_range, i, self.stop, self.out))
            for i in range(workers)
        ]
        for process in self.processes:
            process.start()

    def finish(self) -> list[float]:
        self.stop.set()
        times = [t for _ in self.processes for t in self.out.get()]
        for process in self.processes:
            process.join(timeout=30)
        return times


def rate_between(times: list[float], start: float, end: float) -> float:
    return sum(1 for t in times if start <= t <= end) / max(end - start, 1e-9)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--scale", type=int, default=1_000_000, help="members (ten lots each)")
    parser.add_argument("--workers", type=int, default=2, help="earning processes")
    parser.add_argument("--seconds", type=float, default=10, help="earn rate without the job")
    parser.add_argument("--pause", type=float, default=0.0, help="pace the year-end run")
    parser.add_argument(
        "--job-workers",
        type=int,
        default=2,
        help="workers sharing the daily run and the tier evaluation",
    )
    parser.add_argument(
        "--clearing-workers",
        type=int,
        default=1,
        help="workers sharing the year-end clearing beside the earnings",
    )
    args = parser.parse_args(argv)
    url = with_schema(args.database_url, SCHEMA)
    admin_sql(args.database_url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    admin_sql(args.database_url, f"CREATE SCHEMA {SCHEMA}")
    results: list[str] = []
    try:
        program_id, _ = seed(url, args.scale)
        engine = create_engine(url)
        with engine.connect() as conn:
            first, last = conn.execute(
                text("SELECT min(member_id), max(member_id) FROM accounts WHERE program_id = :p"),
                {"p": program_id},
            ).one()
        engine.dispose()

        say(f"earn alone: {args.workers} processes, {args.seconds:.0f} s ...")
        load = EarnLoad(url, (first, last), args.workers)
        time.sleep(3)  # connect and warm up
        alone_start = time.time()
        time.sleep(args.seconds)
        alone_end = time.time()
        alone = rate_between(load.finish(), alone_start, alone_end)
        say(f"  earn without the job: {alone:,.0f} tps")

        say("year-end clearing at 2027-01-01 00:10 ...")
        clearing_at = YEAR_END + timedelta(minutes=10)
        limit_yearend, _ = set_based_seconds(url, program_id, clearing_at)
        load = EarnLoad(url, (first, last), args.workers)
        try:
            time.sleep(3)
            began = time.time()
            yearend, _ = run_job_shared(
                url, program_id, clearing_at, "points.expire", args.clearing_workers, args.pause
            )
            ended = time.time()
        finally:
            times = load.finish()
        during = rate_between(times, began, ended)
        say(f"  earn during the clearing: {during:,.0f} tps")

        say("daily run at 2027-01-02 00:10, a day later ...")
        vacuum_analyze(url)
        daily_at = YEAR_END + timedelta(days=1, minutes=10)
        limit_daily, _ = set_based_seconds(url, program_id, daily_at)
        daily, _ = run_job_shared(url, program_id, daily_at, "points.expire", args.job_workers)

        say("tier evaluation at 2027-01-01 02:00 ...")
        evaluation_at = YEAR_END + timedelta(hours=2)
        limit_tiers = tiers_set_based_seconds(url, program_id, evaluation_at)
        tier_eval, _ = run_job_shared(
            url, program_id, evaluation_at, "tiers.evaluate", args.job_workers
        )

        results += [
            result("expiry_daily_s", daily, "s", limit_daily),
            result("expiry_yearend_s", yearend, "s", limit_yearend),
            result("earn_during_clearing", during, "tps", alone),
            result("tier_eval_s", tier_eval, "s", limit_tiers),
        ]
    finally:
        admin_sql(args.database_url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    say("")
    for line in results:
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
