"""Group commit within a process: use cases on one key that arrive together share a commit.

Every write to one member's points account takes the account's row lock and holds it until
its commit is on the disk: writers of one busy account (a company's pooled account, a
member's till and app at once) queue behind each other, and each pays its own COMMIT round
trip and flush while the others wait, where writes to different accounts share flushes
(PostgreSQL's own group commit).

:class:`Combiner` lets such writers share the wait and the commit. A use case run with a
key (``Database.run(fn, combine=key)``) either finds no other use case of that key at work
in this process and leads, or queues behind the one that does. A leader opens a
transaction and runs its function, then, in the same transaction, one after another and
each after a savepoint, the functions of its key that queued while it waited for its lock
or ran (up to ``MOST``), and commits them together; whoever queued after that leads next.
Every caller gets its own function's answer or error only once that commit is done,
exactly as if it had run alone:

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
        """Run ``first``, then what queues behind it while it runs (up to ``most``
        functions), in as few transactions as they allow; hand the lead on."""
        taken = 1
        ahead: deque[_Call] = deque([first])

        def after() -> _Call | None:
            """The next function to run: queued while the transaction waited for its lock
            or ran, so that a batch takes in those who arrived meanwhile."""
            nonlocal taken
            if ahead:
                return ahead.popleft()
            with self._mutex:
                queue = self._queues[key]
                if not queue or taken >= self._most:
                    return None
                taken += 1
                return queue.popleft()

        try:
            while (call := after()) is not None:
                self._transaction(call, after)
        finally:
            with self._mutex:
                queue = self._queues[key]
                if queue:
                    following = queue.popleft()
                    following.lead = True
                    following.woken.set()
                else:
                    del self._queues[key]

    def _transaction(self, call: _Call, after: Callable[[], _Call | None]) -> None:
        """Run ``call`` and, while it has gone well, what ``after`` gives, each after a
        savepoint, in one transaction; commit; wake their callers. When the transaction's
        first function fails, it is rolled back and that function alone is answered."""
        from jifen.db.uow import UnitOfWork, is_transient

        database = self._database
        ran: list[_Call] = []
        done: list[_Call] = []
        try:
            with database.engine.connect() as conn:
                transaction = conn.begin()
                try:
                    current: _Call | None = call
                    while current is not None:
                        ran.append(current)
                        first = not done
                        if not first:
                            driver(conn).execute(_SAVEPOINT)
                        try:
                            current.result = current.fn(
                                UnitOfWork(conn, current.clock, database.cache)
                            )
                        except Exception as exc:
                            _failed(current, exc, is_transient(exc))
                            if first:
                                break  # rolled back below; the next goes on afresh
                            driver(conn).execute(_ROLLBACK)
                        else:
                            done.append(current)
                        current = after()
                    if done:
                        transaction.commit()
                    else:
                        transaction.rollback()
                except Exception as exc:
                    if transaction.is_active:
                        transaction.rollback()
                    for failed in done:  # none of them was committed
                        _failed(failed, exc, is_transient(exc))
                    done = []
            if done:
                with self._mutex:
                    self.stats.transactions += 1
                    self.stats.functions += len(done)
        except BaseException:  # the machinery itself failed: nothing of it was committed
            for undecided in ran:
                if undecided.error is None and not undecided.alone:
                    _failed(undecided, None, True)
            raise
        finally:
            for woken in ran:
                woken.woken.set()


def _failed(call: _Call, error: BaseException | None, transient: bool) -> None:
    """Answer ``call`` with ``error``, or have it run by itself when it lost a race."""
    call.result = None
    if transient:
        call.alone = True
    else:
        call.error = error
