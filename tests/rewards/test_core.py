"""The pure rules of redemption, with the documents' numbers: pricing, limits, the window,
the lottery draw, an expired voucher's fee and coupons."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jifen.errors import LimitReached, NotOnSale, TierNotAllowed
from jifen.rewards import core
from jifen.rewards.schemas import (
    CouponTerms,
    DynamicPricing,
    LotteryTerms,
    RedemptionPolicy,
    RewardDef,
    TierTerms,
)

NOW = datetime(2026, 6, 1, 4, 0, tzinfo=UTC)

# The documents' redemption terms: 银卡9折 金卡8折 钻石7折; per redemption 2000/5000/10000;
# 3 / 5 / unlimited a month; 钻石 above 5,000 points waits 24 hours; birthday month 1.2倍;
# 高溢价品类 0.8; when 80 % has been redeemed the price rises 20 %.
POLICY = RedemptionPolicy(
    default=TierTerms(max_points=2000, per_month=3),
    tiers={
        "普通": TierTerms(max_points=2000, per_month=3),
        "银卡": TierTerms(discount_pct=90, max_points=5000, per_month=5),
        "金卡": TierTerms(discount_pct=80, max_points=10000),
        "钻石": TierTerms(discount_pct=70, cooling_off_above=5000, cooling_off_hours=24),
    },
    birthday_pct=120,
    category_pct={"数码": 80},
    dynamic=DynamicPricing(threshold_pct=80, rise_pct=20),
)


def reward(**overrides: Any) -> RewardDef:
    fields: dict[str, Any] = {"code": "mug", "kind": "physical", "name": {"zh": "马克杯"},
                              "points": 1000}  # fmt: skip
    fields.update(overrides)
    return RewardDef.model_validate(fields)


def price(tier: str | None, *, birthday: bool = False, sold: int = 0, total: int | None = None,
          quantity: int = 1, **overrides: Any) -> core.Quote:  # fmt: skip
    return core.quote(
        reward(**overrides), quantity=quantity, buyer=core.Buyer(tier, birthday), policy=POLICY,
        sold=sold, stock_total=total,
    )  # fmt: skip


@pytest.mark.parametrize(("tier", "points"), [("普通", 1000), ("银卡", 900), ("金卡", 800),
                                              ("钻石", 700), (None, 1000)])  # fmt: skip
def test_tier_discounts_9_8_7(tier: str | None, points: int) -> None:
    assert price(tier).points == points


def test_points_plus_cash_90_yuan_and_1000_points_discounts_only_the_points() -> None:
    quoted = price("金卡", cash_fen=9000, quantity=2)
    assert (quoted.points, quoted.cash_fen) == (1600, 18000)


def test_birthday_month_makes_a_point_worth_1_2_and_rounds_up() -> None:
    quoted = price("普通", birthday=True)
    assert quoted.points == 834  # 1000 / 1.2 = 833.33…, never less than the price
    assert [s.factor for s in quoted.steps] == ["1", "1/1.2"]
    assert quoted.steps[-1].points == "833.3333"
    # and with the tier discount: 1000 / 1.2 × 0.7 = 583.33… → 584
    assert price("钻石", birthday=True).points == 584


def test_a_member_of_no_tier_is_told_the_programmes_own_discount_as_such() -> None:
    policy = POLICY.model_copy(update={"default": TierTerms(discount_pct=95)})
    quoted = core.quote(reward(points=999), quantity=1, buyer=core.Buyer(None), policy=policy)
    assert quoted.points == 950  # 999 × 0.95 = 949.05
    last = quoted.steps[-1]
    assert (last.factor, last.points) == ("0.95", "949.05")
    assert last.what == "no tier: pays 95 %" and last.what_zh == "无等级会员:按 95% 计价"
    assert "None" not in last.what + last.what_zh


def test_category_coefficient_0_8_makes_premium_goods_dearer_in_points() -> None:
    assert price("普通", category="数码").points == 1250  # 100 points buy 0.8 yuan there
    assert price("普通", category="日用").points == 1000


def test_dynamic_price_rises_20_percent_once_80_percent_of_the_stock_is_gone() -> None:
    assert price("普通", sold=79, total=100).points == 1000
    rose = price("普通", sold=80, total=100)
    assert rose.points == 1200
    assert "80 of 100" in rose.steps[-1].what
    assert price("普通", sold=80, total=None).points == 1000  # unlimited stock never rises


def test_partner_exchange_and_donations_are_not_discounted_by_tier() -> None:
    partner = {"kind": "partner", "partner": {"partner": "航空", "unit": "公里", "units": 100}}
    assert price("钻石", **partner).points == 1000
    assert price("钻石", **partner, discounts=True).points == 700


def test_value_anchor_one_point_is_one_fen_unless_the_reward_says() -> None:
    assert price("银卡").value_fen == 900
    assert price("银卡", point_value_fen="0.8").value_fen == 720


@given(
    base=st.integers(1, 10**6), quantity=st.integers(1, 50),
    tier=st.sampled_from(["普通", "银卡", "金卡", "钻石", None]), birthday=st.booleans(),
    sold=st.integers(0, 100),
)  # fmt: skip
def test_a_price_is_never_fractional_nor_below_the_exact_product(
    base: int, quantity: int, tier: str | None, birthday: bool, sold: int
) -> None:
    quoted = price(tier, birthday=birthday, sold=sold, total=100, quantity=quantity,
                   points=base)  # fmt: skip
    exact = base * quantity * POLICY.for_tier(tier).discount_pct / 100
    if birthday:
        exact /= 1.2
    if sold >= 80:
        exact *= 1.2
    assert quoted.points >= exact - 1e-6 * exact
    assert quoted.points < exact + 1 + 1e-6 * exact
    # a better tier never pays more
    assert quoted.points <= price(None, birthday=birthday, sold=sold, total=100,
                                  quantity=quantity, points=base).points  # fmt: skip


# --------------------------------------------------------------------------- limits


def test_limits_per_redemption_and_per_month_by_tier() -> None:
    terms = POLICY.for_tier("普通")
    core.check_limits(reward(), quantity=1, points=2000, terms=terms, tier="普通",
                      redeemed_of_reward=0, redemptions_this_month=2)  # fmt: skip
    with pytest.raises(LimitReached, match="at most 2000 points"):
        core.check_limits(reward(), quantity=1, points=2001, terms=terms, tier="普通",
                          redeemed_of_reward=0, redemptions_this_month=0)  # fmt: skip
    with pytest.raises(LimitReached, match="3 times a month") as refused:
        core.check_limits(reward(), quantity=1, points=10, terms=terms, tier="普通",
                          redeemed_of_reward=0, redemptions_this_month=3)  # fmt: skip
    assert "每月可兑换 3 次" in refused.value.message("zh")
    gold = POLICY.for_tier("金卡")  # unlimited a month
    core.check_limits(reward(), quantity=1, points=10000, terms=gold, tier="金卡",
                      redeemed_of_reward=0, redemptions_this_month=999)  # fmt: skip


def test_per_member_limit_counts_units() -> None:
    limited = reward(limit_per_member=2, limit_period="month", max_quantity=5)
    terms = POLICY.for_tier("金卡")
    core.check_limits(limited, quantity=1, points=1, terms=terms, tier="金卡",
                      redeemed_of_reward=1, redemptions_this_month=0)  # fmt: skip
    with pytest.raises(LimitReached, match="has 1 left"):
        core.check_limits(limited, quantity=2, points=1, terms=terms, tier="金卡",
                          redeemed_of_reward=1, redemptions_this_month=0)  # fmt: skip


def test_a_tier_with_no_redemptions_a_month_is_not_told_to_try_next_month() -> None:
    with pytest.raises(LimitReached) as none:
        core.check_limits(reward(), quantity=1, points=10, terms=TierTerms(per_month=0),
                          tier="体验", redeemed_of_reward=0, redemptions_this_month=0)  # fmt: skip
    assert "next month" not in none.value.message("en")
    assert none.value.message("en") == "A member of 体验 may not redeem rewards."
    assert none.value.message("zh") == "体验会员不可兑换礼品。"


def test_early_access_24_hours_for_higher_tiers_and_the_window() -> None:
    start = NOW + timedelta(hours=10)
    limited = reward(sales_start=start, sales_end=start + timedelta(days=7),
                     early_access={"金卡": 24, "钻石": 24})  # fmt: skip
    core.check_on_sale(limited, state="active", tier="金卡", now=NOW, zone="UTC")
    with pytest.raises(NotOnSale, match="may redeem earlier"):
        core.check_on_sale(limited, state="active", tier="普通", now=NOW, zone="UTC")
    core.check_on_sale(limited, state="active", tier="普通", now=start, zone="UTC")
    with pytest.raises(NotOnSale, match="ended"):
        core.check_on_sale(
            limited, state="active", tier="金卡", now=start + timedelta(days=7), zone="UTC"
        )
    with pytest.raises(NotOnSale, match="paused"):
        core.check_on_sale(limited, state="paused", tier="金卡", now=start, zone="UTC")
    with pytest.raises(TierNotAllowed):
        core.check_on_sale(
            reward(visible_tiers=["钻石"]), state="active", tier="金卡", now=NOW, zone="UTC"
        )


def test_a_member_told_to_wait_hears_only_of_tiers_that_open_before_it() -> None:
    start = NOW + timedelta(hours=48)
    staged = reward(sales_start=start, early_access={"钻石": 36, "金卡": 24, "银卡": 12})
    with pytest.raises(NotOnSale) as gold:
        core.check_on_sale(staged, state="active", tier="金卡", now=NOW, zone="UTC")
    assert "Members of 钻石 may redeem earlier." in gold.value.message("en")
    assert "钻石会员可更早兑换" in gold.value.message("zh")
    assert "银卡" not in gold.value.message("en") + gold.value.message("zh")  # opens later
    with pytest.raises(NotOnSale) as silver:
        core.check_on_sale(staged, state="active", tier="银卡", now=NOW, zone="UTC")
    assert "Members of 钻石, 金卡 may redeem earlier." in silver.value.message("en")
    assert "钻石、金卡会员可更早兑换" in silver.value.message("zh")
    with pytest.raises(NotOnSale) as first:
        core.check_on_sale(staged, state="active", tier="钻石", now=NOW, zone="UTC")
    assert "earlier" not in first.value.message("en")
    assert "更早" not in first.value.message("zh")


def test_cooling_off_above_5000_for_diamond_only() -> None:
    assert core.cooling_off(5000, POLICY.for_tier("钻石")) is None
    assert core.cooling_off(5001, POLICY.for_tier("钻石")) == timedelta(hours=24)
    assert core.cooling_off(10**6, POLICY.for_tier("金卡")) is None


def test_period_starts_in_the_programme_time_zone() -> None:
    late = datetime(2026, 5, 31, 17, 0, tzinfo=UTC)  # 1 June 01:00 in Shanghai
    assert core.period_start("month", late, "Asia/Shanghai") == datetime(
        2026, 5, 31, 16, 0, tzinfo=UTC
    )
    monday = core.period_start("week", NOW, "Asia/Shanghai")
    assert monday is not None and monday.astimezone(core.ZoneInfo("Asia/Shanghai")).weekday() == 0
    assert core.period_start("ever", NOW, "UTC") is None


# --------------------------------------------------------------------------- lottery


WHEEL = LotteryTerms.model_validate(
    {"prizes": [
        {"code": "big", "name": {"zh": "大奖"}, "chance_ppm": 10_000, "points": 1000},
        {"code": "small", "name": {"zh": "小奖"}, "chance_ppm": 200_000, "points": 50},
        {"code": "cup", "name": {"zh": "杯子"}, "chance_ppm": 90_000, "value": 300},
    ]}
)  # fmt: skip


def test_lottery_odds_hold_within_tolerance_over_10000_draws() -> None:
    wins = Counter(
        (prize.code if (prize := core.prize_for(WHEEL, core.roll(f"p:{i}"))) else None)
        for i in range(10_000)
    )
    # expected 100 / 2,000 / 900 / 7,000: within 4 standard deviations
    for code, chance in (("big", 0.01), ("small", 0.2), ("cup", 0.09), (None, 0.7)):
        expected = 10_000 * chance
        assert abs(wins[code] - expected) <= 4 * (expected * (1 - chance)) ** 0.5, (code, wins)


def test_a_draw_is_replayable_from_its_seed() -> None:
    assert core.roll("demo:key-1") == core.roll("demo:key-1")
    assert 0 <= core.roll("x") < core.PPM


def test_a_prize_that_does_not_fit_the_budget_or_quantity_is_not_given() -> None:
    big = WHEEL.prizes[0]
    assert core.affordable(big, left=1, budget_left=1000)
    assert not core.affordable(big, left=0, budget_left=None)
    assert not core.affordable(big, left=None, budget_left=999)


def test_chances_above_100_percent_are_refused() -> None:
    with pytest.raises(ValueError, match="more than 1,000,000"):
        LotteryTerms.model_validate(
            {"prizes": [{"code": "a", "name": {"en": "A"}, "chance_ppm": 600_000},
                        {"code": "b", "name": {"en": "B"}, "chance_ppm": 500_000}]}
        )  # fmt: skip


# --------------------------------------------------------------------------- vouchers


def test_an_expired_voucher_returns_the_points_less_10_percent_rounded_for_the_member() -> None:
    assert core.expiry_refund(1000, 10) == (900, 100)
    assert core.expiry_refund(999, 10) == (900, 99)
    assert core.expiry_refund(5, 0) == (5, 0)


def test_coupons_discount_or_cash_with_a_minimum_spend() -> None:
    cash = CouponTerms(amount_fen=2000, min_spend_fen=10000)
    assert core.coupon_discount(cash, 9999) is None
    assert core.coupon_discount(cash, 10000) == 2000
    off = CouponTerms(percent_off=20)
    assert core.coupon_discount(off, 12345) == 2469
    with pytest.raises(ValueError, match="exactly one"):
        CouponTerms(percent_off=10, amount_fen=100)


def test_price_bands() -> None:
    bands = [100, 500, 1000, 2000, 5000]
    assert [core.band(p, bands) for p in (50, 100, 999, 1000, 4999, 5000, 90000)] == [
        "0-100", "100-500", "500-1000", "1000-2000", "2000-5000", "5000+", "5000+",
    ]  # fmt: skip


def test_kind_terms_must_match_the_kind() -> None:
    with pytest.raises(ValueError, match="needs its coupon terms"):
        reward(kind="coupon")
    with pytest.raises(ValueError, match="belong to vote rewards"):
        reward(vote={"options": ["a", "b"]})
    with pytest.raises(ValueError, match="give sales_start"):
        reward(early_access={"金卡": 24})
    with pytest.raises(ValueError, match="draws once a redemption"):
        reward(kind="lottery", max_quantity=3, lottery=WHEEL.model_dump())
