"""What the rewards use cases take and answer with: the catalogue, the redemption policy,
quotes, orders and vouchers."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, Field, model_validator

from jifen.api.schemas import NO_NUL, Instant, RequestBody, text
from jifen.errors import Refusal

RewardKind = Literal[
    "physical", "virtual", "coupon", "service", "partner", "lottery", "charity", "vote", "event"
]
"""physical goods (fulfilled by staff), virtual goods, coupons, service vouchers, partner
exchanges, lottery draws, charity donations, votes, event registrations."""

VOUCHER_KINDS = frozenset({"virtual", "coupon", "service", "event"})
"""Kinds whose order is a code the member shows: a voucher (also physical goods for pickup)."""

UNDISCOUNTED_KINDS = frozenset({"partner", "lottery", "charity", "vote"})
"""Kinds whose price tier discounts and birthday factors leave alone unless a reward says so:
an exchange rate, a stake, a gift or a ballot is the same for everyone."""

RewardState = Literal["active", "paused", "retired"]
OrderState = Literal[
    "awaiting_payment",
    "held",
    "created",
    "confirmed",
    "shipped",
    "delivered",
    "cancelled",
    "returned",
]
"""awaiting_payment: its cash part is not paid yet (points frozen, stock taken); held: in
its cooling-off, waiting for the member's confirmation (points frozen); then fulfilment."""
VoucherState = Literal["issued", "used", "expired", "cancelled"]
LimitPeriod = Literal["day", "week", "month", "year", "ever"]

Code = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", examples=["mug"]),
]
TierCode = Annotated[str, Field(min_length=1, max_length=64)]
Percent = Annotated[int, Field(ge=1, le=100)]
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=NO_NUL)]
Short = Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)]
Line = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)]


class Texts(RequestBody):
    """A text in Chinese and English; either may be left empty, not both."""

    zh: str = Field("", max_length=2000, pattern=NO_NUL)
    en: str = Field("", max_length=2000, pattern=NO_NUL)

    @model_validator(mode="after")
    def _one(self) -> Self:
        if not self.zh and not self.en:
            raise Refusal(
                "give the text in Chinese (zh), English (en) or both",
                "请给出中文(zh)、英文(en)文本,或两者都给",
            )
        return self


class OptionalTexts(RequestBody):
    zh: str = Field("", max_length=4000, pattern=NO_NUL)
    en: str = Field("", max_length=4000, pattern=NO_NUL)


# --------------------------------------------------------------------------- kinds


class CouponTerms(RequestBody):
    """A discount coupon (``percent_off``) or a cash coupon (``amount_fen``) for a till."""

    percent_off: int | None = Field(None, ge=1, le=99)
    """20 means 20 % off the order (a 8折 coupon)."""
    amount_fen: int | None = Field(None, ge=1, le=10**9)
    min_spend_fen: int = Field(0, ge=0, le=10**12)
    """The order must be at least this much for the coupon to apply."""

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.percent_off is None) == (self.amount_fen is None):
            raise Refusal(
                "give exactly one of percent_off (a discount) or amount_fen (cash)",
                "percent_off(折扣)和 amount_fen(现金)须且只能给出其一",
            )
        return self


class PartnerTerms(RequestBody):
    """Points out to a partner programme: each unit of the reward gives ``units`` of the
    partner's own (1,000 points = 100 km: points 1000, units 100, unit 公里)."""

    partner: str = text(100, min_length=1)
    unit: str = text(20, min_length=1)
    units: int = Field(ge=1, le=10**9)


class Prize(RequestBody):
    code: Code
    name: Texts
    chance_ppm: int = Field(ge=0, le=1_000_000)
    """Chance of this prize per draw, in millionths (50,000 = 5 %)."""
    quantity: int | None = Field(None, ge=0, le=10**9)
    """How many of this prize there are; ``None``: no limit but the budget."""
    points: int = Field(0, ge=0, le=10**9)
    """Points credited to the winner (0 for a prize that staff hand over)."""
    value: int | None = Field(None, ge=0, le=10**9)
    """What the prize is worth, in points: for a prize that staff hand over, what it costs
    the budget; for points, what it costs beyond them if more (default: its points)."""

    @property
    def cost(self) -> int:
        """What one of the prize takes from the lottery's budget: its value, and never less
        than the points it credits, so that the budget bounds the points its prizes credit
        (a value set below them, which terms stored before this rule may have, counts for
        its points)."""
        return self.points if self.value is None else max(self.points, self.value)


class LotteryTerms(RequestBody):
    prizes: list[Prize] = Field(min_length=1, max_length=50)
    budget: int | None = Field(None, ge=0, le=10**12)
    """The most the prizes together may cost, in points; ``None``: only their quantities."""

    @model_validator(mode="after")
    def _odds(self) -> Self:
        if sum(prize.chance_ppm for prize in self.prizes) > 1_000_000:
            raise Refusal(
                "the prizes' chances add up to more than 1,000,000 ppm (100 %)",
                "各奖品的概率之和超过 1,000,000 ppm(100%)",
                at="prizes",
            )
        if len({prize.code for prize in self.prizes}) != len(self.prizes):
            raise Refusal("two prizes have the same code", "有两个奖品的 code 相同", at="prizes")
        return self


class CharityTerms(RequestBody):
    charity: str = text(200, min_length=1)
    """Who receives the donation, as printed on the receipt."""


class VoteTerms(RequestBody):
    options: list[Name] = Field(min_length=2, max_length=50)


class EventTerms(RequestBody):
    starts_at: Instant
    venue: str = Field("", max_length=200, pattern=NO_NUL)


# --------------------------------------------------------------------------- the catalogue


class RewardDef(RequestBody):
    """What a reward is: its kind, texts, price and the rules of redeeming it."""

    code: Code
    kind: RewardKind
    name: Texts
    description: OptionalTexts = OptionalTexts()
    images: list[Annotated[str, Field(min_length=1, max_length=500, pattern=r"^\S+$")]] = Field(
        default_factory=list, max_length=10
    )
    """Paths or URLs of images, shown as given."""
    category: str = Field("", max_length=64, pattern=NO_NUL)
    """For browsing and for the programme's category coefficients (数码 0.8)."""
    points: int = Field(ge=1, le=10**9)
    """The points price of one unit, before tier discounts and the other factors."""
    cash_fen: int = Field(0, ge=0, le=10**10)
    """The cash part of one unit (90 yuan + 1,000 points: cash_fen 9000, points 1000)."""
    point_value_fen: Decimal = Field(Decimal(1), ge=0, le=10_000, decimal_places=4)
    """What a point redeemed for this reward is worth in reports, in fen (1 point = 0.01 yuan)."""
    safety_stock: int = Field(0, ge=0, le=10**9)
    """At or below this many left, a restock alert is raised."""
    sales_start: Instant | None = None
    sales_end: Instant | None = None
    visible_tiers: list[TierCode] | None = None
    """Only members of these tiers see and redeem it; ``None``: everyone."""
    early_access: dict[TierCode, Annotated[int, Field(ge=1, le=720)]] = Field(default_factory=dict)
    """Hours before ``sales_start`` that members of a tier may redeem (金卡: 24)."""
    limit_per_member: int | None = Field(None, ge=1, le=10**6)
    """Units one member may redeem in ``limit_period``."""
    limit_period: LimitPeriod = "ever"
    max_quantity: int = Field(1, ge=1, le=1000)
    """Units in one redemption."""
    validity_days: int | None = Field(None, ge=1, le=3650)
    """Days a voucher stays valid; default: the programme's days for the kind."""
    pickup: bool = False
    """Physical goods collected at a store with a voucher instead of shipped."""
    discounts: bool | None = None
    """Whether tier discounts and the birthday factor apply; default by kind."""
    coupon: CouponTerms | None = None
    partner: PartnerTerms | None = None
    lottery: LotteryTerms | None = None
    charity: CharityTerms | None = None
    vote: VoteTerms | None = None
    event: EventTerms | None = None

    @model_validator(mode="after")
    def _kind_terms(self) -> Self:
        sections = ("coupon", "partner", "lottery", "charity", "vote", "event")
        for section in sections:
            given = getattr(self, section) is not None
            if section == self.kind and not given:
                raise Refusal(
                    f"a {self.kind} reward needs its {section} terms",
                    f"{self.kind} 类礼品须给出 {section} 条款",
                    at=section,
                )
            if section != self.kind and given:
                raise Refusal(
                    f"{section} terms belong to {section} rewards, not {self.kind}",
                    f"{section} 条款只适用于 {section} 类礼品,不适用于 {self.kind}",
                    at=section,
                )
        if self.sales_start and self.sales_end and self.sales_end <= self.sales_start:
            raise Refusal(
                "sales_end must be after sales_start",
                "sales_end 须晚于 sales_start",
                at="sales_end",
            )
        if self.kind == "lottery" and self.max_quantity != 1:
            raise Refusal(
                "a lottery draws once a redemption: max_quantity must be 1",
                "抽奖每次兑换只抽一次:max_quantity 须为 1",
                at="max_quantity",
            )
        if self.pickup and self.kind != "physical":
            raise Refusal("pickup is for physical goods", "自提只适用于实物礼品", at="pickup")
        if self.early_access and self.sales_start is None:
            raise Refusal(
                "early access counts back from sales_start; give sales_start",
                "提前兑换从 sales_start 往前计算,请给出 sales_start",
                at="sales_start",
            )
        return self

    written: ClassVar[bool] = True
    """Whether these terms are being written (created, edited), not read back as stored."""

    @model_validator(mode="after")
    def _terms_to_write(self) -> Self:
        """Rules a reward's terms meet when it is created or edited, added after rewards were
        first stored: terms stored before them are read back as they are (:class:`StoredTerms`)
        and meet them at their next edit; redemption checks on its own what it must."""
        if not self.written:
            return self
        if self.kind in VOUCHER_KINDS and self.max_quantity != 1:
            raise Refusal(
                f"each {self.kind} voucher is used once: max_quantity must be 1 (a member "
                "redeems one voucher per unit)",
                f"每张 {self.kind} 券只能使用一次:max_quantity 须为 1(每件单独兑换一张券)",
                at="max_quantity",
            )
        if self.visible_tiers == []:
            raise Refusal(
                "visible_tiers names no tier, so no member could redeem it: name at least one "
                "tier, or leave it out for everyone (pause the reward to hide it)",
                "visible_tiers 未列出任何等级,将无会员可兑换:请至少列出一个等级,"
                "或不填以对所有会员开放(如需隐藏请暂停该礼品)",
                at="visible_tiers",
            )
        if self.limit_period != "ever" and self.limit_per_member is None:
            raise Refusal(
                f"limit_period {self.limit_period!r} is the period of limit_per_member: give "
                "limit_per_member (units a member may redeem in it), or leave both out",
                f"limit_period {self.limit_period!r} 是 limit_per_member 的计算周期:"
                "请给出 limit_per_member(每位会员在该周期内可兑换的件数),或两者都不填",
                at="limit_per_member",
            )
        if self.validity_days is not None and not self.has_voucher:
            raise Refusal(
                f"validity_days is how long a voucher stays valid, and a {self.kind} reward "
                f"{'shipped ' if self.kind == 'physical' else ''}issues none: leave it out"
                f"{' (or collect it at a store: pickup)' if self.kind == 'physical' else ''}",
                f"validity_days 是券的有效天数,而 {self.kind} 类礼品"
                f"{'(快递发货)' if self.kind == 'physical' else ''}不发券:请不要填写"
                f"{'(或改为门店自提:pickup)' if self.kind == 'physical' else ''}",
                at="validity_days",
            )
        if self.lottery is not None and self.lottery.budget is not None:
            free = [i for i, prize in enumerate(self.lottery.prizes) if prize.cost == 0]
            if free:  # it would be given out without end, whatever the budget
                code = self.lottery.prizes[free[0]].code
                raise Refusal(
                    f"prize {code!r} would cost the lottery's budget nothing: give a prize "
                    "that staff hand over (points 0) its value, in points, to count against "
                    "the budget",
                    f"奖品 {code!r} 不占用抽奖预算:由员工发放的奖品(points 为 0)"
                    "须给出其价值 value(以积分计),计入预算",
                    at=f"lottery.prizes.{free[0]}.value",
                )
        return self

    @property
    def discountable(self) -> bool:
        return self.kind not in UNDISCOUNTED_KINDS if self.discounts is None else self.discounts

    @property
    def has_voucher(self) -> bool:
        return self.kind in VOUCHER_KINDS or self.pickup


class StoredTerms(RewardDef):
    """A reward's terms as stored: read back without the rules added since they were
    written (the next edit must meet them)."""

    written: ClassVar[bool] = False


class RewardCreate(RewardDef):
    stock: int | None = Field(None, ge=0, le=10**9)
    """Units in stock; ``None``: unlimited."""


class RewardStateSet(RequestBody):
    state: RewardState


class Restock(RequestBody):
    add: int = Field(ge=1, le=10**9)
    """Units added to the stock."""


class RewardRead(StoredTerms):
    id: int
    state: RewardState
    stock_left: int | None
    """Units left; ``None``: unlimited."""
    stock_total: int | None
    """Units ever stocked."""
    sold: int
    """Units redeemed and not given back (limited stock only)."""
    band: str
    """The price band of its points price (``500-1000``)."""
    created_at: datetime
    updated_at: datetime


class StockAlert(BaseModel):
    id: int
    reward: str
    stock_left: int
    safety_stock: int
    raised_at: datetime


# --------------------------------------------------------------------------- the policy


class TierTerms(RequestBody):
    """How members of one tier redeem."""

    discount_pct: Percent = 100
    """Share of the points price the tier pays: 90 for 9折."""
    max_points: int | None = Field(None, ge=1, le=10**12)
    """The most points one redemption may cost (普通 2,000)."""
    per_month: int | None = Field(None, ge=0, le=10**6)
    """Redemptions a calendar month (普通 3); ``None``: no limit."""
    cooling_off_above: int | None = Field(None, ge=1, le=10**12)
    """A redemption above this many points waits ``cooling_off_hours`` for the member's
    confirmation (钻石: 5,000 points, 24 hours)."""
    cooling_off_hours: int = Field(24, ge=1, le=720)


class DynamicPricing(RequestBody):
    """When this share of a reward's stock has been redeemed, its price rises by a share."""

    threshold_pct: Percent = 80
    rise_pct: int = Field(20, ge=1, le=1000)


def _default_validity() -> dict[str, int]:
    return {"physical": 30, "virtual": 90, "coupon": 90, "service": 90, "event": 90}


class RedemptionPolicy(RequestBody):
    """A programme's rules of redemption (part of its settings, so changed by approval)."""

    tiers: dict[TierCode, TierTerms] = Field(default_factory=dict)
    """Terms by tier; a member of a tier not named here (or of none) gets ``default``."""
    default: TierTerms = TierTerms()
    birthday_pct: int = Field(100, ge=100, le=1000)
    """In the member's birthday month a point is worth this share (120: 1.2倍)."""
    category_pct: dict[Annotated[str, Field(max_length=64)], Percent] = Field(default_factory=dict)
    """What a point is worth in a category (数码 80: 100 points buy 0.8 yuan of it)."""
    dynamic: DynamicPricing | None = None
    validity_days: dict[str, Annotated[int, Field(ge=1, le=3650)]] = Field(
        default_factory=_default_validity
    )
    """Days a voucher stays valid, by reward kind (goods 30, services 90)."""
    voucher_fee_pct: int = Field(10, ge=0, le=100)
    """Share of the points kept when a voucher expires unused; the rest goes back."""
    hold_days: int = Field(7, ge=1, le=365)
    """Days after its cooling-off that a held redemption waits before it is cancelled."""
    payment_minutes: int = Field(30, ge=1, le=1440)
    """Minutes a redemption made before its cash part is paid waits for the payment (from
    the member's app, say) before it is cancelled: its points are released, its stock
    returns."""
    price_bands: list[int] = Field(default_factory=lambda: [100, 500, 1000, 2000, 5000])

    def for_tier(self, tier: str | None) -> TierTerms:
        return self.tiers.get(tier, self.default) if tier is not None else self.default


# --------------------------------------------------------------------------- quotes


class PriceStep(BaseModel):
    """One step of how a price was reached."""

    what: str
    what_zh: str
    factor: str
    """The factor applied, as an exact fraction or decimal ("0.9", "1/1.2")."""
    points: str
    """The unrounded points price after this step."""


class Quote(BaseModel):
    reward: str
    quantity: int
    points: int
    """What the member pays in points (rounded up to a whole point)."""
    cash_fen: int
    value_fen: int
    """What the points are worth, for reports."""
    steps: list[PriceStep]


class QuoteRequest(RequestBody):
    member_id: int = Field(ge=1, le=2**63 - 1)
    quantity: int = Field(1, ge=1, le=1000)


# --------------------------------------------------------------------------- redemption


class RedemptionCreate(RequestBody):
    reward: Code
    quantity: int = Field(1, ge=1, le=1000)
    payment_ref: Line | None = None
    """The payment of the cash part, as the caller's payment system names it."""
    amount_fen: int | None = Field(None, ge=0, le=10**12)
    """What the payment ``payment_ref`` took, in fen: refused unless it is the cash part
    due (a cash price changed since the till showed it is not recorded as paid)."""
    choice: Name | None = None
    """The option voted for (votes)."""
    partner_account: Name | None = None
    """The member's account at the partner (partner exchanges)."""
    expected_points: int | None = Field(None, ge=0, le=10**12)
    """Refuse if the price is no longer this (a price shown and then changed)."""
    store: Short | None = None
    merchant: Short | None = None

    @model_validator(mode="after")
    def _amount_of_a_payment(self) -> Self:
        if self.amount_fen is not None and self.payment_ref is None:
            raise Refusal(
                "amount_fen is what the payment named by payment_ref took: give payment_ref",
                "amount_fen 为 payment_ref 所指支付的金额:请同时给出 payment_ref",
                at="payment_ref",
            )
        return self


class OrderStep(BaseModel):
    state: str
    at: datetime
    by: str
    note: str = ""


def mask_code(code: str) -> str:
    """A voucher code as shown to anyone but its member: all but its last 4 characters
    hidden, its length kept (``********H359``), enough to tell two apart at a counter."""
    return "*" * max(len(code) - 4, 0) + code[-4:]


class VoucherRead(BaseModel):
    code: str
    state: VoucherState
    order_id: int
    member_id: int
    reward: str
    valid_until: datetime
    used_at: datetime | None = None
    used_store: str | None = None
    refund_posting_id: int | None = None
    """The posting that returned the points (less the fee) when it expired unused."""
    coupon: CouponTerms | None = None

    def masked(self) -> Self:
        """The voucher with its code masked (for anyone but its member)."""
        return self.model_copy(update={"code": mask_code(self.code)})


class OrderRead(BaseModel):
    id: int
    member_id: int
    reward: str
    kind: RewardKind
    quantity: int
    state: OrderState
    points: int
    cash_fen: int
    value_fen: int
    payment_ref: str | None = None
    hold_until: datetime | None = None
    """Cooling-off: the member may confirm from this time on."""
    pay_by: datetime | None = None
    """Made before its cash part (``cash_fen``) was paid: the payment is due by then, or
    the order lapses (cancelled, points released)."""
    spend_posting_id: int | None = None
    hold_posting_id: int | None = None
    refund_posting_id: int | None = None
    price: list[PriceStep]
    outcome: dict[str, Any] = Field(default_factory=dict)
    """What the redemption gave: a lottery prize, partner units, a receipt, a vote."""
    voucher: VoucherRead | None = None
    steps: list[OrderStep] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    replayed: bool = False

    def masked(self) -> Self:
        """The order with its voucher's code masked, also where the outcome names it (for
        anyone but its member)."""
        if self.voucher is None:
            return self
        outcome = dict(self.outcome)
        if isinstance(outcome.get("voucher"), str):
            outcome["voucher"] = mask_code(outcome["voucher"])
        return self.model_copy(update={"voucher": self.voucher.masked(), "outcome": outcome})


class OrderPayment(RequestBody):
    """The payment system's word that the cash part of an order awaiting payment is paid."""

    payment_ref: Line
    """The payment, as the payment system names it (one payment pays for one order)."""
    amount_fen: int = Field(ge=0, le=10**12)
    """What was paid: the order's ``cash_fen``, exactly."""


class OrderAction(RequestBody):
    note: str = Field("", max_length=500, pattern=NO_NUL)
    tracking: Name | None = None


class VoucherUse(RequestBody):
    store: Short | None = None
    order_amount_fen: int | None = Field(None, ge=0, le=10**12)
    """The till's order, to check a coupon's minimum spend and compute its discount."""


class VoucherUsed(BaseModel):
    voucher: VoucherRead
    discount_fen: int | None = None
    """What a coupon takes off the till's order."""


class Available(BaseModel):
    reward: RewardRead
    quote: Quote
    short: int
    """Points still needed (0: redeemable now)."""


class WhatCanIGet(BaseModel):
    """Given the member's balance: what is redeemable now (the dearest first) and what is
    within reach (the nearest first)."""

    available: int
    now: list[Available]
    within_reach: list[Available]


class ExpiryReport(BaseModel):
    dry_run: bool
    vouchers: int
    points_returned: int
    fees: int
    codes: list[str] = Field(default_factory=list)
    found: int = 0
    """Vouchers due the search found, up to its limit, before their members' locks: those
    used or cancelled meanwhile are not expired. A run is over when the search finds fewer
    than its limit, not when fewer are expired."""


class HoldsReport(BaseModel):
    dry_run: bool
    cancelled: int
    order_ids: list[int] = Field(default_factory=list)
    found: int = 0
    """Lapsed orders the search found, up to its limit, before their members' locks: those
    that moved on meanwhile (paid, confirmed) are not cancelled. A sweep is over when the
    search finds fewer than its limit, not when fewer are cancelled."""
