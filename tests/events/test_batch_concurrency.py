"""Batches side by side on PostgreSQL: several threads take in batches that share every
member (in different orders), with a budgeted and capped rule and refunds; none deadlocks,
each event is taken once, no budget or cap is overrun, and the ledger holds."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from typing import Any

import pytest
from psycopg import errors as pg_errors
from sqlalchemy import func, select

from jifen.clock import ManualClock
from jifen.db import uow as uow_module
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import JifenError
from jifen.events import service
from jifen.events.models import event_awards, events
from jifen.events.schemas import EventIn, EventResult
from jifen.members import service as members
from jifen.points import service as points
from jifen.rules.models import rule_budgets
from tests.conftest import START
from tests.events.test_batch import DAYS, LOGIN, programme, sequence
from tests.events.test_doors import REFS
from tests.factories import assert_ledger_sound

THREADS, BATCHES, SIZE = 4, 5, 40


def batches_of(thread: int) -> list[list[EventIn]]:
    """A thread's batches: orders, logins and check-ins of every member, and refunds of
    the thread's orders of earlier batches; each batch shuffled."""
    rng = random.Random(thread)
    made: list[list[EventIn]] = []
    orders: list[EventIn] = []
    for batch in range(BATCHES):
        steps = [
            (rng.choice(["order", "order", "login", "check"]), rng.randrange(len(REFS)),
             rng.randrange(DAYS), rng.randint(1, 3000))
            for _ in range(SIZE)
        ]  # fmt: skip
        chunk = [
            e.model_copy(update={"external_id": f"t{thread}b{batch}-{e.external_id}",
                                 "payload": _renamed(e, f"t{thread}b{batch}-")})
            for e in sequence(steps)
        ]  # fmt: skip
        for earlier in orders[-3:]:  # a few refunds of orders already taken in
            chunk.append(EventIn.model_validate({
                "source": "pos", "external_id": f"refund-{earlier.external_id}",
                "type": "order.refunded", "member_ref": earlier.member_ref,
                "occurred_at": START + timedelta(days=DAYS),
                "payload": {"order_id": earlier.payload["order_id"],
                            "lines": [{"sku": "T", "amount_fen": 100}]},
            }))  # fmt: skip
        orders += [e for e in chunk if e.type == "order.paid"]
        rng.shuffle(chunk)
        made.append(chunk)
    return made


def _renamed(event: EventIn, prefix: str) -> dict[str, Any]:
    payload = dict(event.payload)
    if "order_id" in payload:
        payload["order_id"] = prefix + str(payload["order_id"])
    return payload


def test_batches_sharing_every_member_wait_for_each_other_and_never_deadlock(
    pg: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = programme(pg)
    assert isinstance(pg.clock, ManualClock)
    pg.clock.set(START + timedelta(days=DAYS, hours=2))
    lost_races: list[str] = []
    real = uow_module.is_transient

    def noting(exc: BaseException) -> bool:  # every transient error Database.run retries
        transient = real(exc)
        if transient:
            lost_races.append(type(getattr(exc, "orig", exc)).__name__)
        return transient

    monkeypatch.setattr(uow_module, "is_transient", noting)
    outcomes: list[EventResult | Exception] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> None:
        try:
            start.wait()
            for chunk in batches_of(thread):
                got = pg.run(lambda uow, c=chunk: service.ingest_many(
                    uow, program_id=program.id, events=c))  # fmt: skip
                with lock:
                    outcomes.extend(got)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert pg_errors.DeadlockDetected.__name__ not in lost_races, lost_races
    unexpected = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, JifenError)]
    assert unexpected == []
    taken = [o for o in outcomes if isinstance(o, EventResult)]
    assert len(taken) > THREADS * BATCHES * SIZE // 2  # most went in: the test means something

    def read(uow: UnitOfWork) -> dict[str, Any]:
        stored = uow.conn.execute(
            select(func.count(), func.count(func.distinct(events.c.external_id))).where(
                events.c.program_id == program.id
            )
        ).one()
        login = uow.conn.execute(
            select(event_awards.c.member_id, func.sum(event_awards.c.points))
            .where(event_awards.c.program_id == program.id, event_awards.c.rule_code == "login")
            .group_by(event_awards.c.member_id)
        ).all()
        budget = uow.conn.execute(
            select(rule_budgets.c.spent).where(
                rule_budgets.c.program_id == program.id, rule_budgets.c.rule_code == "login"
            )
        ).scalar_one_or_none()
        summaries = [
            points.balance(uow, member_id=members.find_member(
                uow, program_id=program.id, external_ref=ref).id)
            for ref in REFS
        ]  # fmt: skip
        return {"stored": tuple(stored), "login": dict(login), "budget": budget,
                "balances": summaries}  # fmt: skip

    found = pg.run(read, read_only=True)
    assert found["stored"] == (len(taken), len(taken))  # each taken event stored once
    assert LOGIN.caps.budget is not None
    assert sum(found["login"].values()) == (found["budget"] or 0) <= LOGIN.caps.budget
    assert all(given <= 40 for given in found["login"].values())  # the lifetime cap
    assert sum(s.balance for s in found["balances"]) == sum(o.points for o in taken)
    assert all(s.debt == 0 for s in found["balances"])
    assert_ledger_sound(pg, program.id)
