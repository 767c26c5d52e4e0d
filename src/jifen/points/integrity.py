"""Proof that the stored ledger is what was posted: verify, reconcile, checkpoint.

- :func:`verify` recomputes every posting's digest and every member account's hash chain,
  and checks the checkpoints, naming each posting that was edited, deleted or inserted out
  of band.
- :func:`reconcile` recomputes every cached figure (balances, frozen, debt, lots'
  remaining) from the lines and allocations and reports every difference, with the
  programme-wide sums that must be zero, and every reference between the ledger's rows
  that leads nowhere (the ledger's tables carry no foreign keys: see ``REFERENCES``).
- :func:`checkpoint` hashes all account heads together, chained to the previous checkpoint.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    CompoundSelect,
    bindparam,
    case,
    cast,
    func,
    literal,
    null,
    select,
    union_all,
)

from jifen import ledger
from jifen.db.engine import READ_ONLY
from jifen.db.uow import UnitOfWork
from jifen.ledger import GENESIS, Kind, PostingFacts, SystemAccount
from jifen.members.models import members
from jifen.points.models import (
    REFERENCES,
    accounts,
    allocations,
    chain_entries,
    checkpoint_heads,
    checkpoints,
    lines,
    lots,
    postings,
)
from jifen.programs.models import programs

_CHUNK = 2000


@dataclass(frozen=True)
class Problem:
    """One thing found wrong, with the posting or account it is about."""

    what: str
    posting_id: int | None = None
    account_id: int | None = None

    def __str__(self) -> str:
        where = []
        if self.posting_id is not None:
            where.append(f"posting {self.posting_id}")
        if self.account_id is not None:
            where.append(f"account {self.account_id}")
        return f"{', '.join(where)}: {self.what}" if where else self.what


@dataclass
class VerifyReport:
    postings: int = 0
    accounts: int = 0
    checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class ReconcileReport:
    accounts: int = 0
    lots: int = 0
    system_balances: dict[str, int] = field(default_factory=dict)
    member_total: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _program_filter(column: Any, program_id: int | None) -> list[Any]:
    return [] if program_id is None else [column == program_id]


# --------------------------------------------------------------------------- verify


def _posting_chunks(uow: UnitOfWork, program_id: int | None) -> Iterator[Sequence[Any]]:
    last = 0
    while True:
        chunk = uow.conn.execute(
            select(postings)
            .where(postings.c.id > last, *_program_filter(postings.c.program_id, program_id))
            .order_by(postings.c.id)
            .limit(_CHUNK)
        ).all()
        if not chunk:
            return
        yield chunk
        last = chunk[-1].id


def _recomputed_digests(uow: UnitOfWork, chunk: Sequence[Any]) -> dict[int, str]:
    ids = [p.id for p in chunk]
    by_posting: dict[str, dict[int, list[Any]]] = {
        "lines": defaultdict(list),
        "allocations": defaultdict(list),
        "lots": defaultdict(list),
    }
    for row in uow.conn.execute(
        select(lines.c.posting_id, lines.c.account_id, lines.c.amount).where(
            lines.c.posting_id.in_(ids)
        )
    ):
        by_posting["lines"][row.posting_id].append((row.account_id, row.amount))
    for row in uow.conn.execute(
        select(allocations.c.posting_id, allocations.c.lot_id, allocations.c.amount).where(
            allocations.c.posting_id.in_(ids)
        )
    ):
        by_posting["allocations"][row.posting_id].append((row.lot_id, row.amount))
    for row in uow.conn.execute(select(lots).where(lots.c.posting_id.in_(ids))):
        by_posting["lots"][row.posting_id].append(
            (row.account_id, row.amount, row.available_at, row.expires_at, row.source_lot_id)
        )
    return {
        p.id: ledger.posting_digest(
            PostingFacts(
                program_id=p.program_id,
                kind=p.kind,
                idempotency_key=p.idempotency_key,
                created_at=p.created_at,
                amount=p.amount,
                ref_posting_id=p.ref_posting_id,
                reason=p.reason,
                actor=p.actor,
                lines=tuple(by_posting["lines"][p.id]),
                allocations=tuple(by_posting["allocations"][p.id]),
                new_lots=tuple(by_posting["lots"][p.id]),
            )
        )
        for p in chunk
    }


def verify(
    uow: UnitOfWork, *, program_id: int | None = None, kept_root: str | None = None
) -> VerifyReport:
    """Check every posting digest, every member account chain and every checkpoint, and that
    ``kept_root`` (a root :func:`checkpoint` printed, kept outside the database) is one of
    theirs: a history rewritten with its checkpoints no longer has it. All as they stood at
    one moment: postings made meanwhile are left for the next check."""
    with _one_moment(uow) as seen:
        return _verify(seen, program_id, kept_root)


def _verify(uow: UnitOfWork, program_id: int | None, kept_root: str | None) -> VerifyReport:
    report = VerifyReport()
    stored_digest: dict[int, str] = {}
    for chunk in _posting_chunks(uow, program_id):
        recomputed = _recomputed_digests(uow, chunk)
        for p in chunk:
            report.postings += 1
            stored_digest[p.id] = p.digest
            if recomputed[p.id] != p.digest:
                report.problems.append(
                    Problem(
                        "was edited: its lines, lots or fields no longer match its digest", p.id
                    )
                )
    _verify_chains(uow, program_id, stored_digest, report)
    roots = _verify_checkpoints(uow, program_id, report)
    if kept_root is not None and kept_root not in roots:
        report.problems.append(
            Problem(
                f"no checkpoint has the root {kept_root}: the checkpoints were removed or "
                "rewritten, or the root is of another programme or installation"
            )
        )
    return report


def _verify_chains(
    uow: UnitOfWork, program_id: int | None, digests: dict[int, str], report: VerifyReport
) -> None:
    member_accounts = {
        row.id: row
        for row in uow.conn.execute(
            select(accounts.c.id, accounts.c.head_seq, accounts.c.head_hash).where(
                accounts.c.member_id.is_not(None),
                *_program_filter(accounts.c.program_id, program_id),
            )
        )
    }
    report.accounts = len(member_accounts)
    chained: set[tuple[int, int]] = set()  # (posting, account)
    seen: set[int] = set()
    current: int | None = None
    link, seq, last_posting = GENESIS, 0, None

    def close(account_id: int) -> None:
        head = member_accounts[account_id]
        if (seq, link) != (head.head_seq, head.head_hash):
            report.problems.append(
                Problem(
                    f"chain ends at entry {seq} but the account's head says {head.head_seq}: "
                    f"postings after {last_posting} were deleted or the head was rewritten",
                    last_posting,
                    account_id,
                )
            )

    entries = uow.conn.execute(
        select(chain_entries)
        .join(accounts, accounts.c.id == chain_entries.c.account_id)
        .where(*_program_filter(accounts.c.program_id, program_id))
        .order_by(chain_entries.c.account_id, chain_entries.c.seq)
    )
    for row in entries:
        if row.account_id != current:
            if current is not None:
                close(current)
            current, link, seq, last_posting = row.account_id, GENESIS, 0, None
            seen.add(current)
        chained.add((row.posting_id, row.account_id))
        if row.seq != seq + 1:
            report.problems.append(
                Problem(
                    f"entries {seq + 1}..{row.seq - 1} of the account's chain are missing: "
                    f"postings between {last_posting} and {row.posting_id} were deleted",
                    row.posting_id,
                    row.account_id,
                )
            )
        expected = ledger.chain_link(link, row.seq, digests.get(row.posting_id, ""))
        if row.chain_hash != expected:
            report.problems.append(
                Problem(
                    f"breaks the chain at entry {row.seq}: edited, or inserted out of band",
                    row.posting_id,
                    row.account_id,
                )
            )
        # Carry on from the stored link, so one bad entry is reported once, not to the end.
        link, seq, last_posting = row.chain_hash, row.seq, row.posting_id
    if current is not None:
        close(current)
    for account_id, head in member_accounts.items():
        if head.head_seq and account_id not in seen:
            report.problems.append(
                Problem(f"head says {head.head_seq} entries but none are stored: deleted",
                        None, account_id)
            )  # fmt: skip
    concerned = {posting_id for posting_id, _ in chained}
    for posting_id in sorted(set(digests) - concerned):
        report.problems.append(
            Problem("is in no member account's chain: inserted out of band", posting_id)
        )
    member_lines = uow.conn.execute(
        select(lines.c.posting_id, lines.c.account_id)
        .join(accounts, accounts.c.id == lines.c.account_id)
        .where(
            accounts.c.member_id.is_not(None),
            *_program_filter(accounts.c.program_id, program_id),
        )
    )
    for posting_id, account_id in member_lines:
        if (posting_id, account_id) not in chained:
            report.problems.append(
                Problem("moves points of an account whose chain does not hold it: inserted "
                        "out of band", posting_id, account_id)
            )  # fmt: skip


def _verify_checkpoints(uow: UnitOfWork, program_id: int | None, report: VerifyReport) -> set[str]:
    """Check each checkpoint against its heads and the entries it sealed; their roots."""
    previous: dict[int, str] = {}
    rows = uow.conn.execute(
        select(checkpoints)
        .where(*_program_filter(checkpoints.c.program_id, program_id))
        .order_by(checkpoints.c.id)
    ).all()
    for cp in rows:
        report.checkpoints += 1
        heads = uow.conn.execute(
            select(
                checkpoint_heads.c.account_id,
                checkpoint_heads.c.seq,
                checkpoint_heads.c.chain_hash,
                chain_entries.c.chain_hash.label("stored"),
            )
            .select_from(
                checkpoint_heads.outerjoin(
                    chain_entries,
                    (chain_entries.c.account_id == checkpoint_heads.c.account_id)
                    & (chain_entries.c.seq == checkpoint_heads.c.seq),
                )
            )
            .where(checkpoint_heads.c.checkpoint_id == cp.id)
        ).all()
        expected_previous = previous.get(cp.program_id, GENESIS)
        root = ledger.checkpoint_root(cp.previous_root, [(h[0], h[1], h[2]) for h in heads])
        if (
            cp.previous_root != expected_previous
            or root != cp.root_hash
            or len(heads) != cp.accounts
        ):
            report.problems.append(Problem(f"checkpoint {cp.id} was altered"))
        for h in heads:
            if h.stored != h.chain_hash:
                report.problems.append(
                    Problem(
                        f"entry {h.seq} sealed by checkpoint {cp.id} is gone or changed: "
                        "history was rewritten",
                        None,
                        h.account_id,
                    )
                )
        previous[cp.program_id] = cp.root_hash
    return {cp.root_hash for cp in rows}


def checkpoint(uow: UnitOfWork, *, program_id: int) -> tuple[int, str]:
    """Seal every member account's current head; returns (checkpoint id, root hash)."""
    heads = [
        (row.id, row.head_seq, row.head_hash)
        for row in uow.conn.execute(
            select(accounts.c.id, accounts.c.head_seq, accounts.c.head_hash).where(
                accounts.c.program_id == program_id,
                accounts.c.member_id.is_not(None),
                accounts.c.head_seq > 0,
            )
        )
    ]
    previous = (
        uow.conn.execute(
            select(checkpoints.c.root_hash)
            .where(checkpoints.c.program_id == program_id)
            .order_by(checkpoints.c.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        or GENESIS
    )
    root = ledger.checkpoint_root(previous, heads)
    checkpoint_id = uow.conn.execute(
        checkpoints.insert().returning(checkpoints.c.id),
        {
            "program_id": program_id,
            "created_at": uow.clock.now(),
            "accounts": len(heads),
            "previous_root": previous,
            "root_hash": root,
        },
    ).scalar_one()
    if heads:
        uow.conn.execute(
            checkpoint_heads.insert(),
            [
                {"checkpoint_id": checkpoint_id, "account_id": a, "seq": s, "chain_hash": h}
                for a, s, h in heads
            ],
        )
    return int(checkpoint_id), root


# --------------------------------------------------------------------------- reconcile


_ONE_SNAPSHOT = ("REPEATABLE READ", "SERIALIZABLE")


@contextmanager
def _one_moment(uow: UnitOfWork) -> Iterator[UnitOfWork]:
    """``uow``, or where it would see what commits between its statements (PostgreSQL at
    READ COMMITTED, a job's transaction, or a read-only unit of work) a REPEATABLE READ
    transaction of its own: the checks read postings, lines, lots, chains and accounts one
    after the other, and a posting committed between two of those reads would look like a
    difference or a broken chain. SQLite's transaction is one snapshot already."""
    if uow.dialect != "postgresql" or uow.conn.get_isolation_level() in _ONE_SNAPSHOT:
        yield uow
        return
    with uow.conn.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ", **{READ_ONLY: True})
        with conn.begin():
            yield UnitOfWork(conn, uow.clock, uow.cache)


def reconcile(uow: UnitOfWork, *, program_id: int | None = None) -> ReconcileReport:
    """Recompute every cached figure from lines and allocations and report each difference;
    and each member account's copy of its member's state; all as they stood at one moment."""
    with _one_moment(uow) as seen:
        return _reconcile(seen, program_id)


def _reconcile(uow: UnitOfWork, program_id: int | None) -> ReconcileReport:
    report = ReconcileReport()
    conn = uow.conn
    report.problems.extend(_dangling(uow, program_id))
    in_program = _program_filter(accounts.c.program_id, program_id)

    unbalanced = conn.execute(
        select(lines.c.posting_id, func.sum(lines.c.amount))
        .join(postings, postings.c.id == lines.c.posting_id)
        .where(*_program_filter(postings.c.program_id, program_id))
        .group_by(lines.c.posting_id)
        .having(func.sum(lines.c.amount) != 0)
    ).all()
    for posting_id, total in unbalanced:
        report.problems.append(Problem(f"lines sum to {total}, not 0", posting_id))

    per_program = conn.execute(
        select(accounts.c.program_id, func.sum(lines.c.amount))
        .join(accounts, accounts.c.id == lines.c.account_id)
        .where(*in_program)
        .group_by(accounts.c.program_id)
    ).all()
    for pid, total in per_program:
        if total != 0:
            report.problems.append(Problem(f"programme {pid}: all accounts sum to {total}, not 0"))

    line_sums = dict(
        conn.execute(
            select(lines.c.account_id, func.sum(lines.c.amount))
            .join(accounts, accounts.c.id == lines.c.account_id)
            .where(*in_program)
            .group_by(lines.c.account_id)
        ).all()
    )
    lot_sums = dict(
        conn.execute(
            select(lots.c.account_id, func.sum(lots.c.remaining))
            .join(accounts, accounts.c.id == lots.c.account_id)
            .where(*in_program)
            .group_by(lots.c.account_id)
        ).all()
    )
    frozen_sums: dict[int, int] = defaultdict(int)
    for account_id, kind, total in conn.execute(
        select(postings.c.account_id, postings.c.kind, func.sum(postings.c.amount))
        .join(accounts, accounts.c.id == postings.c.account_id)
        .where(postings.c.kind.in_([Kind.FREEZE.value, Kind.UNFREEZE.value]), *in_program)
        .group_by(postings.c.account_id, postings.c.kind)
    ):
        frozen_sums[account_id] += total if kind == Kind.FREEZE.value else -total
    receivable = accounts.alias("receivable")
    # A posting's receivable lines move its member's debt; a transfer's, its receiver's
    # (what it received paid that off first).
    debtor = case(
        (postings.c.kind == Kind.TRANSFER.value, postings.c.counterparty_id),
        else_=postings.c.account_id,
    )
    debt_sums = dict(
        conn.execute(
            select(debtor, -func.sum(lines.c.amount))
            .select_from(
                lines.join(postings, postings.c.id == lines.c.posting_id).join(
                    receivable, receivable.c.id == lines.c.account_id
                )
            )
            .where(
                receivable.c.system_code == SystemAccount.RECEIVABLE.value,
                *_program_filter(receivable.c.program_id, program_id),
            )
            .group_by(debtor)
        ).all()
    )

    # What posts to an account reads the member's state there (see points.service
    # .set_member_state): it must be the member's own.
    states = dict(
        conn.execute(
            select(members.c.id, members.c.state).where(
                *_program_filter(members.c.program_id, program_id)
            )
        ).all()
    )
    for row in conn.execute(select(accounts).where(*in_program).order_by(accounts.c.id)):
        from_lines = int(line_sums.get(row.id, 0))
        if row.system_code is not None:
            report.system_balances[row.system_code] = (
                report.system_balances.get(row.system_code, 0) + from_lines
            )
            continue
        report.accounts += 1
        report.member_total += from_lines
        expected = {
            "balance (stored) vs its lines": (row.balance, from_lines),
            "balance vs its lots' remaining": (row.balance, int(lot_sums.get(row.id, 0))),
            "frozen vs its freezes less unfreezes": (row.frozen, frozen_sums.get(row.id, 0)),
            "debt vs its receivable lines": (row.debt, int(debt_sums.get(row.id, 0))),
        }
        for label, (stored, recomputed) in expected.items():
            if stored != recomputed:
                report.problems.append(
                    Problem(f"{label}: {stored} != {recomputed}", account_id=row.id)
                )
        if row.member_state != states.get(row.member_id):
            report.problems.append(
                Problem(
                    f"member state carried by the account vs the member's: {row.member_state} "
                    f"!= {states.get(row.member_id)}",
                    account_id=row.id,
                )
            )
        if min(row.balance, row.frozen, row.debt) < 0:
            report.problems.append(
                Problem("a balance, frozen or debt figure is negative", account_id=row.id)
            )

    lot_rows = conn.execute(
        select(
            lots.c.id,
            lots.c.account_id,
            lots.c.amount,
            lots.c.remaining,
            func.coalesce(func.sum(allocations.c.amount), 0).label("moved"),
        )
        .select_from(
            lots.join(accounts, accounts.c.id == lots.c.account_id).outerjoin(
                allocations, allocations.c.lot_id == lots.c.id
            )
        )
        .where(*in_program)
        .group_by(lots.c.id, lots.c.account_id, lots.c.amount, lots.c.remaining)
    ).all()
    for lot in lot_rows:
        report.lots += 1
        if lot.remaining != lot.amount + lot.moved or lot.remaining < 0:
            report.problems.append(
                Problem(
                    f"lot {lot.id}: remaining {lot.remaining} != amount {lot.amount} "
                    f"+ allocations {lot.moved}",
                    account_id=lot.account_id,
                )
            )
    return report


def _dangling(uow: UnitOfWork, program_id: int | None) -> list[Problem]:
    """Each reference of :data:`jifen.points.models.REFERENCES` that leads to no row, in the
    rows of the programme's postings (a row whose posting is gone belongs to no programme:
    it is found by a run over every programme)."""
    statement = _dangling_statement(scoped=program_id is not None)
    rows = uow.conn.execute(statement, {"program_id": program_id}).all()
    found: list[Problem] = []
    for number, first, second, value, posting_id in rows:
        column, target = REFERENCES[number]
        names = [c.name for c in column.table.primary_key.columns]
        what = ", ".join(f"{n} {v}" for n, v in zip(names, (first, second), strict=False))
        found.append(
            Problem(
                f"{column.table.name} ({what}): {column.name} {value} is no row of {target}",
                posting_id=posting_id,
            )
        )
    return found


@cache
def _dangling_statement(*, scoped: bool) -> CompoundSelect[int, int, int, int, int]:
    """The statement :func:`_dangling` runs, a part a reference, scoped to the postings of
    the programme bound as ``program_id`` or not. Built once: building it costs more than
    running it on a programme's ledger."""
    targets = {"accounts": accounts, "postings": postings, "lots": lots, "programs": programs}
    program_id = bindparam("program_id", type_=BigInteger)
    parts = []
    for number, (column, target) in enumerate(REFERENCES):
        table = column.table
        to = targets[target].alias("target").c.id  # an alias: lots name lots
        posting = table.c.id if table is postings else table.c.posting_id
        key = list(table.primary_key.columns)
        second = key[1] if len(key) > 1 else null()
        scope = [] if not scoped else [
            table.c.program_id == program_id if table is postings
            else posting.in_(select(postings.c.id).where(postings.c.program_id == program_id))
        ]  # fmt: skip
        parts.append(
            select(
                literal(number, BigInteger).label("reference"),
                cast(key[0], BigInteger).label("first"),
                cast(second, BigInteger).label("second"),
                cast(column, BigInteger).label("value"),
                cast(posting, BigInteger).label("posting_id"),
            ).where(column.is_not(None), ~select(to).where(to == column).exists(), *scope)
        )
    return union_all(*parts).order_by("reference", "first", "second")
