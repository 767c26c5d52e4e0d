"""On PostgreSQL most earnings are one statement (``store.credit_at_once``): the service
plans the earning before the lock, for an active member who owes nothing, and the statement
that locks the account writes the plan only if the locked row bears that out, spelling the
digest and the chain link out in SQL. Given any earning, it writes what the general path
(lock, plan, write) writes; where the row does not bear the plan out, nothing is written
and the earning ends as the general path ends it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import (
    IdempotencyConflict,
    InsufficientPoints,
    InvalidInput,
    Refused,
    StateConflict,
    UnknownMember,
)
from jifen.ledger import SystemAccount
from jifen.members import service as members
from jifen.points import service as points
from jifen.points.schemas import PostingRead
from tests.factories import assert_ledger_sound, new_members, new_program

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
EARNING = st.fixed_dictionaries(
    {
        "amount": st.integers(1, 10**12),
        # days from now: in the past (available at once) or the future (pending)
        "available": st.one_of(st.none(), st.integers(-3, 40)),
        "expires": st.one_of(st.none(), st.integers(41, 800)),
        "reason": TEXT,
        "actor": TEXT,
        "key": TEXT.filter(lambda k: k.strip() != ""),
    }
)


def _one_member(pg: Database, at: datetime) -> tuple[ManualClock, Any, int]:
    """A programme with one member, on a clock set at ``at``: (the clock, programme, member)."""
    clock = ManualClock(at)
    pg.clock = clock
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    return clock, program, member_id


class _Undo(Exception):
    """Rolls the savepoint of the general path back."""


def _general_path(uow: UnitOfWork, *, member_id: int, key: str, **_: Any) -> Any:
    """What an earning runs instead of the one statement (SQLite's path): lock, then plan."""
    return points._lock_one(uow, member_id, key)


def _written(uow: UnitOfWork, account_id: int) -> dict[str, Any]:
    """What the member's earnings wrote, postings known by their keys rather than ids."""
    params = {"a": account_id}
    rows = uow.conn.execute
    return {
        "postings": rows(text(
            "SELECT idempotency_key, program_id, kind, request_hash, account_id,"
            " counterparty_id, ref_posting_id, amount, reason, actor, created_at, digest"
            " FROM postings WHERE account_id = :a ORDER BY id"
        ), params).all(),
        "lines": rows(text(
            "SELECT p.idempotency_key, l.account_id, l.amount FROM lines l"
            " JOIN postings p ON p.id = l.posting_id WHERE p.account_id = :a ORDER BY l.id"
        ), params).all(),
        "chain": rows(text(
            "SELECT c.account_id, c.seq, p.idempotency_key, c.chain_hash"
            " FROM chain_entries c JOIN postings p ON p.id = c.posting_id"
            " WHERE c.account_id = :a ORDER BY c.seq"
        ), params).all(),
        "lots": rows(text(
            "SELECT p.idempotency_key, l.account_id, l.amount, l.remaining, l.available_at,"
            " l.expires_at, l.source_lot_id FROM lots l JOIN postings p ON p.id = l.posting_id"
            " WHERE l.account_id = :a ORDER BY l.id"
        ), params).all(),
        "account": rows(text(
            "SELECT balance, frozen, debt, head_seq, head_hash, member_state FROM accounts"
            " WHERE id = :a"
        ), params).one(),
    }  # fmt: skip


def _earn(uow: UnitOfWork, member_id: int, earning: dict[str, Any], now: datetime) -> Any:
    available, expires = earning["available"], earning["expires"]
    return points.earn(
        uow, member_id=member_id, amount=earning["amount"], key=earning["key"],
        available_at=None if available is None else now + timedelta(days=available),
        expires_at=None if expires is None else now + timedelta(days=expires),
        reason=earning["reason"], actor=earning["actor"],
    )  # fmt: skip


def _account_id(uow: UnitOfWork, member_id: int) -> int:
    return int(
        uow.conn.execute(
            text("SELECT id FROM accounts WHERE member_id = :m"), {"m": member_id}
        ).scalar_one()
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(before=st.integers(0, 3), earning=EARNING)
def test_the_statement_writes_what_the_general_path_writes(
    pg: Database, before: int, earning: dict[str, Any]
) -> None:
    # Given a member with some history (its chain's head is not the first) ...
    clock, program, member_id = _one_member(pg, datetime(2026, 3, 1, 8, 30, 0, 123456, tzinfo=UTC))
    for n in range(before):
        pg.run(lambda uow, n=n: points.earn(uow, member_id=member_id, amount=7, key=f"b{n}"))
    now = clock.now()

    def both(uow: UnitOfWork) -> tuple[dict[str, Any], dict[str, Any], Any]:
        account_id = _account_id(uow, member_id)
        # When the general path writes the earning (the lock taken first, then undone) ...
        general: dict[str, Any] = {}
        try:
            with uow.savepoint(), pytest.MonkeyPatch.context() as patch:
                patch.setattr(points, "_earn_at_once", _general_path)
                _earn(uow, member_id, earning, now)
                general = _written(uow, account_id)
                raise _Undo
        except _Undo:
            pass
        # ... and the one statement writes it.
        answer = _earn(uow, member_id, earning, now)
        return general, _written(uow, account_id), answer

    general, statement, answer = pg.run(both)

    # Then both wrote the same rows, the statement wrote them, and the ledger verifies.
    assert statement == general
    assert statement["postings"][-1].idempotency_key == earning["key"]
    assert answer.amount == earning["amount"] and answer.debt_change == 0
    assert answer.model_dump() == PostingRead.model_validate(answer.model_dump()).model_dump()
    assert_ledger_sound(pg, program.id)


def test_the_statement_is_what_an_earning_runs(pg: Database) -> None:
    # Given an active member who owes nothing, when it earns through the service ...
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)

    def earn_at_once(uow: UnitOfWork) -> Any:
        return points._earn_at_once(
            uow, member_id=member_id, amount=30, key="k", request_hash="h",
            available_at=None, expires_at=None, reason="", actor="",
        )  # fmt: skip

    # ... then the statement wrote the posting (no account handed back to go on from).
    assert isinstance(pg.run(earn_at_once), PostingRead)
    assert pg.run(lambda uow: points.balance(uow, member_id=member_id)).available == 30


def test_the_statement_is_what_a_spending_runs(pg: Database) -> None:
    # Given an active member with points in two lots, when it spends through the service ...
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=30, key="a"))
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=30, key="b"))

    def spend_at_once(uow: UnitOfWork) -> Any:
        return points._spend_at_once(
            uow, member_id=member_id, amount=45, key="k", request_hash="h", reason="",
            actor="", into=SystemAccount.REDEEMED,
        )  # fmt: skip

    # ... then the statement wrote the posting, taking the first lot whole.
    assert isinstance(pg.run(spend_at_once), PostingRead)
    lots = pg.run(lambda uow: points.member_lots(uow, member_id=member_id))
    assert [lot.remaining for lot in lots] == [15]


def _both_paths(
    pg: Database, member_id: int, act: Any, at_once: str, general_path: Any
) -> tuple[Any, Any]:
    """``act`` once with ``points.<at_once>`` replaced by ``general_path`` (undone), and
    once as the service runs it: (each one's answer or the refusal it raised, what each
    wrote, the allocations of the member's postings)."""

    def outcome(uow: UnitOfWork) -> Any:
        try:
            dump = act(uow).model_dump()
        except (InvalidInput, StateConflict, IdempotencyConflict, Refused) as exc:
            return (type(exc), str(exc))
        if not dump["replayed"]:
            del dump["id"]  # a new posting's id differs between the two (the sequence moved on)
        return dump

    def both(uow: UnitOfWork) -> tuple[Any, Any]:
        account_id = _account_id(uow, member_id)
        general: Any = None
        try:
            with uow.savepoint(), pytest.MonkeyPatch.context() as patch:
                patch.setattr(points, at_once, general_path)
                general = (outcome(uow), _written(uow, account_id), _allocations(uow, account_id))
                raise _Undo
        except _Undo:
            pass
        return general, (outcome(uow), _written(uow, account_id), _allocations(uow, account_id))

    return pg.run(both)


@pytest.mark.parametrize("case", ["debt", "closed", "replay", "conflict", "lapsed replay"])
def test_where_the_row_does_not_bear_the_plan_out_the_earning_ends_as_it_would(
    pg: Database, case: str
) -> None:
    # Given a member who owes points, is closed, or has used the key already ...
    clock, program, member_id = _one_member(pg, datetime(2026, 3, 1, 8, 30, tzinfo=UTC))
    now = clock.now()
    expires = now + timedelta(days=2)
    earned = pg.run(
        lambda uow: points.earn(
            uow, member_id=member_id, amount=100, key="later", expires_at=expires
        )
    )
    if case == "debt":
        pg.run(lambda uow: points.spend(uow, member_id=member_id, amount=80, key="s"))
        pg.run(lambda uow: points.reverse(uow, earn_id=earned.id, key="r", reason="order refunded"))
    elif case == "closed":
        pg.run(lambda uow: points.spend(uow, member_id=member_id, amount=100, key="s"))
        pg.run(lambda uow: members.change_state(uow, program_id=program.id, member_id=member_id,
                                                state="closed", actor="t"))  # fmt: skip
    elif case == "lapsed replay":
        clock.advance(timedelta(days=3))  # the replayed body's expiry is past by now
    amount = 99 if case == "conflict" else 100

    # When it earns (again: the key "later") through the general path and as the service runs
    # it, one after the other ...
    def act(uow: UnitOfWork) -> Any:
        key = "later" if case in ("replay", "conflict", "lapsed replay") else "new"
        return points.earn(uow, member_id=member_id, amount=amount, key=key, expires_at=expires)

    general, service = _both_paths(pg, member_id, act, "_earn_at_once", _general_path)

    # Then both end the same way and write the same rows.
    assert service == general
    if case == "debt":
        assert service[1]["account"].debt == 0 and service[1]["account"].balance == 20
    elif case == "closed":
        assert service[0][0] is StateConflict
    elif case == "conflict":
        assert service[0][0] is IdempotencyConflict
    else:
        assert service[0]["replayed"] and service[0]["id"] == earned.id
    assert_ledger_sound(pg, program.id)


# --------------------------------------------------------------------------- spending

# A member's lots: (points, days to expiry or None for never, days until available), some
# earned long ago so that they lapse before the spending, and the spending's size as a share
# of what the lots hold (over 1: more than the member has).
SPEND_LOTS = st.lists(
    st.tuples(
        st.integers(1, 5_000),
        st.one_of(st.none(), st.integers(1, 400)),
        st.sampled_from([0, 0, 0, 5, 30]),
    ),
    max_size=8,
)


def _general_spending(uow: UnitOfWork, *, member_id: int, key: str, **_: Any) -> Any:
    """What a spending runs instead of the one statement (SQLite's path): the spending lock,
    then the plan."""
    return points._lock_spending(uow, member_id, key)


def _spend_both(
    pg: Database, member_id: int, amount: int, key: str, into: Any = None
) -> tuple[Any, Any]:
    """The spending through the general path (undone), then as the service runs it."""
    extra = {} if into is None else {"into": into}

    def act(uow: UnitOfWork) -> Any:
        return points.spend(uow, member_id=member_id, amount=amount, key=key, **extra)

    return _both_paths(pg, member_id, act, "_spend_at_once", _general_spending)


def _allocations(uow: UnitOfWork, account_id: int) -> list[Any]:
    return uow.conn.execute(
        text(
            "SELECT p.idempotency_key, lp.idempotency_key, a.amount FROM allocations a"
            " JOIN postings p ON p.id = a.posting_id JOIN lots l ON l.id = a.lot_id"
            " JOIN postings lp ON lp.id = l.posting_id WHERE p.account_id = :a ORDER BY a.id"
        ),
        {"a": account_id},
    ).all()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lots=SPEND_LOTS, share=st.floats(0.01, 1.2), earning=EARNING)
def test_a_spending_statement_writes_what_the_general_path_writes(
    pg: Database, lots: list[tuple[int, int | None, int]], share: float, earning: dict[str, Any]
) -> None:
    # Given a member whose lots lapse, wait or never expire, 20 days after they were earned
    # (a lot of up to 20 days has lapsed, one available in 30 is pending) ...
    clock, program, member_id = _one_member(pg, datetime(2026, 3, 1, 8, 30, 0, 123456, tzinfo=UTC))
    start = clock.now()

    def build(uow: UnitOfWork) -> None:
        for n, (amount, expires, available) in enumerate(lots):
            points.earn(
                uow, member_id=member_id, amount=amount, key=f"e{n}",
                available_at=start + timedelta(days=available),
                expires_at=None if expires is None else start + timedelta(days=expires + 30),
            )  # fmt: skip

    pg.run(build)
    clock.advance(timedelta(days=20 + 30))
    amount = max(1, int(share * sum(amount for amount, _, _ in lots)))

    # When it spends through the general path and as the service runs it ...
    general, service = _spend_both(pg, member_id, amount, earning["key"] + "s")

    # Then both end the same way (the spending, or the same refusal) and write the same rows.
    assert service == general
    assert_ledger_sound(pg, program.id)


def test_a_spending_of_more_lots_than_one_read_holds_ends_as_the_general_path(
    pg: Database,
) -> None:
    # Given a member with 70 lots, the first ones (by expiry) pending ...
    clock, program, member_id = _one_member(pg, datetime(2026, 3, 1, 8, 30, tzinfo=UTC))
    now = clock.now()

    def build(uow: UnitOfWork) -> None:
        for n in range(70):
            points.earn(
                uow, member_id=member_id, amount=10, key=f"e{n}",
                available_at=now + timedelta(days=5 if n < 10 else 0),
                expires_at=now + timedelta(days=30 + n),
            )  # fmt: skip

    pg.run(build)

    # When it spends 600 points: 60 lots of those spendable, beyond the 64 first read ...
    general, service = _spend_both(pg, member_id, 600, "big")

    # Then it spent them as the general path does; and refuses 700 the same way too.
    assert service == general
    assert len(service[2]) == 60
    assert pg.run(lambda uow: points.balance(uow, member_id=member_id)).available == 0
    general, service = _spend_both(pg, member_id, 1, "more")
    assert service == general and service[0][0] is InsufficientPoints
    assert_ledger_sound(pg, program.id)


@pytest.mark.parametrize("case", ["replay", "conflict", "closed", "charity", "unknown"])
def test_a_spending_the_row_does_not_bear_out_ends_as_it_would(pg: Database, case: str) -> None:
    # Given a member who spent with the key already, or is closed ...
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    pg.run(lambda uow: points.earn(uow, member_id=member_id, amount=100, key="e"))
    pg.run(lambda uow: points.spend(uow, member_id=member_id, amount=40, key="s"))
    if case == "closed":
        pg.run(lambda uow: points.spend(uow, member_id=member_id, amount=60, key="s2"))
        pg.run(lambda uow: members.change_state(uow, program_id=program.id, member_id=member_id,
                                                state="closed", actor="t"))  # fmt: skip
    if case == "unknown":
        with pytest.raises(UnknownMember):
            pg.run(lambda uow: points.spend(uow, member_id=10**12, amount=1, key="x"))
        return

    # When it spends (again) through the general path and as the service runs it ...
    amount = 41 if case == "conflict" else 40
    into = SystemAccount.CHARITY if case == "charity" else None
    key = {"charity": "c", "closed": "after"}.get(case, "s")
    general, service = _spend_both(pg, member_id, amount, key, into)

    # Then both end the same way and write the same rows.
    assert service == general
    if case == "replay":
        assert service[0]["replayed"]
    elif case == "conflict":
        assert service[0][0] is IdempotencyConflict
    elif case == "closed":
        assert service[0][0] is StateConflict
    else:
        assert service[1]["lines"][-1].account_id != service[1]["lines"][-3].account_id
    assert_ledger_sound(pg, program.id)
