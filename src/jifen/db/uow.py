"""The unit of work: one transaction per use case, opened and committed by the caller.

Services take a :class:`UnitOfWork` and never commit; whoever opened it (an HTTP request,
a CLI command, a job step) commits once, so several services can share one transaction.
:meth:`Database.run` is the usual way in: it runs a function in a fresh unit of work and
runs it again from the start when the database says the transaction lost a race
(deadlock, serialization failure, a concurrent insert of the same idempotency key, SQLite
busy) — the function must therefore do nothing outside the transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from jifen.clock import Clock, SystemClock
from jifen.db.combine import Combiner
from jifen.db.engine import READ_ONLY, make_engine

T = TypeVar("T")

# PostgreSQL SQLSTATEs that mean "try the whole transaction again".
_RETRY_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_UNIQUE_VIOLATION = "23505"
# A unique violation is transient only on the keys that concurrent twins race for: running
# again finds the winner's row and answers as a replay.
RACE_CONSTRAINTS = (
    "uq_postings_program_id",
    "postings.program_id, postings.idempotency_key",
    "uq_idempotency_records_scope_key",  # the API's stored answers
    "idempotency_records.scope, idempotency_records.key",
    "uq_events_program_id_source_external_id",  # an event sent twice at once
    "events.program_id, events.source, events.external_id",
    "uq_events_once",  # one order (or birthday, ...) sent twice at once under two event ids
    "events.program_id, events.type, events.subject",
    "uq_vouchers_program_id_code",  # a new voucher's random code clashed: draw another
    "vouchers.program_id, vouchers.code",
    "uq_rewards_program_id_code",  # one reward added twice at once: the loser is told (409)
    "rewards.program_id, rewards.code",
    "uq_reward_orders_program_id_idempotency_key",  # twins of one redemption
    "reward_orders.program_id, reward_orders.idempotency_key",
    "uq_reward_orders_program_id_payment_ref",  # one payment sent for two redemptions at once
    "reward_orders.program_id, reward_orders.payment_ref",
    # Two tills registering one customer at once (its reference or its phone), one phone or
    # ID number bound to two members at once: run again, the loser's check refuses it as
    # a duplicate (409), as it refuses one sent after.
    "uq_members_program_id_external_ref",
    "members.program_id, members.external_ref",
    "uq_members_program_id_phone_hash",
    "members.program_id, members.phone_hash",
    "uq_members_program_id_id_number_hash",
    "members.program_id, members.id_number_hash",
)


class LostRace(Exception):
    """Raised by a use case whose last conditional write found that a concurrent
    transaction took what it had checked was there (the last unit of a stock): the whole
    transaction runs again, and its checks, made before any write, refuse it cleanly."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means the transaction lost a race and may simply be run again."""
    if isinstance(exc, LostRace):
        return True
    # SQLAlchemy wraps driver errors; the ledger's hot path calls the driver directly.
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if not isinstance(orig, psycopg.Error | sqlite3.Error):
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _RETRY_SQLSTATES:
        return True
    text = str(orig)
    if sqlstate == _UNIQUE_VIOLATION or "UNIQUE constraint failed" in text:
        return any(name in text for name in RACE_CONSTRAINTS)
    return "database is locked" in text  # SQLite busy beyond its timeout


@dataclass
class UnitOfWork:
    """One open transaction and the clock its use case reads."""

    conn: Connection
    clock: Clock
    cache: dict[str, Any] = field(default_factory=dict)
    """Shared by every unit of work of the database: only what never changes once made."""
    local: dict[str, Any] = field(default_factory=dict)
    """This transaction's own: what it read and may read again (a batch of events reads the
    rules once); a use case that changes such a thing drops its entry."""
    alone: bool = False
    """The use case is one points operation and nothing else (its caller said so:
    ``Database.run(fn, alone=True)``). On PostgreSQL, the operation's one statement, when it
    comes first, then runs as a transaction of its own (:func:`jifen.db.prepared.execute`):
    one round trip instead of three. An operation that finds it must do more than that
    statement wrote nothing with it, and takes its lock again in a transaction."""

    @property
    def dialect(self) -> str:
        return self.conn.dialect.name

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A savepoint: when the block raises, what it wrote is undone and so is what it
        left in ``local`` (what it read of its own writes, a lock it handed on: a row lock
        taken inside a savepoint is released by its rollback)."""
        saved = dict(self.local)
        try:
            with self.conn.begin_nested():
                yield
        except BaseException:
            self.local.clear()
            self.local.update(saved)
            raise


class Database:
    """An engine and a clock: where units of work come from."""

    def __init__(self, url: str, *, clock: Clock | None = None, pool_size: int = 20) -> None:
        self.engine: Engine = make_engine(url, pool_size=pool_size)
        self.clock: Clock = clock or SystemClock()
        # Ids of programmes' system accounts never change once created; cached per database.
        self.cache: dict[str, Any] = {}
        # A read-only unit of work on PostgreSQL runs each statement in its own snapshot, as
        # READ COMMITTED would inside a transaction, without the BEGIN and COMMIT round
        # trips; SQLite begins a deferred transaction (one snapshot for the whole read).
        self._read_only: dict[str, Any] = {READ_ONLY: True}
        if self.engine.dialect.name == "postgresql":
            self._read_only["isolation_level"] = "AUTOCOMMIT"
        self.combiner = Combiner(self)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self, *, read_only: bool = False, alone: bool = False) -> Iterator[UnitOfWork]:
        """Open a unit of work; it commits when the block ends and rolls back on error
        (``alone``: see :attr:`UnitOfWork.alone`)."""
        with self.engine.connect() as conn:
            if read_only:
                conn = conn.execution_options(**self._read_only)
            with conn.begin():
                yield UnitOfWork(conn, self.clock, self.cache, alone=alone)

    def run(
        self,
        fn: Callable[[UnitOfWork], T],
        *,
        read_only: bool = False,
        attempts: int = 50,
        combine: Hashable | None = None,
        alone: bool = False,
    ) -> T:
        """Run ``fn`` in a unit of work and commit, retrying lost races from the start.

        ``combine``: the one row ``fn`` locks that others are likely to wait on (a member's
        points account: ``points.account_key(7)``): use cases of one key that arrive
        together in this process share a transaction and its commit (see
        :mod:`jifen.db.combine`), each answered as if it had run alone.

        ``alone``: ``fn`` is one points operation (``points.earn``, ``points.spend``) and
        writes nothing else, so its one statement may commit by itself (see
        :attr:`UnitOfWork.alone`). A function that writes anything besides must not say so:
        its other writes would not be in that statement's transaction."""
        if combine is not None and not read_only:
            combined, result = self.combiner.run(combine, fn, self.clock, alone=alone)
            if combined:
                return cast(T, result)
        try:  # the common case, without the retry machinery's cost
            with self.transaction(read_only=read_only, alone=alone) as uow:
                return fn(uow)
        except Exception as exc:
            if not is_transient(exc):
                raise
        for attempt in Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(attempts - 1),
            wait=wait_random_exponential(multiplier=0.002, max=0.25),
            reraise=True,
        ):
            with attempt, self.transaction(read_only=read_only, alone=alone) as uow:
                return fn(uow)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def with_clock(self, clock: Clock) -> Database:
        """The same database (engine, caches) read at another clock: a job run for a given
        moment."""
        other = object.__new__(Database)
        other.__dict__.update(self.__dict__)
        other.clock = clock
        return other

    def dispose(self) -> None:
        self.engine.dispose()
