"""Group commit within a process: use cases on one key that arrive together share a commit.

Every write to one member's points account takes the account's row lock and holds it until
its commit is on the disk; writers of that member queue behind each other, one flush each.
On the test machine one flush takes about 0.5 ms, so a single busy account (a company's
pooled account, a member's till and app at once) tops out near 1,800 writes a second
however fast the rest is, while accounts across the ledger share flushes (PostgreSQL's own
group commit).

:class:`Combiner` lets such writers share the flush as well. A use case run with a key
(``Database.run(fn, combine=key)``) either finds no other use case of that key at work in
this process and leads: it opens a transaction and runs its function; or it waits, and the
next leader runs the functions that queued meanwhile one after another in one transaction,
each in a savepoint of its own, and commits them together. Every caller gets its own
function's answer or error only once that commit is done, exactly as if it had run alone:

- a function that raises has its writes undone (its savepoint, or the whole transaction
  when it ran first) and its caller gets the error; the others are not affected;
- a function that lost a race (deadlock, a twin's key, :class:`~jifen.db.uow.LostRace`),
  and every function of a transaction whose commit lost one, runs again by itself in its
  caller's thread, with the usual retries;
- a commit that fails otherwise fails every function of it, as it would have failed each.

Functions of one batch see each other's writes, as transactions run one after another
would; each does nothing outside its unit of work (``Database.run``'s rule), so any may
share a transaction with any other. A key names the one row its use cases lock, and only
use cases that lock no other such row should name it: a batch holds every lock its
functions took until it commits, so two batches of transfers, each locking a second
member's account, would take their locks out of order and deadlock (PostgreSQL finds that
only after ``deadlock_timeout``, a second by default). A transfer runs alone.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jifen.clock import Clock
from jifen.db.prepared import driver

if TYPE_CHECKING:
    from jifen.db.uow import Database

MOST = 32
"""The most functions one transaction runs: a longer queue is served by the next leader."""

# Each function after a transaction's first runs after a savepoint of this name, which is
# not released when it succeeds: the next one's shadows it (a round trip fewer each), and a
# rollback goes back to the newest. A released savepoint would keep its subtransaction id
# all the same, so nothing is saved by releasing; MOST keeps them well under the 64 that
# PostgreSQL tracks per transaction without spilling to its subtransaction log.
_SAVEPOINT = "SAVEPOINT jifen_combined"
_ROLLBACK = "ROLLBACK TO SAVEPOINT jifen_combined"


@dataclass(eq=False)
class _Call:
    fn: Callable[[Any], Any]
    clock: Clock
    woken: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    """Woken to lead the next transaction (else: woken with an outcome)."""
    result: Any = None
    error: BaseException | None = None
    alone: bool = False
    """Woken to run by itself (a lost race, or a transaction that could not go on)."""


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
        self._mutex = threading.Lock()
        # A key has a queue while some call of it leads; the queue holds those waiting.
        self._queues: dict[Hashable, deque[_Call]] = {}
        self.stats = CombinerStats()

    def run(self, key: Hashable, fn: Callable[[Any], Any], clock: Clock) -> tuple[bool, Any]:
        """Run ``fn`` in a transaction shared with others of ``key``: (True, its result),
        or (False, None) when the caller must run it by itself. Its error is raised."""
        call = _Call(fn, clock)
        with self._mutex:
            queue = self._queues.get(key)
            if queue is None:
                self._queues[key] = deque()
                call.lead = True
            else:
                queue.append(call)
        if not call.lead:
            call.woken.wait()
        if call.lead:
            self._lead(key, call)
        if call.error is not None:
            raise call.error
        return not call.alone, call.result

    def waiting(self, key: Hashable) -> int:
        """How many calls of ``key`` wait for the next transaction."""
        with self._mutex:
            return len(self._queues.get(key, ()))

    def _lead(self, key: Hashable, first: _Call) -> None:
        """Run ``first`` and what queued behind it, hand the lead on, wake the callers."""
        with self._mutex:
            queue = self._queues[key]
            batch = [first] + [queue.popleft() for _ in range(min(len(queue), self._most - 1))]
        try:
            self._run(batch)
        except BaseException as exc:  # the machinery itself failed: nothing was committed
            for call in batch:
                if call.error is None:
                    call.alone, call.result = True, None
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._mutex:
                queue = self._queues[key]
                if queue:
                    after = queue.popleft()
                    after.lead = True
                    after.woken.set()
                else:
                    del self._queues[key]
            for call in batch:
                call.woken.set()

    def _run(self, batch: list[_Call]) -> None:
        """Run the batch's functions in as few transactions as they allow, committing each."""
        from jifen.db.uow import UnitOfWork, is_transient

        database = self._database
        waiting = deque(batch)
        while waiting:
            done: list[_Call] = []
            with database.engine.connect() as conn:
                transaction = conn.begin()
                try:
                    while waiting:
                        call = waiting[0]
                        first = not done
                        if not first:
                            driver(conn).execute(_SAVEPOINT)
                        try:
                            call.result = call.fn(UnitOfWork(conn, call.clock, database.cache))
                        except Exception as exc:
                            waiting.popleft()
                            call.result = None
                            if is_transient(exc):
                                call.alone = True
                            else:
                                call.error = exc
                            if first:
                                break  # roll back what it wrote; the rest go on afresh
                            driver(conn).execute(_ROLLBACK)
                            continue
                        waiting.popleft()
                        done.append(call)
                    if not done:
                        transaction.rollback()
                        continue
                    transaction.commit()
                except Exception as exc:
                    if transaction.is_active:
                        transaction.rollback()
                    for call in done:  # none of them was committed
                        call.result = None
                        if is_transient(exc):
                            call.alone = True
                        else:
                            call.error = exc
                    continue
            with self._mutex:
                self.stats.transactions += 1
                self.stats.functions += len(done)
