"""The pure ledger core: plans, FIFO allocation, give-backs, claw-backs, digests."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jifen import ledger
from jifen.errors import (
    ExceedsOriginal,
    InsufficientPoints,
    InvalidDates,
    MissingReason,
    NonPositiveAmount,
)
from jifen.ledger import AccountState, Allocation, Kind, Line, Lot, NewLot, Party, SystemAccount

NOW = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def lot(lot_id: int, remaining: int, *, expires_in: int | None, pending_for: int = 0) -> Lot:
    return Lot(
        id=lot_id,
        amount=remaining,
        remaining=remaining,
        available_at=NOW + pending_for * DAY,
        expires_at=None if expires_in is None else NOW + expires_in * DAY,
    )


def test_the_core_imports_nothing_but_the_standard_library_and_itself() -> None:
    package = Path(ledger.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top != "sqlalchemy" and top != "fastapi", f"{source.name} imports {name}"
                if top == "jifen":
                    assert name.startswith("jifen.ledger"), f"{source.name} imports {name}"


def test_spend_takes_earliest_expiry_first_never_expiring_last_ties_oldest_first() -> None:
    # given lots expiring in 30 days, never, 10 days, and 10 days again (newer)
    lots = [
        lot(1, 50, expires_in=30),
        lot(2, 50, expires_in=None),
        lot(3, 50, expires_in=10),
        lot(4, 50, expires_in=10),
    ]
    # when 120 points are spent
    plan = ledger.plan_spend(lots=lots, amount=120, now=NOW)
    # then the 10-day lots go first (older first), then the 30-day one
    assert plan.allocations == (Allocation(3, -50), Allocation(4, -50), Allocation(1, -20))
    assert plan.lines == (
        ledger.Line(Party.MEMBER, -120),
        ledger.Line(SystemAccount.REDEEMED, 120),
    )


def test_pending_and_overdue_lots_are_not_spendable() -> None:
    lots = [
        lot(1, 40, expires_in=30, pending_for=7),
        lot(2, 30, expires_in=0),
        lot(3, 20, expires_in=5),
    ]
    with pytest.raises(InsufficientPoints) as refused:
        ledger.plan_spend(lots=lots, amount=21, now=NOW)
    assert refused.value.params["available"] == 20
    assert "20" in refused.value.message("zh")


@pytest.mark.parametrize("amount", [0, -5, True, 1.5])
def test_amounts_must_be_positive_integers(amount: object) -> None:
    with pytest.raises(NonPositiveAmount):
        ledger.plan_spend(lots=[lot(1, 10, expires_in=None)], amount=amount, now=NOW)  # type: ignore[arg-type]
    with pytest.raises(NonPositiveAmount):
        ledger.plan_earn(account=AccountState(), amount=amount, now=NOW)  # type: ignore[arg-type]


def test_earn_pays_off_debt_first() -> None:
    plan = ledger.plan_earn(account=AccountState(debt=30), amount=100, now=NOW)
    assert plan.change_of(Party.MEMBER) == 70
    assert plan.debt_change == -30
    assert sum(line.amount for line in plan.lines) == 0
    assert plan.new_lots[0].amount == 70


def test_earn_that_only_pays_debt_creates_no_lot() -> None:
    plan = ledger.plan_earn(account=AccountState(debt=300), amount=100, now=NOW)
    assert plan.change_of(Party.MEMBER) == 0 and plan.new_lots == () and plan.debt_change == -100


def test_earn_refuses_expiry_before_availability() -> None:
    with pytest.raises(InvalidDates):
        ledger.plan_earn(
            account=AccountState(), amount=5, now=NOW, available_at=NOW + 10 * DAY,
            expires_at=NOW + 5 * DAY,
        )  # fmt: skip
    with pytest.raises(InvalidDates):
        ledger.plan_earn(account=AccountState(), amount=5, now=NOW, expires_at=NOW - DAY)


def test_refund_restores_last_taken_first_and_never_more_than_spent() -> None:
    spent = [Allocation(1, -30), Allocation(2, -70)]
    first = ledger.plan_refund(
        spend_id=9, spend_amount=100, spend_allocations=spent, earlier_refunds=[],
        earlier_refunded=0, amount=80,
    )  # fmt: skip
    assert first.allocations == (Allocation(2, 70), Allocation(1, 10))
    second = ledger.plan_refund(
        spend_id=9, spend_amount=100, spend_allocations=spent,
        earlier_refunds=list(first.allocations), earlier_refunded=80,
    )  # fmt: skip
    assert second.amount == 20 and second.allocations == (Allocation(1, 20),)
    with pytest.raises(ExceedsOriginal):
        ledger.plan_refund(
            spend_id=9, spend_amount=100, spend_allocations=spent,
            earlier_refunds=[*first.allocations, *second.allocations], earlier_refunded=100,
        )  # fmt: skip


def test_a_give_back_of_a_posting_with_nothing_left_open_says_so() -> None:
    """A second full refund (no amount) of a spend refunded already is refused with a
    message that says the spend has nothing left to refund, not that 0 points are too many."""
    spent = [Allocation(1, -100)]
    with pytest.raises(ExceedsOriginal) as refused:
        ledger.plan_refund(
            spend_id=9, spend_amount=100, spend_allocations=spent,
            earlier_refunds=[Allocation(1, 100)], earlier_refunded=100,
        )  # fmt: skip
    assert refused.value.code == "exceeds_original"
    english, chinese = refused.value.message("en"), refused.value.message("zh")
    assert "0 points is more than" not in english
    assert "posting 9 has no points left" in english and "9" in chinese
    with pytest.raises(ExceedsOriginal) as partly:
        ledger.plan_reverse(
            earn_id=4, earn_amount=50, earlier_reversed=50, own_lots=[], lots=[], now=NOW,
            amount=10,
        )  # fmt: skip
    assert "posting 4 has no points left" in partly.value.message("en")


def test_reverse_takes_own_lot_then_others_then_records_debt() -> None:
    own = lot(5, 40, expires_in=60, pending_for=3)  # pending: still taken back first
    others = [lot(6, 25, expires_in=20)]
    plan = ledger.plan_reverse(
        earn_id=1, earn_amount=100, earlier_reversed=0, own_lots=[own], lots=[own, *others],
        now=NOW,
    )  # fmt: skip
    assert plan.allocations == (Allocation(5, -40), Allocation(6, -25))
    assert plan.change_of(Party.MEMBER) == -65
    assert plan.debt_change == 35
    assert sum(line.amount for line in plan.lines) == 0


def test_reverse_takes_the_members_pending_points_before_it_records_debt() -> None:
    """What the member's spendable points cannot cover comes out of its pending ones, the
    soonest available first, before any debt: else they would become spendable while the
    member still owed."""
    own = lot(5, 10, expires_in=60)
    others = [
        lot(6, 20, expires_in=30),
        lot(7, 15, expires_in=20, pending_for=7),
        lot(8, 30, expires_in=10, pending_for=2),
        lot(9, 40, expires_in=-1),  # past its date: the expiry run takes it, not a claw-back
    ]
    plan = ledger.plan_reverse(
        earn_id=1, earn_amount=100, earlier_reversed=0, own_lots=[own], lots=[own, *others],
        now=NOW,
    )  # fmt: skip
    assert plan.allocations == (
        Allocation(5, -10), Allocation(6, -20), Allocation(8, -30), Allocation(7, -15),
    )  # fmt: skip
    assert (plan.change_of(Party.MEMBER), plan.debt_change) == (-75, 25)
    # what the spendable ones cover leaves the pending ones alone
    plan = ledger.plan_reverse(
        earn_id=1, earn_amount=100, earlier_reversed=0, own_lots=[own], lots=[own, *others],
        now=NOW, amount=25,
    )  # fmt: skip
    assert plan.allocations == (Allocation(5, -10), Allocation(6, -15))


def test_an_unfreeze_pays_the_debt_first_with_the_lots_the_freeze_took_first() -> None:
    lots = [lot(1, 30, expires_in=5), lot(2, 50, expires_in=50)]
    held = ledger.plan_freeze(lots=lots, amount=60, now=NOW, reason="review", actor="risk")
    assert held.allocations == (Allocation(1, -30), Allocation(2, -30))
    first = ledger.plan_unfreeze(
        freeze_id=9, freeze_amount=60, freeze_allocations=held.allocations,
        earlier_unfreezes=[], earlier_unfrozen=0, amount=40, debt=25,
    )  # fmt: skip
    assert first.kind is Kind.UNFREEZE and sum(x.amount for x in first.lines) == 0
    assert {(x.account, x.amount) for x in first.lines} == {
        (SystemAccount.FROZEN, -40), (Party.MEMBER, 15), (SystemAccount.RECEIVABLE, 25),
    }  # fmt: skip
    assert (first.debt_change, first.frozen_change) == (-25, -40)
    assert first.allocations == (Allocation(2, 15),)  # the lot taken last gets its points back
    # the rest of the freeze: never more to a lot than the freeze took from it
    rest = ledger.plan_unfreeze(
        freeze_id=9, freeze_amount=60, freeze_allocations=held.allocations,
        earlier_unfreezes=first.allocations, earlier_unfrozen=40,
    )  # fmt: skip
    assert rest.allocations == (Allocation(2, 15), Allocation(1, 5))
    assert (rest.amount, rest.debt_change, rest.frozen_change) == (20, 0, -20)
    # owing more than it gives back: all of it pays the debt, no lot gets anything
    all_debt = ledger.plan_unfreeze(
        freeze_id=9, freeze_amount=60, freeze_allocations=held.allocations,
        earlier_unfreezes=[], earlier_unfrozen=0, debt=100,
    )  # fmt: skip
    assert (all_debt.allocations, all_debt.debt_change, all_debt.change_of(Party.MEMBER)) == (
        (), -60, 0,
    )  # fmt: skip


def test_a_release_of_lapsed_frozen_points_pays_the_debt_first() -> None:
    plan = ledger.plan_release(
        freeze_id=9, freeze_amount=50, earlier_unfrozen=10, amount=None, now=NOW,
        expires_at=NOW + 30 * DAY, debt=15,
    )  # fmt: skip
    assert (plan.kind, plan.amount, plan.debt_change, plan.frozen_change) == (
        Kind.UNFREEZE, 40, -15, -40,
    )  # fmt: skip
    assert plan.new_lots == (NewLot(25, NOW, NOW + 30 * DAY),)
    assert sum(x.amount for x in plan.lines) == 0


def test_reverse_takes_the_earns_points_from_every_lot_renewals_moved_them_to() -> None:
    # the earn's lot (emptied by a renewal), its successor (pending), and one past its date
    # that a give-back reached after the renewal
    emptied = Lot(5, 40, 0, NOW + 3 * DAY, NOW + 60 * DAY)
    moved = lot(7, 30, expires_in=400, pending_for=3)
    overdue = lot(8, 10, expires_in=-1)
    others = [lot(6, 25, expires_in=20)]
    plan = ledger.plan_reverse(
        earn_id=1, earn_amount=40, earlier_reversed=0, own_lots=[emptied, moved, overdue],
        lots=others, now=NOW,
    )  # fmt: skip
    assert plan.allocations == (Allocation(8, -10), Allocation(7, -30))
    assert (plan.change_of(Party.MEMBER), plan.debt_change) == (-40, 0)


def test_transfer_keeps_expiry_dates_on_the_receivers_lots() -> None:
    lots = [lot(1, 10, expires_in=5), lot(2, 50, expires_in=50)]
    plan = ledger.plan_transfer(lots=lots, amount=30, now=NOW)
    assert [(n.amount, n.expires_at, n.source_lot_id, n.owner) for n in plan.new_lots] == [
        (10, NOW + 5 * DAY, 1, Party.COUNTERPARTY),
        (20, NOW + 50 * DAY, 2, Party.COUNTERPARTY),
    ]


def test_a_transfer_pays_the_receivers_debt_first_with_the_earliest_expiring_points() -> None:
    lots = [lot(1, 10, expires_in=5), lot(2, 50, expires_in=50), lot(3, 40, expires_in=None)]
    # given a receiver owing 25: the sender's 10 due in 5 days and 15 of the next lot pay it
    plan = ledger.plan_transfer(lots=lots, amount=70, now=NOW, receiver_debt=25)
    assert plan.allocations == (Allocation(1, -10), Allocation(2, -50), Allocation(3, -10))
    assert [(n.amount, n.expires_at, n.source_lot_id, n.owner) for n in plan.new_lots] == [
        (35, NOW + 50 * DAY, 2, Party.COUNTERPARTY),
        (10, None, 3, Party.COUNTERPARTY),
    ]
    assert (plan.change_of(Party.MEMBER), plan.change_of(Party.COUNTERPARTY)) == (-70, 45)
    assert (plan.debt_change, plan.counterparty_debt_change) == (0, -25)
    assert plan.debt_change_of(Party.COUNTERPARTY) == -25
    assert Line(SystemAccount.RECEIVABLE, 25) in plan.lines
    assert sum(line.amount for line in plan.lines) == 0
    # a receiver owing more than it receives gets no lot: all of it pays the debt
    plan = ledger.plan_transfer(lots=lots, amount=30, now=NOW, receiver_debt=100)
    assert plan.new_lots == () and plan.change_of(Party.COUNTERPARTY) == 0
    assert plan.counterparty_debt_change == -30 and plan.change_of(Party.MEMBER) == -30
    assert sum(line.amount for line in plan.lines) == 0


def test_a_credit_by_adjustment_pays_the_debt_first_and_a_debit_leaves_it() -> None:
    plan = ledger.plan_adjust(
        lots=[], amount=100, now=NOW, reason="goodwill", actor="ops", debt=30,
        expires_at=NOW + 10 * DAY,
    )  # fmt: skip
    assert (plan.amount, plan.change_of(Party.MEMBER), plan.debt_change) == (100, 70, -30)
    assert [(n.amount, n.expires_at) for n in plan.new_lots] == [(70, NOW + 10 * DAY)]
    assert Line(SystemAccount.RECEIVABLE, 30) in plan.lines
    assert sum(line.amount for line in plan.lines) == 0
    plan = ledger.plan_adjust(lots=[], amount=20, now=NOW, reason="x", actor="ops", debt=30)
    assert (plan.change_of(Party.MEMBER), plan.new_lots, plan.debt_change) == (0, (), -20)
    plan = ledger.plan_adjust(
        lots=[lot(1, 50, expires_in=None)], amount=-20, now=NOW, reason="x", actor="ops", debt=30
    )
    assert (plan.change_of(Party.MEMBER), plan.debt_change) == (-20, 0)


def test_manual_adjustment_and_freeze_need_reason_and_actor() -> None:
    with pytest.raises(MissingReason):
        ledger.plan_adjust(lots=[], amount=10, now=NOW, reason=" ", actor="ops")
    with pytest.raises(MissingReason):
        ledger.plan_freeze(lots=[], amount=10, now=NOW, reason="review", actor="")


def test_expire_takes_only_due_lots_and_nothing_when_none_are() -> None:
    lots = [lot(1, 10, expires_in=0), lot(2, 20, expires_in=1), lot(3, 5, expires_in=None)]
    plan = ledger.plan_expire(lots=lots, now=NOW)
    assert plan is not None and plan.kind is Kind.EXPIRE and plan.amount == 10
    assert ledger.plan_expire(lots=lots[1:], now=NOW) is None


def test_forfeit_clears_every_open_lot_whatever_its_dates_into_expired() -> None:
    lots = [
        lot(1, 10, expires_in=0),  # past its date
        lot(2, 20, expires_in=5),  # available
        lot(3, 5, expires_in=None, pending_for=3),  # pending
        Lot(4, 7, 0, NOW, None),  # used up
    ]
    plan = ledger.plan_forfeit(lots=lots)
    assert plan is not None and (plan.kind, plan.amount) == (Kind.EXPIRE, 35)
    assert plan.lines == (
        ledger.Line(Party.MEMBER, -35), ledger.Line(SystemAccount.EXPIRED, 35),
    )  # fmt: skip
    assert sorted(plan.allocations, key=lambda a: a.lot_id) == [
        Allocation(1, -10), Allocation(2, -20), Allocation(3, -5),
    ]  # fmt: skip
    assert (plan.debt_change, plan.frozen_change, plan.new_lots) == (0, 0, ())
    assert ledger.plan_forfeit(lots=lots[3:]) is None


lot_lists = st.lists(
    st.tuples(
        st.integers(1, 500),
        st.one_of(st.none(), st.integers(-3, 400)),
        st.integers(-2, 5),
    ),
    min_size=0,
    max_size=12,
).map(
    lambda specs: [
        lot(i + 1, remaining, expires_in=expiry, pending_for=pending)
        for i, (remaining, expiry, pending) in enumerate(specs)
    ]
)


@given(lots=lot_lists, amount=st.integers(1, 3000))
def test_fifo_consumes_exactly_the_amount_or_refuses_without_partial_plan(
    lots: list[Lot], amount: int
) -> None:
    spendable_total = sum(x.remaining for x in lots if x.is_spendable(NOW))
    if amount > spendable_total:
        with pytest.raises(InsufficientPoints):
            ledger.consume(lots, amount, NOW)
        return
    allocations = ledger.consume(lots, amount, NOW)
    by_id = {x.id: x for x in lots}
    assert -sum(a.amount for a in allocations) == amount
    assert all(by_id[a.lot_id].is_spendable(NOW) for a in allocations)
    assert all(-a.amount <= by_id[a.lot_id].remaining for a in allocations)
    # FIFO: every lot taken from expires no later than any spendable lot left untouched,
    # and all but the last lot taken are emptied.
    taken = [by_id[a.lot_id] for a in allocations]
    untouched = [x for x in lots if x.is_spendable(NOW) and x.id not in {t.id for t in taken}]
    for t in taken:
        for u in untouched:
            assert ledger.fifo_order(t) <= ledger.fifo_order(u)
    assert all(-a.amount == by_id[a.lot_id].remaining for a in allocations[:-1])


@given(
    lots=lot_lists.filter(lambda ls: any(x.is_spendable(NOW) for x in ls)),
    data=st.data(),
)
def test_refunds_in_any_pieces_restore_each_lot_exactly(
    lots: list[Lot], data: st.DataObject
) -> None:
    total = sum(x.remaining for x in lots if x.is_spendable(NOW))
    amount = data.draw(st.integers(1, total))
    spend = ledger.plan_spend(lots=lots, amount=amount, now=NOW)
    restored: list[Allocation] = []
    refunded = 0
    while refunded < amount:
        piece = data.draw(st.integers(1, amount - refunded))
        plan = ledger.plan_refund(
            spend_id=1, spend_amount=amount, spend_allocations=spend.allocations,
            earlier_refunds=restored, earlier_refunded=refunded, amount=piece,
        )  # fmt: skip
        restored.extend(plan.allocations)
        refunded += piece
    net: dict[int, int] = {}
    for a in [*spend.allocations, *restored]:
        net[a.lot_id] = net.get(a.lot_id, 0) + a.amount
    assert all(v == 0 for v in net.values())


def test_reverse_takes_lapsed_points_out_of_the_expired_account_before_the_members_others() -> None:
    own = Lot(5, 100, 20, NOW - 40 * DAY, NOW + 5 * DAY)  # 80 of 100 gone: 50 lapsed, 30 spent
    others = [lot(6, 500, expires_in=20)]
    plan = ledger.plan_reverse(
        earn_id=1, earn_amount=100, earlier_reversed=0, own_lots=[own], lots=others, now=NOW,
        lapsed=50,
    )  # fmt: skip
    assert plan.allocations == (Allocation(5, -20), Allocation(6, -30))
    assert plan.lines == (
        ledger.Line(SystemAccount.ISSUED, 100), ledger.Line(Party.MEMBER, -50),
        ledger.Line(SystemAccount.EXPIRED, -50),
    )  # fmt: skip
    assert plan.debt_change == 0
    # a part of the earn: what lapsed goes before the member's other points
    part = ledger.plan_reverse(
        earn_id=1, earn_amount=100, earlier_reversed=0, own_lots=[own], lots=others, now=NOW,
        amount=60, lapsed=50,
    )  # fmt: skip
    assert part.allocations == (Allocation(5, -20),)
    assert (SystemAccount.EXPIRED, -40) in [(x.account, x.amount) for x in part.lines]
    with pytest.raises(ValueError, match="lapsed"):
        ledger.plan_reverse(
            earn_id=1, earn_amount=100, earlier_reversed=0, own_lots=[own], lots=others,
            now=NOW, lapsed=-1,
        )  # fmt: skip


@given(
    own=lot_lists,
    others=lot_lists,
    lapsed=st.integers(0, 600),
    used=st.integers(0, 600),
    data=st.data(),
)
def test_claw_backs_in_any_pieces_charge_the_member_only_for_what_it_used(
    own: list[Lot], others: list[Lot], lapsed: int, used: int, data: st.DataObject
) -> None:
    """An earn of E points whose own lots still hold R, of which L lapsed and U the member
    used (E = R + L + U), clawed back in any pieces: the lines of each claw-back sum to
    zero, it takes the earn's own lots first (pending or past their date too), then what
    lapsed, then the member's other spendable lots, then its other pending ones, then
    debt; never more than a lot holds nor anything from another lot past its date; and all
    told the member pays (from other lots or as debt) exactly what it used, U, nothing for
    what lapsed."""
    others = [Lot(x.id + 100, x.amount, x.remaining, x.available_at, x.expires_at) for x in others]
    held = sum(x.remaining for x in own)
    earned = held + lapsed + used
    if earned == 0:
        return
    lots = {x.id: x for x in [*own, *others]}
    own_ids = {x.id for x in own}
    reversed_ = unexpired_total = charged = 0
    lapsed_open = lapsed
    while reversed_ < earned:
        piece = data.draw(st.one_of(st.none(), st.integers(1, earned - reversed_)))
        plan = ledger.plan_reverse(
            earn_id=1, earn_amount=earned, earlier_reversed=reversed_,
            own_lots=[lots[i] for i in sorted(own_ids)], lots=list(lots.values()), now=NOW,
            amount=piece, lapsed=lapsed_open,
        )  # fmt: skip
        amount = earned - reversed_ if piece is None else piece
        assert plan.kind is Kind.REVERSE and plan.amount == amount
        assert sum(line.amount for line in plan.lines) == 0
        by_account = {line.account: line.amount for line in plan.lines}
        assert by_account[SystemAccount.ISSUED] == amount
        unexpired = -by_account.get(SystemAccount.EXPIRED, 0)
        assert 0 <= unexpired <= lapsed_open
        assert -by_account.get(SystemAccount.RECEIVABLE, 0) == plan.debt_change >= 0
        assert by_account.get(Party.MEMBER, 0) == sum(a.amount for a in plan.allocations)
        from_own = -sum(a.amount for a in plan.allocations if a.lot_id in own_ids)
        from_others = -sum(a.amount for a in plan.allocations if a.lot_id not in own_ids)
        for a in plan.allocations:
            assert 0 < -a.amount <= lots[a.lot_id].remaining
            x = lots[a.lot_id]
            assert a.lot_id in own_ids or x.is_spendable(NOW) or x.is_pending(NOW)
        from_pending = -sum(
            a.amount for a in plan.allocations
            if a.lot_id not in own_ids and lots[a.lot_id].is_pending(NOW)
        )  # fmt: skip
        own_left = sum(lots[i].remaining for i in own_ids) - from_own
        if unexpired or from_others or plan.debt_change:  # the earn's own lots went first,
            assert own_left == 0
        if from_others or plan.debt_change:  # then what lapsed,
            assert unexpired == lapsed_open
        spendable_others = sum(
            x.remaining for x in lots.values() if x.id not in own_ids and x.is_spendable(NOW)
        )
        if from_pending or plan.debt_change:  # then the member's other spendable points,
            assert spendable_others == from_others - from_pending
        if plan.debt_change:  # then its pending ones
            assert sum(
                x.remaining for x in lots.values() if x.id not in own_ids and x.is_pending(NOW)
            ) == from_pending  # fmt: skip
        for a in plan.allocations:
            x = lots[a.lot_id]
            lots[a.lot_id] = Lot(x.id, x.amount, x.remaining + a.amount, x.available_at,
                                 x.expires_at)  # fmt: skip
        reversed_ += amount
        lapsed_open -= unexpired
        unexpired_total += unexpired
        charged += from_others + plan.debt_change
    assert (unexpired_total, charged) == (lapsed, used)
    assert all(lots[i].remaining == 0 for i in own_ids)


def test_posting_digest_changes_with_any_fact() -> None:
    facts = ledger.PostingFacts(
        program_id=1, kind="earn", idempotency_key="k", created_at=NOW, amount=10,
        ref_posting_id=None, reason="", actor="", lines=((1, -10), (2, 10)), allocations=(),
        new_lots=((2, 10, NOW, None, None),),
    )  # fmt: skip
    base = ledger.posting_digest(facts)
    from dataclasses import replace

    assert ledger.posting_digest(replace(facts, lines=((1, -11), (2, 11)))) != base
    assert ledger.posting_digest(replace(facts, created_at=NOW + DAY)) != base
    assert ledger.posting_digest(replace(facts, new_lots=((2, 10, NOW, NOW + DAY, None),))) != base
    assert ledger.chain_link(ledger.GENESIS, 1, base) != ledger.chain_link(ledger.GENESIS, 2, base)


@given(
    remaining=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=6),
    shifts=st.lists(st.one_of(st.none(), st.integers(min_value=-400, max_value=400)), min_size=6,
                    max_size=6),
)  # fmt: skip
def test_a_renewal_moves_points_to_later_dates_only_and_keeps_the_balance(
    remaining: list[int], shifts: list[int | None]
) -> None:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    lots = [
        Lot(i + 1, max(r, 1), r, now - timedelta(days=10), now + timedelta(days=30 + 10 * i))
        for i, r in enumerate(remaining)
    ]
    new = {
        lot.id: None if shift is None else lot.expires_at + timedelta(days=shift)  # type: ignore[operator]
        for lot, shift in zip(lots, shifts, strict=False)
    }
    plan = ledger.plan_renew(lots=lots, now=now, new_dates=new)
    if plan is None:
        return
    assert plan.kind == Kind.RENEW and plan.change_of(Party.MEMBER) == 0
    assert sum(line.amount for line in plan.lines) == 0
    assert sum(a.amount for a in plan.allocations) == -plan.amount
    assert sum(n.amount for n in plan.new_lots) == plan.amount
    by_id = {lot.id: lot for lot in lots}
    for made in plan.new_lots:
        old = by_id[made.source_lot_id]  # type: ignore[index]
        assert made.amount == old.remaining
        assert made.expires_at is None or made.expires_at > old.expires_at  # type: ignore[operator]


@given(lots=lot_lists.filter(lambda ls: any(x.is_spendable(NOW) for x in ls)), data=st.data())
def test_a_hold_spent_after_its_release_takes_back_exactly_what_it_held(
    lots: list[Lot], data: st.DataObject
) -> None:
    """Freeze, unfreeze, then spend what was released: every lot ends as the freeze left
    it, whatever the lots' dates by then, and the points land in the spend's account."""
    spendable = sum(x.remaining for x in lots if x.is_spendable(NOW))
    amount = data.draw(st.integers(1, spendable))
    held = ledger.plan_freeze(lots=lots, amount=amount, now=NOW, reason="r", actor="a")
    released = ledger.plan_unfreeze(
        freeze_id=1, freeze_amount=amount, freeze_allocations=held.allocations,
        earlier_unfreezes=[], earlier_unfrozen=0,
    )  # fmt: skip
    spent = ledger.plan_spend_released(released=released.allocations, into=SystemAccount.CHARITY)
    assert spent.kind is Kind.SPEND and spent.amount == amount
    assert sum(line.amount for line in spent.lines) == 0
    assert (Party.MEMBER, -amount) in [(line.account, line.amount) for line in spent.lines]
    change: dict[int, int] = {}
    for allocation in (*held.allocations, *released.allocations, *spent.allocations):
        change[allocation.lot_id] = change.get(allocation.lot_id, 0) + allocation.amount
    assert change == {a.lot_id: a.amount for a in held.allocations}


def test_only_what_an_unfreeze_gave_back_is_spent_from_its_lots() -> None:
    with pytest.raises(ValueError, match="positive allocations"):
        ledger.plan_spend_released(released=[])
    with pytest.raises(ValueError, match="positive allocations"):
        ledger.plan_spend_released(released=[Allocation(1, -5)])
    with pytest.raises(ValueError, match="not spent into"):
        ledger.plan_spend_released(released=[Allocation(1, 5)], into=SystemAccount.ISSUED)
