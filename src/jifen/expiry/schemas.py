"""A programme's expiry policy: how long points stay valid (by tier), what happens when they
lapse, dormancy, and when members are reminded."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, model_validator

from jifen.api.schemas import RequestBody
from jifen.errors import Refusal
from jifen.points.schemas import PostingRead

Channel = Literal["inbox", "email", "sms"]
TierCode = Annotated[str, Field(min_length=1, max_length=64)]


class Validity(RequestBody):
    """How long a lot stays valid from the day its points become available.

    - ``rolling``: ``months`` or ``days`` after that day (12个月), to the end of the day in
      the programme's time zone;
    - ``calendar``: until 1 January, ``years`` years after the year the points were earned
      (次年1月1日清零 is ``years: 1``), at midnight in the programme's time zone;
    - ``never``: the points do not expire (长期有效).
    """

    kind: Literal["rolling", "calendar", "never"]
    months: int | None = Field(None, ge=1, le=1200)
    days: int | None = Field(None, ge=1, le=36500)
    years: int = Field(1, ge=1, le=100)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kind == "rolling" and (self.months is None) == (self.days is None):
            raise Refusal(
                "a rolling validity needs exactly one of months and days",
                "滚动有效期须且只能给出 months 和 days 之一",
            )
        if self.kind != "rolling" and (self.months is not None or self.days is not None):
            raise Refusal(
                "months and days belong to a rolling validity only",
                "months 和 days 只适用于滚动有效期",
            )
        return self


class Dormancy(RequestBody):
    """连续12个月未使用进入休眠, 每月递减10%, 任意行为激活后恢复: after ``after_months``
    without activity, ``decay_pct`` of what is available is held back each month; the
    member's next activity gives back everything held back during that dormancy."""

    after_months: int = Field(12, ge=1, le=120)
    decay_pct: int = Field(10, ge=1, le=100)


class Reminders(RequestBody):
    """When members hear that points will lapse: ``days_before`` each expiry date (30天 /
    90天), and for calendar clearing once a year from ``year_end_from`` (MM-DD, 10月1日起)."""

    days_before: Annotated[list[Annotated[int, Field(ge=1, le=366)]], Field(max_length=6)] = Field(
        default_factory=lambda: [90, 30]
    )
    year_end_from: str | None = Field(None, pattern=r"^(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
    channels: Annotated[list[Channel], Field(min_length=1, max_length=3)] = Field(
        default_factory=lambda: list[Channel](["inbox"])
    )
    suggestions: int = Field(3, ge=0, le=10)
    """How many rewards the member can afford to suggest in a reminder."""


class ExpiryPolicy(RequestBody):
    """Per programme, and per tier where ``by_tier`` names one (普通自然年, 银卡18个月,
    金卡及以上长期有效). ``validity`` ``None`` keeps the programme's ``default_validity_days``.
    """

    validity: Validity | None = None
    by_tier: dict[TierCode, Validity] = Field(default_factory=dict, max_length=50)
    on_tier_change: Literal["keep", "extend"] = "keep"
    """What a member's open lots do when its tier changes (an evaluation, an upgrade, staff):
    ``keep`` their dates, or ``extend`` them to what the new tier's validity gives, counted
    from when each lot became available, where that is later (never shorter). A temporary
    upgrade keeps them."""
    on_expiry: Literal["expire", "freeze"] = "expire"
    """``freeze``: lapsed points are held frozen instead of cleared (冻结而不清零); staff can
    restore them, with a fresh validity."""
    dormancy: Dormancy | None = None
    reminders: Reminders = Reminders()


class RestoreExpired(RequestBody):
    reason: str = Field(min_length=1, max_length=500)
    """Why the points come back (kept with the postings and in the audit log)."""


class RestoredRead(BaseModel):
    """The releases that gave a member back the points frozen when they lapsed."""

    member_id: int
    points: int
    """Every point given back."""
    debt_paid: int = 0
    """Of those, the points that paid off the member's debt first: the rest is spendable."""
    postings: list[PostingRead]
