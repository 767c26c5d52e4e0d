"""PostgreSQL expires many accounts' due lots in one statement (``store.expire_in_place``),
which spells out in SQL what ``points.service`` builds in Python for the same expiry: the
posting, its digest and request hash, its lines, chain link and allocations, the emptied
lots and the account's figures. Given any lots, both write the same rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.ledger import Kind, SystemAccount
from jifen.points import service as points
from jifen.points import store
from tests.factories import assert_ledger_sound, new_members, new_program

# A member's lots, earned a year before the run: (points, days to its expiry or None for
# never, days until it is available), then how much it spends at once (FIFO, partly emptying
# lots). The run comes a year later: lots of up to 365 days are due, the others not yet.
LOTS = st.lists(
    st.tuples(
        st.integers(1, 5_000),
        st.one_of(st.none(), st.integers(31, 400)),
        st.sampled_from([0, 0, 10, 30]),
    ),
    max_size=6,
)
MEMBER = st.tuples(LOTS, st.integers(0, 100))


class _Undo(Exception):
    """Rolls the savepoint of the Python path back."""


def _written(uow: UnitOfWork, program_id: int, account_ids: list[int]) -> dict[str, Any]:
    """Everything an expiry writes, with postings known by their keys rather than ids."""
    params = {"p": program_id, "a": account_ids}
    rows = uow.conn.execute
    return {
        "postings": sorted(
            rows(text(
                "SELECT idempotency_key, program_id, kind, request_hash, account_id,"
                " counterparty_id, ref_posting_id, amount, reason, actor, created_at, digest"
                " FROM postings WHERE program_id = :p AND kind IN ('expire', 'freeze')"
            ), params).all()
        ),
        "lines": sorted(
            rows(text(
                "SELECT p.idempotency_key, l.account_id, l.amount FROM lines l"
                " JOIN postings p ON p.id = l.posting_id"
                " WHERE p.program_id = :p AND p.kind IN ('expire', 'freeze')"
            ), params).all()
        ),
        "chain": sorted(
            rows(text(
                "SELECT c.account_id, c.seq, p.idempotency_key, c.chain_hash"
                " FROM chain_entries c JOIN postings p ON p.id = c.posting_id"
                " WHERE c.account_id = ANY(:a)"
            ), params).all()
        ),
        "allocations": sorted(
            rows(text(
                "SELECT p.idempotency_key, a.lot_id, a.amount FROM allocations a"
                " JOIN postings p ON p.id = a.posting_id"
                " WHERE p.program_id = :p AND p.kind IN ('expire', 'freeze')"
            ), params).all()
        ),
        "lots": sorted(
            rows(text("SELECT id, remaining FROM lots WHERE account_id = ANY(:a)"), params).all()
        ),
        "accounts": sorted(
            rows(text(
                "SELECT id, balance, frozen, debt, head_seq, head_hash FROM accounts"
                " WHERE id = ANY(:a)"
            ), params).all()
        ),
    }  # fmt: skip


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(members=st.lists(MEMBER, min_size=1, max_size=4), freeze=st.booleans())
def test_the_statement_writes_what_the_python_path_writes(
    pg: Database, members: list[tuple[list[tuple[int, int | None, int]], int]], freeze: bool
) -> None:
    # Given members with lots of every kind: lapsed, pending, never expiring, partly spent.
    clock = ManualClock(datetime(2025, 12, 31, 16, 0, 7, 123456, tzinfo=UTC))
    pg.clock = clock
    program = new_program(pg)
    ids = new_members(pg, program.id, len(members))
    now = clock.now()

    def build(uow: UnitOfWork) -> None:
        for member_id, (lots, spent) in zip(ids, members, strict=True):
            for n, (amount, expires, available) in enumerate(lots):
                points.earn(
                    uow, member_id=member_id, amount=amount, key=f"e{member_id}-{n}",
                    available_at=now + timedelta(days=available),
                    expires_at=None if expires is None else now + timedelta(days=expires),
                )  # fmt: skip
            amount = min(spent, points.balance(uow, member_id=member_id).available)
            if amount:
                points.spend(uow, member_id=member_id, amount=amount, key=f"s{member_id}")

    pg.run(build)
    clock.advance(timedelta(days=365, seconds=1))
    now = clock.now()
    system = SystemAccount.FROZEN if freeze else SystemAccount.EXPIRED

    def both(uow: UnitOfWork) -> tuple[dict[str, Any], dict[str, Any], tuple[int, int, int]]:
        rows = store.lock_accounts_by_id(
            uow.conn,
            [a for (a,) in uow.conn.execute(
                text("SELECT id FROM accounts WHERE member_id = ANY(:m)"), {"m": ids}
            )],
        )  # fmt: skip
        account_ids = [row[0] for row in rows]
        # When the Python path writes the expiry (then undone) ...
        python: dict[str, Any] = {}
        try:
            with uow.savepoint():
                locked = [points._account(row) for row in rows]
                points._expire_locked(uow, locked, now, freeze=freeze)
                python = _written(uow, program.id, account_ids)
                raise _Undo
        except _Undo:
            pass
        # ... and the statement writes it.
        figures = store.expire_in_place(
            uow.conn, account_ids, now=now, stamp=round(now.timestamp() * 1_000_000),
            kind=(Kind.FREEZE if freeze else Kind.EXPIRE).value,
            system_account_id=points.system_account_ids(uow, program.id)[system],
            frozen=freeze, reason=points.FROZEN_AT_EXPIRY if freeze else points.EXPIRED_REASON,
            actor="system",
        )  # fmt: skip
        return python, _written(uow, program.id, account_ids), figures

    python, statement, (postings, lots, total) = pg.run(both)

    # Then they wrote the same rows, and the ledger verifies.
    assert statement == python
    assert postings == len(python["postings"])
    assert lots == len(python["allocations"])
    assert total == sum(row.amount for row in python["postings"])
    assert_ledger_sound(pg, program.id)
