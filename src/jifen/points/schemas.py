"""What the points use cases answer with."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jifen.api.schemas import NO_NUL, Instant, RequestBody
from jifen.errors import Refusal


class _Read(BaseModel):
    model_config = ConfigDict(frozen=True)


class PostingRead(_Read):
    """One posting as the caller sees it; ``replayed`` is true when an idempotency key
    returned an earlier result instead of posting again."""

    id: int
    kind: str
    amount: int
    member_id: int
    counterparty_member_id: int | None = None
    ref_posting_id: int | None = None
    reason: str = ""
    actor: str = ""
    created_at: datetime
    replayed: bool = False
    debt_change: int = 0
    """How this posting moved the member's debt (claw-backs raise it; earnings, refunds,
    unfreezes and credits by adjustment pay it off)."""
    counterparty_debt_change: int = 0
    """How a transfer moved its receiver's debt: what it received pays that off first."""


POSTING_EVENTS = {
    "earn": "points.earned", "spend": "points.spent", "refund": "points.refunded",
    "reverse": "points.reversed", "adjust": "points.adjusted",
    "transfer": "points.transferred", "freeze": "points.frozen",
    "unfreeze": "points.unfrozen", "expire": "points.expired", "renew": "points.renewed",
}  # fmt: skip
"""The webhook event a posting of each kind raises where it is announced."""


def posting_event(
    posting: PostingRead, merchant: str | None = None, store: str | None = None
) -> tuple[str, str, dict[str, object]]:
    """(event type, dedupe key, data) of the webhook event announcing ``posting``."""
    data: dict[str, object] = {
        "posting_id": posting.id, "kind": posting.kind, "member_id": posting.member_id,
        "amount": posting.amount, "counterparty_member_id": posting.counterparty_member_id,
        "ref_posting_id": posting.ref_posting_id, "debt_change": posting.debt_change,
        "counterparty_debt_change": posting.counterparty_debt_change,
        "reason": posting.reason, "actor": posting.actor, "merchant": merchant,
        "store": store, "at": posting.created_at.isoformat(),
    }  # fmt: skip
    return POSTING_EVENTS[posting.kind], f"posting:{posting.id}", data


class ExpiringAmount(_Read):
    date: date
    """Day (in the programme's time zone) on which ``amount`` points expire."""
    amount: int


class BalanceSummary(_Read):
    member_id: int
    balance: int
    """All points the member holds: available + pending + overdue."""
    available: int
    """Spendable now."""
    pending: int
    """Credited but not usable yet (for example during an order's return window)."""
    overdue: int
    """Past their expiry date, waiting for the expiry run; not spendable."""
    frozen: int
    """Held away from the member by a freeze; comes back on unfreeze."""
    debt: int
    """Owed after a claw-back the balance could not cover; paid off by the next earnings."""
    expiring: list[ExpiringAmount]


class LotRead(_Read):
    id: int
    posting_id: int
    amount: int
    remaining: int
    available_at: datetime
    expires_at: datetime | None
    source_lot_id: int | None


class LotPage(_Read):
    items: list[LotRead]
    next_cursor: str | None
    """Pass back as ``cursor`` for the next page; ``None`` on the last page."""


class LineRead(_Read):
    account_id: int
    account: str
    """``member:<external ref>`` for a member account, else the system account's code."""
    amount: int


class HistoryEntry(_Read):
    seq: int
    posting_id: int
    kind: str
    change: int
    """How this posting changed this member's balance."""
    amount: int
    counterpart: str
    """Where the points came from or went to."""
    reason: str
    actor: str
    ref_posting_id: int | None
    created_at: datetime
    lines: list[LineRead]


class HistoryPage(_Read):
    items: list[HistoryEntry]
    next_cursor: str | None
    """Pass back as ``cursor`` for the next (older) page; ``None`` on the last page."""


# --------------------------------------------------------------------------- request bodies

MAX_POINTS = 10**12
"""The largest amount one request may move: far above any real posting, far below 2**63."""

Amount = Annotated[
    int, Field(strict=True, ge=1, le=MAX_POINTS, description="Points, a whole number > 0.")
]
"""Strict: ``true``, ``1.0`` or ``"2"`` is not an amount (nor reads as the same request)."""
Reason = Annotated[str, Field(max_length=500, pattern=NO_NUL)]
RequiredReason = Annotated[str, Field(min_length=1, max_length=500, pattern=NO_NUL)]
Merchant = Annotated[str | None, Field(min_length=1, max_length=64, pattern=NO_NUL)]


class EarnCreate(RequestBody):
    amount: Amount
    available_at: Instant | None = None
    """Pending until then (for example the end of the return window); default: now."""
    expires_at: Instant | None = None
    """When the points lapse; default: never."""
    reason: Reason = ""
    merchant: Merchant = None
    store: Merchant = None


class SpendCreate(RequestBody):
    amount: Amount
    reason: Reason = ""
    merchant: Merchant = None
    store: Merchant = None


class AdjustCreate(RequestBody):
    amount: int = Field(strict=True, ge=-MAX_POINTS, le=MAX_POINTS)
    """Positive credits, negative debits; never 0. Above the programme's threshold (in
    absolute value) the adjustment waits for a second person's approval."""
    reason: RequiredReason
    expires_at: Instant | None = None
    """When a credit's points lapse (default: never); a debit takes no date."""

    @field_validator("amount")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise Refusal(
                "an adjustment of 0 points changes nothing; give a non-zero amount",
                "调整 0 积分不会有任何变化;请给出非零的数量",
            )
        return value

    @model_validator(mode="after")
    def _dated_credit(self) -> AdjustCreate:
        if self.amount < 0 and self.expires_at is not None:  # it was silently left unused
            raise Refusal(
                "expires_at dates the points a credit gives; a debit (a negative amount) "
                "takes points as they are: leave expires_at out",
                "expires_at 用于给增加的积分定到期日;扣减(负数)按积分现有的到期日扣除:"
                "请不要给出 expires_at",
            )
        return self


class FreezeCreate(RequestBody):
    amount: Amount
    reason: RequiredReason


class ClearCreate(RequestBody):
    reason: RequiredReason


class TransferCreate(RequestBody):
    to_member_id: int = Field(strict=True, ge=1, le=2**63 - 1)
    """Strict, as an amount is: ``true`` is not member 1, nor ``"1"`` another way to say it."""
    amount: Amount
    reason: Reason = ""


class GiveBackCreate(RequestBody):
    """A refund, reversal or unfreeze of an earlier posting: all of what is open (no
    ``amount``) or part of it."""

    amount: int | None = Field(None, strict=True, ge=1, le=MAX_POINTS)
    reason: Reason = ""
