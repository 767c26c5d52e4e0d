"""Events taken in together end as if each had been taken in alone, one after another:
the same results, refusals, balances, counters and a sound ledger, for any sequence of
orders, check-ins, capped and budgeted awards, refunds, repeats and bad events, in batches
of any size. A batch whose writing fails finds the event at fault and keeps the others."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import JifenError
from jifen.events import service
from jifen.events.models import member_counters
from jifen.events.schemas import EventIn, EventResult
from jifen.members import service as members
from jifen.points import service as points
from jifen.programs.schemas import ProgramRead
from jifen.rules import service as rules
from jifen.rules.schemas import RuleSpec
from tests.conftest import START
from tests.events.test_doors import REFS, shop
from tests.factories import assert_ledger_sound

DAYS = 40
LOGIN = RuleSpec.model_validate(
    {
        "code": "login",
        "name": "login",
        "event_types": ["member.logged_in"],
        "params": {"kind": "fixed", "points": 10},
        "caps": {"per_member": {"day": 15, "lifetime": 40}, "budget": 70},
    }
)

STEP = st.tuples(
    st.sampled_from(
        ["order", "order", "order", "check", "login", "refund", "again", "twin", "bad"]
    ),
    st.integers(0, len(REFS) - 1),
    st.integers(0, DAYS - 1),
    st.integers(1, 3000),
)


def programme(db: Database) -> ProgramRead:
    """The shop of the doors' test (the demo's rules, five members of four tiers), with a
    login award capped per member and by a budget."""
    program = shop(db)

    def go(uow: UnitOfWork) -> None:
        draft = rules.create_version(uow, program_id=program.id, spec=LOGIN, created_by="maker")
        rules.submit(uow, program_id=program.id, version_id=draft.id, approval_id=None)
        rules.approve(uow, program_id=program.id, version_id=draft.id, approved_by="checker")

    db.run(go)
    return program


def sequence(steps: list[tuple[str, int, int, int]]) -> list[EventIn]:
    """The events the steps describe; times go back and forth (late events)."""
    made: list[EventIn] = []
    orders: list[tuple[str, int]] = []
    for n, (what, who, day, yuan) in enumerate(steps):
        when = START + timedelta(days=day, hours=1 + n % 20)
        ref = REFS[who]
        body: dict[str, Any] = {"source": "pos", "external_id": f"e{n}", "member_ref": ref,
                                "occurred_at": when}  # fmt: skip
        if what == "again" and made:
            made.append(made[yuan % len(made)])
            continue
        if what == "twin" and orders:
            order_id, _ = orders[yuan % len(orders)]
            body |= {"type": "order.paid", "payload": {"order_id": order_id, "lines": [
                {"sku": "T", "category": "日用品", "amount_fen": 100}]}}  # fmt: skip
        elif what in ("order", "again", "twin"):
            orders.append((f"o{n}", yuan))
            body |= {"type": "order.paid", "payload": {"order_id": f"o{n}", "lines": [
                {"sku": "T", "category": "日用品", "amount_fen": yuan * 100},
                {"sku": "TV", "category": "家电", "amount_fen": yuan * 30}]}}  # fmt: skip
        elif what == "check":
            body |= {"type": "member.checked_in", "payload": {}}
        elif what == "login":
            body |= {"type": "member.logged_in", "payload": {}}
        elif what == "refund":
            order_id, _ = orders[yuan % len(orders)] if orders else ("none", 0)
            body |= {"type": "order.refunded", "occurred_at": START + timedelta(days=DAYS),
                     "payload": {"order_id": order_id,
                                 "lines": [{"sku": "T", "amount_fen": yuan * 20}]}}  # fmt: skip
        else:  # bad: a member nobody registered
            body |= {"type": "member.checked_in", "member_ref": "nobody", "payload": {}}
        made.append(EventIn.model_validate(body))
    return made


def summary(outcome: EventResult | Exception) -> tuple[Any, ...]:
    if isinstance(outcome, JifenError):
        return ("refused", outcome.code, outcome.message("en"))
    assert isinstance(outcome, EventResult), outcome
    awards = sorted((a.rule, a.kind, a.points, a.wanted, a.cap, a.held) for a in outcome.awards)
    return ("ok", outcome.points, tuple(awards), tuple(map(str, outcome.skipped)))


def state(db: Database, program_id: int) -> dict[str, Any]:
    def read(uow: UnitOfWork) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for ref in REFS:
            member = members.find_member(uow, program_id=program_id, external_ref=ref)
            s = points.balance(uow, member_id=member.id)
            counters = uow.conn.execute(
                select(member_counters.c.event_type, member_counters.c.seen,
                       member_counters.c.streak_day, member_counters.c.streak_length)
                .where(member_counters.c.member_id == member.id)
                .order_by(member_counters.c.event_type)
            ).all()  # fmt: skip
            found[ref] = (s.balance, s.pending, s.debt, [tuple(c) for c in counters])
        return found

    return db.run(read, read_only=True)


def one_by_one(db: Database, program_id: int, made: list[EventIn]) -> list[tuple[Any, ...]]:
    answers = []
    for event in made:
        try:
            result = db.run(
                lambda uow, e=event: service.ingest(uow, program_id=program_id, event=e)
            )
            answers.append(summary(result))
        except JifenError as exc:
            answers.append(summary(exc))
    return answers


def in_batches(
    db: Database, program_id: int, made: list[EventIn], size: int
) -> list[tuple[Any, ...]]:
    answers = []
    for start in range(0, len(made), size):
        chunk = made[start : start + size]
        outcomes = db.run(
            lambda uow, c=chunk: service.ingest_many(uow, program_id=program_id, events=c)
        )
        answers += [summary(o) for o in outcomes]
    return answers


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(STEP, min_size=1, max_size=60), size=st.integers(1, 60))
def test_a_batch_ends_as_the_events_one_by_one(
    db: Database, steps: list[tuple[str, int, int, int]], size: int
) -> None:
    db.clock = ManualClock(START)  # each example begins at the start, its rules live from there
    made = sequence(steps)
    alone, together = programme(db), programme(db)
    assert isinstance(db.clock, ManualClock)
    db.clock.set(START + timedelta(days=DAYS, hours=2))
    expected = one_by_one(db, alone.id, made)
    got = in_batches(db, together.id, made, size)
    assert got == expected
    assert state(db, together.id) == state(db, alone.id)
    assert_ledger_sound(db, together.id)
    # sent again, every event taken in answers as before and nothing changes
    before = state(db, together.id)
    taken = [e for e, answer in zip(made, expected, strict=True) if answer[0] == "ok"]
    again = db.run(lambda uow: service.ingest_many(uow, program_id=together.id, events=taken))
    assert [summary(a) for a in again] == [answer for answer in expected if answer[0] == "ok"]
    assert all(isinstance(a, EventResult) and a.replayed for a in again)
    assert state(db, together.id) == before


def test_a_batch_whose_writing_fails_keeps_the_events_not_at_fault(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    program, alone = programme(db), programme(db)
    assert isinstance(db.clock, ManualClock)
    db.clock.set(START + timedelta(days=DAYS, hours=2))
    made = sequence([("order", n % len(REFS), n, 100 + n) for n in range(12)])
    real = points.earn_many
    d3 = db.run(lambda uow: members.find_member(uow, program_id=program.id, external_ref="d3").id)

    def broken_for_d3(uow: UnitOfWork, earnings: list[points.Earning]) -> list[int]:
        if any(e.member_id == d3 for e in earnings):
            raise RuntimeError("a fault in writing d3's points")
        return real(uow, earnings)

    monkeypatch.setattr(points, "earn_many", broken_for_d3)
    outcomes = db.run(lambda uow: service.ingest_many(uow, program_id=program.id, events=made))
    faulty = [i for i, o in enumerate(outcomes) if isinstance(o, Exception)]
    assert faulty == [i for i, e in enumerate(made) if e.member_ref == "d3"]
    assert all("d3" in str(outcomes[i]) for i in faulty)
    monkeypatch.undo()
    # the others went in whole; d3's orders, sent again, go in now and the rest replay
    again = db.run(lambda uow: service.ingest_many(uow, program_id=program.id, events=made))
    assert [isinstance(o, EventResult) and not o.replayed for o in again] == [
        i in faulty for i in range(len(made))
    ]
    assert all(o.points > 0 for o in again if isinstance(o, EventResult))
    assert one_by_one(db, alone.id, made) == [summary(o) for o in again]
    assert state(db, program.id) == state(db, alone.id)
    assert_ledger_sound(db, program.id)
