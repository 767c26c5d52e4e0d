"""Random sequences of every ledger operation, with the clock moving, against a reference model.

The reference model is deliberately naive: a list of lots per member and a record of what
each debit took, written without the core's helpers. After every step the stored ledger
must agree with it member by member, and every invariant must hold: the lines of each
posting and all accounts of the programme sum to zero, each member balance equals its lines
and its lots, nothing is negative, and every hash chain verifies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.errors import (
    ExceedsOriginal,
    IdempotencyConflict,
    InsufficientPoints,
    InvalidDates,
    JifenError,
)
from jifen.points import service as points
from tests.factories import assert_ledger_sound, new_members, new_program

MEMBERS = 3
FAR = datetime.max.replace(tzinfo=UTC)
SHANGHAI = ZoneInfo("Asia/Shanghai")  # the programmes' default zone, for expiry days


@dataclass
class RefLot:
    order: int
    remaining: int
    available_at: datetime
    expires_at: datetime | None
    renewed_to: list[RefLot] = field(default_factory=list)
    """The lots renewals moved this one's points to."""
    expired: int = 0
    """What expiry took from this lot, all told."""

    def latest_renewal(self) -> tuple[bool, datetime | None]:
        """Whether a renewal moved this lot on, and the latest date it moved it to."""
        dates = [x.expires_at for x in self.renewed_to]
        for x in self.renewed_to:
            renewed, date = x.latest_renewal()
            if renewed:
                dates.append(date)
        if not dates:
            return False, None
        return True, None if None in dates else max(d for d in dates if d is not None)

    def family(self) -> list[RefLot]:
        """This lot and every lot renewals moved its points to, directly or not."""
        return [self, *(y for x in self.renewed_to for y in x.family())]

    def spendable(self, now: datetime) -> bool:
        return (
            self.remaining > 0
            and self.available_at <= now
            and (self.expires_at is None or self.expires_at > now)
        )

    def pending(self, now: datetime) -> bool:
        return self.remaining > 0 and self.available_at > now

    def fifo(self) -> tuple[datetime, int]:
        return (self.expires_at or FAR, self.order)


@dataclass
class RefDebit:
    """What a spend or freeze took, lot by lot, and how much was given back since."""

    member: int
    amount: int
    taken: list[tuple[RefLot, int]]
    given_back: int = 0
    returned: dict[int, int] = field(default_factory=dict)  # lot order -> given back


@dataclass
class RefEarn:
    member: int
    amount: int
    lot: RefLot | None
    reversed: int = 0
    unexpired: int = 0
    """What its claw-backs took back of its points that lapsed, out of the expired account."""


class Model:
    def __init__(self, members: list[int]) -> None:
        self.lots: dict[int, list[RefLot]] = {m: [] for m in members}
        self.debt = dict.fromkeys(members, 0)
        self.frozen = dict.fromkeys(members, 0)
        self.order = itertools.count(1)

    def new_lot(self, member: int, amount: int, available_at: datetime, expires_at: Any) -> RefLot:
        lot = RefLot(next(self.order), amount, available_at, expires_at)
        self.lots[member].append(lot)
        return lot

    def take(self, member: int, amount: int, now: datetime) -> list[tuple[RefLot, int]]:
        usable = sorted((x for x in self.lots[member] if x.spendable(now)), key=RefLot.fifo)
        if sum(x.remaining for x in usable) < amount:
            raise InsufficientPoints(account_id=0, available=0, requested=amount)
        taken = []
        for lot in usable:
            if amount == 0:
                break
            part = min(lot.remaining, amount)
            lot.remaining -= part
            amount -= part
            taken.append((lot, part))
        return taken

    def give_back(
        self, debit: RefDebit, amount: int | None, now: datetime, *, repays: bool = False
    ) -> int:
        """Give ``amount`` of ``debit`` back, last taken first; a refund (``repays``) pays the
        member's debt first out of it, with the points the spend took first."""
        open_amount = debit.amount - debit.given_back
        amount = open_amount if amount is None else amount
        if open_amount == 0 or amount > open_amount:
            raise ExceedsOriginal(
                operation="", operation_zh="", requested=amount, remaining=open_amount,
                posting_id=0,
            )  # fmt: skip
        repaid = min(self.debt[debit.member], amount) if repays else 0
        self.debt[debit.member] -= repaid
        left = amount - repaid
        for lot, part in reversed(debit.taken):
            room = part - debit.returned.get(lot.order, 0)
            give = min(room, left)
            if give > 0:
                lot.remaining += give
                debit.returned[lot.order] = debit.returned.get(lot.order, 0) + give
                left -= give
                renewed, date = lot.latest_renewal()
                if renewed and (date is None or date > now):  # the points follow the renewal
                    lot.remaining -= give
                    follow = self.new_lot(debit.member, give, lot.available_at, date)
                    lot.renewed_to.append(follow)
        debit.given_back += amount
        return amount

    def summary(self, member: int, now: datetime) -> tuple[int, ...]:
        lots = [x for x in self.lots[member] if x.remaining > 0]
        pending = sum(x.remaining for x in lots if x.available_at > now)
        available = sum(x.remaining for x in lots if x.spendable(now))
        balance = sum(x.remaining for x in lots)
        expiring: dict[Any, int] = {}
        for x in lots:
            if x.expires_at is not None:
                day = x.expires_at.astimezone(SHANGHAI).date()
                expiring[day] = expiring.get(day, 0) + x.remaining
        return (balance, available, pending, balance - available - pending,
                self.frozen[member], self.debt[member], sorted(expiring.items()))  # fmt: skip


def make_machine(db: Database) -> type[RuleBasedStateMachine]:
    clock = db.clock
    assert isinstance(clock, ManualClock)

    class LedgerMachine(RuleBasedStateMachine):
        spends = Bundle("spends")
        earns = Bundle("earns")
        freezes = Bundle("freezes")

        def __init__(self) -> None:
            super().__init__()
            self.program_id = new_program(db).id
            self.members = new_members(db, self.program_id, MEMBERS)
            self.model = Model(self.members)
            self.keys = itertools.count()
            self.sent: list[tuple[Any, dict[str, Any], int]] = []  # (fn, kwargs, posting id)

        def now(self) -> datetime:
            return clock.now()

        def post(self, fn: Any, **kwargs: Any) -> Any:
            kwargs["key"] = f"k{next(self.keys)}"
            result = db.run(lambda uow: fn(uow, **kwargs))
            if result is not None:
                assert not result.replayed
                self.sent.append((fn, kwargs, result.id))
            return result

        def expect_refusal(self, error: type[JifenError], fn: Any, **kwargs: Any) -> None:
            with pytest.raises(error):
                self.post(fn, **kwargs)

        member = st.integers(0, MEMBERS - 1)

        @initialize(
            target=earns,
            amounts=st.lists(st.integers(1, 500), min_size=MEMBERS, max_size=MEMBERS),
            expiry_days=st.one_of(st.none(), st.integers(1, 120)),
        )
        def fund(self, amounts: list[int], expiry_days: int | None) -> Any:
            """Start every member with spendable points, so debits are tried, not just refused."""
            return multiple(
                *(self.earn(i, amount, 0, expiry_days) for i, amount in enumerate(amounts))
            )

        @rule(
            target=earns,
            who=member,
            amount=st.integers(1, 400),
            pending_days=st.sampled_from([0, 0, 0, 1, 7]),
            expiry_days=st.one_of(st.none(), st.integers(1, 400)),
        )
        def earn(self, who: int, amount: int, pending_days: int, expiry_days: int | None) -> Any:
            m, now = self.members[who], self.now()
            available_at = now + timedelta(days=pending_days)
            expires_at = None if expiry_days is None else now + timedelta(days=expiry_days)
            if expires_at is not None and expires_at <= available_at:
                self.expect_refusal(InvalidDates, points.earn, member_id=m, amount=amount,
                                    available_at=available_at, expires_at=expires_at)  # fmt: skip
                return multiple()
            posted = self.post(points.earn, member_id=m, amount=amount,
                               available_at=available_at, expires_at=expires_at)  # fmt: skip
            repaid = min(self.model.debt[m], amount)
            self.model.debt[m] -= repaid
            lot = None
            if amount - repaid:
                lot = self.model.new_lot(m, amount - repaid, available_at, expires_at)
            return (posted.id, RefEarn(m, amount, lot))

        @rule(target=spends, who=member, amount=st.integers(1, 200))
        def spend(self, who: int, amount: int) -> Any:
            m = self.members[who]
            try:
                taken = self.model.take(m, amount, self.now())
            except InsufficientPoints:
                self.expect_refusal(InsufficientPoints, points.spend, member_id=m, amount=amount)
                return multiple()
            posted = self.post(points.spend, member_id=m, amount=amount)
            return (posted.id, RefDebit(m, amount, taken))

        @rule(spend=spends, amount=st.one_of(st.none(), st.integers(1, 80)))
        def refund(self, spend: Any, amount: int | None) -> None:
            spend_id, debit = spend
            try:
                debt = self.model.debt[debit.member]
                given = self.model.give_back(debit, amount, self.now(), repays=True)
            except ExceedsOriginal:
                self.expect_refusal(
                    ExceedsOriginal, points.refund, spend_id=spend_id, amount=amount
                )
                return
            posted = self.post(points.refund, spend_id=spend_id, amount=amount)
            assert posted.debt_change == -min(debt, given)

        @rule(earn=earns, amount=st.one_of(st.none(), st.integers(1, 400)))
        def reverse(self, earn: Any, amount: int | None) -> None:
            earn_id, ref = earn
            open_amount = ref.amount - ref.reversed
            wanted = open_amount if amount is None else amount
            if open_amount == 0 or wanted > open_amount:
                self.expect_refusal(ExceedsOriginal, points.reverse, earn_id=earn_id, amount=amount)
                return
            posted = self.post(points.reverse, earn_id=earn_id, amount=amount)
            m, now, short = ref.member, self.now(), wanted
            # the earn's own points first, wherever renewals moved them, earliest expiry first
            family = ref.lot.family() if ref.lot is not None else []
            for lot in sorted(family, key=RefLot.fifo):
                own = min(lot.remaining, short)
                lot.remaining -= own
                short -= own
            # then those of them that lapsed, which the member does not pay for again
            lapsed = sum(x.expired for x in family) - ref.unexpired
            unexpired = min(lapsed, short)
            ref.unexpired += unexpired
            short -= unexpired
            # then the member's other spendable points, then its pending ones (the soonest
            # available first), and only what they cannot cover becomes debt
            others = [x for x in self.model.lots[m] if all(x is not y for y in family)]
            for lot in [
                *sorted((x for x in others if x.spendable(now)), key=RefLot.fifo),
                *sorted((x for x in others if x.pending(now)),
                        key=lambda x: (x.available_at, *x.fifo())),
            ]:  # fmt: skip
                part = min(lot.remaining, short)
                lot.remaining -= part
                short -= part
            self.model.debt[m] += short
            ref.reversed += wanted
            assert posted.debt_change == short

        @rule(who=member, amount=st.integers(-200, 200).filter(bool))
        def adjust(self, who: int, amount: int) -> None:
            m, now = self.members[who], self.now()
            kwargs = {"member_id": m, "amount": amount, "reason": "correction", "actor": "ops"}
            repaid = 0
            if amount < 0:
                try:
                    self.model.take(m, -amount, now)
                except InsufficientPoints:
                    self.expect_refusal(InsufficientPoints, points.adjust, **kwargs)
                    return
            else:  # a credit pays the member's debt first, as an earning does
                repaid = min(self.model.debt[m], amount)
                self.model.debt[m] -= repaid
                if amount - repaid:
                    self.model.new_lot(m, amount - repaid, now, None)
            posted = self.post(points.adjust, **kwargs)
            assert posted.debt_change == -repaid

        @rule(sender=member, receiver=member, amount=st.integers(1, 300))
        def transfer(self, sender: int, receiver: int, amount: int) -> None:
            if sender == receiver:
                return
            a, b, now = self.members[sender], self.members[receiver], self.now()
            kwargs = {"from_member_id": a, "to_member_id": b, "amount": amount}
            try:
                taken = self.model.take(a, amount, now)
            except InsufficientPoints:
                self.expect_refusal(InsufficientPoints, points.transfer, **kwargs)
                return
            # the receiver's debt first, out of the points given earliest (soonest to lapse)
            repaid = owed = min(self.model.debt[b], amount)
            self.model.debt[b] -= repaid
            for lot, part in taken:
                paying = min(owed, part)
                owed -= paying
                if part - paying:
                    self.model.new_lot(b, part - paying, now, lot.expires_at)
            posted = self.post(points.transfer, **kwargs)
            assert (posted.debt_change, posted.counterparty_debt_change) == (0, -repaid)

        @rule(target=freezes, who=member, amount=st.integers(1, 200))
        def freeze(self, who: int, amount: int) -> Any:
            m = self.members[who]
            kwargs = {"member_id": m, "amount": amount, "reason": "review", "actor": "risk"}
            try:
                taken = self.model.take(m, amount, self.now())
            except InsufficientPoints:
                self.expect_refusal(InsufficientPoints, points.freeze, **kwargs)
                return multiple()
            posted = self.post(points.freeze, **kwargs)
            self.model.frozen[m] += amount
            return (posted.id, RefDebit(m, amount, taken))

        @rule(frozen=freezes, amount=st.one_of(st.none(), st.integers(1, 200)))
        def unfreeze(self, frozen: Any, amount: int | None) -> None:
            freeze_id, debit = frozen
            try:  # paying the member's debt first, as a refund does
                debt = self.model.debt[debit.member]
                given = self.model.give_back(debit, amount, self.now(), repays=True)
            except ExceedsOriginal:
                self.expect_refusal(ExceedsOriginal, points.unfreeze, freeze_id=freeze_id,
                                    amount=amount)  # fmt: skip
                return
            posted = self.post(points.unfreeze, freeze_id=freeze_id, amount=amount)
            assert posted.debt_change == -min(debt, given)
            self.model.frozen[debit.member] -= given

        @rule(frozen=freezes)
        def spend_frozen(self, frozen: Any) -> None:
            """All a freeze still holds, released and spent from the very lots it held,
            whatever their dates by now (a redemption completed after its wait)."""
            freeze_id, debit = frozen
            kwargs = {"freeze_id": freeze_id, "release_key": f"r{next(self.keys)}",
                      "reason": "redeem", "release_reason": "paid", "actor": "shop"}  # fmt: skip
            if debit.given_back == debit.amount:
                self.expect_refusal(ExceedsOriginal, points.spend_frozen, **kwargs)
                return
            if any(lot.renewed_to for lot, _ in debit.taken):
                return  # given back, the points would follow the renewal: another path
            before = dict(debit.returned)
            given = self.model.give_back(debit, None, self.now())
            for lot, _ in debit.taken:  # taken again from the lots they went back to
                lot.remaining -= debit.returned.get(lot.order, 0) - before.get(lot.order, 0)
            posted = self.post(points.spend_frozen, **kwargs)
            assert (posted.kind, posted.amount) == ("spend", given)
            self.model.frozen[debit.member] -= given

        @rule(who=member)
        def expire(self, who: int) -> None:
            m, now = self.members[who], self.now()
            due = [x for x in self.model.lots[m]
                   if x.remaining and x.expires_at is not None and x.expires_at <= now]  # fmt: skip
            result = db.run(lambda uow: points.expire_member(uow, member_id=m))
            assert (result.amount if result else 0) == sum(x.remaining for x in due)
            for lot in due:
                lot.expired += lot.remaining
                lot.remaining = 0

        @rule(who=member, extra_days=st.one_of(st.none(), st.integers(-30, 90)))
        def renew(self, who: int, extra_days: int | None) -> None:
            """Every open lot's date moved by ``extra_days`` (None: never expires), where
            that is later: the points move to new lots, the balance stays."""
            m, now = self.members[who], self.now()
            shift = None if extra_days is None else timedelta(days=extra_days)

            def new_date(lot: Any) -> datetime | None:
                if lot.expires_at is None or shift is None:
                    return None
                return lot.expires_at + shift  # type: ignore[no-any-return]

            moved = [
                x for x in sorted(self.model.lots[m], key=RefLot.fifo)
                if x.remaining and x.expires_at is not None and x.expires_at > now
                and (shift is None or shift > timedelta(0))
            ]  # fmt: skip
            result = self.post(points.renew, member_id=m, new_date=new_date, reason="tier")
            assert (result.amount if result else 0) == sum(x.remaining for x in moved)
            for lot in moved:
                lot.renewed_to.append(
                    self.model.new_lot(m, lot.remaining, lot.available_at, new_date(lot))
                )
                lot.remaining = 0

        @rule(hours=st.sampled_from([1, 12, 24, 24 * 3, 24 * 8, 24 * 40]))
        def advance_clock(self, hours: int) -> None:
            clock.advance(timedelta(hours=hours))

        @precondition(lambda self: bool(self.sent))
        @rule(data=st.data())
        def replay(self, data: st.DataObject) -> None:
            fn, kwargs, posting_id = data.draw(st.sampled_from(self.sent))
            again = db.run(lambda uow: fn(uow, **kwargs))
            assert again.id == posting_id
            assert again.replayed
            if "amount" in kwargs and kwargs["amount"] is not None:
                changed = {**kwargs, "amount": kwargs["amount"] + 1}
                with pytest.raises(IdempotencyConflict):
                    db.run(lambda uow: fn(uow, **changed))

        @invariant()
        def agrees_with_the_model_and_the_ledger_is_sound(self) -> None:
            now = self.now()
            for m in self.members:
                s = db.run(lambda uow, m=m: points.balance(uow, member_id=m), read_only=True)
                stored = (s.balance, s.available, s.pending, s.overdue, s.frozen, s.debt,
                          [(e.date, e.amount) for e in s.expiring])  # fmt: skip
                assert stored == self.model.summary(m, now), f"member {m}"
                # a member that owes has no points to spend and none on the way
                assert s.debt == 0 or s.available == s.pending == 0, f"member {m}"
            assert_ledger_sound(db, self.program_id)

    return LedgerMachine


def test_random_operations_agree_with_the_model_and_keep_every_invariant(db: Database) -> None:
    # The model and the core are the same on both backends; PostgreSQL's round trips make
    # each step dearer there, so it runs half the sequences SQLite does.
    run_state_machine_as_test(
        make_machine(db),
        settings=settings(
            max_examples=30 if db.dialect == "sqlite" else 15,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
