"""What the tiers use cases take and answer with: the tiers, a member's tier, the tier scheme
(how a score is made, the tiers' score ranges and retention lines, temporary upgrades, the
benefits matrix) and the record of every tier change."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from jifen.api.schemas import Instant, RequestBody
from jifen.errors import Refusal

TierCode = Annotated[str, Field(min_length=1, max_length=64)]
Score = Annotated[int, Field(ge=0, le=10**9)]
Weight = Annotated[int, Field(ge=0, le=1000)]
EventTypeName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00]*$")]


class TierDef(RequestBody):
    code: TierCode
    """What rules and caps name (普通, 银卡, 金卡, 钻石)."""
    name: Annotated[str, Field(min_length=1, max_length=100)]
    rank: Annotated[int, Field(ge=0, le=100)]
    """0 for the entry tier; a higher rank is a better tier."""


class TiersSet(RequestBody):
    tiers: Annotated[list[TierDef], Field(min_length=1, max_length=50)]


class TierRead(BaseModel):
    code: str
    name: str
    rank: int


class MemberTierSet(RequestBody):
    tier: TierCode
    reason: Annotated[str, Field(max_length=500)] = ""


class MemberTierRead(BaseModel):
    member_id: int
    tier: str | None
    """None: the member has no tier yet (rules treat it as no tier)."""
    since: datetime | None = None
    reason: str = ""
    set_by: str = ""
    temporary_until: datetime | None = None
    """Set while the tier is a temporary upgrade: it ends by itself then."""
    returns_to: str | None = None
    """While temporary: the tier the member goes back to when it ends."""


# --------------------------------------------------------------------------- the scheme


class SpendPart(RequestBody):
    """Score for money spent (paid orders less refunds): ``score`` for every whole
    ``per_yuan`` (每满1000元得40分)."""

    per_yuan: Annotated[int, Field(ge=1, le=10**9)] = 1000
    score: Score = 40
    weight_pct: Weight = 100
    """Share of this part that counts, in per cent (100: as computed)."""


class EarnedPart(RequestBody):
    """Score for points earned (earnings less claw-backs): ``score`` for every whole
    ``per_points`` (每1000积分得40分)."""

    per_points: Annotated[int, Field(ge=1, le=10**12)] = 1000
    score: Score = 40
    weight_pct: Weight = 100


class ActivityPart(RequestBody):
    """Score for activity: ``score`` for every whole ``per_events`` events of the listed
    types (check-ins, reviews, shares)."""

    event_types: Annotated[frozenset[EventTypeName], Field(min_length=1, max_length=20)]
    per_events: Annotated[int, Field(ge=1, le=10**6)] = 1
    score: Score = 1
    weight_pct: Weight = 100


class ScoreParts(RequestBody):
    """What a tier score is made of; a part left out counts nothing."""

    spend: SpendPart | None = None
    earned: EarnedPart | None = None
    activity: ActivityPart | None = None

    @model_validator(mode="after")
    def _one_part_at_least(self) -> ScoreParts:
        if self.spend is None and self.earned is None and self.activity is None:
            raise Refusal(
                "give at least one part: spend, earned or activity",
                "请至少给出一项:spend、earned 或 activity",
            )
        return self


class TierLevel(RequestBody):
    """One tier's place on the score scale."""

    tier: TierCode
    min_score: Score
    """The score that reaches this tier (银卡 101)."""
    retention: Score | None = None
    """A member of this tier keeps it at evaluation while its score is at or above this line
    (银卡 80); ``None``: the entry score (a member is never kept below its tier's range)."""


class TemporaryUpgrade(RequestBody):
    """During a campaign, a member whose score over the campaign reaches ``share`` times a
    higher tier's threshold holds that tier for ``months`` (大促期间达标120%,临时升级1个月)."""

    name: Annotated[str, Field(min_length=1, max_length=100)] = "campaign"
    starts_at: Instant
    ends_at: Instant
    share: Annotated[Decimal, Field(ge=1, le=10, max_digits=6, decimal_places=4)] = Decimal("1.2")
    months: Annotated[int, Field(ge=1, le=12)] = 1

    @model_validator(mode="after")
    def _ordered(self) -> TemporaryUpgrade:
        if self.ends_at <= self.starts_at:
            raise Refusal("ends_at must be after starts_at", "ends_at 须晚于 starts_at")
        return self


class TierBenefits(RequestBody):
    """What a tier gives (one row of the benefits matrix)."""

    earn_multiplier: Annotated[Decimal, Field(ge=1, le=100, max_digits=8, decimal_places=4)] = (
        Decimal(1)
    )
    """Multiplies the points a member earns by spending (银卡 1.2, 金卡 1.5); applied by the
    rules unless an active rule names its own factor by tier."""
    discount_pct: Annotated[int, Field(ge=1, le=100)] | None = None
    """Share of a reward's points price the tier pays (90: 9折); used when the redemption
    policy has no terms of its own for the tier."""
    daily_earn_cap: Annotated[int, Field(ge=1, le=10**9)] | None = None
    """The most points a day; used when the earning caps name no limit for the tier."""
    monthly_earn_cap: Annotated[int, Field(ge=1, le=10**9)] | None = None
    validity_months: Annotated[int, Field(ge=1, le=1200)] | None = None
    """How long the tier's new points stay valid (rolling, from when they become usable);
    used when the expiry policy names no validity of its own for the tier."""
    early_access_hours: Annotated[int, Field(ge=0, le=24 * 90)] = 0
    """How long before a reward's sales start the tier may redeem it; used when the reward
    names no early access of its own for the tier."""
    birthday_gift: Annotated[int, Field(ge=0, le=10**9)] = 0
    """Points the tier gets on ``member.birthday``; awarded when no birthday gift rule is
    live for the event (such a rule says what each tier gets)."""


Schedule = Literal["monthly", "quarterly", "half_yearly", "yearly"]


class TierScheme(RequestBody):
    """How a programme's tiers follow its members' scores (part of its settings)."""

    parts: ScoreParts
    window_months: Annotated[int, Field(ge=1, le=60)] = 12
    """The score counts what happened in the last this many months."""
    levels: Annotated[list[TierLevel], Field(min_length=1, max_length=50)]
    """Every tier of the programme, entry tier first, with its score range."""
    schedule: Schedule = "quarterly"
    """When the scheduled evaluation runs (the first day of each period, programme time)."""
    upgrade_at_once: bool = True
    """Move a member up as soon as an earning, an order or an activity takes its score over
    a threshold; otherwise only at evaluation. Downgrades happen only at evaluation."""
    temporary_upgrades: Annotated[list[TemporaryUpgrade], Field(max_length=50)] = Field(
        default_factory=list
    )
    benefits: dict[TierCode, TierBenefits] = Field(default_factory=dict)
    """The benefits matrix: what each tier gives."""

    @model_validator(mode="after")
    def _consistent(self) -> TierScheme:
        codes = [level.tier for level in self.levels]
        if len(set(codes)) != len(codes):
            raise Refusal("levels: each tier once", "levels:每个等级只能出现一次")
        if self.levels[0].min_score != 0:
            raise Refusal(
                "levels: the entry tier starts at score 0", "levels:入门等级须从 0 分开始"
            )
        for lower, upper in zip(self.levels, self.levels[1:], strict=False):
            if upper.min_score <= lower.min_score:
                raise Refusal(
                    f"levels: {upper.tier} must start above {lower.tier}'s {lower.min_score}",
                    f"levels:{upper.tier} 的起始分须高于 {lower.tier} 的 {lower.min_score}",
                )
        for level in self.levels:
            if level.retention is not None and level.retention >= level.min_score:
                raise Refusal(
                    f"levels: {level.tier}'s retention line {level.retention} must be below "
                    f"its entry score {level.min_score}",
                    f"levels:{level.tier} 的保级线 {level.retention} 须低于其起始分 "
                    f"{level.min_score}",
                )
        unknown = sorted(set(self.benefits) - set(codes))
        if unknown:
            raise Refusal(
                f"benefits: {', '.join(unknown)} not among the levels",
                f"benefits:{', '.join(unknown)} 不在 levels 中",
            )
        return self


class TierSchemeRead(BaseModel):
    scheme: TierScheme | None
    """None: the programme has no tier scheme (tiers are set by hand only)."""


class BenefitsMatrix(RequestBody):
    benefits: dict[TierCode, TierBenefits]


# --------------------------------------------------------------------------- changes

ChangeKind = Literal["evaluation", "upgrade", "temporary", "temporary_end", "manual"]


class TierChangeRead(BaseModel):
    id: int
    member_id: int
    from_tier: str | None
    to_tier: str
    returns_to: str | None = None
    """While a temporary upgrade lasts after the change: the tier the member goes back to,
    its own."""
    kind: ChangeKind
    reason: str
    score: int | None
    at: datetime
    actor: str

    @property
    def own_tier(self) -> str:
        """The tier the member holds by its own score after the change, a lent one aside."""
        return self.returns_to or self.to_tier


class ScoreRead(BaseModel):
    """A member's score and what it is made of."""

    spend_fen: int
    earned_points: int
    activity: int
    score: int
    since: datetime
    until: datetime


class MemberEvaluation(BaseModel):
    member_id: int
    score: ScoreRead
    tier: MemberTierRead
    change: TierChangeRead | None
    """The change this evaluation made, if any."""


class EvaluationReport(BaseModel):
    """What an evaluation of a chunk of members did (or, dry, would do)."""

    evaluated: int = 0
    upgraded: int = 0
    downgraded: int = 0
    temporary: int = 0
    """Temporary upgrades given."""
    unchanged: int = 0
    last_member_id: int | None = None
    """The highest member id of the chunk: pass it as ``after_member_id`` for the next."""
    changes: list[TierChangeRead] = Field(default_factory=list)
    """The changes made (empty for a dry run)."""

    def add(self, other: EvaluationReport) -> None:
        self.evaluated += other.evaluated
        self.upgraded += other.upgraded
        self.downgraded += other.downgraded
        self.temporary += other.temporary
        self.unchanged += other.unchanged
        self.last_member_id = other.last_member_id or self.last_member_id


class DryRunIn(RequestBody):
    at: Instant | None = None
    """Evaluate as of this time (default: now)."""
