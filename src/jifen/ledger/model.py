"""The nouns of the ledger: kinds of posting, parties, lots, lines, allocations and plans.

Everything here is an immutable value. Storage turns rows into these and plans back into
rows; the core never sees a database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Kind(StrEnum):
    """What a posting does. Every change of points is exactly one posting of one kind."""

    EARN = "earn"
    SPEND = "spend"
    REFUND = "refund"
    REVERSE = "reverse"
    ADJUST = "adjust"
    TRANSFER = "transfer"
    FREEZE = "freeze"
    UNFREEZE = "unfreeze"
    EXPIRE = "expire"
    RENEW = "renew"
    """Lots given a later expiry date (a tier whose validity is longer): the same points
    move from the old lots to new ones, and the balance does not change."""


class SystemAccount(StrEnum):
    """A programme's own accounts. Their balances are derived from lines, never stored,
    so no writer ever queues on them."""

    ISSUED = "issued"  # source of earned points; its balance is minus what was ever issued
    REDEEMED = "redeemed"  # where spent points go
    EXPIRED = "expired"  # where expired points go
    ADJUSTMENTS = "adjustments"  # counterpart of manual adjustments
    FROZEN = "frozen"  # points held away from members by a freeze
    RECEIVABLE = "receivable"  # minus what members owe after a claw-back they could not cover
    CHARITY = "charity"  # points members donated
    PARTNERS = "partners"  # points members exchanged out to partner programmes


class Party(StrEnum):
    """The member accounts a posting can touch: the one it is about, and a transfer's receiver."""

    MEMBER = "member"
    COUNTERPARTY = "counterparty"


Account = Party | SystemAccount


@dataclass(frozen=True, slots=True)
class Lot:
    """Points credited to a member at once, with when they become usable and when they lapse."""

    id: int
    amount: int
    remaining: int
    available_at: datetime
    expires_at: datetime | None

    def is_spendable(self, now: datetime) -> bool:
        return (
            self.remaining > 0
            and self.available_at <= now
            and (self.expires_at is None or self.expires_at > now)
        )

    def is_pending(self, now: datetime) -> bool:
        return self.remaining > 0 and self.available_at > now

    def is_due(self, now: datetime) -> bool:
        return self.remaining > 0 and self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True, slots=True)
class Allocation:
    """A change to one lot's remaining points: negative consumes, positive restores."""

    lot_id: int
    amount: int


@dataclass(frozen=True, slots=True)
class NewLot:
    amount: int
    available_at: datetime
    expires_at: datetime | None
    owner: Party = Party.MEMBER
    source_lot_id: int | None = None


@dataclass(frozen=True, slots=True)
class Line:
    account: Account
    amount: int


@dataclass(frozen=True, slots=True)
class AccountState:
    """The stored facts of one member account that a plan needs."""

    balance: int = 0
    frozen: int = 0
    debt: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """What one operation will write: its lines (summing to zero), lot changes and new lots.

    ``amount`` is the headline figure of the posting (always > 0); ``debt_change`` and
    ``frozen_change`` move the member account's debt and frozen totals,
    ``counterparty_debt_change`` a transfer receiver's debt.
    """

    kind: Kind
    amount: int
    lines: tuple[Line, ...]
    allocations: tuple[Allocation, ...] = ()
    new_lots: tuple[NewLot, ...] = ()
    debt_change: int = 0
    frozen_change: int = 0
    counterparty_debt_change: int = 0
    notes: dict[str, int] = field(default_factory=dict)

    def change_of(self, party: Party) -> int:
        """How much this plan moves ``party``'s balance."""
        return sum(line.amount for line in self.lines if line.account == party)

    def debt_change_of(self, party: Party) -> int:
        """How much this plan moves ``party``'s debt."""
        return self.debt_change if party is Party.MEMBER else self.counterparty_debt_change
