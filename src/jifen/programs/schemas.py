"""What the programmes use cases take and answer with."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from jifen.api.schemas import RequestBody
from jifen.expiry.schemas import ExpiryPolicy
from jifen.rewards.schemas import RedemptionPolicy
from jifen.tiers.schemas import TierScheme

APPROVAL_TTL_HOURS = 72
"""How long a pending approval request stays open when its programme sets nothing else."""
ClosingPolicy = Literal["forfeit", "refuse"]
CLOSING_POLICY: ClosingPolicy = "forfeit"
"""What closing a member account does with its points when its programme sets nothing else."""


class ProgramRead(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    code: str
    name: str
    time_zone: str
    created_at: datetime


class ProgramCreate(RequestBody):
    code: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    """Short stable name used in URLs, for example ``demo``."""
    name: str = Field(min_length=1, max_length=200)
    time_zone: str = Field("Asia/Shanghai", max_length=64)
    """IANA time zone for calendar rules."""


class ProgramSettings(RequestBody):
    """A programme's policy. Read by anyone who may see the programme; changed only through
    an approval (``PUT /programs/{program}/settings`` files the request)."""

    adjust_approval_threshold: int = Field(1000, ge=0, le=10**12)
    """Manual adjustments larger than this (in absolute points) need a second person."""
    approval_ttl_hours: int = Field(APPROVAL_TTL_HOURS, ge=1, le=90 * 24)
    """Hours a request waiting for a second person stays open (1 hour to 90 days); after
    that it has expired: it can no longer be approved (a checker may still reject it, its
    maker withdraw it), and must be filed again."""
    transfers_enabled: bool = True
    """Whether members' points may be moved to other members."""
    transfer_max: int | None = Field(None, ge=1, le=10**12)
    """The most points one transfer may move; ``None``: no limit."""
    return_window_days: int = Field(7, ge=0, le=365)
    """Days an order's points stay pending, while the goods may still be returned."""
    default_validity_days: int | None = Field(365, ge=1, le=36500)
    """Days earned points stay valid when an earning names no expiry; ``None``: forever."""
    redemption: RedemptionPolicy = RedemptionPolicy()
    """How members redeem: terms by tier, pricing factors, voucher validity and fees."""
    expiry: ExpiryPolicy = ExpiryPolicy()
    """How long points stay valid (by tier), what lapsing does, dormancy and reminders."""
    closing_policy: ClosingPolicy = CLOSING_POLICY
    """What closing a member account does with the points it still holds: ``forfeit``
    clears them (available, pending and past their date alike) into the expired account,
    as expired points go; ``refuse`` refuses to close it until staff have spent,
    transferred or adjusted them. Either way an account with frozen points is not closed
    until they are unfrozen or released, and a debt stays on the closed account.

    A closed account earns, spends and is adjusted no more. Points given back to it later
    (a refund of a spend, a returned redemption) are, under ``forfeit``, forfeited in the
    same transaction by an expiry posting that refers to the refund; under ``refuse`` the
    refund is refused. An unused voucher that lapses after closing has its points given
    back and forfeited under either policy. The refund of an order it earned from takes
    nothing back: its points were settled at closing, and a closed account takes on no
    debt."""
    tier_scheme: TierScheme | None = None
    """How members' tiers follow their scores, and what each tier gives; ``None``: tiers
    are set by hand only."""
