"""Group commit: use cases of one key queued behind a leader share its next transaction, and
each caller is answered as if its use case had run alone."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, String, Table, UniqueConstraint, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError

from jifen.db.combine import CombinerStats
from jifen.db.prepared import driver, execute, in_transaction
from jifen.db.uow import Database, LostRace, UnitOfWork
from tests.db.scratch import scratch_table

KEY = ("scratch", 1)


@pytest.fixture
def scratch(db: Database) -> Iterator[Table]:
    with scratch_table(db, "combine", Column("code", String(40), nullable=False)) as table:
        yield table


def _insert(table: Table, code: str) -> Callable[[UnitOfWork], str]:
    def fn(uow: UnitOfWork) -> str:
        uow.conn.execute(table.insert().values(code=code))
        return code

    return fn


def _insert_then_fail(table: Table, code: str) -> Callable[[UnitOfWork], str]:
    def fn(uow: UnitOfWork) -> str:
        uow.conn.execute(table.insert().values(code=code))
        raise ValueError(f"{code} changed its mind")

    return fn


def _insert_alone(table: Table, code: str) -> Callable[[UnitOfWork], str]:
    """PostgreSQL: a use case whose one statement may commit by itself (``uow.alone``), as
    a points operation run alone does."""

    def fn(uow: UnitOfWork) -> str:
        sql = f"INSERT INTO {table.name} (code) VALUES (%(code)s)"
        execute(uow.conn, sql, {"code": code}, alone=uow.alone)
        return code

    return fn


def _codes(db: Database, table: Table) -> list[str]:
    return db.run(
        lambda uow: sorted(uow.conn.execute(select(table.c.code)).scalars()), read_only=True
    )


def _stats(db: Database) -> CombinerStats:
    stats = db.combiner.stats
    return CombinerStats(stats.transactions, stats.functions)


def _since(db: Database, before: CombinerStats) -> tuple[int, int]:
    """(Transactions committed, functions they carried) since ``before``."""
    after = db.combiner.stats
    return after.transactions - before.transactions, after.functions - before.functions


def behind_a_leader(
    db: Database,
    table: Table,
    *fns: Callable[[UnitOfWork], Any],
    lead_fails: bool = False,
    keys: Sequence[Hashable] = (),
    alone: bool = False,
) -> list[Any]:
    """Run a leader that waits until ``fns`` have queued behind it, in their order, each
    from a thread of its own, then writes ``lead`` (and fails, if ``lead_fails``); the
    leader's answer or error, then each one's. The leader runs with ``KEY``, the others
    with ``keys`` (by default ``KEY`` too): each must queue where ``KEY``'s calls do.
    ``alone`` (PostgreSQL): every call is run as one points operation is, and the leader
    that does not fail writes as :func:`_insert_alone` does."""
    release, started = threading.Event(), threading.Event()
    outcomes: list[Any] = [None] * (len(fns) + 1)

    def lead(uow: UnitOfWork) -> str:
        started.set()
        assert release.wait(30)
        if alone and not lead_fails:
            return _insert_alone(table, "lead")(uow)
        return (_insert_then_fail if lead_fails else _insert)(table, "lead")(uow)

    def call(i: int, fn: Callable[[UnitOfWork], Any]) -> None:
        try:
            outcomes[i] = db.run(fn, combine=keys[i - 1] if keys and i else KEY, alone=alone)
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=call, args=(0, lead))]
    threads[0].start()
    assert started.wait(30)
    for i, fn in enumerate(fns, start=1):
        threads.append(threading.Thread(target=call, args=(i, fn)))
        threads[-1].start()
        deadline = time.monotonic() + 30
        while db.combiner.waiting(KEY) < i:  # queued in this order
            assert time.monotonic() < deadline
            time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(30)
    assert db.combiner.waiting(KEY) == 0
    return outcomes


def test_queued_use_cases_share_one_commit_and_each_gets_its_own_answer(
    db: Database, scratch: Table
) -> None:
    before = _stats(db)
    outcomes = behind_a_leader(db, scratch, *(_insert(scratch, f"q{i}") for i in range(3)))
    assert outcomes == ["lead", "q0", "q1", "q2"]
    assert _codes(db, scratch) == ["lead", "q0", "q1", "q2"]
    # the three that queued while the leader's transaction ran joined it
    assert _since(db, before) == (1, 4)


def test_a_use_case_that_fails_in_a_batch_is_told_so_and_the_others_run_again_alone(
    db: Database, scratch: Table
) -> None:
    before = _stats(db)
    outcomes = behind_a_leader(
        db, scratch, _insert(scratch, "a"), _insert_then_fail(scratch, "b"), _insert(scratch, "c")
    )
    assert outcomes[:2] == ["lead", "a"] and outcomes[3] == "c"
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "b changed its mind"
    assert _codes(db, scratch) == ["a", "c", "lead"]
    # no savepoints: "lead", "a" and "b" ran again by themselves, "c" led the next batch
    assert _since(db, before) == (1, 1)


def test_on_sqlite_use_cases_of_every_key_share_the_one_writers_commit(
    sqlite_database: Database,
) -> None:
    db = sqlite_database
    with scratch_table(db, "combine", Column("code", String(40), nullable=False)) as table:
        before = _stats(db)
        outcomes = behind_a_leader(
            db, table, *(_insert(table, f"m{i}") for i in range(3)),
            keys=[("points", i) for i in range(3)],
        )  # fmt: skip
        assert outcomes == ["lead", "m0", "m1", "m2"]
        assert _codes(db, table) == ["lead", "m0", "m1", "m2"]
        assert _since(db, before) == (1, 4)


def test_when_the_first_use_case_of_a_transaction_fails_the_rest_go_on_in_a_new_one(
    db: Database, scratch: Table
) -> None:
    before = _stats(db)
    outcomes = behind_a_leader(
        db, scratch, _insert(scratch, "a"), _insert(scratch, "b"), lead_fails=True
    )
    assert isinstance(outcomes[0], ValueError)
    assert outcomes[1:] == ["a", "b"]
    assert _codes(db, scratch) == ["a", "b"]
    assert _since(db, before) == (1, 2)


def test_use_cases_of_a_batch_see_the_writes_of_those_before_them(
    db: Database, scratch: Table
) -> None:
    def count_then_insert(code: str) -> Callable[[UnitOfWork], int]:
        def fn(uow: UnitOfWork) -> int:
            seen = uow.conn.execute(select(func.count()).select_from(scratch)).scalar_one()
            uow.conn.execute(scratch.insert().values(code=code))
            return int(seen)

        return fn

    outcomes = behind_a_leader(db, scratch, *(count_then_insert(f"q{i}") for i in range(4)))
    assert outcomes[1:] == [1, 2, 3, 4]


def test_a_lost_race_runs_again_by_itself_in_its_callers_thread(
    db: Database, scratch: Table
) -> None:
    runs: list[int] = []

    def loses_once(uow: UnitOfWork) -> str:
        runs.append(threading.get_ident())
        if len(runs) == 1:
            uow.conn.execute(scratch.insert().values(code="lost"))
            raise LostRace
        return _insert(scratch, "won")(uow)

    outcomes = behind_a_leader(
        db, scratch, _insert(scratch, "a"), loses_once, _insert(scratch, "b")
    )
    assert outcomes == ["lead", "a", "won", "b"]
    assert _codes(db, scratch) == ["a", "b", "lead", "won"]
    # first run in the leader's thread, then in its caller's
    assert len(runs) == 2 and runs[0] != runs[1]


def test_a_commit_that_fails_fails_every_use_case_in_it(pg: Database) -> None:
    # a unique constraint checked at commit: two queued inserts of one code pass their
    # statements and break the commit of the transaction they share
    deferred = UniqueConstraint("code", deferrable=True, initially="DEFERRED")
    with scratch_table(pg, "combine", Column("code", String(40)), deferred) as table:
        outcomes = behind_a_leader(
            pg, table, _insert(table, "x"), _insert(table, "x"), _insert(table, "y")
        )
        assert all(isinstance(o, IntegrityError) for o in outcomes)
        assert _codes(pg, table) == []


def _loses_once(table: Table, code: str) -> Callable[[UnitOfWork], str]:
    """Writes, then loses a race the first time it runs; writes ``code`` the next."""
    runs: list[int] = []

    def fn(uow: UnitOfWork) -> str:
        runs.append(1)
        if len(runs) == 1:
            uow.conn.execute(table.insert().values(code=f"{code}-lost"))
            raise LostRace
        return _insert(table, code)(uow)

    return fn


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(st.sampled_from(["ok", "fails", "loses"]), min_size=1, max_size=7),
    lead_fails=st.booleans(),
)
def test_a_batch_ends_as_its_use_cases_run_one_by_one_would(
    db: Database, scratch: Table, kinds: list[str], lead_fails: bool
) -> None:
    db.run(lambda uow: uow.conn.execute(scratch.delete()))
    makers = {"ok": _insert, "fails": _insert_then_fail, "loses": _loses_once}
    fns = [makers[kind](scratch, f"q{i}") for i, kind in enumerate(kinds)]
    outcomes = behind_a_leader(db, scratch, *fns, lead_fails=lead_fails)
    # each caller's answer is what its use case gives when run by itself
    expected: list[Any] = [ValueError if lead_fails else "lead"]
    expected += [ValueError if kind == "fails" else f"q{i}" for i, kind in enumerate(kinds)]
    assert [type(o) if isinstance(o, Exception) else o for o in outcomes] == expected
    # and what is stored is what those answers say was written, nothing of the rest
    assert _codes(db, scratch) == sorted(o for o in outcomes if isinstance(o, str))


def test_a_transaction_that_cannot_begin_leaves_each_use_case_to_run_by_itself(
    db: Database, scratch: Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the leader's connection fails (a pool exhausted, a database gone for a moment) once
    # a use case has queued behind it: nothing was committed, so the leader's use case
    # runs by itself and the queued one is led on, none left waiting
    engine = db.engine
    connect = engine.connect
    connecting = threading.Event()

    def fails_once_one_has_queued() -> Any:
        if connecting.is_set():
            return connect()
        connecting.set()
        deadline = time.monotonic() + 30
        while db.combiner.waiting(KEY) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        raise TimeoutError("no connection in time")

    monkeypatch.setattr(engine, "connect", fails_once_one_has_queued)
    outcomes: dict[str, Any] = {}

    def call(code: str) -> None:
        outcomes[code] = db.run(_insert(scratch, code), combine=KEY)

    threads = [threading.Thread(target=call, args=("lead",))]
    threads[0].start()
    assert connecting.wait(30)
    threads.append(threading.Thread(target=call, args=("q",)))
    threads[1].start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert outcomes == {"lead": "lead", "q": "q"}
    assert _codes(db, scratch) == ["lead", "q"]
    assert db.combiner.waiting(KEY) == 0


def test_a_use_case_that_swallows_its_statements_error_does_not_take_the_batch_with_it(
    pg: Database,
) -> None:
    # PostgreSQL aborts a transaction at a failed statement: a use case that catches the
    # error and returns would have the whole batch's commit silently roll back
    def swallow(uow: UnitOfWork) -> None:
        with contextlib.suppress(DBAPIError):
            uow.conn.execute(select(func.no_such_function()))

    _runs_alone_once_its_transaction_ended(pg, swallow)


def test_on_sqlite_a_use_case_whose_transaction_the_database_ended_runs_by_itself(
    sqlite_database: Database,
) -> None:
    # SQLite rolls a transaction back by itself at some errors (a full disk); the batch's
    # later statements would then each commit on their own
    _runs_alone_once_its_transaction_ended(
        sqlite_database, lambda uow: driver(uow.conn).execute("ROLLBACK")
    )


def _runs_alone_once_its_transaction_ended(db: Database, ends: Callable[[UnitOfWork], Any]) -> None:
    """A use case that writes, then has its transaction ended by ``ends`` and returns, in a
    batch between two others: it runs again by itself, and only its own write is lost."""
    with scratch_table(db, "combine", Column("code", String(40), nullable=False)) as table:

        def ended(uow: UnitOfWork) -> str:
            uow.conn.execute(table.insert().values(code="ended"))
            ends(uow)
            return "ended"

        outcomes = behind_a_leader(db, table, _insert(table, "a"), ended, _insert(table, "b"))
        assert outcomes == ["lead", "a", "ended", "b"]
        # its own write is lost, as when it runs by itself; the others' are kept
        assert _codes(db, table) == ["a", "b", "lead"]


def test_a_use_case_nested_in_a_batched_one_runs_by_itself_instead_of_waiting_for_ever(
    pg: Database,
) -> None:
    # (SQLite's one writer would refuse the nested transaction after its busy timeout)
    with scratch_table(pg, "combine", Column("code", String(40), nullable=False)) as table:

        def nests(uow: UnitOfWork) -> str:
            inner = pg.run(_insert(table, "inner"), combine=KEY)
            return _insert(table, f"outer-{inner}")(uow)

        outcomes = behind_a_leader(pg, table, _insert(table, "a"), nests)
        assert outcomes == ["lead", "a", "outer-inner"]
        assert _codes(pg, table) == ["a", "inner", "lead", "outer-inner"]


def test_a_caller_interrupted_while_it_waits_leaves_the_queue_and_its_use_case_never_runs(
    db: Database, scratch: Table
) -> None:
    # Ctrl-C reaches the main thread, here the one waiting behind a leader
    release, started = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def lead(uow: UnitOfWork) -> str:
        started.set()
        assert release.wait(30)
        return _insert(scratch, "lead")(uow)

    def interrupt_once_queued() -> None:
        deadline = time.monotonic() + 30
        while db.combiner.waiting(KEY) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    leader = threading.Thread(target=lambda: outcome.append(db.run(lead, combine=KEY)))
    leader.start()
    assert started.wait(30)
    interrupter = threading.Thread(target=interrupt_once_queued)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        db.run(_insert(scratch, "interrupted"), combine=KEY)
    interrupter.join(30)
    assert db.combiner.waiting(KEY) == 0
    release.set()
    leader.join(30)
    assert outcome == ["lead"]
    assert _codes(db, scratch) == ["lead"]
    # the key is free again: the next caller leads at once
    assert db.run(_insert(scratch, "after"), combine=KEY) == "after"


def test_alone_the_leader_commits_by_itself_and_those_queued_share_a_commit(
    pg: Database,
) -> None:
    with scratch_table(pg, "combine", Column("code", String(40))) as table:
        before = _stats(pg)
        seen: list[bool] = []

        def third(uow: UnitOfWork) -> str:
            code = _insert_alone(table, "q2")(uow)
            seen.append(in_transaction(uow.conn))
            return code

        fns = [_insert_alone(table, "q0"), _insert_alone(table, "q1"), third]
        outcomes = behind_a_leader(pg, table, *fns, alone=True)
        assert outcomes == ["lead", "q0", "q1", "q2"]
        # the leader, with nobody queued as it began, committed by itself; the three that
        # had queued shared the next transaction (the last, with nobody behind it, too: a
        # transaction was open), and its one commit
        assert _since(pg, before) == (2, 4)
        assert seen == [True]
        assert _codes(pg, table) == ["lead", "q0", "q1", "q2"]


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(st.sampled_from(["ok", "fails", "loses", "alone"]), min_size=1, max_size=7),
    lead_fails=st.booleans(),
)
def test_alone_a_batch_ends_as_its_use_cases_run_one_by_one_would(
    pg: Database, kinds: list[str], lead_fails: bool
) -> None:
    with scratch_table(pg, "combine", Column("code", String(40))) as table:
        makers: dict[str, Callable[[Table, str], Callable[[UnitOfWork], str]]] = {
            "ok": _insert, "fails": _insert_then_fail, "loses": _loses_once,
            "alone": _insert_alone,
        }  # fmt: skip
        fns = [makers[kind](table, f"q{i}") for i, kind in enumerate(kinds)]
        outcomes = behind_a_leader(pg, table, *fns, lead_fails=lead_fails, alone=True)
        # each caller's answer is what its use case gives when run by itself
        expected: list[Any] = [ValueError if lead_fails else "lead"]
        expected += [ValueError if kind == "fails" else f"q{i}" for i, kind in enumerate(kinds)]
        assert [type(o) if isinstance(o, Exception) else o for o in outcomes] == expected
        # and what is stored is what those answers say was written, nothing of the rest
        assert _codes(pg, table) == sorted(o for o in outcomes if isinstance(o, str))
