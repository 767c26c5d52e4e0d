"""Points use cases: every change of points, over the pure ledger core.

Each write locks the member account(s) it changes (PostgreSQL ``FOR NO KEY UPDATE``, in
account id order; SQLite's ``BEGIN IMMEDIATE`` already serialises writers), looks up its
idempotency key in the same statement, asks the core for a plan, and writes the plan:
one posting, its lines, lot allocations, new lots and the account caches, all in the
caller's transaction. A key seen before returns the first posting (``replayed=True``) if
the request is the same and raises :class:`IdempotencyConflict` if it is not.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import and_, case, func, literal_column, select
from sqlalchemy.engine import Row

from jifen import ledger
from jifen.db.bulk import among
from jifen.db.prepared import Read, in_transaction
from jifen.db.uow import UnitOfWork
from jifen.errors import (
    IdempotencyConflict,
    InvalidInput,
    Refused,
    SameAccount,
    StateConflict,
    UnknownMember,
    UnknownPosting,
    not_active,
)
from jifen.ledger import (
    AccountState,
    Allocation,
    Kind,
    Lot,
    Party,
    Plan,
    PostingFacts,
    SystemAccount,
)
from jifen.points import store
from jifen.points.models import (
    accounts,
    allocations,
    chain_entries,
    lines,
    lots,
    posting_origins,
    postings,
)
from jifen.points.schemas import (
    BalanceSummary,
    ExpiringAmount,
    HistoryEntry,
    HistoryPage,
    LineRead,
    LotPage,
    LotRead,
    PostingRead,
)
from jifen.programs import service as programs_service

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

CURRENCY = "points"
SYSTEM = "system"
"""The actor of what jifen posts by itself (its jobs, a birthday gift): never a member's
doing, so never its activity (:func:`last_activity`)."""
_FIFO_BATCH = 64  # open lots read per round trip; most debits need far fewer
_AT_ONCE_LOTS = 8  # open lots a spending in one statement reads: most take one or two


# --------------------------------------------------------------------------- accounts


def open_system_accounts(uow: UnitOfWork, *, program_id: int) -> None:
    """Create a programme's own accounts (issued, redeemed, expired, …)."""
    now = uow.clock.now()
    uow.conn.execute(
        accounts.insert(),
        [
            {"program_id": program_id, "system_code": code.value, "created_at": now}
            for code in SystemAccount
        ],
    )


def open_member_account(uow: UnitOfWork, *, program_id: int, member_id: int) -> int:
    """Create a member's points account; returns its id."""
    result = uow.conn.execute(
        accounts.insert().returning(accounts.c.id),
        {"program_id": program_id, "member_id": member_id, "created_at": uow.clock.now()},
    )
    return int(result.scalar_one())


def system_account_ids(uow: UnitOfWork, program_id: int) -> dict[SystemAccount, int]:
    cache_key = f"system_accounts:{program_id}"
    cached: dict[SystemAccount, int] | None = uow.cache.get(cache_key)
    if cached is None:
        rows = uow.conn.execute(
            select(accounts.c.system_code, accounts.c.id).where(
                accounts.c.program_id == program_id,
                accounts.c.system_code.is_not(None),
                accounts.c.currency == CURRENCY,
            )
        )
        cached = {SystemAccount(code): int(account_id) for code, account_id in rows}
        uow.cache[cache_key] = cached
    return cached


@dataclass(frozen=True, slots=True)
class _Account:
    """A member account row, locked for this transaction."""

    id: int
    program_id: int
    member_id: int
    balance: int
    frozen: int
    debt: int
    head_seq: int
    head_hash: str
    member_state: str
    """The member's state as the account carries it (see :func:`set_member_state`): read
    with the account's lock, so no concurrent change of state can have committed since."""

    @property
    def state(self) -> AccountState:
        return AccountState(balance=self.balance, frozen=self.frozen, debt=self.debt)


def _account(row: Sequence[Any]) -> _Account:
    """The account of a row :mod:`points.store` read (``AccountRow``: the account's fields,
    then the replayed posting's id, which :data:`_REPLAYED` indexes)."""
    return _Account(*row[:_REPLAYED])


_REPLAYED: Final = 9
"""Where an ``AccountRow`` holds the posting already made with the key (``None``: none):
after the account's fields (a literal, so that the type checker knows the field's type)."""
assert len(store.ACCOUNT_COLUMNS) == _REPLAYED, "an AccountRow's fields changed"


_HELD = "points:held"
"""``uow.local``'s key for the :class:`_Held` account of the transaction, if any."""


@dataclass(frozen=True, slots=True)
class _Held:
    """An account :func:`lock_account` locked for the posting with ``key`` that follows: the
    next lock of the transaction takes it (that posting) or drops it (any other)."""

    key: str
    account: _Account
    lots: list[Lot] | None = None
    """The first open lots, read with the lock (``None``: not read)."""


def _take_held(uow: UnitOfWork, member_id: int, key: str) -> _Held | None:
    """The held account if it was locked for this very posting, and nothing was posted
    since; any held account is dropped either way."""
    held: _Held | None = uow.local.pop(_HELD, None)
    if held is not None and held.key == key and held.account.member_id == member_id:
        return held
    return None


def _lock(
    uow: UnitOfWork, member_ids: Sequence[int], key: str
) -> tuple[list[_Account], int | None]:
    """Lock the members' accounts in id order and find a posting already made with ``key``."""
    uow.local.pop(_HELD, None)
    rows = store.lock_accounts(uow.conn, member_ids, key)
    found = {row[2]: _account(row) for row in rows}
    for member_id in member_ids:
        if member_id not in found:
            raise UnknownMember(member_id=member_id)
    return [found[m] for m in member_ids], rows[0][_REPLAYED]


def _lock_one(uow: UnitOfWork, member_id: int, key: str) -> tuple[_Account, int | None]:
    held = _take_held(uow, member_id, key)
    if held is not None:
        return held.account, None
    locked, replay_id = _lock(uow, [member_id], key)
    return locked[0], replay_id


def _lock_spending(
    uow: UnitOfWork, member_id: int, key: str
) -> tuple[_Account, int | None, list[Lot] | None]:
    """:func:`_lock_one` for a debit: also, when they came with the lock, the first open
    lots (``None``: read them)."""
    held = _take_held(uow, member_id, key)
    if held is not None:
        return held.account, None, held.lots
    row, opened = store.lock_account_spending(uow.conn, member_id, key, _FIFO_BATCH)
    if row is None:
        raise UnknownMember(member_id=member_id)
    lots = None if opened is None else [Lot(*lot) for lot in opened]
    return _account(row), row[_REPLAYED], lots


def lock_account(uow: UnitOfWork, *, member_id: int, key: str = "", spending: bool = False) -> bool:
    """Hold the member's points account until the transaction ends, as every posting to it
    does: a use case that decides by what the member did before (redemption limits) reads
    under the same lock its posting will take, so two of them cannot both pass. Answers
    whether a posting was already made with ``key`` (a replay), in the same statement.

    With a ``key`` and no replay, the posting with that key that follows (the next lock of
    the transaction) starts from the row read here, without locking it again; ``spending``
    (that posting is likely a debit) reads its first open lots in the same round trip.
    """
    if not key:
        _lock_one(uow, member_id, key)
        return False
    if spending:
        member, replay_id, lots = _lock_spending(uow, member_id, key)
        held = _Held(key, member, lots)
    else:
        member, replay_id = _lock_one(uow, member_id, key)
        held = _Held(key, member)
    if replay_id is None:
        uow.local[_HELD] = held
    return replay_id is not None


def lock_account_read(uow: UnitOfWork, *, member_id: int, key: str) -> Read[None]:
    """:func:`lock_account` (not spending) as a read to run together with a use case's
    first reads, saving the posting's own round trip for the lock. PostgreSQL only: the
    other reads of that statement take no lock, so it takes this one alone; SQLite's
    transaction holds the write lock already, and its posting locks as usual."""

    def answer(row: Any) -> None:
        uow.local.pop(_HELD, None)
        if row is not None and row[_REPLAYED] is None:  # a replay locks (and answers) again
            uow.local[_HELD] = _Held(key, _account(row))

    if uow.dialect != "postgresql" or not key:
        return Read(None, {}, lambda _row: None)
    return Read(store.LOCK_ONE, {"key": key, "member": member_id}, answer)


def set_member_state(uow: UnitOfWork, *, member_id: int, state: str) -> None:
    """Record the member's new ``state`` on its points account, in the transaction that
    changes it (and locking the account until it ends). Every posting to the account locks
    its row and reads this state there: on PostgreSQL a posting that waited for this change
    reads the row as it left it, so once a freeze, ban or closing commits no earning posts
    after it (the member's own row, read in the posting's statement, would still show the
    state from before)."""
    uow.local.pop(_HELD, None)  # the row changes: a lock handed on would hold an old copy
    uow.conn.execute(
        accounts.update()
        .where(accounts.c.member_id == member_id, accounts.c.currency == CURRENCY)
        .values(member_state=state)
    )


def _require_active(*holders: _Account) -> None:
    """Refuse an earning, a debit or a transfer of a member that is not active, by the
    state its locked account carries."""
    for holder in holders:
        if holder.member_state != "active":
            raise not_active(holder.member_id, holder.member_state)


def _require_open(holder: _Account, what: str, what_zh: str) -> None:
    """Refuse ``what`` (a correction, a claw-back) on a closed account: its points were
    settled when it closed, and it takes on neither points nor debt since."""
    if holder.member_state == "closed":
        raise StateConflict(
            problem=f"Member {holder.member_id} is closed: its points were settled when it "
            f"closed, and a closed account takes no {what}.",
            problem_zh=f"会员 {holder.member_id} 已注销:其积分已在注销时结算,已注销的账户"
            f"不再接受{what_zh}。",
        )


def _member_of_account(uow: UnitOfWork, account_id: int) -> int:
    member_id = uow.conn.execute(
        select(accounts.c.member_id).where(accounts.c.id == account_id)
    ).scalar_one()
    return int(member_id)


# --------------------------------------------------------------------------- idempotency


def _fingerprint(operation: str, **params: Any) -> str:
    """A digest of the request, the same for the same request whatever time zone it uses."""
    parts = [operation]
    for name in sorted(params):
        value = params[name]
        if isinstance(value, datetime):
            value = round(value.timestamp() * 1_000_000)
        parts.append(f"{name}={value!r}")
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _require_key(key: str) -> str:
    if not isinstance(key, str) or not key.strip() or len(key) > 200:
        raise InvalidInput(
            field="key",
            problem="an idempotency key of 1 to 200 characters is required for every write",
            problem_zh="每次写操作都须提供 1 至 200 个字符的幂等键",
        )
    return key


def _replay(uow: UnitOfWork, posting_id: int, key: str, request_hash: str) -> PostingRead:
    row = uow.conn.execute(select(postings).where(postings.c.id == posting_id)).one()
    if row.request_hash != request_hash:
        raise IdempotencyConflict(key=key)
    return _posting_read(uow, row, replayed=True)


def _posting_read(uow: UnitOfWork, row: Row[Any], *, replayed: bool) -> PostingRead:
    receivable = system_account_ids(uow, row.program_id)[SystemAccount.RECEIVABLE]
    debt_lines = uow.conn.execute(
        select(func.coalesce(func.sum(lines.c.amount), 0)).where(
            lines.c.posting_id == row.id, lines.c.account_id == receivable
        )
    ).scalar_one()
    counterparty = (
        _member_of_account(uow, row.counterparty_id) if row.counterparty_id is not None else None
    )
    # What a posting pays into the receivable account pays off a debt: the receiver's for
    # a transfer (what it received), else the member's.
    debt_change = -int(debt_lines)
    receiver_pays = row.kind == Kind.TRANSFER.value
    return PostingRead(
        id=row.id,
        kind=row.kind,
        amount=row.amount,
        member_id=_member_of_account(uow, row.account_id),
        counterparty_member_id=counterparty,
        ref_posting_id=row.ref_posting_id,
        reason=row.reason,
        actor=row.actor,
        created_at=row.created_at,
        replayed=replayed,
        debt_change=0 if receiver_pays else debt_change,
        counterparty_debt_change=debt_change if receiver_pays else 0,
    )


# --------------------------------------------------------------------------- writing a plan


def _write(
    uow: UnitOfWork,
    plan: Plan,
    *,
    member: _Account,
    counterparty: _Account | None = None,
    key: str,
    request_hash: str,
    now: datetime,
    ref_posting_id: int | None = None,
    reason: str = "",
    actor: str = "",
) -> PostingRead:
    """Store ``plan`` as one posting with its lines, allocations, lots and account caches."""
    rows = _rows(
        uow, plan, member=member, counterparty=counterparty, key=key, request_hash=request_hash,
        now=now, ref_posting_id=ref_posting_id, reason=reason, actor=actor,
    )  # fmt: skip
    posting_id = store.write_posting(uow.conn, rows)
    # Built from values this function made itself: no validation needed on the hot path.
    return PostingRead.model_construct(
        id=posting_id,
        kind=plan.kind.value,
        amount=plan.amount,
        member_id=member.member_id,
        counterparty_member_id=counterparty.member_id if counterparty else None,
        ref_posting_id=ref_posting_id,
        reason=reason,
        actor=actor,
        created_at=now,
        debt_change=plan.debt_change,
        counterparty_debt_change=plan.counterparty_debt_change,
    )


def _rows(
    uow: UnitOfWork,
    plan: Plan,
    *,
    member: _Account,
    counterparty: _Account | None,
    key: str,
    request_hash: str,
    now: datetime,
    ref_posting_id: int | None,
    reason: str,
    actor: str,
) -> store.PostingRows:
    """The rows that store ``plan``: its digest, lines, chain links, lots and account caches."""
    system = system_account_ids(uow, member.program_id)
    parties = {Party.MEMBER: member}
    if counterparty is not None:
        parties[Party.COUNTERPARTY] = counterparty

    def account_id(account: ledger.model.Account) -> int:
        return parties[account].id if isinstance(account, Party) else system[account]

    line_facts = tuple((account_id(line.account), line.amount) for line in plan.lines)
    lot_facts = tuple(
        (parties[lot.owner].id, lot.amount, lot.available_at, lot.expires_at, lot.source_lot_id)
        for lot in plan.new_lots
    )
    digest = ledger.posting_digest(
        PostingFacts(
            program_id=member.program_id,
            kind=plan.kind.value,
            idempotency_key=key,
            created_at=now,
            amount=plan.amount,
            ref_posting_id=ref_posting_id,
            reason=reason,
            actor=actor,
            lines=line_facts,
            allocations=tuple((a.lot_id, a.amount) for a in plan.allocations),
            new_lots=lot_facts,
        )
    )
    # Each member account the posting concerns appends one link to its own chain, even when
    # the posting moves none of its points (an earning that only pays off debt).
    chain = [
        (
            holder.id,
            holder.head_seq + 1,
            ledger.chain_link(holder.head_hash, holder.head_seq + 1, digest),
        )
        for holder in parties.values()
    ]
    heads = {account: (seq, link) for account, seq, link in chain}
    return store.PostingRows(
        posting={
            "program_id": member.program_id,
            "kind": plan.kind.value,
            "idempotency_key": key,
            "request_hash": request_hash,
            "account_id": member.id,
            "counterparty_id": counterparty.id if counterparty else None,
            "ref_posting_id": ref_posting_id,
            "amount": plan.amount,
            "reason": reason,
            "actor": actor,
            "created_at": now,
            "digest": digest,
        },
        lines=list(line_facts),
        chain=chain,
        allocations=[(a.lot_id, a.amount) for a in plan.allocations],
        new_lots=list(lot_facts),
        accounts=[
            (
                holder.id,
                plan.change_of(party),
                plan.frozen_change if party is Party.MEMBER else 0,
                plan.debt_change_of(party),
                *heads[holder.id],
            )
            for party, holder in parties.items()
        ],
    )


def _planned(
    uow: UnitOfWork, program_id: int, key: str, request: str, make: Callable[[], Plan]
) -> Plan | PostingRead:
    """``make()``'s plan, made under the account's lock; where it refuses on PostgreSQL,
    the posting a twin of this request (the same key) committed while this one waited for
    that lock, replayed, if there is one. The lock statement looked the key up in its own
    snapshot, taken before the wait: a twin that found the points, or the spend, already
    taken by its twin would be refused where a twin sent later replays. (One that goes on
    to write loses on the key's unique index and runs again, replaying.)"""
    try:
        return make()
    except Refused:
        if uow.dialect == "postgresql":
            found = store.posting_with_key(uow.conn, program_id, key)
            if found is not None:
                return _replay(uow, found, key, request)
        raise


# --------------------------------------------------------------------------- reading lots


def _lot(row: Row[Any]) -> Lot:
    return Lot(row.id, row.amount, row.remaining, row.available_at, row.expires_at)


def _lot_columns() -> tuple[Any, ...]:
    return (lots.c.id, lots.c.amount, lots.c.remaining, lots.c.available_at, lots.c.expires_at)


@dataclass(frozen=True, slots=True)
class _FirstLots:
    """An account's first open lots in FIFO order (any dates), read with its lock, at most
    ``limit`` of them: all there are if fewer."""

    lots: list[Lot]
    limit: int = _FIFO_BATCH


def _spendable_lots(
    uow: UnitOfWork,
    account_id: int,
    now: datetime,
    needed: int,
    opened: list[Lot] | _FirstLots | None = None,
) -> list[Lot]:
    """Spendable lots in FIFO order, reading only as many as ``needed`` calls for
    (``opened``: the first open lots in FIFO order, read already, of which those spendable
    at ``now`` are taken; a plain list holds up to ``_FIFO_BATCH``)."""
    if opened is None:
        rows = store.spendable_lots(uow.conn, account_id, now, _FIFO_BATCH)
        first = [Lot(*row) for row in rows]
        complete = len(first) < _FIFO_BATCH
    else:
        read = opened if isinstance(opened, _FirstLots) else _FirstLots(opened)
        first = ledger.spendable(read.lots, now)
        complete = len(read.lots) < read.limit
    if complete or sum(lot.remaining for lot in first) >= needed:
        return first
    return [Lot(*row) for row in store.spendable_lots(uow.conn, account_id, now, None)]


def _open_lots(uow: UnitOfWork, account_id: int) -> list[Lot]:
    rows = uow.conn.execute(
        select(*_lot_columns()).where(lots.c.account_id == account_id, lots.c.remaining > 0)
    )
    return [_lot(row) for row in rows]


# --------------------------------------------------------------------------- the operations


def account_key(member_id: int) -> tuple[str, int]:
    """What a member's points writes meet on (their account's row): the ``combine`` key of
    :meth:`jifen.db.uow.Database.run` for a use case that writes to that account."""
    return ("points", member_id)


def earn(
    uow: UnitOfWork,
    *,
    member_id: int,
    amount: int,
    key: str,
    available_at: datetime | None = None,
    expires_at: datetime | None = None,
    reason: str = "",
    actor: str = "",
) -> PostingRead:
    """Credit points from the programme's issuing account.

    ``available_at`` in the future makes them pending until then; ``expires_at`` is when the
    lot lapses (``None``: never). Any debt of the member is paid off first. Refused unless
    the member is active, by the state its account carries under the lock (see
    :func:`set_member_state`); so are :func:`earn_many`, :func:`spend` and
    :func:`transfer` (both members).
    """
    _require_key(key)
    request = _fingerprint(
        "earn",
        member=member_id,
        amount=amount,
        available_at=available_at,
        expires_at=expires_at,
        reason=reason,
        actor=actor,
    )
    held = _take_held(uow, member_id, key)
    if held is not None:
        member, replay_id = held.account, None
    elif uow.dialect == "postgresql":
        at_once = _earn_at_once(
            uow, member_id=member_id, amount=amount, key=key, request_hash=request,
            available_at=available_at, expires_at=expires_at, reason=reason, actor=actor,
        )  # fmt: skip
        if isinstance(at_once, PostingRead):
            return at_once
        member, replay_id = at_once
    else:
        member, replay_id = _lock_one(uow, member_id, key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    _require_active(member)
    now = uow.clock.now()
    plan = ledger.plan_earn(
        account=member.state,
        amount=amount,
        now=now,
        available_at=available_at,
        expires_at=expires_at,
    )
    return _write(
        uow,
        plan,
        member=member,
        key=key,
        request_hash=request,
        now=now,
        reason=reason,
        actor=actor,
    )


_DEBT_FREE = AccountState(balance=0, frozen=0, debt=0)


def _earn_at_once(
    uow: UnitOfWork,
    *,
    member_id: int,
    amount: int,
    key: str,
    request_hash: str,
    available_at: datetime | None,
    expires_at: datetime | None,
    reason: str,
    actor: str,
) -> PostingRead | tuple[_Account, int | None]:
    """PostgreSQL: :func:`earn` in one statement, as most earnings go: the plan is made
    before the lock for an active member that owes nothing (an earning's plan reads the
    account for its debt alone), and the statement that locks the account writes it only
    if the locked row bears that out and the key is new. Answers the posting, or else what
    :func:`_lock` answers, the account locked and nothing written: the caller goes on as
    after any lock (a replay, a refusal, an earning that pays off debt)."""
    now = uow.clock.now()
    try:
        plan = ledger.plan_earn(
            account=_DEBT_FREE, amount=amount, now=now, available_at=available_at,
            expires_at=expires_at,
        )  # fmt: skip
    except InvalidInput:  # refused after the lock, where a replay answers first
        return _lock_one(uow, member_id, key)
    (lot,) = plan.new_lots
    credit = store.Credit(
        kind=plan.kind.value,
        issuer=SystemAccount.ISSUED.value,
        amount=amount,
        now=now,
        available_at=lot.available_at,
        expires_at=lot.expires_at,
        request_hash=request_hash,
        reason=reason,
        actor=actor,
        facts=ledger.middle_pieces(plan.kind.value, key, now, amount, None, reason, actor),
        lot_stamps=f"{ledger.stamp(lot.available_at)}:{ledger.stamp(lot.expires_at)}",
    )
    row, posting_id = store.credit_at_once(uow.conn, member_id, key, credit, alone=uow.alone)
    if row is None:
        raise UnknownMember(member_id=member_id)
    if posting_id is None:
        if not in_transaction(uow.conn):  # it ran by itself: its lock went with its commit
            return _lock_one(uow, member_id, key)
        return _account(row), row[_REPLAYED]
    return _posted_at_once(posting_id, plan.kind, amount, member_id, reason, actor, now)


def _posted_at_once(
    posting_id: int, kind: Kind, amount: int, member_id: int, reason: str, actor: str,
    now: datetime,
) -> PostingRead:  # fmt: skip
    """The answer for a posting one statement wrote: the member's alone, owing nothing."""
    # Built from values the service made itself: no validation needed on the hot path.
    return PostingRead.model_construct(
        id=posting_id,
        kind=kind.value,
        amount=amount,
        member_id=member_id,
        counterparty_member_id=None,
        ref_posting_id=None,
        reason=reason,
        actor=actor,
        created_at=now,
        debt_change=0,
    )


@dataclass(frozen=True, slots=True)
class Earning:
    """One credit of :func:`earn_many`; the fields are :func:`earn`'s."""

    member_id: int
    amount: int
    key: str
    available_at: datetime | None = None
    expires_at: datetime | None = None
    reason: str = ""
    actor: str = ""


def earn_many(uow: UnitOfWork, earnings: Sequence[Earning]) -> list[PostingRead]:
    """Several :func:`earn` in one write, in order (a member may earn more than once):
    their postings. The keys must be new — a batch of events keys its postings by the
    events' new ids — and a key used before breaks the programme's unique index, failing
    the whole write rather than replaying."""
    if not earnings:
        return []
    for earning in earnings:
        _require_key(earning.key)
    ids = sorted({e.member_id for e in earnings})
    uow.local.pop(_HELD, None)
    held = {row[2]: _account(row) for row in store.lock_accounts(uow.conn, ids, "")}
    now = uow.clock.now()
    batch: list[store.PostingRows] = []
    debt_changes: list[int] = []
    for earning in earnings:
        member = held.get(earning.member_id)
        if member is None:
            raise UnknownMember(member_id=earning.member_id)
        _require_active(member)
        plan = ledger.plan_earn(
            account=member.state, amount=earning.amount, now=now,
            available_at=earning.available_at, expires_at=earning.expires_at,
        )  # fmt: skip
        request = _fingerprint(
            "earn", member=earning.member_id, amount=earning.amount,
            available_at=earning.available_at, expires_at=earning.expires_at,
            reason=earning.reason, actor=earning.actor,
        )  # fmt: skip
        rows = _rows(
            uow, plan, member=member, counterparty=None, key=earning.key, request_hash=request,
            now=now, ref_posting_id=None, reason=earning.reason, actor=earning.actor,
        )  # fmt: skip
        batch.append(rows)
        debt_changes.append(plan.debt_change)
        # The next posting of the member starts from this one's figures and chain head.
        _, seq, link = rows.chain[0]
        held[earning.member_id] = replace(
            member, balance=member.balance + plan.change_of(Party.MEMBER),
            frozen=member.frozen + plan.frozen_change, debt=member.debt + plan.debt_change,
            head_seq=seq, head_hash=link,
        )  # fmt: skip
    posting_ids = store.write_postings(uow.conn, batch)
    # Built from values the service made itself: no validation needed on the batch's path.
    return [
        PostingRead.model_construct(
            id=posting_id, kind=Kind.EARN.value, amount=earning.amount,
            member_id=earning.member_id, counterparty_member_id=None, ref_posting_id=None,
            reason=earning.reason, actor=earning.actor, created_at=now, replayed=False,
            debt_change=debt_change,
        )
        for posting_id, earning, debt_change in zip(
            posting_ids, earnings, debt_changes, strict=True
        )
    ]  # fmt: skip


def hold_accounts(uow: UnitOfWork, *, member_ids: Iterable[int]) -> None:
    """Hold the members' points accounts (in id order) until the transaction ends, as the
    postings to come will: a batch takes every account it may touch before any of them."""
    uow.local.pop(_HELD, None)
    store.lock_accounts(uow.conn, sorted(set(member_ids)), "")


def record_origins(uow: UnitOfWork, origins: Sequence[tuple[int, str | None, str | None]]) -> None:
    """:func:`record_origin` for new postings, (posting id, merchant, store) each, at once."""
    rows = [
        {"posting_id": posting_id, "merchant": merchant, "store": where}
        for posting_id, merchant, where in origins
        if merchant is not None or where is not None
    ]
    if rows:
        uow.conn.execute(posting_origins.insert(), rows)


def spend(
    uow: UnitOfWork,
    *,
    member_id: int,
    amount: int,
    key: str,
    reason: str = "",
    actor: str = "",
    into: SystemAccount = SystemAccount.REDEEMED,
) -> PostingRead:
    """Debit spendable points, earliest-expiring first, into the redeemed account (or into
    the charity or partners account for a donation or an exchange out)."""
    _require_key(key)
    request = _spend_request(member_id, amount, reason, actor, into)
    held = _take_held(uow, member_id, key)
    opened: list[Lot] | _FirstLots | None
    if held is not None:
        member, replay_id, opened = held.account, None, held.lots
    elif uow.dialect == "postgresql" and type(amount) is int and amount > 0:
        at_once = _spend_at_once(
            uow, member_id=member_id, amount=amount, key=key, request_hash=request,
            reason=reason, actor=actor, into=into,
        )  # fmt: skip
        if isinstance(at_once, PostingRead):
            return at_once
        member, replay_id, opened = at_once
    else:
        member, replay_id, opened = _lock_spending(uow, member_id, key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    _require_active(member)
    ledger.postings.require_positive(amount)
    now = uow.clock.now()
    lots_now = _spendable_lots(uow, member.id, now, amount, opened)
    plan = _planned(
        uow,
        member.program_id,
        key,
        request,
        lambda: ledger.plan_spend(
            lots=lots_now, amount=amount, now=now, account_id=member.id, into=into
        ),
    )
    if isinstance(plan, PostingRead):
        return plan
    return _write(
        uow,
        plan,
        member=member,
        key=key,
        request_hash=request,
        now=now,
        reason=reason,
        actor=actor,
    )


def _spend_request(
    member_id: int, amount: int, reason: str, actor: str, into: SystemAccount
) -> str:
    """A spending's request fingerprint, the same whether :func:`spend` or
    :func:`spend_frozen` makes it (``into`` named only where it is not the redeemed
    account, as before it could be chosen)."""
    return _fingerprint(
        "spend", member=member_id, amount=amount, reason=reason, actor=actor,
        **({"into": into.value} if into is not SystemAccount.REDEEMED else {}),
    )  # fmt: skip


def _spend_at_once(
    uow: UnitOfWork,
    *,
    member_id: int,
    amount: int,
    key: str,
    request_hash: str,
    reason: str,
    actor: str,
    into: SystemAccount,
) -> PostingRead | tuple[_Account, int | None, list[Lot] | _FirstLots | None]:
    """PostgreSQL: :func:`spend` in one statement where the member is active, has not used
    the key and its first open lots hold enough spendable points (the statement takes them
    as :func:`ledger.consume` does). Answers the posting, or else the account locked with
    its first open lots and nothing written: the caller goes on as after the spending lock
    (a replay, a refusal, a posting that committed while the statement waited, a spending
    of more lots than the statement reads)."""
    now = uow.clock.now()
    debit = store.Debit(
        kind=Kind.SPEND.value,
        into=into.value,
        amount=amount,
        now=now,
        request_hash=request_hash,
        reason=reason,
        actor=actor,
        facts=ledger.middle_pieces(Kind.SPEND.value, key, now, amount, None, reason, actor),
    )
    row, posting_id, opened = store.debit_at_once(
        uow.conn, member_id, key, debit, _AT_ONCE_LOTS, alone=uow.alone
    )
    if row is None:
        raise UnknownMember(member_id=member_id)
    if posting_id is None:  # a twin that committed meanwhile: see _planned
        if not in_transaction(uow.conn):  # it ran by itself: its lock went with its commit
            return _lock_spending(uow, member_id, key)
        lots = _FirstLots([Lot(*lot) for lot in opened], _AT_ONCE_LOTS)
        return _account(row), row[_REPLAYED], lots
    return _posted_at_once(posting_id, Kind.SPEND, amount, member_id, reason, actor, now)


@dataclass(frozen=True, slots=True)
class _Original:
    """A posting that a refund, reversal or unfreeze refers to, with what was done to it since."""

    id: int
    account_id: int
    amount: int
    allocations: list[Allocation]  # the original's own
    later: list[Allocation]  # those of the give-backs that refer to it
    later_amount: int
    later_ids: tuple[int, ...] = ()  # those give-backs, oldest first


def _original(uow: UnitOfWork, posting_id: int, kind: Kind, follow_up: Kind) -> _Original:
    row = uow.conn.execute(
        select(postings.c.id, postings.c.account_id, postings.c.amount).where(
            postings.c.id == posting_id, postings.c.kind == kind.value
        )
    ).one_or_none()
    if row is None:
        raise UnknownPosting(posting_id=posting_id, expected=kind.value, expected_zh=_KIND_ZH[kind])
    related = uow.conn.execute(
        select(postings.c.id, postings.c.amount).where(
            postings.c.ref_posting_id == posting_id, postings.c.kind == follow_up.value
        )
    ).all()
    later_ids = [r.id for r in related]
    allocation_rows = uow.conn.execute(
        select(allocations.c.posting_id, allocations.c.lot_id, allocations.c.amount)
        .where(allocations.c.posting_id.in_([posting_id, *later_ids]))
        .order_by(allocations.c.id)
    ).all()
    return _Original(
        id=row.id,
        account_id=row.account_id,
        amount=row.amount,
        allocations=[
            Allocation(a.lot_id, a.amount) for a in allocation_rows if a.posting_id == posting_id
        ],
        later=[
            Allocation(a.lot_id, a.amount) for a in allocation_rows if a.posting_id != posting_id
        ],
        later_amount=sum(r.amount for r in related),
        later_ids=tuple(sorted(later_ids)),
    )


_KIND_ZH = {
    Kind.EARN: "获取",
    Kind.SPEND: "消费",
    Kind.FREEZE: "冻结",
    Kind.REFUND: "退还",
    Kind.REVERSE: "冲正",
    Kind.ADJUST: "调整",
    Kind.TRANSFER: "转赠",
    Kind.UNFREEZE: "解冻",
    Kind.EXPIRE: "过期",
    Kind.RENEW: "续期",
}


def _member_of_posting(uow: UnitOfWork, posting_id: int, kind: Kind) -> int:
    row = uow.conn.execute(
        select(accounts.c.member_id)
        .select_from(postings.join(accounts, accounts.c.id == postings.c.account_id))
        .where(postings.c.id == posting_id, postings.c.kind == kind.value)
    ).one_or_none()
    if row is None:
        found = uow.conn.execute(
            select(postings.c.kind).where(postings.c.id == posting_id)
        ).scalar_one_or_none()
        other = {"found": found, "found_zh": _KIND_ZH[Kind(found)]} if found else {}
        raise UnknownPosting(
            posting_id=posting_id, expected=kind.value, expected_zh=_KIND_ZH[kind], **other
        )
    return int(row.member_id)


def _spent_into(uow: UnitOfWork, spend_id: int, program_id: int) -> SystemAccount:
    """The system account a spend's points went into (what its refund takes back from)."""
    by_id = {account_id: code for code, account_id in system_account_ids(uow, program_id).items()}
    credited = uow.conn.execute(
        select(lines.c.account_id).where(lines.c.posting_id == spend_id, lines.c.amount > 0)
    ).scalars()
    return next((by_id[a] for a in credited if a in by_id), SystemAccount.REDEEMED)


def refund(
    uow: UnitOfWork,
    *,
    spend_id: int,
    key: str,
    amount: int | None = None,
    reason: str = "",
    actor: str = "",
    forfeit_if_closed: bool = False,
) -> PostingRead:
    """Give back all (``amount=None``) or part of a spend, to exactly the lots it took; a
    member's debt is paid off first out of what comes back (:func:`ledger.plan_refund`).

    To a closed account (a return after closing), by the programme's ``closing_policy``:
    under ``forfeit`` the points are given back and forfeited at once, by an expiry posting
    that refers to the refund, in the same transaction; under ``refuse`` the refund is
    refused, as points on a closed account could be neither used nor forfeited. With
    ``forfeit_if_closed`` (what jifen gives back by itself, a voucher lapsed unused, where
    no one could act on a refusal) they are forfeited whatever the policy."""
    _require_key(key)
    request = _fingerprint("refund", spend=spend_id, amount=amount, reason=reason, actor=actor)
    member, replay_id = _lock_one(uow, _member_of_posting(uow, spend_id, Kind.SPEND), key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    original = _original(uow, spend_id, Kind.SPEND, Kind.REFUND)
    plan = _planned(
        uow,
        member.program_id,
        key,
        request,
        lambda: ledger.plan_refund(
            holder=_spent_into(uow, spend_id, member.program_id),
            spend_id=spend_id,
            spend_amount=original.amount,
            spend_allocations=original.allocations,
            earlier_refunds=original.later,
            earlier_refunded=original.later_amount,
            amount=amount,
            debt=member.debt,
        ),
    )
    if isinstance(plan, PostingRead):
        return plan
    return _given_back(
        uow, plan, member=member, key=key, request_hash=request, ref_posting_id=spend_id,
        reason=reason, actor=actor, forfeit_if_closed=forfeit_if_closed,
    )  # fmt: skip


GIVEN_BACK_FORFEITED = (
    "account closed: points given back to it are forfeited 账户已注销,退回的积分作废"
)
"""The reason of the posting that forfeits points given back to a closed account."""


def _given_back(
    uow: UnitOfWork,
    plan: Plan,
    *,
    member: _Account,
    key: str,
    request_hash: str,
    ref_posting_id: int,
    reason: str,
    actor: str,
    forfeit_if_closed: bool = False,
) -> PostingRead:
    """Write a refund or an unfreeze; then the points it gave back to lots whose points a
    renewal has since moved to a later date (a tier change, say) follow them there, by a
    renewal posting in the same transaction. Left on the old lot they would lapse on the
    date the renewal had put behind them. So do points given back to a lot that held none
    when a tier change extended the member's lots (it was spent, or frozen by a dormancy
    decay): they take the date that change would have given them
    (:func:`jifen.expiry.service.tier_dates_missed`).

    On a closed account (see :func:`refund`) the points given back are forfeited instead,
    in the same transaction, or the give-back is refused before anything is written."""
    closed = member.member_state == "closed"
    if closed and not forfeit_if_closed and plan.change_of(Party.MEMBER) > 0:
        # (what only pays off the account's debt lands no points on it: taken under any policy)
        _refuse_given_back_unless_forfeited(uow, member)
    now = uow.clock.now()
    posting = _write(
        uow, plan, member=member, key=key, request_hash=request_hash, now=now,
        ref_posting_id=ref_posting_id, reason=reason, actor=actor,
    )  # fmt: skip
    if closed:
        forfeit_all(
            uow, member_id=member.member_id, key=f"forfeit-after:{posting.id}",
            reason=GIVEN_BACK_FORFEITED, actor=SYSTEM, ref_posting_id=posting.id,
        )  # fmt: skip
        return posting
    given = {a.lot_id: a.amount for a in plan.allocations if a.amount > 0}
    dates = _renewed_dates(uow, given)
    # Imported here: expiry's service reads points through this module.
    from jifen.expiry import service as expiry_service

    missed = expiry_service.tier_dates_missed(
        uow, program_id=member.program_id, member_id=member.member_id, lot_ids=sorted(given)
    )
    for lot_id, date in missed.items():
        if lot_id not in dates or _later(date, dates[lot_id]):
            dates[lot_id] = date
    if dates:
        follow_key = f"renewal-after:{posting.id}"
        account, _ = _lock_one(uow, member.member_id, follow_key)
        follow = ledger.plan_follow_renewal(
            lots=_open_lots(uow, account.id), given_back=given, dates=dates, now=now
        )
        if follow is not None:
            _write(
                uow, follow, member=account, key=follow_key,
                request_hash=_fingerprint("renew", after=posting.id), now=now,
                ref_posting_id=posting.id, reason=FOLLOWED_RENEWAL, actor=SYSTEM,
            )  # fmt: skip
    return posting


FOLLOWED_RENEWAL = "points given back to a renewed lot take its later date"


def _refuse_given_back_unless_forfeited(uow: UnitOfWork, member: _Account) -> None:
    """Refuse to give points back to a closed account unless the programme forfeits them."""
    policy = programs_service.get_settings(uow, program_id=member.program_id).closing_policy
    if policy != "forfeit":
        raise StateConflict(
            problem=f"Member {member.member_id} is closed, and this programme does not forfeit "
            "points at closing: points cannot be given back to a closed account, where they "
            "could be neither used nor forfeited. Settle with the member another way.",
            problem_zh=f"会员 {member.member_id} 已注销,且本计划注销账户时不作废积分:积分不能"
            "退回已注销的账户(既无法使用,也不能作废)。请以其他方式与会员结算。",
        )


def _renewed_dates(uow: UnitOfWork, lot_ids: Iterable[int]) -> dict[int, datetime | None]:
    """For each of ``lot_ids`` whose points a renewal moved on (directly or through later
    renewals): the latest date they were moved to (``None``: never expires)."""
    latest: dict[int, datetime | None] = {}
    origin_of = {lot_id: lot_id for lot_id in lot_ids}  # a lot on a renewal chain -> its start
    while origin_of:
        successors: dict[int, int] = {}
        for source, successor in _renewals_of(uow, origin_of):
            origin = origin_of[source]
            if origin not in latest or _later(successor.expires_at, latest[origin]):
                latest[origin] = successor.expires_at
            successors[successor.id] = origin
        origin_of = successors
    return latest


def _renewals_of(uow: UnitOfWork, lot_ids: Iterable[int]) -> list[tuple[int, Lot]]:
    """(source, lot) for each lot a renewal made from one of ``lot_ids``: the lots their
    points were moved to. Read by the renewals' allocations to those lots (indexed by lot),
    then the new lots of those postings (indexed by posting)."""
    ids = list(lot_ids)
    if not ids:
        return []
    renewed = lots.alias("renewed")
    rows = uow.conn.execute(
        select(
            allocations.c.lot_id, renewed.c.id, renewed.c.amount, renewed.c.remaining,
            renewed.c.available_at, renewed.c.expires_at,
        )
        .join(postings, postings.c.id == allocations.c.posting_id)
        .join(
            renewed,
            and_(
                renewed.c.posting_id == allocations.c.posting_id,
                renewed.c.source_lot_id == allocations.c.lot_id,
            ),
        )
        .where(allocations.c.lot_id.in_(ids), postings.c.kind == Kind.RENEW.value)
        .order_by(renewed.c.id)
    ).all()  # fmt: skip
    return [(int(row[0]), Lot(*row[1:])) for row in rows]


def _earned_lots(uow: UnitOfWork, earn_id: int, account_id: int) -> list[Lot]:
    """The lots that hold an earn's own points: the lot it made and every lot renewals
    moved its points to since (a better tier's validity, an upgrade in the very
    transaction of the earning), directly or through later renewals; empty ones too."""
    found = [
        _lot(row)
        for row in uow.conn.execute(
            select(*_lot_columns()).where(
                lots.c.posting_id == earn_id, lots.c.account_id == account_id
            )
        )
    ]
    frontier = [lot.id for lot in found]
    while frontier:
        moved = [lot for _, lot in _renewals_of(uow, frontier)]
        found.extend(moved)
        frontier = [lot.id for lot in moved]
    return found


def lots_made(uow: UnitOfWork, *, lot_ids: Iterable[int]) -> list[tuple[Lot, datetime]]:
    """Each of ``lot_ids`` (those that exist) with when the posting that made it was written."""
    ids = sorted(set(lot_ids))
    if not ids:
        return []
    rows = uow.conn.execute(
        select(*_lot_columns(), postings.c.created_at)
        .join(postings, postings.c.id == lots.c.posting_id)
        .where(lots.c.id.in_(ids))
        .order_by(lots.c.id)
    ).all()
    return [(Lot(*row[:5]), row[5]) for row in rows]


def _later(date: datetime | None, than: datetime | None) -> bool:
    """Whether an expiry ``date`` is later than ``than`` (``None``: never, the latest)."""
    return than is not None and (date is None or date > than)


def reverse(
    uow: UnitOfWork,
    *,
    earn_id: int,
    key: str,
    amount: int | None = None,
    reason: str = "",
    actor: str = "",
) -> PostingRead:
    """Claw back all (``amount=None``) or part of an earn.

    What is left of the earn's own points goes first, in its lot or in the lots renewals
    moved them to (pending or not); then those of them that lapsed, out of the expired
    account, and those frozen when they lapsed (``on_expiry: freeze``) and still held, by
    an unfreeze of that freeze back to their lots just before, so that staff cannot give
    them back as free points later. Only what the member used of the earn's points (spent,
    gave away, holds frozen otherwise) is taken from its other spendable points, then from
    its pending ones, and what those cannot cover becomes debt that later credits pay off:
    a refund of an order whose points lapsed costs the member nothing more, and a member
    that owes has no points to spend or on the way. Refused on a closed account: its points
    were settled at closing, and it takes on no debt (that nothing could ever pay).
    """
    _require_key(key)
    request = _fingerprint("reverse", earn=earn_id, amount=amount, reason=reason, actor=actor)
    member, replay_id = _lock_one(uow, _member_of_posting(uow, earn_id, Kind.EARN), key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    _require_open(member, "claw-back", "冲正")
    original = _original(uow, earn_id, Kind.EARN, Kind.REVERSE)
    now = uow.clock.now()
    own = _earned_lots(uow, earn_id, member.id)
    lapsed = _lapsed(uow, member.program_id, [lot.id for lot in own], original.later_ids)
    open_amount = original.amount - original.later_amount
    wanted = open_amount if amount is None else amount
    if type(wanted) is int and 0 < wanted <= open_amount:
        short = wanted - sum(lot.remaining for lot in own) - lapsed
        if short > 0 and _unfreeze_lapsed(
            uow, member, earn_id, original, own, short, now=now, actor=actor
        ):
            # The account and the earn's lots as those unfreezes left them.
            member, _ = _lock_one(uow, member.member_id, key)
            own = _earned_lots(uow, earn_id, member.id)
    # Other lots are read for the part the earn's own lots and its lapsed points cannot
    # cover (none where they cover it all); the first of them may be its own spendable ones,
    # which the plan passes over.
    short = (wanted if type(wanted) is int else 0) - sum(lot.remaining for lot in own) - lapsed
    needed = short + sum(lot.remaining for lot in ledger.spendable(own, now)) if short > 0 else 0
    others = _spendable_lots(uow, member.id, now, max(needed, 0))
    if sum(lot.remaining for lot in others) < needed:  # all spendable: the pending go next
        others += ledger.pending(_open_lots(uow, member.id), now)
    plan = _planned(
        uow,
        member.program_id,
        key,
        request,
        lambda: ledger.plan_reverse(
            earn_id=earn_id,
            earn_amount=original.amount,
            earlier_reversed=original.later_amount,
            own_lots=own,
            lots=others,
            now=now,
            amount=amount,
            lapsed=lapsed,
        ),
    )
    if isinstance(plan, PostingRead):
        return plan
    return _write(
        uow,
        plan,
        member=member,
        key=key,
        request_hash=request,
        now=now,
        ref_posting_id=earn_id,
        reason=reason,
        actor=actor,
    )


def _lapsed(
    uow: UnitOfWork, program_id: int, lot_ids: Sequence[int], reversal_ids: Sequence[int]
) -> int:
    """What the expiry of ``lot_ids`` (an earn's lots) put into the expired account, less
    what earlier claw-backs of the earn (``reversal_ids``) took back out of it."""
    if not lot_ids:
        return 0
    expired = uow.conn.execute(
        select(func.coalesce(func.sum(allocations.c.amount), 0))
        .join(postings, postings.c.id == allocations.c.posting_id)
        .where(allocations.c.lot_id.in_(lot_ids), postings.c.kind == Kind.EXPIRE.value)
    ).scalar_one()
    taken_back = 0
    if reversal_ids:
        taken_back = uow.conn.execute(
            select(func.coalesce(func.sum(lines.c.amount), 0)).where(
                lines.c.posting_id.in_(reversal_ids),
                lines.c.account_id == system_account_ids(uow, program_id)[SystemAccount.EXPIRED],
            )
        ).scalar_one()
    return -int(expired) + int(taken_back)


CLAWED_BACK_FROZEN = "claw-back of the earn: its points frozen when they lapsed are taken back"
"""The reason of the unfreeze that hands a claw-back the earn's points frozen at expiry."""


def _unfreeze_lapsed(
    uow: UnitOfWork,
    member: _Account,
    earn_id: int,
    original: _Original,
    own: Sequence[Lot],
    wanted: int,
    *,
    now: datetime,
    actor: str,
) -> bool:
    """Give back to the earn's lots (``own``) up to ``wanted`` of their points that the
    expiry run froze (``on_expiry: freeze``) and that are still held, oldest freeze first,
    for the claw-back that follows to take: one unfreeze posting a freeze. A freeze given
    back in part by a release (to a new lot, not to the lots it held) holds no more than it
    has left. Answers whether anything was given back."""
    own_ids = {lot.id for lot in own}
    freeze_ids = uow.conn.execute(
        select(allocations.c.posting_id)
        .join(postings, postings.c.id == allocations.c.posting_id)
        .where(
            allocations.c.lot_id.in_(own_ids),
            postings.c.kind == Kind.FREEZE.value,
            postings.c.reason == FROZEN_AT_EXPIRY,
        )
        .distinct()
        .order_by(allocations.c.posting_id)
    ).scalars()
    done = False
    for freeze_id in list(freeze_ids):
        if wanted <= 0:
            break
        frozen = _original(uow, freeze_id, Kind.FREEZE, Kind.UNFREEZE)
        theirs = [a for a in frozen.allocations if a.lot_id in own_ids]
        held = -sum(a.amount for a in theirs) - sum(
            a.amount for a in frozen.later if a.lot_id in own_ids
        )
        back = min(held, frozen.amount - frozen.later_amount, wanted)
        if back <= 0:
            continue
        plan = ledger.plan_unfreeze(
            freeze_id=freeze_id, freeze_amount=frozen.amount, freeze_allocations=theirs,
            earlier_unfreezes=frozen.later, earlier_unfrozen=frozen.later_amount, amount=back,
        )  # fmt: skip
        # One key a claw-back (the earn's reversals so far number it) and a freeze: a twin
        # of this claw-back writes the same and loses on the key's unique index.
        unfreeze_key = f"claw-back:{earn_id}:{len(original.later_ids)}:{freeze_id}"
        account, _ = _lock_one(uow, member.member_id, unfreeze_key)
        _write(
            uow, plan, member=account, key=unfreeze_key,
            request_hash=_fingerprint(
                "unfreeze", freeze=freeze_id, amount=back, reason=CLAWED_BACK_FROZEN,
                actor=actor,
            ),
            now=now, ref_posting_id=freeze_id, reason=CLAWED_BACK_FROZEN, actor=actor,
        )  # fmt: skip
        wanted -= back
        done = True
    return done


def adjust(
    uow: UnitOfWork,
    *,
    member_id: int,
    amount: int,
    key: str,
    reason: str,
    actor: str,
    expires_at: datetime | None = None,
) -> PostingRead:
    """A manual correction by ``actor``: positive credits, negative debits (never below 0).
    A credit pays off any debt of the member first, as an earning does. Refused on a
    closed account, which holds no points and takes none."""
    _require_key(key)
    request = _fingerprint(
        "adjust",
        member=member_id,
        amount=amount,
        reason=reason,
        actor=actor,
        expires_at=expires_at,
    )
    member, replay_id = _lock_one(uow, member_id, key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    _require_open(member, "adjustment", "积分调整")
    now = uow.clock.now()
    needed = -amount if isinstance(amount, int) and amount < 0 else 0
    plan = _planned(
        uow,
        member.program_id,
        key,
        request,
        lambda: ledger.plan_adjust(
            lots=_spendable_lots(uow, member.id, now, needed) if needed else (),
            amount=amount,
            now=now,
            reason=reason,
            actor=actor,
            expires_at=expires_at,
            account_id=member.id,
            debt=member.debt,
        ),
    )
    if isinstance(plan, PostingRead):
        return plan
    return _write(
        uow,
        plan,
        member=member,
        key=key,
        request_hash=request,
        now=now,
        reason=reason,
        actor=actor,
    )


def check_adjustment(
    uow: UnitOfWork,
    *,
    member_id: int,
    amount: int,
    reason: str,
    actor: str,
    expires_at: datetime | None = None,
) -> None:
    """Refuse, before it is filed for approval, an adjustment that :func:`adjust` would
    refuse whenever it were approved: one of a closed account, a credit whose points would
    lapse at once (its ``expires_at`` already past). What may change meanwhile (the points
    a debit needs) is left to the approval."""
    _require_open(_account_of(uow, member_id), "adjustment", "积分调整")
    if amount > 0:
        ledger.plan_adjust(
            lots=(), amount=amount, now=uow.clock.now(), reason=reason, actor=actor,
            expires_at=expires_at,
        )  # fmt: skip


def transfer(
    uow: UnitOfWork,
    *,
    from_member_id: int,
    to_member_id: int,
    amount: int,
    key: str,
    reason: str = "",
    actor: str = "",
) -> PostingRead:
    """Move spendable points between two members of one programme; expiry dates travel along.
    Any debt of the receiver is paid off first out of what it receives (the sender's
    earliest-expiring points), as out of an earning."""
    _require_key(key)
    if from_member_id == to_member_id:
        raise SameAccount(member_id=from_member_id)
    request = _fingerprint(
        "transfer",
        sender=from_member_id,
        receiver=to_member_id,
        amount=amount,
        reason=reason,
        actor=actor,
    )
    (sender, receiver), replay_id = _lock(uow, [from_member_id, to_member_id], key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    _require_active(sender, receiver)
    if sender.program_id != receiver.program_id:
        raise InvalidInput(
            field="to_member_id",
            problem=f"member {to_member_id} belongs to another programme; points can move "
            "only between members of the same programme",
            problem_zh=f"会员 {to_member_id} 属于其他计划;积分只能在同一计划的会员之间转赠",
        )
    ledger.postings.require_positive(amount)
    now = uow.clock.now()
    plan = _planned(
        uow,
        sender.program_id,
        key,
        request,
        lambda: ledger.plan_transfer(
            lots=_spendable_lots(uow, sender.id, now, amount),
            amount=amount,
            now=now,
            account_id=sender.id,
            receiver_debt=receiver.debt,
        ),
    )
    if isinstance(plan, PostingRead):
        return plan
    return _write(
        uow,
        plan,
        member=sender,
        counterparty=receiver,
        key=key,
        request_hash=request,
        now=now,
        reason=reason,
        actor=actor,
    )


def freeze(
    uow: UnitOfWork, *, member_id: int, amount: int, key: str, reason: str, actor: str,
    require_active: bool = False,
) -> PostingRead:  # fmt: skip
    """Hold ``amount`` spendable points away from the member (for example during a review).
    Staff may hold the points of a member in any state; ``require_active`` refuses a member
    that is not active by the state its locked account carries, as a debit does (a hold that
    pays for a redemption)."""
    _require_key(key)
    request = _fingerprint("freeze", member=member_id, amount=amount, reason=reason, actor=actor)
    member, replay_id, opened = _lock_spending(uow, member_id, key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    if require_active:
        _require_active(member)
    ledger.postings.require_positive(amount)
    now = uow.clock.now()
    plan = _planned(
        uow,
        member.program_id,
        key,
        request,
        lambda: ledger.plan_freeze(
            lots=_spendable_lots(uow, member.id, now, amount, opened),
            amount=amount,
            now=now,
            reason=reason,
            actor=actor,
            account_id=member.id,
        ),
    )
    if isinstance(plan, PostingRead):
        return plan
    return _write(
        uow,
        plan,
        member=member,
        key=key,
        request_hash=request,
        now=now,
        reason=reason,
        actor=actor,
    )


def unfreeze(
    uow: UnitOfWork,
    *,
    freeze_id: int,
    key: str,
    amount: int | None = None,
    reason: str = "",
    actor: str = "",
    pays_debt: bool = True,
) -> PostingRead:
    """Release all (``amount=None``) or part of a freeze back to the lots it held; to a
    closed account, as :func:`refund` gives back to one. The member's debt is paid off
    first out of what comes back (:func:`jifen.ledger.plan_unfreeze`), unless
    ``pays_debt`` is false: points given back only to be spent at once for what they were
    held for (:func:`spend_frozen`)."""
    _require_key(key)
    request = _fingerprint("unfreeze", freeze=freeze_id, amount=amount, reason=reason, actor=actor)
    member, replay_id = _lock_one(uow, _member_of_posting(uow, freeze_id, Kind.FREEZE), key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    original = _original(uow, freeze_id, Kind.FREEZE, Kind.UNFREEZE)
    plan = _planned(
        uow,
        member.program_id,
        key,
        request,
        lambda: ledger.plan_unfreeze(
            freeze_id=freeze_id,
            freeze_amount=original.amount,
            freeze_allocations=original.allocations,
            earlier_unfreezes=original.later,
            earlier_unfrozen=original.later_amount,
            amount=amount,
            debt=member.debt if pays_debt else 0,
        ),
    )
    if isinstance(plan, PostingRead):
        return plan
    return _given_back(
        uow, plan, member=member, key=key, request_hash=request, ref_posting_id=freeze_id,
        reason=reason, actor=actor,
    )  # fmt: skip


def spend_frozen(
    uow: UnitOfWork,
    *,
    freeze_id: int,
    release_key: str,
    key: str,
    reason: str,
    release_reason: str,
    actor: str,
    into: SystemAccount = SystemAccount.REDEEMED,
) -> PostingRead:
    """Spend all that a freeze holds: :func:`unfreeze` gives it back to the lots it held
    (key ``release_key``), then a spend (``key``) takes it from those very lots, past their
    date or not (:func:`jifen.ledger.plan_spend_released`). Points held for a redemption
    that completes after a wait (its cooling-off, its payment) pay for it even where their
    lots lapsed meanwhile, instead of the member's other points while the held ones lapse
    at the next expiry run. Where the points given back have since moved on (a renewal
    carried them to a later lot), the spend takes spendable points earliest-expiring first,
    as :func:`spend` does. Answers the spend."""
    released = unfreeze(
        uow, freeze_id=freeze_id, key=release_key, reason=release_reason, actor=actor,
        pays_debt=False,
    )  # fmt: skip
    member_id, amount = released.member_id, released.amount
    request = _spend_request(member_id, amount, reason, actor, into)
    member, replay_id, opened = _lock_spending(uow, member_id, key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    _require_active(member)
    now = uow.clock.now()
    given: dict[int, int] = {}
    for lot_id, change in uow.conn.execute(
        select(allocations.c.lot_id, allocations.c.amount).where(
            allocations.c.posting_id == released.id, allocations.c.amount > 0
        )
    ):
        given[lot_id] = given.get(lot_id, 0) + change
    remaining = {lot.id: lot.remaining for lot in _open_lots(uow, member.id)}
    if given and all(remaining.get(lot_id, 0) >= back for lot_id, back in given.items()):
        back_to = [Allocation(lot_id, back) for lot_id, back in given.items()]
        plan = ledger.plan_spend_released(released=back_to, into=into)
    else:
        planned = _planned(
            uow, member.program_id, key, request,
            lambda: ledger.plan_spend(
                lots=_spendable_lots(uow, member.id, now, amount, opened), amount=amount,
                now=now, account_id=member.id, into=into,
            ),
        )  # fmt: skip
        if isinstance(planned, PostingRead):
            return planned
        plan = planned
    return _write(
        uow, plan, member=member, key=key, request_hash=request, now=now, reason=reason,
        actor=actor,
    )  # fmt: skip


EXPIRED_REASON = "lots reached their expiry date"
FROZEN_AT_EXPIRY = "lots reached their expiry date: frozen instead of cleared"


@dataclass(frozen=True, slots=True)
class ExpiryChunk:
    accounts: int
    """Member accounts whose due lots this chunk expired (or froze)."""
    lots: int
    points: int
    found: int = 0
    """Accounts the chunk found with due lots (0: the run is over)."""
    account_ids: tuple[int, ...] = ()
    """The accounts it found (their postings, if any, are :func:`expiries` at ``at``)."""
    at: datetime | None = None
    """The moment its postings bear."""


def expire_member(uow: UnitOfWork, *, member_id: int, freeze: bool = False) -> PostingRead | None:
    """Expire what remains of the member's lots that are due now; ``None`` if none are."""
    member, _ = _lock_one(uow, member_id, key="")
    written, _ = _expire_locked(uow, [member], uow.clock.now(), freeze=freeze)
    return written[0] if written else None


CLOSED_REASON = "account closed: its points are forfeited 账户已注销,积分作废"
"""The reason of the posting that clears a closed account's points."""


@dataclass(frozen=True, slots=True)
class ClosingSettlement:
    """What closing a member account did with its points: those forfeited by kind (spendable,
    pending, past their date but not yet expired), the posting that cleared them (``None``:
    the account held none) and the debt left on the account."""

    policy: str
    forfeited: int
    available: int
    pending: int
    overdue: int
    posting_id: int | None
    debt_left: int


def settle_closing(
    uow: UnitOfWork, *, member_id: int, policy: str, actor: str
) -> ClosingSettlement:
    """Settle the points of a member account being closed, in the closing transaction, under
    the account's lock. Refused while points are frozen (a freeze is a review or a hold that
    staff resolve first) and, under the ``refuse`` policy, while the account holds points;
    under ``forfeit``, every open lot is cleared into the expired account by one expiry
    posting. A debt stays on the account as it is: writing it off would need a posting no
    operation makes, and a closed account earns nothing that could pay it."""
    key = f"member-closed:{member_id}"
    lock_account(uow, member_id=member_id, key=key)
    held = balance(uow, member_id=member_id)
    if held.frozen:
        raise StateConflict(
            problem=f"Member {member_id} has {held.frozen} frozen points (a review, a hold or "
            "points frozen when they lapsed): unfreeze or release them before closing the "
            "account.",
            problem_zh=f"会员 {member_id} 有 {held.frozen} 积分处于冻结状态(审核、暂扣或过期时"
            "冻结):请先解冻或返还,再注销账户。",
        )
    if policy == "refuse" and held.balance:
        raise StateConflict(
            problem=f"Member {member_id} still holds {held.balance} points ({held.available} "
            f"available, {held.pending} pending, {held.overdue} past their date); the "
            "programme does not forfeit points at closing: spend, transfer or adjust them "
            "first.",
            problem_zh=f"会员 {member_id} 仍有 {held.balance} 积分(可用 {held.available},"
            f"待生效 {held.pending},已过期待清理 {held.overdue});本计划注销账户时不作废积分:"
            "请先使用、转赠或调整这些积分。",
        )
    posting = forfeit_all(uow, member_id=member_id, key=key, reason=CLOSED_REASON, actor=actor)
    return ClosingSettlement(
        policy=policy, forfeited=held.balance, available=held.available, pending=held.pending,
        overdue=held.overdue, posting_id=posting.id if posting is not None else None,
        debt_left=held.debt,
    )  # fmt: skip


def forfeit_all(
    uow: UnitOfWork,
    *,
    member_id: int,
    key: str,
    reason: str,
    actor: str,
    ref_posting_id: int | None = None,
) -> PostingRead | None:
    """Clear every point the member holds (available, pending or past its date) into the
    expired account, as one expiry posting (referring to ``ref_posting_id``, the posting
    whose points it forfeits, if any); ``None`` when it holds none."""
    _require_key(key)
    request = _fingerprint(
        "forfeit", member=member_id, reason=reason, actor=actor,
        **({"ref": ref_posting_id} if ref_posting_id is not None else {}),
    )  # fmt: skip
    member, replay_id = _lock_one(uow, member_id, key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    plan = ledger.plan_forfeit(lots=_open_lots(uow, member.id))
    if plan is None:
        return None
    return _write(
        uow, plan, member=member, key=key, request_hash=request, now=uow.clock.now(),
        ref_posting_id=ref_posting_id, reason=reason, actor=actor,
    )  # fmt: skip


def expire_due(
    uow: UnitOfWork, *, program_id: int, limit: int = 1000, freeze: bool = False
) -> ExpiryChunk:
    """Expire (or with ``freeze``, freeze) the due lots of up to ``limit`` member accounts
    of the programme, one posting per account, written together.

    A lot once expired has nothing remaining, so the next call takes the next accounts: a
    run is a loop of calls until one finds no account, and a run cut short anywhere
    simply continues — no lot is expired twice, none is missed. On PostgreSQL a call
    passes over accounts another transaction holds while there are others to take, so
    several workers calling side by side each expire accounts of their own; once only
    held ones are left it waits for them, so "none found" still means none is due."""
    now = uow.clock.now()
    uow.local.pop(_HELD, None)
    rows = (
        store.take_accounts_with_due_lots(uow.conn, program_id, now, limit)
        if uow.dialect == "postgresql"
        else []
    )
    if not rows:
        account_ids = store.accounts_with_due_lots(uow.conn, program_id, now, limit)
        if not account_ids:
            return ExpiryChunk(0, 0, 0, found=0)
        rows = store.lock_accounts_by_id(uow.conn, account_ids)
    if uow.dialect == "postgresql":  # the same rows, built and written by one statement
        system = SystemAccount.FROZEN if freeze else SystemAccount.EXPIRED
        expired, lots_expired, points = store.expire_in_place(
            uow.conn, [row[0] for row in rows], now=now, stamp=round(now.timestamp() * 1_000_000),
            kind=(Kind.FREEZE if freeze else Kind.EXPIRE).value,
            system_account_id=system_account_ids(uow, program_id)[system], frozen=freeze,
            reason=FROZEN_AT_EXPIRY if freeze else EXPIRED_REASON, actor="system",
        )  # fmt: skip
        return ExpiryChunk(
            accounts=expired, lots=lots_expired, points=points, found=len(rows),
            account_ids=tuple(row[0] for row in rows), at=now,
        )  # fmt: skip
    locked = [_account(row) for row in rows]
    written, lots_expired = _expire_locked(uow, locked, now, freeze=freeze)
    return ExpiryChunk(
        accounts=len(written), lots=lots_expired, points=sum(p.amount for p in written),
        found=len(rows), account_ids=tuple(holder.id for holder in locked), at=now,
    )  # fmt: skip


def expiries(
    uow: UnitOfWork, *, program_id: int, account_ids: Sequence[int], at: datetime
) -> list[PostingRead]:
    """The postings an expiry chunk made at ``at`` for these accounts (an expiry, or a
    freeze at expiry), read at once. Neither moves a debt."""
    if not account_ids:
        return []
    rows = uow.conn.execute(
        select(postings.c.id, postings.c.kind, postings.c.amount, accounts.c.member_id,
               postings.c.reason, postings.c.actor, postings.c.created_at)
        .join(accounts, accounts.c.id == postings.c.account_id)
        .where(postings.c.program_id == program_id,
               among(uow.dialect, postings.c.account_id, sorted(set(account_ids))),
               postings.c.created_at == at,
               postings.c.kind.in_((Kind.EXPIRE.value, Kind.FREEZE.value)))
        .order_by(postings.c.id)
    ).all()  # fmt: skip
    return [
        PostingRead(
            id=row.id, kind=row.kind, amount=row.amount, member_id=row.member_id,
            reason=row.reason, actor=row.actor, created_at=row.created_at,
        )
        for row in rows
    ]  # fmt: skip


def _expire_locked(
    uow: UnitOfWork, holders: Sequence[_Account], now: datetime, *, freeze: bool
) -> tuple[list[PostingRead], int]:
    """One expiry posting for each of the locked ``holders`` with due lots; and how many
    lots they took."""
    due: dict[int, list[Lot]] = {}
    for row in store.due_lots(uow.conn, [h.id for h in holders], now):
        due.setdefault(row[0], []).append(Lot(*row[1:]))
    stamp = round(now.timestamp() * 1_000_000)
    reason = FROZEN_AT_EXPIRY if freeze else EXPIRED_REASON
    batch: list[tuple[_Account, Plan, store.PostingRows]] = []
    for holder in holders:
        plan = ledger.plan_expire(lots=due.get(holder.id, ()), now=now, freeze=freeze)
        if plan is None:
            continue
        # The chain position makes the key unique even if lots become due again at the same
        # time (a refund restoring an already expired lot). The time comes first: a run's
        # keys sit together in the key index, where a million accounts' keys would
        # otherwise each land on a page of their own.
        key = f"expire:{stamp}:{holder.id}:{holder.head_seq}"
        request = _fingerprint("expire", member=holder.member_id, at=stamp, seq=holder.head_seq)
        rows = _rows(
            uow, plan, member=holder, counterparty=None, key=key, request_hash=request, now=now,
            ref_posting_id=None, reason=reason, actor="system",
        )  # fmt: skip
        batch.append((holder, plan, rows))
    ids = store.write_postings(uow.conn, [rows for _, _, rows in batch])
    written = [
        PostingRead.model_construct(
            id=posting_id,
            kind=plan.kind.value,
            amount=plan.amount,
            member_id=holder.member_id,
            counterparty_member_id=None,
            ref_posting_id=None,
            reason=reason,
            actor="system",
            created_at=now,
            debt_change=0,
        )
        for posting_id, (holder, plan, _) in zip(ids, batch, strict=True)
    ]
    return written, sum(len(plan.allocations) for _, plan, _ in batch)


def renew(
    uow: UnitOfWork,
    *,
    member_id: int,
    new_date: Callable[[Lot], datetime | None],
    key: str,
    reason: str,
    actor: str = "system",
) -> PostingRead | None:
    """Give the member's open lots the later of their date and ``new_date(lot)`` (``None``:
    never), as one renewal posting; ``None`` when no date moves. ``key`` makes it
    idempotent."""
    _require_key(key)
    member, replay_id = _lock_one(uow, member_id, key)
    if replay_id is not None:
        return _posting_read(
            uow, uow.conn.execute(select(postings).where(postings.c.id == replay_id)).one(),
            replayed=True,
        )  # fmt: skip
    now = uow.clock.now()
    open_lots = _open_lots(uow, member.id)
    plan = ledger.plan_renew(
        lots=open_lots, now=now, new_dates={lot.id: new_date(lot) for lot in open_lots}
    )
    if plan is None:
        return None
    request = _fingerprint("renew", member=member_id, key=key)
    return _write(
        uow, plan, member=member, key=key, request_hash=request, now=now, reason=reason,
        actor=actor,
    )  # fmt: skip


def release(
    uow: UnitOfWork,
    *,
    freeze_id: int,
    key: str,
    expires_at: datetime | None,
    amount: int | None = None,
    reason: str = "",
    actor: str = "",
) -> PostingRead:
    """Give back all or part of a freeze as a new lot valid until ``expires_at`` (points that
    were frozen when they lapsed: their own lots are past their date)."""
    _require_key(key)
    request = _fingerprint(
        "release", freeze=freeze_id, amount=amount, expires_at=expires_at, reason=reason,
        actor=actor,
    )  # fmt: skip
    member, replay_id = _lock_one(uow, _member_of_posting(uow, freeze_id, Kind.FREEZE), key)
    if replay_id is not None:
        return _replay(uow, replay_id, key, request)
    original = _original(uow, freeze_id, Kind.FREEZE, Kind.UNFREEZE)
    now = uow.clock.now()
    plan = ledger.plan_release(
        freeze_id=freeze_id,
        freeze_amount=original.amount,
        earlier_unfrozen=original.later_amount,
        amount=amount,
        now=now,
        expires_at=expires_at,
        debt=member.debt,
    )
    return _write(
        uow, plan, member=member, key=key, request_hash=request, now=now,
        ref_posting_id=freeze_id, reason=reason, actor=actor,
    )  # fmt: skip


def open_freezes(
    uow: UnitOfWork, *, member_id: int, reason: str | None = None, key_prefix: str | None = None
) -> list[tuple[int, int, datetime]]:
    """The member's freezes not wholly given back: (freeze id, points still frozen, when),
    oldest first; only those with ``reason`` or a key starting with ``key_prefix``."""
    account = _account_of(uow, member_id)
    query = select(postings.c.id, postings.c.amount, postings.c.created_at).where(
        postings.c.account_id == account.id, postings.c.kind == Kind.FREEZE.value
    )
    if reason is not None:
        query = query.where(postings.c.reason == reason)
    if key_prefix is not None:
        query = query.where(postings.c.idempotency_key.startswith(key_prefix, autoescape=True))
    freezes = uow.conn.execute(query.order_by(postings.c.id)).all()
    if not freezes:
        return []
    released = dict(
        uow.conn.execute(
            select(postings.c.ref_posting_id, func.sum(postings.c.amount))
            .where(
                postings.c.ref_posting_id.in_([f.id for f in freezes]),
                postings.c.kind == Kind.UNFREEZE.value,
            )
            .group_by(postings.c.ref_posting_id)
        ).all()
    )
    return [
        (f.id, f.amount - int(released.get(f.id, 0)), f.created_at)
        for f in freezes
        if f.amount > int(released.get(f.id, 0))
    ]


def last_activity(
    uow: UnitOfWork,
    *,
    member_ids: Sequence[int],
    kinds: Sequence[str] = ("earn", "spend", "transfer"),
) -> dict[int, datetime]:
    """When each member last earned, spent or gave points: postings of its doing, not those
    jifen made by itself (actor :data:`SYSTEM`: a birthday gift, a dormancy restoration).
    What dormancy counts as activity, with the member's own events
    (``jifen.expiry.service.last_activity``)."""
    if not member_ids:
        return {}
    rows = uow.conn.execute(
        select(accounts.c.member_id, func.max(postings.c.created_at))
        .select_from(postings.join(accounts, accounts.c.id == postings.c.account_id))
        .where(
            among(uow.dialect, accounts.c.member_id, member_ids),
            postings.c.kind.in_(kinds),
            postings.c.actor != SYSTEM,
        )
        .group_by(accounts.c.member_id)
    ).all()
    return {int(m): when for m, when in rows}


def holders_page(
    uow: UnitOfWork, *, program_id: int, after_member_id: int, limit: int
) -> list[int]:
    """Members of the programme holding points (or frozen points), by member id, for jobs
    that walk them in chunks."""
    rows = uow.conn.execute(
        select(accounts.c.member_id)
        .where(
            accounts.c.program_id == program_id,
            accounts.c.member_id > after_member_id,
            (accounts.c.balance > 0) | (accounts.c.frozen > 0),
        )
        .order_by(accounts.c.member_id)
        .limit(limit)
    )
    return [int(member_id) for (member_id,) in rows]


def members_with_frozen(uow: UnitOfWork, *, member_ids: Sequence[int]) -> list[int]:
    """Those of ``member_ids`` whose accounts hold frozen points, by member id."""
    if not member_ids:
        return []
    rows = uow.conn.execute(
        select(accounts.c.member_id)
        .where(
            among(uow.dialect, accounts.c.member_id, member_ids),
            accounts.c.currency == CURRENCY,
            accounts.c.frozen > 0,
        )
        .order_by(accounts.c.member_id)
    )
    return [int(member_id) for (member_id,) in rows]


def key_used(uow: UnitOfWork, *, program_id: int, key: str) -> bool:
    """Whether the programme has a posting made with ``key``."""
    found = uow.conn.execute(
        select(postings.c.id).where(
            postings.c.program_id == program_id, postings.c.idempotency_key == key
        )
    ).first()
    return found is not None


def count_postings(
    uow: UnitOfWork, *, member_id: int, key_prefix: str, since: datetime | None = None
) -> int:
    """How many of the member's postings (made at or after ``since``, if given) have a key
    starting with ``key_prefix``."""
    account = _account_of(uow, member_id)
    query = select(func.count()).where(
        postings.c.account_id == account.id,
        postings.c.idempotency_key.startswith(key_prefix, autoescape=True),
    )
    if since is not None:
        query = query.where(postings.c.created_at >= since)
    return int(uow.conn.execute(query).scalar_one())


def expiring_between(
    uow: UnitOfWork,
    *,
    program_id: int,
    start: datetime,
    end: datetime,
    after_member_id: int,
    limit: int,
) -> dict[int, dict[datetime, int]]:
    """For up to ``limit`` members (after ``after_member_id``, by id): the points of their
    lots lapsing in (``start``, ``end``], by expiry date."""
    members = (
        select(accounts.c.member_id)
        .select_from(lots.join(accounts, accounts.c.id == lots.c.account_id))
        .where(
            accounts.c.program_id == program_id,
            accounts.c.member_id > after_member_id,
            lots.c.remaining > 0,
            lots.c.expires_at > start,
            lots.c.expires_at <= end,
        )
        .group_by(accounts.c.member_id)
        .order_by(accounts.c.member_id)
        .limit(limit)
    )
    ids = [int(m) for (m,) in uow.conn.execute(members)]
    if not ids:
        return {}
    rows = uow.conn.execute(
        select(accounts.c.member_id, lots.c.expires_at, func.sum(lots.c.remaining))
        .select_from(lots.join(accounts, accounts.c.id == lots.c.account_id))
        .where(
            among(uow.dialect, accounts.c.member_id, ids),
            lots.c.remaining > 0,
            lots.c.expires_at > start,
            lots.c.expires_at <= end,
        )
        .group_by(accounts.c.member_id, lots.c.expires_at)
    )
    found: dict[int, dict[datetime, int]] = {m: {} for m in ids}
    for member_id, expires_at, points in rows:
        found[int(member_id)][expires_at] = int(points)
    return found


# --------------------------------------------------------------------------- queries


def _account_of(uow: UnitOfWork, member_id: int) -> Any:
    row = uow.conn.execute(
        select(*store.ACCOUNT_COLUMNS).where(
            accounts.c.member_id == member_id, accounts.c.currency == CURRENCY
        )
    ).one_or_none()
    if row is None:
        raise UnknownMember(member_id=member_id)
    return row


ADJUSTMENTS_COUNTED_OVER = timedelta(hours=24)
"""How far back an operator's own adjustments add up against the approval threshold."""


def adjusted_lately(uow: UnitOfWork, *, program_id: int, actor: str) -> int:
    """The points ``actor`` adjusted directly in the programme over the last day (credits
    and debits alike): adjustments an approval executed, which carry its key, are not
    counted. One read of the partial index of adjustments by author.

    Read under :func:`_hold_adjustments`, held to the end of the transaction: the caller
    posts (or files for approval) in the same transaction, so that two adjustments of one
    actor at once cannot each add up the day without the other.

    The budget is the actor's, a staff account's: one person with several accounts has one
    budget for each. That is left as it is, a choice of the product, not an oversight."""
    _hold_adjustments(uow, program_id=program_id, actor=actor)
    since = uow.clock.now() - ADJUSTMENTS_COUNTED_OVER
    total = uow.conn.execute(
        select(func.coalesce(func.sum(postings.c.amount), 0)).where(
            postings.c.kind == literal_column("'adjust'"),  # a literal: the index's predicate
            postings.c.program_id == program_id,
            postings.c.actor == actor,
            postings.c.created_at > since,
            postings.c.idempotency_key.not_like("approval:%"),
        )
    ).scalar_one()
    return int(total)


def _hold_adjustments(uow: UnitOfWork, *, program_id: int, actor: str) -> None:
    """Wait for, then hold until the transaction ends, ``actor``'s turn to adjust in the
    programme. PostgreSQL: a transaction-scoped advisory lock on a stable 64-bit digest of
    programme and actor (other actors and programmes do not wait); SQLite serialises
    writers already."""
    if uow.dialect != "postgresql":
        return
    digest = hashlib.sha256(f"points.adjust:{program_id}:{actor}".encode()).digest()
    uow.conn.execute(
        select(func.pg_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True)))
    )


def balance(uow: UnitOfWork, *, member_id: int) -> BalanceSummary:
    """Balance, what is available, pending, overdue, frozen and owed, and what expires when."""
    rows = store.balance_rows(uow.conn, member_id)
    if not rows:
        raise UnknownMember(member_id=member_id)
    program_id, balance_, frozen, debt = rows[0][:4]
    now = uow.clock.now()
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    available = pending = overdue = 0
    expiring: dict[Any, int] = {}
    for *_, remaining, available_at, expires_at in rows:
        if remaining is None or available_at is None:  # the account holds no open lot
            break
        if available_at > now:
            pending += remaining
        elif expires_at is not None and expires_at <= now:
            overdue += remaining
        else:
            available += remaining
        if expires_at is not None:
            day = expires_at.astimezone(zone).date()
            expiring[day] = expiring.get(day, 0) + remaining
    # Built from the database's own figures: no validation needed on this hot read.
    return BalanceSummary.model_construct(
        member_id=member_id,
        balance=balance_,
        available=available,
        pending=pending,
        overdue=overdue,
        frozen=frozen,
        debt=debt,
        expiring=[
            ExpiringAmount.model_construct(date=d, amount=n) for d, n in sorted(expiring.items())
        ],
    )


def member_lots(uow: UnitOfWork, *, member_id: int, open_only: bool = True) -> list[LotRead]:
    """All the member's lots, earliest expiry first."""
    return lots_page(uow, member_id=member_id, open_only=open_only).items


def lots_page(
    uow: UnitOfWork,
    *,
    member_id: int,
    open_only: bool = True,
    cursor: str | None = None,
    limit: int | None = None,
) -> LotPage:
    """The member's lots, earliest expiry first (those that never expire last), a page at a
    time: ``cursor`` is the previous page's ``next_cursor``."""
    account = _account_of(uow, member_id)
    query = select(lots).where(lots.c.account_id == account.id)
    if open_only:
        query = query.where(lots.c.remaining > 0)
    if cursor is not None:
        after_expiry, after_id = _decode_lot_cursor(cursor)
        if after_expiry is None:
            query = query.where(lots.c.expires_at.is_(None), lots.c.id > after_id)
        else:
            query = query.where(
                (lots.c.expires_at > after_expiry)
                | ((lots.c.expires_at == after_expiry) & (lots.c.id > after_id))
                | lots.c.expires_at.is_(None)
            )
    query = query.order_by(lots.c.expires_at.asc().nulls_last(), lots.c.id)
    if limit is not None:
        query = query.limit(limit + 1)  # one more than asked: whether another page follows
    rows = uow.conn.execute(query).all()
    more = limit is not None and len(rows) > limit
    items = [
        LotRead(
            id=r.id,
            posting_id=r.posting_id,
            amount=r.amount,
            remaining=r.remaining,
            available_at=r.available_at,
            expires_at=r.expires_at,
            source_lot_id=r.source_lot_id,
        )
        for r in (rows[:limit] if more else rows)
    ]
    return LotPage(items=items, next_cursor=_encode_lot_cursor(items[-1]) if more else None)


def _encode_lot_cursor(lot: LotRead) -> str:
    expiry = "none" if lot.expires_at is None else str(_micros(lot.expires_at))
    return base64.urlsafe_b64encode(f"lot:{expiry}:{lot.id}".encode()).decode().rstrip("=")


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def _decode_lot_cursor(cursor: str) -> tuple[datetime | None, int]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, expiry, lot_id = text.split(":")
        number = int(lot_id)
        moment = None if expiry == "none" else EPOCH + timedelta(microseconds=int(expiry))
        if prefix != "lot" or not 0 <= number < 2**63:
            raise ValueError(cursor)
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise InvalidInput(
            field="cursor",
            problem="pass back a next_cursor from a previous page",
            problem_zh="请原样传回上一页给出的 next_cursor",
        ) from None
    return moment, number


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, seq = text.split(":")
        number = int(seq)
        if prefix != "seq" or not 0 <= number < 2**63:  # beyond BIGINT: not one of ours
            raise ValueError(text)
        return number
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            field="cursor",
            problem="not a cursor this API gave out; start again without one",
            problem_zh="不是本 API 给出的游标;请不带游标从头开始",
        ) from exc


def history(
    uow: UnitOfWork,
    *,
    member_id: int,
    cursor: str | None = None,
    limit: int = 50,
    kinds: Iterable[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> HistoryPage:
    """The member's postings, newest first, each with its lines, counterpart and reason."""
    if not 1 <= limit <= 500:
        raise InvalidInput(
            field="limit",
            problem=f"must be between 1 and 500, got {limit}",
            problem_zh=f"须在 1 到 500 之间,收到的是 {limit}",
        )
    account = _account_of(uow, member_id)
    conditions = [chain_entries.c.account_id == account.id]
    if cursor is not None:
        conditions.append(chain_entries.c.seq < _decode_cursor(cursor))
    if kinds:
        kind_list = list(kinds)
        unknown = sorted(set(kind_list) - {k.value for k in Kind})
        if unknown:
            raise InvalidInput(
                field="kinds",
                problem=f"unknown kind(s) {unknown}; use {[k.value for k in Kind]}",
                problem_zh=f"未知的记录类型 {unknown};可用类型:{[k.value for k in Kind]}",
            )
        conditions.append(postings.c.kind.in_(kind_list))
    if since is not None:
        conditions.append(postings.c.created_at >= since)
    if until is not None:
        conditions.append(postings.c.created_at < until)
    rows = uow.conn.execute(
        select(chain_entries.c.seq, postings)
        .select_from(chain_entries.join(postings, postings.c.id == chain_entries.c.posting_id))
        .where(and_(*conditions))
        .order_by(chain_entries.c.seq.desc())
        .limit(limit + 1)
    ).all()
    page, more = rows[:limit], len(rows) > limit
    labelled = _lines_of(uow, [r.id for r in page])
    items = []
    for r in page:
        posting_lines = labelled.get(r.id, [])
        mine = [line for line in posting_lines if line.account_id == account.id]
        others = [line.account for line in posting_lines if line.account_id != account.id]
        items.append(
            HistoryEntry(
                seq=r.seq,
                posting_id=r.id,
                kind=r.kind,
                change=sum(line.amount for line in mine),
                amount=r.amount,
                counterpart=", ".join(others),
                reason=r.reason,
                actor=r.actor,
                ref_posting_id=r.ref_posting_id,
                created_at=r.created_at,
                lines=posting_lines,
            )
        )
    next_cursor = _encode_cursor(page[-1].seq) if more and page else None
    return HistoryPage(items=items, next_cursor=next_cursor)


def _lines_of(uow: UnitOfWork, posting_ids: list[int]) -> dict[int, list[LineRead]]:
    if not posting_ids:
        return {}
    # Imported here: members' service opens points accounts, so it imports this module.
    from jifen.members import service as members_service

    rows = uow.conn.execute(
        select(
            lines.c.posting_id,
            lines.c.account_id,
            lines.c.amount,
            accounts.c.system_code,
            accounts.c.member_id,
        )
        .select_from(lines.join(accounts, accounts.c.id == lines.c.account_id))
        .where(lines.c.posting_id.in_(posting_ids))
        .order_by(lines.c.id)
    ).all()
    refs = members_service.external_refs(
        uow, member_ids={r.member_id for r in rows if r.member_id is not None}
    )
    result: dict[int, list[LineRead]] = {}
    for r in rows:
        label = r.system_code if r.system_code else f"member:{refs.get(r.member_id, r.member_id)}"
        result.setdefault(r.posting_id, []).append(
            LineRead(account_id=r.account_id, account=label, amount=r.amount)
        )
    return result


def posting_counts(uow: UnitOfWork, *, program_id: int) -> dict[str, int]:
    """How many postings of each kind the programme has."""
    rows = uow.conn.execute(
        select(postings.c.kind, func.count())
        .where(postings.c.program_id == program_id)
        .group_by(postings.c.kind)
    )
    return {kind: int(count) for kind, count in rows}


def get_posting(uow: UnitOfWork, *, program_id: int, posting_id: int) -> PostingRead:
    """One posting of the programme; a posting of another programme is not found here."""
    row = uow.conn.execute(
        select(postings).where(postings.c.id == posting_id, postings.c.program_id == program_id)
    ).one_or_none()
    if row is None:
        raise UnknownPosting(posting_id=posting_id, expected="points", expected_zh="积分")
    return _posting_read(uow, row, replayed=False)


def record_origin(
    uow: UnitOfWork, *, posting_id: int, merchant: str | None, store: str | None
) -> None:
    """Remember the merchant and store a posting was made for (nothing when neither)."""
    if merchant is None and store is None:
        return
    exists = uow.conn.execute(
        select(posting_origins.c.posting_id).where(posting_origins.c.posting_id == posting_id)
    ).first()
    if exists is None:  # a replayed posting already has its origin
        uow.conn.execute(
            posting_origins.insert(),
            {"posting_id": posting_id, "merchant": merchant, "store": store},
        )


def origin_of(uow: UnitOfWork, *, posting_id: int) -> tuple[str | None, str | None]:
    """The merchant and store a posting was made for; ``(None, None)`` when not recorded."""
    row = uow.conn.execute(
        select(posting_origins.c.merchant, posting_origins.c.store).where(
            posting_origins.c.posting_id == posting_id
        )
    ).one_or_none()
    return (row.merchant, row.store) if row is not None else (None, None)


def earned_by(
    uow: UnitOfWork, *, member_ids: Iterable[int], since: datetime, until: datetime
) -> dict[int, int]:
    """Points each of ``member_ids`` earned in (``since``, ``until``], less what was clawed
    back of those earnings up to ``until``: a claw-back counts in the window of the earning
    it claws back (joined by its reference), so one in the window of an earning made before
    it takes nothing off the window's earnings. One grouped query (members who earned
    nothing are left out)."""
    ids = sorted(set(member_ids))
    if not ids:
        return {}
    signed = case((postings.c.kind == "reverse", -postings.c.amount), else_=postings.c.amount)
    earning = postings.alias("earning")
    rows = uow.conn.execute(
        select(accounts.c.member_id, func.sum(signed))
        .select_from(
            postings.join(accounts, accounts.c.id == postings.c.account_id).outerjoin(
                earning,
                and_(postings.c.kind == "reverse", earning.c.id == postings.c.ref_posting_id),
            )
        )
        .where(
            among(uow.dialect, accounts.c.member_id, ids),
            accounts.c.currency == CURRENCY,
            postings.c.kind.in_(("earn", "reverse")),
            postings.c.created_at > since,
            postings.c.created_at <= until,
            # a claw-back comes after its earning: an earning in the window is after since
            (postings.c.kind != "reverse") | (earning.c.created_at > since),
        )
        .group_by(accounts.c.member_id)
    ).all()
    return {int(member_id): int(total or 0) for member_id, total in rows}
