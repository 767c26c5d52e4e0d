"""Plans for every posting: pure functions from the current state to what must be written.

Each ``plan_*`` function checks its input, decides which lots are consumed or restored,
and returns a :class:`Plan` whose lines sum to zero. None of them reads a clock or a
database; "now" is an argument.

Allocation order: a debit consumes spendable lots earliest expiry first (lots that never
expire last), ties oldest first. A refund or unfreeze gives back exactly the lots the
original debit took, last taken first, so that a partial refund returns the longest-lived
points and the member loses the least to expiry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from jifen.ledger.errors import (
    ExceedsOriginal,
    InsufficientPoints,
    InvalidDates,
    LedgerCorrupt,
    MissingReason,
    NonPositiveAmount,
)
from jifen.ledger.model import (
    AccountState,
    Allocation,
    Kind,
    Line,
    Lot,
    NewLot,
    Party,
    Plan,
    SystemAccount,
)

_NEVER = datetime.max.replace(tzinfo=UTC)
SPEND_TARGETS = frozenset({SystemAccount.REDEEMED, SystemAccount.CHARITY, SystemAccount.PARTNERS})
"""Where spent points may go: redeemed for rewards, donated, or exchanged out to a partner."""


def fifo_order(lot: Lot) -> tuple[datetime, int]:
    """Sort key: earliest expiry first, never-expiring last, then oldest (lowest id) first."""
    return (lot.expires_at or _NEVER, lot.id)


def spendable(lots: Iterable[Lot], now: datetime) -> list[Lot]:
    """The lots a debit at ``now`` may take, in the order it takes them."""
    return sorted((lot for lot in lots if lot.is_spendable(now)), key=fifo_order)


def pending(lots: Iterable[Lot], now: datetime) -> list[Lot]:
    """The lots not yet available at ``now``, the soonest available first (then in
    :func:`fifo_order`)."""
    return sorted(
        (lot for lot in lots if lot.is_pending(now)),
        key=lambda lot: (lot.available_at, *fifo_order(lot)),
    )


def require_positive(value: int, field: str = "amount") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NonPositiveAmount(field=field, value=value)
    return value


def consume(
    lots: Iterable[Lot], amount: int, now: datetime, *, account_id: int = 0
) -> list[Allocation]:
    """Take ``amount`` from the spendable lots, FIFO by expiry; refuse if they fall short."""
    allocations: list[Allocation] = []
    needed = amount
    for lot in spendable(lots, now):
        if needed == 0:
            break
        take = min(lot.remaining, needed)
        allocations.append(Allocation(lot.id, -take))
        needed -= take
    if needed:
        raise InsufficientPoints(account_id=account_id, available=amount - needed, requested=amount)
    return allocations


def restore(
    consumed: Sequence[Allocation],
    already_restored: Mapping[int, int],
    amount: int,
) -> list[Allocation]:
    """Give back ``amount`` to the lots a debit consumed, last taken first.

    ``consumed`` are the debit's own allocations (negative), ``already_restored`` how much
    earlier refunds or unfreezes of the same debit gave back to each lot.
    """
    allocations: list[Allocation] = []
    needed = amount
    # A debit takes each lot at most once, so a lot's open amount is what this debit took
    # from it less what earlier give-backs of the same debit returned to it.
    for allocation in reversed(consumed):
        if needed == 0:
            break
        open_here = -allocation.amount - already_restored.get(allocation.lot_id, 0)
        give = min(open_here, needed)
        if give > 0:
            allocations.append(Allocation(allocation.lot_id, give))
            needed -= give
    if needed:  # the caller checked the total, so the stored history contradicts itself
        raise LedgerCorrupt(
            problem=f"a debit's lots can take back only {amount - needed} of {amount}"
        )
    return allocations


def _debt(debt: int) -> int:
    """``debt``, checked: what a member owes is a count of points."""
    if isinstance(debt, bool) or not isinstance(debt, int) or debt < 0:
        raise ValueError(f"a debt is a count of points, not {debt!r}")
    return debt


def _check_dates(now: datetime, available_at: datetime, expires_at: datetime | None) -> None:
    if expires_at is None:
        return
    if expires_at <= now:
        raise InvalidDates(
            problem=f"expires_at {expires_at.isoformat()} is not after now ({now.isoformat()}).",
            problem_zh=f"到期时间 {expires_at.isoformat()} 早于当前时间。",
        )
    if expires_at <= available_at:
        raise InvalidDates(
            problem=f"expires_at {expires_at.isoformat()} is not after available_at "
            f"{available_at.isoformat()}.",
            problem_zh=f"到期时间 {expires_at.isoformat()} 不晚于可用时间 "
            f"{available_at.isoformat()}。",
        )


def plan_earn(
    *,
    account: AccountState,
    amount: int,
    now: datetime,
    available_at: datetime | None = None,
    expires_at: datetime | None = None,
) -> Plan:
    """Credit ``amount`` from the issuing account; any debt of the member is paid off first."""
    require_positive(amount)
    available_at = max(available_at or now, now)
    _check_dates(now, available_at, expires_at)
    return _credit(Kind.EARN, SystemAccount.ISSUED, amount, account.debt, available_at, expires_at)


def _credit(
    kind: Kind, source: SystemAccount, amount: int, debt: int,
    available_at: datetime, expires_at: datetime | None,
) -> Plan:  # fmt: skip
    """``amount`` from the system account ``source`` to the member, who pays off its
    ``debt`` out of it first: only the rest becomes a lot, none when it all goes to the
    debt."""
    repaid = min(_debt(debt), amount)
    credited = amount - repaid
    lines = [Line(source, -amount)]
    if credited:
        lines.append(Line(Party.MEMBER, credited))
    if repaid:
        lines.append(Line(SystemAccount.RECEIVABLE, repaid))
    new_lots = (NewLot(credited, available_at, expires_at),) if credited else ()
    return Plan(kind, amount, tuple(lines), new_lots=new_lots, debt_change=-repaid)


def plan_spend(
    *,
    lots: Iterable[Lot],
    amount: int,
    now: datetime,
    account_id: int = 0,
    into: SystemAccount = SystemAccount.REDEEMED,
) -> Plan:
    """Debit ``amount`` of spendable points into ``into`` (redeemed, unless the points are
    donated or exchanged out to a partner)."""
    require_positive(amount)
    if into not in SPEND_TARGETS:
        raise ValueError(f"points are not spent into the {into.value} account")
    allocations = consume(lots, amount, now, account_id=account_id)
    lines = (Line(Party.MEMBER, -amount), Line(into, amount))
    return Plan(Kind.SPEND, amount, lines, allocations=tuple(allocations))


def plan_spend_released(
    *, released: Sequence[Allocation], into: SystemAccount = SystemAccount.REDEEMED
) -> Plan:
    """Debit exactly what an unfreeze has just given back (its ``released`` allocations),
    from the very lots it went back to, whether or not they are past their date: a hold
    that pays for something (a redemption confirmed or paid for after a wait) spends the
    points it held, not the member's others while the held ones lapse."""
    if into not in SPEND_TARGETS:
        raise ValueError(f"points are not spent into the {into.value} account")
    if not released or any(a.amount <= 0 for a in released):
        raise ValueError("only what an unfreeze gave back (positive allocations) is spent")
    amount = sum(a.amount for a in released)
    allocations = tuple(Allocation(a.lot_id, -a.amount) for a in released)
    lines = (Line(Party.MEMBER, -amount), Line(into, amount))
    return Plan(Kind.SPEND, amount, lines, allocations=allocations)


def _give_back(
    kind: Kind,
    holder: SystemAccount,
    *,
    original_id: int,
    original_amount: int,
    original_allocations: Sequence[Allocation],
    earlier: Sequence[Allocation],
    earlier_amount: int,
    amount: int | None,
    labels: tuple[str, str],
) -> Plan:
    open_amount = original_amount - earlier_amount
    amount = open_amount if amount is None else require_positive(amount)
    if amount > open_amount or open_amount == 0:
        raise ExceedsOriginal(
            operation=labels[0],
            operation_zh=labels[1],
            requested=amount,
            remaining=open_amount,
            posting_id=original_id,
        )
    already: dict[int, int] = {}
    for allocation in earlier:
        already[allocation.lot_id] = already.get(allocation.lot_id, 0) + allocation.amount
    allocations = restore(original_allocations, already, amount)
    lines = (Line(holder, -amount), Line(Party.MEMBER, amount))
    frozen_change = -amount if kind is Kind.UNFREEZE else 0
    return Plan(kind, amount, lines, allocations=tuple(allocations), frozen_change=frozen_change)


def plan_refund(
    *,
    spend_id: int,
    spend_amount: int,
    spend_allocations: Sequence[Allocation],
    earlier_refunds: Sequence[Allocation],
    earlier_refunded: int,
    amount: int | None = None,
    holder: SystemAccount = SystemAccount.REDEEMED,
    debt: int = 0,
) -> Plan:
    """Give back all or part of a spend to exactly the lots it took (``amount=None``: the rest),
    from ``holder``, the account the spend went into.

    A member with ``debt`` (what a claw-back could not take, because the points had been
    spent) pays it off first out of what comes back, as an earning would: had the spend been
    refunded before the claw-back, the claw-back would have taken these very points. The
    lots the spend took first (the earliest to lapse) pay it; the rest go back to theirs."""
    plan = _give_back(
        Kind.REFUND,
        holder,
        original_id=spend_id,
        original_amount=spend_amount,
        original_allocations=spend_allocations,
        earlier=earlier_refunds,
        earlier_amount=earlier_refunded,
        amount=amount,
        labels=("A refund", "退还"),
    )
    return _repaying(plan, holder, spend_allocations, earlier_refunds, debt)


def _repaying(
    plan: Plan,
    holder: SystemAccount,
    original_allocations: Sequence[Allocation],
    earlier: Sequence[Allocation],
    debt: int,
) -> Plan:
    """``plan``, a give-back from ``holder`` to the lots of a debit, paying the member's
    ``debt`` first out of what it gives back: only the rest goes back to the lots, the
    last taken first, so that the lots taken first (the earliest to lapse) pay it."""
    repaid = min(_debt(debt), plan.amount)
    if not repaid:
        return plan
    already: dict[int, int] = {}
    for allocation in earlier:
        already[allocation.lot_id] = already.get(allocation.lot_id, 0) + allocation.amount
    kept = plan.amount - repaid
    allocations = restore(original_allocations, already, kept) if kept else []
    lines = [Line(holder, -plan.amount)]
    if kept:
        lines.append(Line(Party.MEMBER, kept))
    lines.append(Line(SystemAccount.RECEIVABLE, repaid))
    return Plan(
        plan.kind, plan.amount, tuple(lines), allocations=tuple(allocations),
        debt_change=-repaid, frozen_change=plan.frozen_change,
    )  # fmt: skip


def plan_unfreeze(
    *,
    freeze_id: int,
    freeze_amount: int,
    freeze_allocations: Sequence[Allocation],
    earlier_unfreezes: Sequence[Allocation],
    earlier_unfrozen: int,
    amount: int | None = None,
    debt: int = 0,
) -> Plan:
    """Release all or part of a freeze back to exactly the lots it held.

    A member with ``debt`` (a claw-back the points it held could not meet) pays it off
    first out of what comes back, as a refund does; the caller passes no debt where the
    points are given back only to be spent at once for what they were held for."""
    plan = _give_back(
        Kind.UNFREEZE,
        SystemAccount.FROZEN,
        original_id=freeze_id,
        original_amount=freeze_amount,
        original_allocations=freeze_allocations,
        earlier=earlier_unfreezes,
        earlier_amount=earlier_unfrozen,
        amount=amount,
        labels=("An unfreeze", "解冻"),
    )
    return _repaying(plan, SystemAccount.FROZEN, freeze_allocations, earlier_unfreezes, debt)


def plan_reverse(
    *,
    earn_id: int,
    earn_amount: int,
    earlier_reversed: int,
    own_lots: Iterable[Lot],
    lots: Iterable[Lot],
    now: datetime,
    amount: int | None = None,
    lapsed: int = 0,
) -> Plan:
    """Claw back all or part of an earn.

    Takes first from the earn's own points wherever they are now (``own_lots``: its lot and
    the lots renewals moved its points to), pending, spendable or past their date, earliest
    expiry first; then from those of them that lapsed (``lapsed``: what the expiry of those
    lots put into the expired account and no earlier claw-back of the earn took back), out
    of the expired account; only then, for what the member used of them (spent, gave away,
    holds frozen), from its other spendable lots, then from its pending ones (points it
    would otherwise come to spend while it owes), and whatever those cannot cover becomes
    debt, which later credits pay off. So the member never pays for points it lost to
    expiry, the balance never goes negative, and a member that owes has no points to spend
    and none on the way (held ones aside: an unfreeze pays the debt out of what it gives
    back).
    """
    if isinstance(lapsed, bool) or not isinstance(lapsed, int) or lapsed < 0:
        raise ValueError(f"lapsed points are a count, not {lapsed!r}")
    open_amount = earn_amount - earlier_reversed
    amount = open_amount if amount is None else require_positive(amount)
    if amount > open_amount or open_amount == 0:
        raise ExceedsOriginal(
            operation="A reversal",
            operation_zh="冲正",
            requested=amount,
            remaining=open_amount,
            posting_id=earn_id,
        )
    own = {lot.id: lot for lot in own_lots}
    allocations: list[Allocation] = []
    taken = 0
    for lot in sorted(own.values(), key=fifo_order):
        take = min(lot.remaining, amount - taken)
        if take > 0:
            allocations.append(Allocation(lot.id, -take))
            taken += take
    unexpired = min(lapsed, amount - taken)
    others = [lot for lot in lots if lot.id not in own]
    for lot in [*spendable(others, now), *pending(others, now)]:
        take = min(lot.remaining, amount - taken - unexpired)
        if take <= 0:
            break
        allocations.append(Allocation(lot.id, -take))
        taken += take
    debt = amount - taken - unexpired
    lines = [Line(SystemAccount.ISSUED, amount)]
    if taken:
        lines.append(Line(Party.MEMBER, -taken))
    if unexpired:
        lines.append(Line(SystemAccount.EXPIRED, -unexpired))
    if debt:
        lines.append(Line(SystemAccount.RECEIVABLE, -debt))
    return Plan(
        Kind.REVERSE, amount, tuple(lines), allocations=tuple(allocations), debt_change=debt
    )


def plan_adjust(
    *,
    lots: Iterable[Lot],
    amount: int,
    now: datetime,
    reason: str,
    actor: str,
    expires_at: datetime | None = None,
    account_id: int = 0,
    debt: int = 0,
) -> Plan:
    """A manual correction: positive credits a new lot, negative debits FIFO.

    A credit pays off the member's ``debt`` first, as an earning does: only the rest
    becomes a lot (none when it all goes to the debt)."""
    if not reason.strip() or not actor.strip():
        raise MissingReason(kind="adjustment")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount == 0:
        raise NonPositiveAmount(field="amount (its size)", value=amount)
    if amount > 0:
        _check_dates(now, now, expires_at)
        return _credit(Kind.ADJUST, SystemAccount.ADJUSTMENTS, amount, debt, now, expires_at)
    allocations = consume(lots, -amount, now, account_id=account_id)
    lines = (Line(Party.MEMBER, amount), Line(SystemAccount.ADJUSTMENTS, -amount))
    return Plan(Kind.ADJUST, -amount, lines, allocations=tuple(allocations))


def plan_transfer(
    *, lots: Iterable[Lot], amount: int, now: datetime, account_id: int = 0, receiver_debt: int = 0
) -> Plan:
    """Move spendable points to another member; the receiver's lots keep their expiry dates.

    A receiver with a debt (``receiver_debt``) pays it off first out of what it receives,
    as it would out of an earning: the points the sender gave first (the earliest to lapse)
    pay it, and the rest become the receiver's lots, with their dates."""
    require_positive(amount)
    by_id = {lot.id: lot for lot in lots}
    allocations = consume(by_id.values(), amount, now, account_id=account_id)
    repaid = min(_debt(receiver_debt), amount)
    new_lots: list[NewLot] = []
    owed = repaid
    for allocation in allocations:
        given = -allocation.amount
        paying = min(owed, given)
        owed -= paying
        if given > paying:
            new_lots.append(
                NewLot(
                    given - paying,
                    now,
                    by_id[allocation.lot_id].expires_at,
                    owner=Party.COUNTERPARTY,
                    source_lot_id=allocation.lot_id,
                )
            )
    credited = amount - repaid
    lines = [Line(Party.MEMBER, -amount)]
    if credited:
        lines.append(Line(Party.COUNTERPARTY, credited))
    if repaid:
        lines.append(Line(SystemAccount.RECEIVABLE, repaid))
    return Plan(
        Kind.TRANSFER, amount, tuple(lines), allocations=tuple(allocations),
        new_lots=tuple(new_lots), counterparty_debt_change=-repaid,
    )  # fmt: skip


def plan_freeze(
    *, lots: Iterable[Lot], amount: int, now: datetime, reason: str, actor: str, account_id: int = 0
) -> Plan:
    """Hold spendable points away from the member until they are unfrozen."""
    require_positive(amount)
    if not reason.strip() or not actor.strip():
        raise MissingReason(kind="freeze")
    allocations = consume(lots, amount, now, account_id=account_id)
    lines = (Line(Party.MEMBER, -amount), Line(SystemAccount.FROZEN, amount))
    return Plan(Kind.FREEZE, amount, lines, allocations=tuple(allocations), frozen_change=amount)


def plan_expire(*, lots: Iterable[Lot], now: datetime, freeze: bool = False) -> Plan | None:
    """Expire what remains of every lot due at ``now``; ``None`` when nothing is due.

    With ``freeze`` the lapsed points are not cleared but frozen (a freeze posting into the
    frozen account): staff can give them back later with :func:`plan_release`."""
    due = sorted((lot for lot in lots if lot.is_due(now)), key=fifo_order)
    total = sum(lot.remaining for lot in due)
    if not total:
        return None
    allocations = tuple(Allocation(lot.id, -lot.remaining) for lot in due)
    if freeze:
        lines = (Line(Party.MEMBER, -total), Line(SystemAccount.FROZEN, total))
        return Plan(Kind.FREEZE, total, lines, allocations=allocations, frozen_change=total)
    return _to_expired(total, allocations)


def plan_forfeit(*, lots: Iterable[Lot]) -> Plan | None:
    """Clear what remains of every open lot, whatever its dates (available, pending or past
    its date), into the expired account as an expiry posting: the points a closed account
    forfeits. ``None`` when no lot holds points."""
    held = sorted((lot for lot in lots if lot.remaining > 0), key=fifo_order)
    total = sum(lot.remaining for lot in held)
    if not total:
        return None
    return _to_expired(total, tuple(Allocation(lot.id, -lot.remaining) for lot in held))


def _to_expired(total: int, allocations: tuple[Allocation, ...]) -> Plan:
    lines = (Line(Party.MEMBER, -total), Line(SystemAccount.EXPIRED, total))
    return Plan(Kind.EXPIRE, total, lines, allocations=allocations)


def plan_renew(
    *, lots: Iterable[Lot], now: datetime, new_dates: Mapping[int, datetime | None]
) -> Plan | None:
    """Give open lots a later expiry date: each lot in ``new_dates`` (lot id → new date,
    ``None`` for never) whose date that extends hands what remains to a new lot with the
    same availability and the new date (its source); ``None`` when no date moves. Never
    shortens a lot, never touches one already due."""
    moved: list[tuple[Lot, datetime | None]] = []
    for lot in sorted(lots, key=fifo_order):
        if lot.id not in new_dates or lot.remaining <= 0 or lot.is_due(now):
            continue
        new = new_dates[lot.id]
        if lot.expires_at is None or (new is not None and new <= lot.expires_at):
            continue
        moved.append((lot, new))
    return _renewal([(lot, lot.remaining, new) for lot, new in moved])


def plan_follow_renewal(
    *,
    lots: Iterable[Lot],
    given_back: Mapping[int, int],
    dates: Mapping[int, datetime | None],
    now: datetime,
) -> Plan | None:
    """Points just given back to lots (lot id → amount) whose points a renewal has since
    moved to a later date (lot id → that date, ``None`` for never) follow them: a renewal
    hands them to new lots with that date. Unlike :func:`plan_renew`, it does so even when
    the old lot's own date has passed: these points were renewed before it came. ``None``
    when nothing follows (no lot was renewed, or the later date has passed too)."""
    by_id = {lot.id: lot for lot in lots}
    moved: list[tuple[Lot, int, datetime | None]] = []
    for lot_id, amount in sorted(given_back.items()):
        if lot_id not in dates or lot_id not in by_id:
            continue
        new = dates[lot_id]
        if new is not None and new <= now:
            continue
        lot = by_id[lot_id]
        if min(amount, lot.remaining) > 0:
            moved.append((lot, min(amount, lot.remaining), new))
    return _renewal(moved)


def _renewal(moved: Sequence[tuple[Lot, int, datetime | None]]) -> Plan | None:
    """A renewal posting: each (lot, amount, date) hands ``amount`` of the lot to a new lot
    with the same availability and ``date`` (its source)."""
    total = sum(amount for _, amount, _ in moved)
    if not total:
        return None
    allocations = tuple(Allocation(lot.id, -amount) for lot, amount, _ in moved)
    new_lots = tuple(
        NewLot(amount, lot.available_at, new, source_lot_id=lot.id) for lot, amount, new in moved
    )
    lines = (Line(Party.MEMBER, -total), Line(Party.MEMBER, total))
    return Plan(Kind.RENEW, total, lines, allocations=allocations, new_lots=new_lots)


def plan_release(
    *,
    freeze_id: int,
    freeze_amount: int,
    earlier_unfrozen: int,
    amount: int | None,
    now: datetime,
    expires_at: datetime | None,
    debt: int = 0,
) -> Plan:
    """Give back all or part of a freeze as a new lot valid until ``expires_at``, not to the
    lots it held: for points frozen when they lapsed, whose own lots are past their date.
    A member with ``debt`` pays it off first out of them, as out of any credit."""
    open_amount = freeze_amount - earlier_unfrozen
    amount = open_amount if amount is None else require_positive(amount)
    if amount > open_amount or open_amount == 0:
        raise ExceedsOriginal(
            operation="A release", operation_zh="解冻", requested=amount, remaining=open_amount,
            posting_id=freeze_id,
        )  # fmt: skip
    _check_dates(now, now, expires_at)
    credit = _credit(Kind.UNFREEZE, SystemAccount.FROZEN, amount, debt, now, expires_at)
    return replace(credit, frozen_change=-amount)
