"""Events in, points out: rule evaluation cost and ingestion throughput through each door.

What it measures, in order, on the PostgreSQL given by ``--database-url``:

1. ``eval_us``: the pure evaluation of one ``order.paid`` event (three lines, a 金卡
   member with a birthday and caps) against the demo's rule pack (20-odd rules), in µs per
   event. The limit is the 50 µs target.
2. The ceiling: the same number of events written as rows by batched SQL (1,000 per
   transaction, ``executemany``) with no rules, no ledger and no checks: what storing
   events costs on this machine. Every door's ratio is against it.
3. ``ingest_batch_api``: ``POST …/events/batch`` (1,000 events a request) from
   ``--clients`` threads against ``jifen serve --workers 2``, for ``--seconds``.
4. ``ingest_csv``: ``jifen import orders`` of ``--scale`` orders as a separate process;
   ``import_peak_mb`` is that process's peak resident memory (the limit: 500 MB).
5. ``ingest_jetstream``: ``--scale`` events published to JetStream, then two ``jifen
   worker`` processes until every event is stored.

Run: ``python bench/ingest.py [--database-url URL] [--seconds 10] [--scale 5000]
[--clients 4] [--nats-url nats://127.0.0.1:4222]``. It works in a schema of its own
(``bench_ingest``) and a stream of its own, and drops both at the end. Targets from the
issue: eval ≤ 50 µs; ≥ 20,000 events/s for the batched doors and ≥ 0.3 of the ceiling; a
1,000,000-row import under 500 MB (``--scale 500000``: two rows an order; memory is bounded by
the batch, not the file).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx2 as httpx
import nats
from sqlalchemy import create_engine, func, select, text

from api import served
from jifen.auth import service as auth
from jifen.db.migrate import upgrade
from jifen.db.uow import Database, UnitOfWork
from jifen.events.models import events
from jifen.events.schemas import EventIn
from jifen.events.stream import publish_sync
from jifen.members import service as members
from jifen.programs import service as programs
from jifen.rules import core
from jifen.rules import service as rules
from jifen.rules.schemas import RulePack
from jifen.settings import get_settings, normalise_database_url
from jifen.tiers import service as tiers
from ledger import admin_sql, result, say, vacuum_analyze, with_schema

SCHEMA = "bench_ingest"
EVAL_TARGET_US = 50.0
MEMORY_TARGET_MB = 500.0
CATEGORIES = ("日用品", "食品", "服饰", "家电")
HIGH_LIMIT = "100000000/minute"


def demo_pack() -> RulePack:
    text_ = resources.files("jifen.demo").joinpath("rules.json").read_text(encoding="utf-8")
    return RulePack.model_validate(json.loads(text_))


# --------------------------------------------------------------------------- evaluation


def eval_us(iterations: int = 20_000) -> float:
    """µs per evaluation of an order against the demo's rules, best of three rounds."""
    pack = demo_pack()
    rule_set = core.RuleSet(rules.compile_rule(spec) for spec in pack.rules)
    program = core.Program(ZoneInfo("Asia/Shanghai"), pack.caps or core.ProgramCaps())
    event = core.Event(
        key="pos:1",
        type="order.paid",
        occurred_at=datetime(2026, 6, 10, 4, 0, tzinfo=UTC),
        member_id=1,
        payload={"order_id": "1", "channel": "store", "store": "S1", "pickup": True},
        lines=(
            core.OrderLine("T1", "日用品", 2, 12_000),
            core.OrderLine("TV", "家电", 1, 250_000),
            core.OrderLine("F1", "食品", 3, 4_500),
        ),
    )
    facts = {
        1: core.Facts(
            member_id=1,
            tier="金卡",
            tags=frozenset({"vip"}),
            birthday=date(1990, 6, 2),
            counts={"order.paid": 3},
            usage=core.Usage(day=200, month=1500),
        )
    }
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(iterations):
            core.evaluate(event, rule_set, program, facts)
        best = min(best, (time.perf_counter() - began) / iterations * 1e6)
    return best


# --------------------------------------------------------------------------- setup


def seed(url: str, members_count: int) -> tuple[str, int, str]:
    """A programme with the demo's rules, ``members_count`` members in four tiers, and an
    API key; the rules go live a day ago so that events of today meet them."""
    database = Database(url, pool_size=2)
    database.clock = _Shifted(timedelta(days=-1))
    try:
        upgrade(database.engine)
        code = f"bench-ingest-{int(time.time())}"

        def build(uow: UnitOfWork) -> tuple[int, str]:
            program = programs.create_program(uow, code=code, name=code)
            rules.load_pack(
                uow, program_id=program.id, pack=demo_pack(), actor="bench", activate=True
            )
            tier_codes = ["普通", "银卡", "金卡", "钻石"]
            for n in range(members_count):
                member = members.register_member(uow, program_id=program.id, external_ref=f"b{n}")
                tiers.set_member_tier(
                    uow,
                    program_id=program.id,
                    member_id=member.id,
                    tier=tier_codes[n % 4],
                    reason="bench",
                    set_by="bench",
                )
            key = auth.create_api_key(uow, program_id=program.id, name="bench", created_by="b")
            return program.id, key.token

        program_id, token = database.run(build)
        return code, program_id, token
    finally:
        database.dispose()


class _Shifted:
    def __init__(self, by: timedelta) -> None:
        self.by = by

    def now(self) -> datetime:
        return datetime.now(UTC) + self.by


def order_event(n: int, members_count: int, tag: str) -> dict[str, Any]:
    category = CATEGORIES[n % len(CATEGORIES)]
    return {
        "source": "bench",
        "external_id": f"{tag}-{n}",
        "type": "order.paid",
        "occurred_at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        "member_ref": f"b{n % members_count}",
        "payload": {
            "order_id": f"{tag}-{n}",
            "store": "S1",
            "lines": [
                {"sku": f"{category}-1", "category": category, "amount_fen": 5_000 + n % 97 * 100},
                {"sku": "T1", "category": "日用品", "amount_fen": 1_990},
            ],
        },
    }


def stored(url: str, program_id: int) -> int:
    engine = create_engine(normalise_database_url(url))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(events.c.program_id == program_id)
                ).scalar_one()
            )
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the ceiling


def ceiling(url: str, program_id: int, count: int) -> float:
    """Events/s when the same rows are written by batched SQL, 1,000 a transaction, with no
    rules, no ledger and no checks."""
    engine = create_engine(normalise_database_url(url))
    member_id = int(engine.connect().execute(text("SELECT min(id) FROM members")).scalar_one())
    rows = [
        {
            "program_id": program_id,
            "source": "ceiling",
            "external_id": f"c{n}",
            "type": "order.paid",
            "member_id": member_id,
            "occurred_at": datetime.now(UTC),
            "received_at": datetime.now(UTC),
            "payload": order_event(n, 1, "c")["payload"],
            "request_hash": "0" * 64,
            "subject": f"c{n}",
            "amount_fen": 6990,
            "points": 0,
        }
        for n in range(count)
    ]
    began = time.perf_counter()
    for start in range(0, count, 1000):
        with engine.begin() as conn:
            conn.execute(events.insert(), rows[start : start + 1000])
    seconds = time.perf_counter() - began
    with engine.begin() as conn:
        conn.execute(events.delete().where(events.c.source == "ceiling"))
    engine.dispose()
    return count / seconds


# --------------------------------------------------------------------------- doors


def batch_api(url: str, code: str, token: str, args: argparse.Namespace, data_dir: str) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    done = [0]
    errors: list[str] = []
    lock = threading.Lock()
    with served(url, 2, data_dir) as (base, _):
        end = time.perf_counter() + args.seconds

        def client(index: int) -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
                batch = 0
                while time.perf_counter() < end:
                    batch += 1
                    tag = f"api-{index}-{batch}"
                    # Each client its own members (tills of different shops), as far as
                    # there are members enough: batches that share members wait on them.
                    first = index * (args.members // args.clients)
                    made = [order_event(first + n, args.members, tag) for n in range(1000)]
                    body = {"events": made}
                    answer = http.post(
                        f"/v1/programs/{code}/events/batch",
                        json=body,
                        headers={"Idempotency-Key": tag},
                    )
                    with lock:
                        if answer.status_code != 200:
                            errors.append(f"{answer.status_code} {answer.text[:200]}")
                            return
                        done[0] += answer.json()["accepted"]

        began = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - began
    for error in errors[:3]:
        say(f"  error: {error}")
    return done[0] / seconds


def csv_import(url: str, code: str, args: argparse.Namespace, folder: Path) -> tuple[float, float]:
    """(events/s, peak MB) of ``jifen import orders`` as a process of its own."""
    path = folder / "orders.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["order_id", "member_ref", "occurred_at", "sku", "category", "amount_fen", "store"]
        )
        for n in range(args.scale):
            event = order_event(n, args.members, "csv")
            for line in event["payload"]["lines"]:
                writer.writerow(
                    [
                        f"csv-{n}",
                        event["member_ref"],
                        event["occurred_at"],
                        line["sku"],
                        line["category"],
                        line["amount_fen"],
                        "S1",
                    ]
                )
    command = [
        sys.executable,
        "-m",
        "jifen",
        "--database-url",
        url,
        "import",
        "orders",
        str(path),
        "--program",
        code,
        "--batch",
        "500",
    ]
    out, err = folder / "import.out", folder / "import.err"
    began = time.perf_counter()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        # This process's own peak (wait4), not the largest of every child so far (the API
        # server's processes are children too).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - began
    say(f"  {out.read_text().strip()}")
    if process.returncode != 0:
        say(f"  import exited {process.returncode}: {err.read_text().strip()[-300:]}")
    peak_mb = usage.ru_maxrss / 1024
    return args.scale / seconds, peak_mb


def jetstream(url: str, code: str, program_id: int, args: argparse.Namespace) -> float:
    tag = uuid.uuid4().hex[:8]
    names = {
        "JIFEN_NATS_URL": args.nats_url,
        "JIFEN_NATS_STREAM": f"BENCH_{tag}",
        "JIFEN_NATS_SUBJECT_PREFIX": f"bench{tag}.events",
        "JIFEN_NATS_DURABLE": f"bench-{tag}",
    }
    before = stored(url, program_id)
    published = [
        EventIn.model_validate(order_event(n, args.members, f"js{tag}")) for n in range(args.scale)
    ]
    publish_sync(
        args.nats_url,
        code,
        published,
        subject_prefix=names["JIFEN_NATS_SUBJECT_PREFIX"],
        stream=names["JIFEN_NATS_STREAM"],
    )
    env = {**os.environ, **names}
    command = [sys.executable, "-m", "jifen", "--database-url", url, "worker", "--batch", "200"]
    began = time.perf_counter()
    workers = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    try:
        while stored(url, program_id) - before < args.scale:
            if time.perf_counter() - began > 3600:
                raise RuntimeError("the workers did not finish in an hour")
            time.sleep(0.5)
        seconds = time.perf_counter() - began
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=60)
        asyncio.run(_drop_stream(args.nats_url, names["JIFEN_NATS_STREAM"]))
    return args.scale / seconds


async def _drop_stream(url: str, name: str) -> None:
    connection = await nats.connect(url)
    try:
        await connection.jetstream().delete_stream(name)
    finally:
        await connection.close()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seconds", type=float, default=10, help="length of the API measure")
    parser.add_argument("--scale", type=int, default=5000, help="events for CSV and JetStream")
    parser.add_argument(
        "--members", type=int, default=10_000, help="members the events are spread over"
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent batch clients")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    args = parser.parse_args(argv)
    os.environ.setdefault("JIFEN_SECRET_KEY", secrets.token_urlsafe(48))
    os.environ["JIFEN_RATE_LIMIT_IP"] = os.environ["JIFEN_RATE_LIMIT_KEY"] = HIGH_LIMIT
    get_settings.cache_clear()

    evaluation = eval_us()
    count = len(demo_pack().rules)
    say(f"evaluation: {evaluation:.1f} µs an order against the demo's {count} rules")
    url = with_schema(args.database_url, SCHEMA)
    admin_sql(args.database_url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    admin_sql(args.database_url, f"CREATE SCHEMA {SCHEMA}")
    try:
        say(f"seeding {args.members:,} members and the demo's rules ...")
        code, program_id, token = seed(url, args.members)
        vacuum_analyze(url)
        limit = ceiling(url, program_id, max(args.scale, 20_000))
        say(f"ceiling: {limit:,.0f} events/s written by batched SQL, no rules")
        # Between measures, standing for the autovacuum that is off on this server: the
        # ceiling leaves its rows dead, and each door adds thousands of events that the
        # planner's statistics of the empty tables know nothing of.
        vacuum_analyze(url)
        with tempfile.TemporaryDirectory() as folder:
            api_rate = batch_api(url, code, token, args, folder)
            say(f"batch API: {api_rate:,.0f} events/s ({args.clients} clients, 1,000 a request)")
            vacuum_analyze(url)
            csv_rate, peak = csv_import(url, code, args, Path(folder))
            say(
                f"CSV import: {csv_rate:,.0f} events/s, peak {peak:,.0f} MB ({args.scale:,} orders)"
            )
        vacuum_analyze(url)
        js_rate = jetstream(url, code, program_id, args)
        say(f"JetStream: {js_rate:,.0f} events/s (2 workers, {args.scale:,} events)")
    finally:
        admin_sql(args.database_url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    say(
        "targets: eval_us ratio <= 1; batched doors >= 20,000 events/s and ratio >= 0.3; "
        "import_peak_mb ratio <= 1"
    )
    say("")
    say(result("eval_us", evaluation, "us", EVAL_TARGET_US))
    say(result("ingest_batch_api", api_rate, "events/s", limit))
    say(result("ingest_csv", csv_rate, "events/s", limit))
    say(result("ingest_jetstream", js_rate, "events/s", limit))
    say(result("import_peak_mb", peak, "MB", MEMORY_TARGET_MB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
