"""The pure rules of redemption: what a member pays, whether it may redeem now, the lottery
draw, what an expired voucher gives back, and the order of "what can I get".

Plain Python: the reward's terms, the member's facts and the time come in, decisions come
out. Prices are exact fractions until the last step, which rounds up to a whole point (a
member never pays a fraction of a point, and a discount never gives one away).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

from jifen.errors import LimitReached, NotOnSale, TierNotAllowed
from jifen.rewards.schemas import (
    VOUCHER_KINDS,
    CouponTerms,
    LimitPeriod,
    LotteryTerms,
    PriceStep,
    Prize,
    Quote,
    RedemptionPolicy,
    RewardDef,
    TierTerms,
)

PPM = 1_000_000


@dataclass(frozen=True, slots=True)
class Buyer:
    """What pricing and the limits read about the member."""

    tier: str | None
    birthday_month: bool = False


def _show(value: Fraction) -> str:
    """An exact fraction as a short text: ``900``, ``833.3333``, ``1/1.2`` stays a fraction."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.4f}".rstrip("0").rstrip(".")


def quote(
    reward: RewardDef,
    *,
    quantity: int,
    buyer: Buyer,
    policy: RedemptionPolicy,
    sold: int = 0,
    stock_total: int | None = None,
) -> Quote:
    """The price of ``quantity`` units of ``reward`` for ``buyer``, and how it was reached.

    In order: the base price; the category coefficient (a point worth 0.8 in 数码 makes the
    price 1/0.8 as many points); the birthday factor (a point worth 1.2 in the birthday month);
    the tier discount (银卡 9折); the dynamic rise (when 80 % of the stock has gone, +20 %).
    Coefficients and the birthday factor change what a point is worth, so they divide; the
    discount and the rise change the price, so they multiply. Cash is never discounted.
    """
    price = Fraction(reward.points * quantity)
    steps = [
        PriceStep(
            what=f"{quantity} × {reward.points} points",
            what_zh=f"{quantity} × {reward.points} 积分",
            factor="1",
            points=_show(price),
        )
    ]

    def step(what: str, what_zh: str, factor: Fraction, shown: str) -> None:
        nonlocal price
        price *= factor
        steps.append(PriceStep(what=what, what_zh=what_zh, factor=shown, points=_show(price)))

    coefficient = policy.category_pct.get(reward.category) if reward.category else None
    if coefficient is not None and coefficient != 100:
        step(
            f"category {reward.category}: a point is worth {coefficient} %",
            f"品类 {reward.category}:每积分价值按 {coefficient}% 计",
            Fraction(100, coefficient),
            f"1/{_show(Fraction(coefficient, 100))}",
        )
    if reward.discountable and buyer.birthday_month and policy.birthday_pct != 100:
        step(
            f"birthday month: a point is worth {policy.birthday_pct} %",
            f"生日月:每积分价值按 {policy.birthday_pct}% 计",
            Fraction(100, policy.birthday_pct),
            f"1/{_show(Fraction(policy.birthday_pct, 100))}",
        )
    terms = policy.for_tier(buyer.tier)
    if reward.discountable and terms.discount_pct != 100:
        if not policy.tiers:  # one discount for all, whatever their tier
            who, who_zh = "every member", "所有会员"
        elif buyer.tier is not None:
            who, who_zh = f"tier {buyer.tier}", buyer.tier
        else:
            who, who_zh = "no tier", "无等级会员"
        step(
            f"{who}: pays {terms.discount_pct} %",
            f"{who_zh}:按 {terms.discount_pct}% 计价",
            Fraction(terms.discount_pct, 100),
            _show(Fraction(terms.discount_pct, 100)),
        )
    if (
        policy.dynamic is not None
        and stock_total
        and sold * 100 >= policy.dynamic.threshold_pct * stock_total
    ):
        rate = Fraction(100 + policy.dynamic.rise_pct, 100)
        step(
            f"{sold} of {stock_total} redeemed (≥ {policy.dynamic.threshold_pct} %): "
            f"+{policy.dynamic.rise_pct} %",
            f"已兑换 {sold}/{stock_total}(≥{policy.dynamic.threshold_pct}%):"
            f"上调 {policy.dynamic.rise_pct}%",
            rate,
            _show(rate),
        )
    points = math.ceil(price)
    return Quote(
        reward=reward.code,
        quantity=quantity,
        points=points,
        cash_fen=reward.cash_fen * quantity,
        value_fen=round(reward.point_value_fen * points),
        steps=steps,
    )


# --------------------------------------------------------------------------- may it redeem now


def opens_for(reward: RewardDef, tier: str | None) -> datetime | None:
    """When ``reward`` opens to a member of ``tier``: earlier by the tier's early access."""
    if reward.sales_start is None:
        return None
    hours = reward.early_access.get(tier, 0) if tier is not None else 0
    return reward.sales_start - timedelta(hours=hours)


def visible_to(reward: RewardDef, tier: str | None) -> bool:
    return reward.visible_tiers is None or (tier is not None and tier in reward.visible_tiers)


def check_visible(reward: RewardDef, tier: str | None) -> None:
    """Refuse a reward its ``visible_tiers`` hide from a member of ``tier``."""
    if not visible_to(reward, tier):
        raise TierNotAllowed(
            reward=reward.code, tiers=", ".join(reward.visible_tiers or []), tier=tier or "-"
        )


def local_text(moment: datetime, zone: str) -> str:
    """``moment`` as a refusal or a message shows it: ISO 8601 in the programme's time zone
    ``zone``, with its offset (``2026-03-01T10:00:00+08:00``)."""
    return moment.astimezone(ZoneInfo(zone)).isoformat()


def check_on_sale(
    reward: RewardDef, *, state: str, tier: str | None, now: datetime, zone: str
) -> None:
    """Refuse a redemption the reward's state, tiers or sales window do not allow now (the
    times refused named in the programme's time zone ``zone``)."""
    if state != "active":
        raise NotOnSale(
            reward=reward.code,
            problem=f"it is {state}.",
            problem_zh="已暂停兑换。" if state == "paused" else "已下架。",
        )
    check_visible(reward, tier)
    opens = opens_for(reward, tier)
    if opens is not None and now < opens:
        # Only the tiers that open before this member's (the earliest first): one that
        # opens later is no hint.
        own = reward.early_access.get(tier, 0) if tier is not None else 0
        ahead = sorted(reward.early_access.items(), key=lambda item: -item[1])
        early = [t for t, h in ahead if t != tier and h > own]
        hint = f" Members of {', '.join(early)} may redeem earlier." if early else ""
        hint_zh = f"{'、'.join(early)}会员可更早兑换。" if early else ""
        raise NotOnSale(
            reward=reward.code,
            problem=f"it opens at {local_text(opens, zone)} for this member.{hint}",
            problem_zh=f"该会员可兑换时间为 {local_text(opens, zone)} 起。{hint_zh}",
        )
    if reward.sales_end is not None and now >= reward.sales_end:
        raise NotOnSale(
            reward=reward.code,
            problem=f"its sales ended at {local_text(reward.sales_end, zone)}.",
            problem_zh=f"兑换已于 {local_text(reward.sales_end, zone)} 结束。",
        )


def period_start(period: LimitPeriod, now: datetime, zone: str) -> datetime | None:
    """The start of the calendar ``period`` containing ``now`` in ``zone`` (``None``: ever).
    Weeks start on Monday."""
    if period == "ever":
        return None
    local = now.astimezone(ZoneInfo(zone))
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def check_quantity(reward: RewardDef, quantity: int) -> None:
    """Refuse more units than one redemption of ``reward`` takes (a quote is refused so too:
    it would price what cannot be redeemed)."""
    if reward.kind in VOUCHER_KINDS and quantity > 1:  # also if stored with more allowed
        raise LimitReached(
            problem=f"Each voucher of {reward.code!r} is used once: redeem one at a time "
            f"(one voucher a unit); {quantity} asked for.",
            problem_zh=f"礼品 {reward.code!r} 的每张券只能使用一次:请每次兑换 1 件"
            f"(每件一张券),本次为 {quantity} 件。",
        )
    if quantity > reward.max_quantity:
        raise LimitReached(
            problem=f"At most {reward.max_quantity} of {reward.code!r} in one redemption; "
            f"{quantity} asked for.",
            problem_zh=f"礼品 {reward.code!r} 每次最多兑换 {reward.max_quantity} 件,"
            f"本次为 {quantity} 件。",
        )


def check_limits(
    reward: RewardDef,
    *,
    quantity: int,
    points: int,
    terms: TierTerms,
    tier: str | None,
    redeemed_of_reward: int,
    redemptions_this_month: int,
    everyone: bool = False,
) -> None:
    """Refuse a redemption beyond the reward's per-member limit or the tier's limits
    (``everyone``: the programme's terms are the same for every tier, and say so)."""
    check_quantity(reward, quantity)
    if reward.limit_per_member is not None:
        room = reward.limit_per_member - redeemed_of_reward
        if quantity > room:
            period = {"ever": "in all", "day": "a day", "week": "a week", "month": "a month",
                      "year": "a year"}[reward.limit_period]  # fmt: skip
            period_zh = {"ever": "累计", "day": "每天", "week": "每周", "month": "每月",
                         "year": "每年"}[reward.limit_period]  # fmt: skip
            raise LimitReached(
                problem=f"A member may redeem {reward.limit_per_member} of {reward.code!r} "
                f"{period}; this member has {max(room, 0)} left.",
                problem_zh=f"礼品 {reward.code!r} 每位会员{period_zh}限兑 "
                f"{reward.limit_per_member} 件,该会员还可兑换 {max(room, 0)} 件。",
            )
    # Whose terms these are: a tier's (or those of members of none), or everyone's.
    of_who = "" if everyone else f" of {tier or 'no tier'}"
    member_zh = "" if everyone else f"{tier or '无等级'}会员"
    if terms.max_points is not None and points > terms.max_points:
        cost = f"One redemption may cost a member{of_who}" if of_who else "One redemption may cost"
        raise LimitReached(
            problem=f"{cost} at most {terms.max_points} points; this one costs {points}. "
            "Redeem fewer units.",
            problem_zh=f"{member_zh}单次兑换最多 {terms.max_points} 积分,本次需 {points} 积分。",
        )
    if terms.per_month == 0:  # none at all: next month will not change it
        raise LimitReached(
            problem=f"A member{of_who} may not redeem rewards.",
            problem_zh=f"{member_zh or '会员'}不可兑换礼品。",
        )
    if terms.per_month is not None and redemptions_this_month >= terms.per_month:
        raise LimitReached(
            problem=f"A member{of_who} may redeem {terms.per_month} times a month; this "
            "member has reached it. Try again next month.",
            problem_zh=f"{member_zh or '会员'}每月可兑换 {terms.per_month} 次,本月次数已用完。",
        )


def cooling_off(points: int, terms: TierTerms) -> timedelta | None:
    """How long a redemption of ``points`` waits for the member's confirmation, if at all."""
    if terms.cooling_off_above is not None and points > terms.cooling_off_above:
        return timedelta(hours=terms.cooling_off_hours)
    return None


# --------------------------------------------------------------------------- lottery


def roll(seed: str) -> int:
    """A draw in [0, 1,000,000) from ``seed``: the same seed always draws the same number,
    so a recorded draw can be replayed and audited."""
    digest = hashlib.sha256(seed.encode()).digest()
    return int.from_bytes(digest[:8], "big") % PPM


def prize_for(terms: LotteryTerms, drawn: int) -> Prize | None:
    """The prize whose slice of [0, 1,000,000) holds ``drawn``; ``None``: no prize."""
    edge = 0
    for prize in terms.prizes:
        edge += prize.chance_ppm
        if drawn < edge:
            return prize
    return None


def affordable(prize: Prize, *, left: int | None, budget_left: int | None) -> bool:
    """Whether one more of ``prize`` fits its quantity and the lottery's budget."""
    return (left is None or left >= 1) and (budget_left is None or budget_left >= prize.cost)


def can_pay_a_prize(
    terms: LotteryTerms, left: dict[str, int | None], budget_left: int | None
) -> bool:
    """Whether a draw can still win anything: a prize with a chance that its quantity left
    and the budget left still cover (``left`` by prize code; ``None``: no limit)."""
    return any(
        prize.chance_ppm > 0
        and affordable(prize, left=left.get(prize.code), budget_left=budget_left)
        for prize in terms.prizes
    )


# --------------------------------------------------------------------------- vouchers


def expiry_refund(points: int, fee_pct: int) -> tuple[int, int]:
    """What an unused voucher of ``points`` gives back when it expires, and the fee kept.
    The fee is rounded down: the member never loses more than the stated share."""
    fee = points * fee_pct // 100
    return points - fee, fee


def coupon_discount(coupon: CouponTerms, order_amount_fen: int) -> int | None:
    """What ``coupon`` takes off an order of ``order_amount_fen``; ``None`` below its minimum."""
    if order_amount_fen < coupon.min_spend_fen:
        return None
    if coupon.amount_fen is not None:
        return min(coupon.amount_fen, order_amount_fen)
    assert coupon.percent_off is not None
    return order_amount_fen * coupon.percent_off // 100


def band(points: int, bands: list[int]) -> str:
    """The price band of ``points``: ``500-1000``, or ``5000+`` above the last edge."""
    edges = sorted(bands)
    if not edges or points < edges[0]:
        return f"0-{edges[0]}" if edges else "all"
    for low, high in itertools.pairwise(edges):
        if points < high:
            return f"{low}-{high}"
    return f"{edges[-1]}+"
