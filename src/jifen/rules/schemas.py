"""What an earning rule is made of: its kind with typed parameters, its stacking, its window,
its gray-release share and its caps; and the programme-wide caps by tier.

Every kind's parameters are a model of their own, chosen by ``kind`` (a discriminated
union), so a rule pack or an API body with a misspelt or missing parameter is refused with
the field that was wrong. Points per yuan are decimals (``"1.5"``); amounts of money are
integer fen; points are integers.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal, get_args

from pydantic import AwareDatetime, BaseModel, Field, model_validator

from jifen.api.schemas import RequestBody
from jifen.errors import Refusal
from jifen.tiers.schemas import TierDef

Rounding = Literal["floor", "half_up", "ceil"]
Points = Annotated[int, Field(ge=0, le=10**9)]
PositivePoints = Annotated[int, Field(ge=1, le=10**9)]
Rate = Annotated[Decimal, Field(ge=0, le=10**6, max_digits=12, decimal_places=6)]
Factor = Annotated[Decimal, Field(ge=1, le=100, max_digits=8, decimal_places=4)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00]*$")]
EventType = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*\.[a-z0-9_.]+$")
]


class SpendRate(RequestBody):
    """Points for money spent: ``rate`` points per yuan, or a category's own rate
    (日用品 1, 家电 3 per yuan at 1 point = 0.01 yuan are the documents' 1 % and 3 %).
    Lines paid with points, excluded skus and excluded categories earn nothing."""

    kind: Literal["spend_rate"] = "spend_rate"
    rate: Rate = Decimal(1)
    category_rates: dict[Name, Rate] = Field(default_factory=dict)
    excluded_skus: frozenset[Name] = frozenset()
    excluded_categories: frozenset[Name] = frozenset()
    channels: frozenset[Name] | None = None
    """Only orders from these channels (online, store, livestream); ``None``: any."""
    stores: frozenset[Name] | None = None
    """Only orders at these stores; ``None``: any."""
    rounding: Rounding = "floor"
    round_each_line: bool = False
    """Round each line's points (True) or the order's sum once (False, the default)."""


class FixedAward(RequestBody):
    """The same points each time the rule fires (注册送100, 到店核销+50, 带图评价30)."""

    kind: Literal["fixed"] = "fixed"
    points: PositivePoints


class PerUnit(RequestBody):
    """Points per unit of a number in the event (垃圾分类指导每小时5分: ``field`` ``hours``;
    每题10分: ``field`` ``correct_answers``)."""

    kind: Literal["per_unit"] = "per_unit"
    field: Name = "hours"
    points_per_unit: Rate
    rounding: Rounding = "floor"


class Multiplier(RequestBody):
    """Multiplies the points that other rules award on the same event (普通1倍, 银卡1.2倍,
    金卡1.5倍; 双11 2倍; 生日月双倍). ``by_tier`` gives a tier its own factor; a tier not in
    it gets ``factor``. Several multipliers compound, in priority order."""

    kind: Literal["multiplier"] = "multiplier"
    factor: Factor = Decimal(1)
    by_tier: dict[Name, Factor] = Field(default_factory=dict)
    birthday_month: bool = False
    """Only in the member's birthday month (programme time zone)."""
    applies_to: frozenset[str] = frozenset({"spend_rate"})
    """The kinds whose awards it multiplies."""
    rounding: Rounding = "floor"


class Threshold(RequestBody):
    """A bonus when the order's eligible amount reaches ``min_amount_fen``
    (满1000元加送200分); with ``repeat``, once per whole multiple of it."""

    kind: Literal["threshold"] = "threshold"
    min_amount_fen: Annotated[int, Field(ge=1, le=10**12)]
    points: PositivePoints
    repeat: bool = False


class FirstOfKind(RequestBody):
    """A bonus for the member's first event of the rule's type (首单)."""

    kind: Literal["first_of_kind"] = "first_of_kind"
    points: PositivePoints


class StreakLadder(RequestBody):
    """Points by the length of a run of consecutive days (首签10, 连续3天每天15, 连续7天50,
    中断重计): ``ladder`` maps the first day of a rung to its points. A second event the same
    day earns nothing; a missed day starts again at day 1. With ``cycle``, the day after the
    top rung starts again at day 1."""

    kind: Literal["streak"] = "streak"
    ladder: dict[Annotated[int, Field(ge=1, le=3660)], PositivePoints]
    cycle: bool = False

    @model_validator(mode="after")
    def _starts_on_day_one(self) -> StreakLadder:
        if 1 not in self.ladder:
            raise Refusal("the ladder needs a rung for day 1", "阶梯须包含第 1 天的档位")
        return self


class RandomBonus(RequestBody):
    """A surprise: with ``probability``, a whole number of points between ``minimum`` and
    ``maximum`` (10%概率50-200分). The draw is seeded by the event and the rule, so it is
    recorded and the same event always draws the same."""

    kind: Literal["random"] = "random"
    probability: Annotated[Decimal, Field(gt=0, le=1, max_digits=7, decimal_places=6)]
    minimum: PositivePoints
    maximum: PositivePoints

    @model_validator(mode="after")
    def _ordered(self) -> RandomBonus:
        if self.maximum < self.minimum:
            raise Refusal("maximum must not be below minimum", "maximum 不能小于 minimum")
        return self


class Referral(RequestBody):
    """Both sides of a referral (邀请人200, 被邀请人100), on the invited member's first
    order: the event names the inviter in ``inviter_member_id``."""

    kind: Literal["referral"] = "referral"
    inviter_points: Points
    invitee_points: Points


class BirthdayGift(RequestBody):
    """Points on the member's birthday by tier (普通200, 银卡500, 金卡1000)."""

    kind: Literal["birthday_gift"] = "birthday_gift"
    by_tier: dict[Name, Points]
    default: Points = 0


class Reviewed(RequestBody):
    """Points held until a reviewer approves them (特殊贡献, 单次最高50分): the event's
    ``requested_points`` (or ``points``), never more than ``max_points``."""

    kind: Literal["reviewed"] = "reviewed"
    points: Points = 0
    max_points: PositivePoints


Params = Annotated[
    SpendRate
    | FixedAward
    | PerUnit
    | Multiplier
    | Threshold
    | FirstOfKind
    | StreakLadder
    | RandomBonus
    | Referral
    | BirthdayGift
    | Reviewed,
    Field(discriminator="kind"),
]

AWARD_KINDS = frozenset(
    get_args(model.model_fields["kind"].annotation)[0] for model in get_args(get_args(Params)[0])
)
"""The kinds of award the rules give (a multiplier names those it multiplies)."""

Period = Literal["day", "week", "month", "lifetime"]


class RuleCaps(RequestBody):
    """Limits on one rule: per member per period, and a budget over all members."""

    per_member: dict[Period, PositivePoints] = Field(default_factory=dict)
    budget: PositivePoints | None = None


class RuleSpec(RequestBody):
    """One version of a rule, as an operator writes it (API body, rule pack entry)."""

    code: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    event_types: Annotated[frozenset[EventType], Field(min_length=1)]
    params: Params
    condition: Annotated[str, Field(max_length=2000)] | None = None
    """A CEL expression over ``event``, ``member`` and ``now``; the rule fires only when it
    is true."""
    priority: Annotated[int, Field(ge=0, le=10000)] = 100
    """Lower first."""
    exclusive_group: Name | None = None
    """Of the rules of one group that match an event, only the first (by priority) fires."""
    stop_after: bool = False
    """When this rule fires, rules after it (by priority) do not."""
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    gray_share: Annotated[Decimal, Field(ge=0, le=1, max_digits=7, decimal_places=6)] = Decimal(1)
    """The share of members (chosen by a stable hash of rule and member) the rule applies to."""
    caps: RuleCaps = Field(default_factory=RuleCaps)

    @model_validator(mode="after")
    def _window(self) -> RuleSpec:
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise Refusal("ends_at must be after starts_at", "ends_at 须晚于 starts_at")
        return self


class TierCap(RequestBody):
    """A tier's earning limits (普通1000/5000, 银卡1500/8000, 金卡2000/12000)."""

    day: PositivePoints | None = None
    month: PositivePoints | None = None


class ProgramCaps(RequestBody):
    """The programme's limits on earning: per member by tier, and a budget for the programme
    (``None``: no limit). They cap the events from when they are set until the next caps,
    whenever those events come in; a budget bounds the running total of the points awarded
    under a budget (see ``jifen.rules.service.caps_at``)."""

    by_tier: dict[Name, TierCap] = Field(default_factory=dict)
    budget: PositivePoints | None = None


def active_at(spec: RuleSpec, moment: datetime) -> bool:
    """Whether ``moment`` lies in the rule's window (start inclusive, end exclusive)."""
    return (spec.starts_at is None or spec.starts_at <= moment) and (
        spec.ends_at is None or moment < spec.ends_at
    )


RuleState = Literal["draft", "submitted", "approved", "active", "paused", "retired", "rejected"]
RuleStatus = Literal[
    "draft", "submitted", "scheduled", "active", "paused", "retired", "rejected", "approved"
]


class RuleVersionRead(BaseModel):
    """One version of a rule: what it says, where it is in its lifecycle, and when it was
    (or will be) active."""

    id: int
    code: str
    version: int
    spec: RuleSpec
    status: RuleStatus
    """``scheduled`` is an approved version whose activation lies in the future."""
    created_by: str
    created_at: datetime
    approval_id: int | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    active_from: datetime | None = None
    active_to: datetime | None = None


class RuleActivate(RequestBody):
    """When an approved version goes live (default: at approval)."""

    activate_at: AwareDatetime | None = None


FieldType = Literal["string", "integer", "number", "boolean"]
CustomName = Annotated[
    str, Field(min_length=8, max_length=64, pattern=r"^custom\.[a-z][a-z0-9_]*$")
]


class CustomField(RequestBody):
    type: FieldType
    required: bool = True


class EventTypeDeclare(RequestBody):
    """The payload of a ``custom.<name>`` event: its fields, their types, which are required.
    An event of the type with a field missing, unknown or of another type is refused."""

    fields: Annotated[
        dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")], CustomField],
        Field(max_length=50),
    ] = Field(default_factory=dict)
    description: Annotated[str, Field(max_length=500)] = ""


class EventTypeRead(EventTypeDeclare):
    name: str


class RulePack(RequestBody):
    """A programme's earning scheme as data: its tiers, its caps and its rules, loaded
    through the same use cases an operator's requests go through."""

    description: Annotated[str, Field(max_length=2000)] = ""
    tiers: Annotated[list[TierDef], Field(max_length=50)] = Field(default_factory=list)
    caps: ProgramCaps | None = None
    event_types: Annotated[dict[CustomName, EventTypeDeclare], Field(max_length=100)] = Field(
        default_factory=dict
    )
    """The custom events its rules read."""
    rules: Annotated[list[RuleSpec], Field(min_length=1, max_length=500)]

    @model_validator(mode="after")
    def _unique_codes(self) -> RulePack:
        codes = [rule.code for rule in self.rules]
        twice = sorted({code for code in codes if codes.count(code) > 1})
        if twice:
            raise Refusal(
                f"rule codes must be unique in a pack; repeated: {', '.join(twice)}",
                f"同一规则包中的规则 code 不能重复;重复的有:{', '.join(twice)}",
            )
        return self
