"""Redemptions per second on PostgreSQL, against pgbench TPC-B measured in the same run.

What it measures, in order:

1. ``pgbench`` TPC-B (``-c <workers> -T <seconds>``) on the same PostgreSQL: the limit.
2. ``redeem_many``: ``--workers`` workers (threads spread over ``--processes`` processes,
   one a core by default) redeem, for ``--seconds``, a reward drawn from
   ``--rewards`` (limited stock, plenty of it) for a member drawn from ``--scale`` members.
   Each redemption is the whole use case: the member's lock, limits, the price, a FIFO debit,
   the order and its step, and the conditional stock decrement.
3. ``redeem_hot``: every worker redeems the same reward (one hot stock row).
4. ``oversold``: every worker keeps redeeming a reward with ``--race-stock`` units until it
   is refused; the orders made beyond the stock, and any stock below zero, are counted (the
   target is 0), and the programme's ledger is reconciled.

It prints every figure, then ``RESULT <name> <value> <unit> ratio=<value/limit>`` lines.
Targets: redeem_many ≥ 0.5 and redeem_hot ≥ 0.3 of TPC-B; oversold 0.

Run: ``python bench/redeem.py [--database-url URL] [--seconds 20] [--scale 10000]
[--rewards 200] [--workers 8] [--processes N]``. It works in schemas of its own and drops
them at the end.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import func, select

from jifen.db.migrate import upgrade
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import OutOfStock, Refused
from jifen.members import service as members
from jifen.points import integrity
from jifen.points import service as points
from jifen.programs import service as programs
from jifen.rewards import service as rewards
from jifen.rewards.models import reward_orders
from jifen.rewards.models import rewards as rewards_table
from jifen.rewards.schemas import RedemptionCreate, RedemptionPolicy, RewardCreate
from ledger import (
    Outcome,
    Workers,
    admin_sql,
    default_processes,
    pgbench_tps,
    report,
    result,
    say,
    vacuum_analyze,
    with_schema,
)

PGBENCH_SCHEMA = "bench_pgbench"
JIFEN_SCHEMA = "bench_redeem"
BALANCE = 10**9  # no member runs out during a run
SEED_BATCH = 500


def seed(url: str, scale: int, reward_count: int, race_stock: int) -> tuple[int, list[int]]:
    """A programme whose members may redeem without monthly limits, ``scale`` funded members,
    ``reward_count`` rewards with ample stock, a hot one, and one with ``race_stock`` units."""
    database = Database(url, pool_size=2)
    upgrade(database.engine)
    code = f"bench-{int(time.time())}"

    def create(uow: UnitOfWork) -> int:
        program_id = programs.create_program(uow, code=code, name=code).id
        settings = programs.get_settings(uow, program_id=program_id)
        policy = RedemptionPolicy.model_validate({"default": {}})  # no limits
        changed = settings.model_copy(update={"redemption": policy})
        programs.set_settings(uow, program_id=program_id, settings=changed)
        specs = [(f"r{i}", 10**9) for i in range(reward_count)]
        specs += [("hot", 10**9), ("race", race_stock)]
        for reward_code, stock in specs:
            body = RewardCreate.model_validate(
                {"code": reward_code, "kind": "physical", "name": {"en": reward_code},
                 "points": 100, "stock": stock}
            )  # fmt: skip
            rewards.create_reward(uow, program_id=program_id, body=body)
        return program_id

    program_id = database.run(create)
    say(f"seeding {scale:,} members with {BALANCE:,} points each ...")
    started = time.perf_counter()
    member_ids: list[int] = []
    expires = datetime.now(UTC) + timedelta(days=400)
    for start in range(0, scale, SEED_BATCH):

        def batch(uow: UnitOfWork, first: int = start) -> list[int]:
            made = []
            for i in range(first, min(first + SEED_BATCH, scale)):
                member = members.register_member(uow, program_id=program_id,
                                                 external_ref=f"b{i}").id  # fmt: skip
                points.earn(uow, member_id=member, amount=BALANCE, key=f"seed-{i}",
                            expires_at=expires)  # fmt: skip
                made.append(member)
            return made

        member_ids += database.run(batch)
    database.dispose()
    say(f"  seeded in {time.perf_counter() - started:.0f} s")
    return program_id, member_ids


def timed_worker(
    url: str, program_id: int, phase: str, member_ids: list[int], reward_count: int,
    worker: int, start_at: float, seconds: float,
) -> Outcome:  # fmt: skip
    """One worker: redeem until the deadline (or, racing, until the stock is gone)."""
    database = Database(url, pool_size=1)
    rng = random.Random(hash((phase, worker)))
    outcome = Outcome()
    bodies = {
        code: RedemptionCreate(reward=code)
        for code in [f"r{i}" for i in range(reward_count)] + ["hot", "race"]
    }
    database.run(lambda uow: rewards.get_reward(uow, program_id=program_id, code="hot"))
    time.sleep(max(0.0, start_at - time.time()))
    deadline = start_at + seconds
    while time.time() < deadline:
        code = {"many": f"r{rng.randrange(reward_count)}", "hot": "hot", "race": "race"}[phase]
        member = rng.choice(member_ids)
        key = f"{phase}-{worker}-{uuid.uuid4().hex}"

        def op(uow: UnitOfWork, m: int = member, c: str = code, k: str = key) -> Any:
            return rewards.redeem(uow, program_id=program_id, member_id=m, body=bodies[c],
                                  key=k, actor="bench")  # fmt: skip

        began = time.perf_counter()
        try:
            database.run(op)
            outcome.done += 1
            outcome.latencies_ms.append((time.perf_counter() - began) * 1000)
        except OutOfStock:
            outcome.refused += 1
            if phase == "race":
                break
        except Refused:
            outcome.refused += 1
        except Exception:
            outcome.errors.append(traceback.format_exc(limit=3))
    database.dispose()
    return outcome


def run_phase(
    pool: Workers, url: str, program_id: int, phase: str, workers: int, member_ids: list[int],
    reward_count: int, seconds: float,
) -> tuple[float, Outcome]:  # fmt: skip
    start_at = time.time() + 2.0
    args = [(url, program_id, phase, member_ids, reward_count, i, start_at, seconds)
            for i in range(workers)]  # fmt: skip
    return report(phase, pool.run(args), seconds, "redemptions/s")


def oversold(url: str, program_id: int, race_stock: int) -> int:
    """Orders of the race reward beyond its stock, plus any stock below zero; and the
    ledger must reconcile."""
    database = Database(url, pool_size=1)

    def read(uow: UnitOfWork) -> tuple[int, int, list[Any]]:
        reward = uow.conn.execute(
            select(rewards_table.c.id, rewards_table.c.stock_left).where(
                rewards_table.c.program_id == program_id, rewards_table.c.code == "race"
            )
        ).one()
        orders = uow.conn.execute(
            select(func.count()).where(reward_orders.c.reward_id == reward.id)
        ).scalar_one()
        problems = integrity.reconcile(uow, program_id=program_id).problems
        return int(orders), int(reward.stock_left), list(problems)

    orders, left, problems = database.run(read, read_only=True)
    database.dispose()
    say(f"race: {orders} orders for {race_stock} units, {left} left; "
        f"reconcile: {'ok' if not problems else problems[:3]}")  # fmt: skip
    return max(orders - race_stock, 0) + max(-left, 0) + len(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--scale", type=int, default=10_000, help="members")
    parser.add_argument("--rewards", type=int, default=200, help="rewards of redeem_many")
    parser.add_argument("--workers", type=int, default=8, help="concurrent workers / clients")
    parser.add_argument(
        "--processes", type=int, default=default_processes(),
        help="processes the workers run in, as threads (default: one a core)",
    )  # fmt: skip
    parser.add_argument("--race-stock", type=int, default=500)
    args = parser.parse_args(argv)
    url, seconds, workers = args.database_url, args.seconds, args.workers
    jifen_url = with_schema(url, JIFEN_SCHEMA)
    cleanup: list[Callable[[], None]] = []
    try:
        for schema in (PGBENCH_SCHEMA, JIFEN_SCHEMA):
            admin_sql(url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            admin_sql(url, f"CREATE SCHEMA {schema}")
            cleanup.append(lambda s=schema: admin_sql(url, f"DROP SCHEMA IF EXISTS {s} CASCADE"))
        tpcb = pgbench_tps(url, workers, int(seconds))
        say(f"pgbench TPC-B: {tpcb:,.0f} tps")
        program_id, member_ids = seed(jifen_url, args.scale, args.rewards, args.race_stock)
        vacuum_analyze(jifen_url)
        pool = Workers(min(args.processes, workers), timed_worker)
        try:
            phase = partial(run_phase, pool, jifen_url, program_id)
            many, _ = phase("many", workers, member_ids, args.rewards, seconds)
            hot, _ = phase("hot", workers, member_ids, args.rewards, seconds)
            phase("race", workers, member_ids, args.rewards, 60)
        finally:
            pool.close()
        extra = oversold(jifen_url, program_id, args.race_stock)
    finally:
        for drop in cleanup:
            drop()
    say("")
    for line in (
        result("redeem_many", many, "tps", tpcb),
        result("redeem_hot", hot, "tps", tpcb),
        # A count: its "limit" is 1, so the ratio is the count itself (target 0).
        f"RESULT oversold {extra} orders ratio={float(extra):.3f}",
    ):
        say(line)
    return 1 if extra else 0


if __name__ == "__main__":
    sys.exit(main())
