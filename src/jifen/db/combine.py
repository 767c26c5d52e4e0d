"""Group commit within a process: use cases on one key that arrive together share a commit.

Every write to one member's points account takes the account's row lock and holds it until
its commit is on the disk: writers of one busy account (a company's pooled account, a
member's till and app at once) queue behind each other, and each pays its own COMMIT round
trip and flush while the others wait, where writes to different accounts share flushes
(PostgreSQL's own group commit).

:class:`Combiner` lets such writers share the wait and the commit. A use case run with a
key (``Database.run(fn, combine=key)``) either finds no other use case of that key at work
in this process and leads, or queues behind the one that does. A leader opens a
transaction and runs its function, then, in the same transaction, one after another, the
functions of its key that queued while it waited for its lock or ran (up to ``MOST``), and
commits them together; whoever queued after that leads next. Every caller gets its own
function's answer or error only once that commit is done, exactly as if it had run alone:

- a function that raises when it runs first has the transaction rolled back, and its
  caller gets the error; the next leader takes the rest;
- a function after others whose writes the transaction holds that raises, that lost a
  race (deadlock, a twin's key, :class:`~jifen.db.uow.LostRace`) or that caught an error of
  its own statement (the database has then ended the transaction) has the whole
  transaction rolled back: it and every function whose writes it held run again by
  themselves, each in its caller's thread with the usual retries, and each caller gets
  what its function does alone. The same goes for the first function's lost race, and
  for every function of a transaction that failed before its commit (no connection, a
  broken one) or whose commit lost a race: nothing of it was committed;
- a commit that fails otherwise fails every function of it, each caller getting the error
  (whether it committed may be unknown, as for any commit whose answer is lost); a check
  deferred to the commit that one function broke fails them all, as they were committed
  together.

A function its caller said is one points operation and nothing else
(``Database.run(fn, alone=True)``) that runs where no transaction is open (first, or after
functions that each did the same) and with no other function queued behind it may commit
its one statement by itself
(:attr:`~jifen.db.uow.UnitOfWork.alone`): it is settled then, and answered with the others
whatever happens after it. Such functions cost one round trip each, where a shared
transaction adds its BEGIN and COMMIT, and the row's lock is held only while the statement
runs and commits on the server, never across a round trip to this process. Where others
queue, they share one transaction as above: one flush of the log for them all, where each
committing by itself would hold the row through a flush of its own.

A use case run inside a batched function that names a key itself (a ``Database.run``
nested in another, which breaks the rule below) runs by itself: queued behind its own
leader, it would wait for ever.

There are no savepoints between the functions, so a batch that goes well costs no more
round trips than its functions' own statements and one commit. A savepoint would cost
each function a round trip while the lock is held, and on SQLite more than its writes
(SQLite copies each page a savepoint's writes change to a statement journal first). A
failure is the rare case, and costs the functions before it one more run: a refused write
(an overdraft, a member not active) is told so by itself, as it would be without a batch.

Functions of one batch see each other's writes, as transactions run one after another
would; each does nothing outside its unit of work (``Database.run``'s rule), so any may
share a transaction with any other. A key names the one row its use cases lock, and only
use cases that lock no other such row should name it: a batch holds every lock its
functions took until it commits, so two batches of transfers, each locking a second
member's account, would take their locks out of order and deadlock (PostgreSQL finds that
only after ``deadlock_timeout``, a second by default). A transfer runs alone. Rows every
write takes last (the API's audit stripe heads) are held from the first function's write
to the commit, so other writes meeting on them wait for the whole batch.

SQLite has one writer at a time, whatever rows it writes (``BEGIN IMMEDIATE`` takes the
whole database), and every commit waits for the disk: there, every use case run with a key
queues under one key (``ONE_WRITER``), so earnings of different members that arrive together
share a commit too.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from psycopg.pq import TransactionStatus

from jifen.clock import Clock
from jifen.db.prepared import driver, in_transaction

if TYPE_CHECKING:
    from jifen.db.uow import Database

MOST = 32
"""The most functions one transaction runs: a longer queue is served by the next leader."""

ONE_WRITER = "sqlite"
"""The key every use case on SQLite queues under, whatever key it names."""


@dataclass(eq=False)
class _Call:
    fn: Callable[[Any], Any]
    clock: Clock
    woken: SimpleQueue[bool] = field(default_factory=SimpleQueue)
    """Put to when its caller is to go on (an outcome, or the lead): a queue in C costs a
    twentieth of an ``Event``. A call is waited on once; a leader, woken to lead and then
    by itself as its transaction ends, leaves an item nobody reads."""
    lead: bool = False
    """Woken to lead the next transaction (else: woken with an outcome)."""
    result: Any = None
    error: BaseException | None = None
    alone: bool = False
    """Woken to run by itself (a lost race, or a transaction that could not go on)."""
    sole: bool = False
    """Its function is one points operation and nothing else (``Database.run(alone=True)``):
    run where no transaction is open, its statement may commit by itself."""
    settled: bool = False
    """Its function's statement committed by itself: answered, whatever the transaction
    after it does."""


@dataclass
class CombinerStats:
    """What a combiner did: transactions committed and the functions they carried."""

    transactions: int = 0
    functions: int = 0


class Combiner:
    """Group commit for one :class:`~jifen.db.uow.Database` in this process (see the module)."""

    def __init__(self, database: Database, *, most: int = MOST) -> None:
        self._database = database
        self._most = most
        # SQLite: one queue for every key (see the module).
        self._one_writer = database.engine.dialect.name == "sqlite"
        self._mutex = threading.Lock()
        self._leading = threading.local()
        # A key has a queue while some call of it leads; the queue holds those waiting.
        self._queues: dict[Hashable, deque[_Call]] = {}
        self.stats = CombinerStats()

    def run(
        self, key: Hashable, fn: Callable[[Any], Any], clock: Clock, *, alone: bool = False
    ) -> tuple[bool, Any]:
        """Run ``fn`` in a transaction shared with others of ``key``: (True, its result),
        or (False, None) when the caller must run it by itself. Its error is raised.
        ``alone``: ``fn`` is one points operation and nothing else (see the module)."""
        if getattr(self._leading, "now", False):  # nested in a function this thread runs
            return False, None
        call = _Call(fn, clock, sole=alone)
        key = self._key(key)
        with self._mutex:
            queue = self._queues.get(key)
            if queue is None:
                self._queues[key] = deque()
                call.lead = True
            else:
                queue.append(call)
        if not call.lead:
            try:
                call.woken.get()
            except BaseException:  # interrupted while it waited
                self._abandon(key, call)
                raise
        if call.lead:
            self._leading.now = True
            try:
                self._lead(key, call)
            finally:
                self._leading.now = False
        if call.error is not None:
            raise call.error
        return not call.alone, call.result

    def waiting(self, key: Hashable) -> int:
        """How many calls of ``key`` wait for the next transaction."""
        with self._mutex:
            return len(self._queues.get(self._key(key), ()))

    def _key(self, key: Hashable) -> Hashable:
        return ONE_WRITER if self._one_writer else key

    def _abandon(self, key: Hashable, call: _Call) -> None:
        """A waiter interrupted: out of the queue, or the lead it was handed passed on. One
        a leader has taken (out of the queue and into its transaction, under the mutex)
        ends as that leader's transaction ends."""
        with self._mutex:
            queue = self._queues.get(key)
            if queue is not None and call in queue:
                queue.remove(call)
            elif call.lead:
                self._hand_on(key)

    def _hand_on(self, key: Hashable) -> None:
        """With the mutex held: wake the first of ``key``'s queue to lead, or forget the key."""
        queue = self._queues[key]
        if queue:
            following = queue.popleft()
            following.lead = True
            following.woken.put(True)
        else:
            del self._queues[key]

    def _next(self, key: Hashable, ran: list[_Call]) -> _Call | None:
        """The next function for the transaction that has taken ``ran``, added to it: one
        that queued while the transaction waited for its lock or ran."""
        with self._mutex:
            queue = self._queues[key]
            if not queue or len(ran) >= self._most:
                return None
            call = queue.popleft()
            ran.append(call)
            return call

    def _lead(self, key: Hashable, first: _Call) -> None:
        """Run ``first`` and those queued behind it in one transaction; hand the lead on to
        whoever queued after (or when ``first`` failed, ended the transaction early)."""
        try:
            self._transaction(key, first)
        finally:
            with self._mutex:
                self._hand_on(key)

    def _transaction(self, key: Hashable, first: _Call) -> None:
        """Run ``first``, then, while it has gone well, those queued behind it, in one
        transaction; commit; answer and wake every caller taken.

        Raises only what interrupts the thread (``BaseException``). Whatever else fails
        before the commit leaves nothing committed: the functions not yet answered run by
        themselves. A commit that fails answers them with its error, unless it lost a race
        (then they run by themselves too): whether it committed may be unknown."""
        from jifen.db.uow import UnitOfWork, is_transient

        database = self._database
        postgresql = database.engine.dialect.name == "postgresql"
        ran = [first]
        done: list[_Call] = []  # those whose writes the open transaction holds
        settled = 0
        committing = committed = False
        try:
            try:
                with database.engine.connect() as conn:
                    transaction = conn.begin()
                    current: _Call | None = first
                    while current is not None:
                        # Alone only with nobody queued: those queued share a commit better.
                        sole = current.sole and postgresql and not self.waiting(key)
                        try:
                            current.result = current.fn(
                                UnitOfWork(conn, current.clock, database.cache, alone=sole)
                            )
                        except (KeyboardInterrupt, SystemExit):
                            raise
                        except BaseException as exc:  # its own, whatever it is
                            _failed(current, exc, transient=is_transient(exc))
                        else:
                            if _aborted(conn):  # it caught an error of its own statement
                                _failed(current, None, transient=True)  # as it would alone
                            elif sole and not in_transaction(conn):
                                current.settled = True  # its statement committed by itself
                                settled += 1
                            else:
                                done.append(current)
                        if current.error is not None or current.alone:
                            if done:  # nothing to go back to: run them again
                                for call in [*done, current]:
                                    _failed(call, None, transient=True)
                                done = []
                            break  # rolled back below; the next leader goes on afresh
                        current = self._next(key, ran)
                    if done:
                        committing = True
                        transaction.commit()
                        committed = True
                    else:
                        transaction.rollback()
            except Exception as exc:
                if not committed:  # else the connection failed to close: done is done
                    lost = not committing or is_transient(exc)
                    for call in _unanswered(ran):
                        _failed(call, _own(exc), transient=lost)
                    done = []
            if done or settled:
                with self._mutex:
                    self.stats.transactions += settled + (1 if done else 0)
                    self.stats.functions += settled + len(done)
        except BaseException as exc:
            for call in [] if committed else _unanswered(ran):
                if committing:  # it may have committed: not to be run again
                    unknown = RuntimeError("interrupted while committing; the outcome is unknown")
                    unknown.__cause__ = exc
                    _failed(call, unknown, transient=False)
                else:
                    _failed(call, None, transient=True)
            raise
        finally:
            for call in ran:
                call.woken.put(True)


def _aborted(conn: Any) -> bool:
    """Whether the database has ended the transaction behind a function's back: PostgreSQL
    aborts it at any failed statement (the function caught the error and went on), SQLite
    rolls it back at some (a full disk, no memory). Nothing more of it can commit."""
    raw = driver(conn)
    info = getattr(raw, "info", None)
    if info is None:  # sqlite3
        return not raw.in_transaction
    return bool(info.transaction_status == TransactionStatus.INERROR)


def _unanswered(calls: list[_Call]) -> list[_Call]:
    return [call for call in calls if call.error is None and not call.alone and not call.settled]


def _own(exc: BaseException) -> BaseException:
    """A copy of ``exc`` for one caller, caused by it: one exception object raised in many
    threads at once would collect all their tracebacks."""
    try:
        copied = copy.copy(exc)
    except Exception:
        return exc
    copied.__cause__ = exc
    return copied


def _failed(call: _Call, error: BaseException | None, *, transient: bool) -> None:
    """Answer ``call`` with ``error``, or have it run by itself (``transient``: it lost a
    race, or its transaction could not go on without committing anything of it)."""
    call.result = None
    if transient:
        call.alone, call.error = True, None
    else:
        call.error = error
