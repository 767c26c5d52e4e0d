"""The pure rule evaluation, with the scheme documents' own numbers as cases."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from jifen.rules.core import (
    Budgets,
    ConditionFailed,
    Event,
    EventRefused,
    Facts,
    OrderLine,
    Program,
    Rule,
    RuleSet,
    Streak,
    Usage,
    draw,
    draw_seed,
    evaluate,
    in_gray_share,
    reversal_due,
    tier_cap_of,
)
from jifen.rules.schemas import ProgramCaps, RuleSpec

SHANGHAI = ZoneInfo("Asia/Shanghai")
PROGRAM = Program(zone=SHANGHAI)
NOON = datetime(2026, 6, 10, 12, 0, tzinfo=SHANGHAI)
TIER_CAPS = ProgramCaps.model_validate(
    {
        "by_tier": {
            "普通": {"day": 1000, "month": 5000},
            "银卡": {"day": 1500, "month": 8000},
            "金卡": {"day": 2000, "month": 12000},
        }
    }
)


def rule(
    code: str,
    params: dict[str, Any],
    *,
    events: tuple[str, ...] = ("order.paid",),
    condition: Any = None,
    **spec: Any,
) -> Rule:
    body = {"code": code, "name": code, "event_types": list(events), "params": params, **spec}
    return Rule(RuleSpec.model_validate(body), condition=condition)


def order(
    *lines: tuple[str, str, int],
    when: datetime = NOON,
    member: int = 1,
    key: str = "pos:1",
    **payload: Any,
) -> Event:
    """An order.paid event; each line is (sku, category, yuan)."""
    return Event(
        key=key,
        type="order.paid",
        occurred_at=when,
        member_id=member,
        payload={"channel": "store", "store": "S1", **payload},
        lines=tuple(OrderLine(sku, cat, 1, yuan * 100) for sku, cat, yuan in lines),
    )


def run(
    event: Event,
    *rules: Rule,
    program: Program = PROGRAM,
    facts: Mapping[int, Facts] | None = None,
    budgets: Budgets | None = None,
    **member: Any,
) -> dict[str, int]:
    """Points posted by rule code (held awards under ``code (held)``)."""
    facts = facts or {event.member_id: Facts(member_id=event.member_id, **member)}
    result = evaluate(event, RuleSet(rules), program, facts, budgets)
    out: dict[str, int] = {}
    for award in result.awards:
        name = f"{award.rule} (held)" if award.held else award.rule
        out[name] = out.get(name, 0) + award.points
    return out


CATEGORY_RATES = {"kind": "spend_rate", "rate": "1", "category_rates": {"日用品": "1", "家电": "3"}}


# --------------------------------------------------------------------------- kinds


def test_spend_rate_by_category_documents_numbers() -> None:
    # 日用品按消费金额的 1%、家电按 3% 返积分, 1 积分 = 0.01 元: 1 and 3 points per yuan.
    event = order(("T1", "日用品", 200), ("TV", "家电", 1000))
    assert run(event, rule("base", CATEGORY_RATES)) == {"base": 200 + 3000}


def test_spend_rate_skips_exclusions_points_paid_lines_and_other_channels() -> None:
    params = {**CATEGORY_RATES, "excluded_skus": ["GIFT"], "excluded_categories": ["烟酒"]}
    event = Event(
        key="pos:2",
        type="order.paid",
        occurred_at=NOON,
        member_id=1,
        payload={"channel": "online"},
        lines=(
            OrderLine("T1", "日用品", 1, 10_000),
            OrderLine("GIFT", "日用品", 1, 5_000),
            OrderLine("W1", "烟酒", 1, 5_000),
            OrderLine("R1", "日用品", 1, 7_000, paid_with_points=True),
        ),
    )
    assert run(event, rule("base", params)) == {"base": 100}
    only_store = rule("base", {**params, "channels": ["store", "livestream"]})
    assert run(event, only_store) == {}


@pytest.mark.parametrize(
    ("rounding", "fen", "expected"),
    [("floor", 1250, 12), ("half_up", 1250, 13), ("half_up", 1249, 12), ("ceil", 1201, 13)],
)
def test_spend_rate_rounding(rounding: str, fen: int, expected: int) -> None:
    event = Event("k", "order.paid", NOON, 1, {}, (OrderLine("A", "x", 1, fen),))
    params = {"kind": "spend_rate", "rate": "1", "rounding": rounding}
    assert run(event, rule("base", params)) == {"base": expected}


def test_rounding_each_line_differs_from_rounding_the_order() -> None:
    lines = tuple(OrderLine(f"A{i}", "x", 1, 150) for i in range(4))  # 4 × 1.5 yuan
    event = Event("k", "order.paid", NOON, 1, {}, lines)
    params = {"kind": "spend_rate", "rate": "1"}
    assert run(event, rule("base", params)) == {"base": 6}
    assert run(event, rule("base", {**params, "round_each_line": True})) == {"base": 4}


@pytest.mark.parametrize(("tier", "total"), [("普通", 1000), ("银卡", 1200), ("金卡", 1500)])
def test_tier_multiplier_documents_numbers(tier: str, total: int) -> None:
    # 普通会员 1 倍, 银卡 1.2 倍, 金卡 1.5 倍.
    multiplier = rule("tier", {"kind": "multiplier", "by_tier": {"银卡": "1.2", "金卡": "1.5"}})
    result = run(order(("A", "x", 1000)), rule("base", CATEGORY_RATES), multiplier, tier=tier)
    assert sum(result.values()) == total


def test_campaign_window_multiplier_compounds_with_the_tier() -> None:
    # 双11 2 倍, for 金卡 on top of 1.5 倍: 1000 → 1500 → 3000.
    double11 = rule(
        "double11",
        {"kind": "multiplier", "factor": "2"},
        starts_at="2026-11-11T00:00:00+08:00",
        ends_at="2026-11-12T00:00:00+08:00",
        priority=200,
    )
    tier = rule("tier", {"kind": "multiplier", "by_tier": {"金卡": "1.5"}}, priority=150)
    rules = (rule("base", CATEGORY_RATES), tier, double11)
    inside = order(("A", "x", 1000), when=datetime(2026, 11, 11, 23, 59, tzinfo=SHANGHAI))
    outside = order(("A", "x", 1000), when=datetime(2026, 11, 12, 0, 0, tzinfo=SHANGHAI))
    assert run(inside, *rules, tier="金卡") == {"base": 1000, "tier": 500, "double11": 1500}
    assert run(outside, *rules, tier="金卡") == {"base": 1000, "tier": 500}


def test_the_matrix_multiplier_stays_when_a_tiered_rule_does_not_apply_to_the_event() -> None:
    # The benefits matrix gives 金卡 1.5; a 双11 rule naming 金卡 2 says what 金卡 earns only
    # on the orders it applies to: in its window, in its share, when its condition holds.
    matrix = Program(zone=SHANGHAI, tier_multipliers={"金卡": Decimal("1.5")})
    double11 = rule(
        "double11",
        {"kind": "multiplier", "by_tier": {"金卡": "2"}},
        starts_at="2026-11-11T00:00:00+08:00",
        ends_at="2026-11-12T00:00:00+08:00",
    )
    base = rule("base", CATEGORY_RATES)
    inside = order(("A", "x", 1000), when=datetime(2026, 11, 11, 12, 0, tzinfo=SHANGHAI))
    assert run(inside, base, double11, program=matrix, tier="金卡") == {
        "base": 1000,
        "double11": 1000,
    }
    outside = order(("A", "x", 1000), when=datetime(2026, 11, 12, 12, 0, tzinfo=SHANGHAI))
    assert run(outside, base, double11, program=matrix, tier="金卡") == {
        "base": 1000,
        "tier_benefit": 500,
    }
    livestream = rule(
        "livestream", {"kind": "multiplier", "by_tier": {"金卡": "2"}}, condition=lambda _: False
    )
    assert run(order(("A", "x", 1000)), base, livestream, program=matrix, tier="金卡") == {
        "base": 1000,
        "tier_benefit": 500,
    }
    nobody = rule("nobody", {"kind": "multiplier", "by_tier": {"金卡": "2"}}, gray_share="0")
    assert run(order(("A", "x", 1000)), base, nobody, program=matrix, tier="金卡") == {
        "base": 1000,
        "tier_benefit": 500,
    }
    # a birthday gift rule outside its window leaves the matrix's gift too
    gifts = Program(zone=SHANGHAI, birthday_gifts={"金卡": 1000})
    later = rule(
        "gift",
        {"kind": "birthday_gift", "by_tier": {"金卡": 2000}},
        events=("member.birthday",),
        gray_share="0",
    )
    birthday = Event("jifen:b", "member.birthday", NOON, 1, {"year": 2026})
    assert run(birthday, later, program=gifts, tier="金卡") == {"tier_benefit": 1000}


def test_birthday_month_doubles() -> None:
    birthday = rule("bday", {"kind": "multiplier", "factor": "2", "birthday_month": True})
    rules = (rule("base", CATEGORY_RATES), birthday)
    assert run(order(("A", "x", 300)), *rules, birthday=date(1990, 6, 30)) == {
        "base": 300,
        "bday": 300,
    }
    assert run(order(("A", "x", 300)), *rules, birthday=date(1990, 7, 1)) == {"base": 300}
    # The month is the programme's: 31 May 16:30 UTC is already 1 June in Shanghai.
    late_may = datetime(2026, 5, 31, 16, 30, tzinfo=UTC)
    assert run(order(("A", "x", 300), when=late_may), *rules, birthday=date(1990, 6, 2)) == {
        "base": 300,
        "bday": 300,
    }


@pytest.mark.parametrize(
    ("yuan", "repeat", "bonus"),
    [(999, False, 0), (1000, False, 200), (2500, False, 200), (2500, True, 400)],
)
def test_threshold_bonus(yuan: int, repeat: bool, bonus: int) -> None:
    # 消费满 1000 元加送 200 积分.
    params = {"kind": "threshold", "min_amount_fen": 100_000, "points": 200, "repeat": repeat}
    assert run(order(("A", "x", yuan)), rule("full", params)).get("full", 0) == bonus


def test_first_order_bonus_only_once() -> None:
    first = rule("first", {"kind": "first_of_kind", "points": 100})
    assert run(order(("A", "x", 10)), first) == {"first": 100}
    assert run(order(("A", "x", 10)), first, counts={"order.paid": 1}) == {}


def test_fixed_awards_from_the_documents() -> None:
    register = rule("register", {"kind": "fixed", "points": 100}, events=("member.registered",))
    event = Event("app:r1", "member.registered", NOON, 1)
    assert run(event, register) == {"register": 100}
    # 到店核销 +50: a fixed award with a condition on the order.
    pickup = rule(
        "pickup",
        {"kind": "fixed", "points": 50},
        condition=lambda a: a["event"].get("pickup") is True,
    )
    assert run(order(("A", "x", 10), pickup=True), pickup) == {"pickup": 50}
    assert run(order(("A", "x", 10)), pickup) == {}


def test_per_unit_hours_and_quiz_answers() -> None:
    # 垃圾分类指导每小时 5 分; 每答对一题 10 分.
    hours = rule(
        "volunteer", {"kind": "per_unit", "points_per_unit": "5"}, events=("activity.attended",)
    )
    quiz = rule(
        "quiz",
        {"kind": "per_unit", "field": "correct_answers", "points_per_unit": "10"},
        events=("quiz.answered",),
    )
    assert run(Event("a", "activity.attended", NOON, 1, {"hours": 3}), hours) == {"volunteer": 15}
    assert run(Event("a", "activity.attended", NOON, 1, {"hours": 2.5}), hours) == {"volunteer": 12}
    assert run(Event("q", "quiz.answered", NOON, 1, {"correct_answers": 4}), quiz) == {"quiz": 40}
    with pytest.raises(EventRefused, match="hours"):
        run(Event("a", "activity.attended", NOON, 1, {}), hours)
    with pytest.raises(EventRefused, match="from 0 to"):
        run(Event("a", "activity.attended", NOON, 1, {"hours": -1}), hours)


CHECK_IN = {"kind": "streak", "ladder": {"1": 10, "3": 15, "7": 50}}


def test_check_in_ladder_and_restart() -> None:
    # 首次签到 10, 连续 3 天每天 15, 连续 7 天 50, 中断则重新计算.
    ladder = rule("checkin", CHECK_IN, events=("member.checked_in",))
    streak: Streak | None = None
    got = []
    days = [*range(1, 10), 11]  # day 10 is missed
    for day in days:
        when = datetime(2026, 3, day, 8, 0, tzinfo=SHANGHAI)
        facts = Facts(1, streaks={"member.checked_in": streak} if streak else {})
        result = evaluate(
            Event(f"c{day}", "member.checked_in", when, 1), RuleSet([ladder]), PROGRAM, {1: facts}
        )
        got.append(result.total)
        streak = result.streaks[(1, "member.checked_in")]
    assert got == [10, 10, 15, 15, 15, 15, 50, 50, 50, 10]
    # A second check-in on the same day earns nothing and keeps the run.
    again = Event("c11b", "member.checked_in", datetime(2026, 3, 11, 20, tzinfo=SHANGHAI), 1)
    result = evaluate(
        again, RuleSet([ladder]), PROGRAM, {1: Facts(1, streaks={"member.checked_in": streak})}
    )
    assert result.total == 0 and result.streaks == {}


def test_check_in_ladder_can_cycle() -> None:
    ladder = rule("checkin", {**CHECK_IN, "cycle": True}, events=("member.checked_in",))
    facts = Facts(1, streaks={"member.checked_in": Streak(date(2026, 3, 7), 7)})
    event = Event("c", "member.checked_in", datetime(2026, 3, 8, 9, tzinfo=SHANGHAI), 1)
    assert evaluate(event, RuleSet([ladder]), PROGRAM, {1: facts}).total == 10


def test_random_surprise_rate_range_and_replay() -> None:
    # 每日签到有 10% 概率触发惊喜积分 (50-200).
    surprise = rule(
        "surprise",
        {"kind": "random", "probability": "0.1", "minimum": 50, "maximum": 200},
        events=("member.checked_in",),
    )
    rules = RuleSet([surprise])
    hits = []
    for n in range(10_000):
        event = Event(f"c{n}", "member.checked_in", NOON, 1)
        result = evaluate(event, rules, PROGRAM, {1: Facts(1)})
        if result.awards:
            hits.append(result.awards[0].points)
            assert result == evaluate(event, rules, PROGRAM, {1: Facts(1)})  # same draw
    assert 900 <= len(hits) <= 1100
    assert min(hits) >= 50 and max(hits) <= 200 and len(set(hits)) > 100


def test_random_draws_are_seeded_under_the_installations_key_and_replay_from_the_seed() -> None:
    surprise = rule(
        "surprise",
        {"kind": "random", "probability": "0.5", "minimum": 50, "maximum": 200},
        events=("member.checked_in",),
    )
    rules = RuleSet([surprise])
    keyed = [Program(SHANGHAI, draw_key=key) for key in (b"one", b"two")]
    outcomes: list[list[int]] = [[], []]
    for n in range(200):
        event = Event(f"pos:c{n}", "member.checked_in", NOON, 1)
        for program, seen in zip(keyed, outcomes, strict=True):
            result = evaluate(event, rules, program, {1: Facts(1)})
            seed = draw_seed(program.draw_key, event.key, surprise)
            assert (
                seed
                == hmac.new(
                    program.draw_key, f"pos:c{n}|surprise|1".encode(), hashlib.sha256
                ).hexdigest()
            )
            if result.awards:
                (award,) = result.awards
                assert award.detail["seed"] == seed
                replayed = draw(seed)  # the recorded seed draws the same again
                assert replayed.randrange(1_000_000) == award.detail["roll"]
                assert replayed.randint(50, 200) == award.points
            else:
                assert result.skipped[0].why.endswith(f"seed {seed}")
            seen.append(result.total)
    # Under another key the same event ids draw otherwise: ids alone choose nothing.
    assert outcomes[0] != outcomes[1]


def test_two_sided_referral() -> None:
    # 邀请人 200 (+50 after the friend's first order), 被邀请人 100.
    invite = rule(
        "invite",
        {"kind": "referral", "inviter_points": 200, "invitee_points": 100},
        events=("referral.completed",),
    )
    success = rule(
        "invite-success",
        {"kind": "referral", "inviter_points": 50, "invitee_points": 0},
        events=("referral.completed",),
    )
    event = Event("r1", "referral.completed", NOON, 2, {"inviter_member_id": 1})
    result = evaluate(event, RuleSet([invite, success]), PROGRAM, {1: Facts(1), 2: Facts(2)})
    by_member: dict[int, int] = {}
    for award in result.awards:
        by_member[award.member_id] = by_member.get(award.member_id, 0) + award.points
    assert by_member == {1: 250, 2: 100}
    with pytest.raises(EventRefused, match="inviter"):
        evaluate(
            Event("r2", "referral.completed", NOON, 2), RuleSet([invite]), PROGRAM, {2: Facts(2)}
        )
    with pytest.raises(EventRefused, match="unknown inviter 9"):
        evaluate(
            Event("r3", "referral.completed", NOON, 2, {"inviter_member_id": 9}),
            RuleSet([invite]),
            PROGRAM,
            {2: Facts(2)},
        )


@pytest.mark.parametrize(("tier", "points"), [("普通", 200), ("银卡", 500), ("金卡", 1000)])
def test_birthday_gift_by_tier(tier: str, points: int) -> None:
    gift = rule(
        "gift",
        {"kind": "birthday_gift", "by_tier": {"普通": 200, "银卡": 500, "金卡": 1000}},
        events=("member.birthday",),
    )
    assert run(Event("b", "member.birthday", NOON, 1), gift, tier=tier) == {"gift": points}


def test_reviewed_award_is_held_and_limited() -> None:
    # 特殊贡献经评审后加分, 单次最高 50 分.
    contribution = rule(
        "contribution", {"kind": "reviewed", "max_points": 50}, events=("custom.contribution",)
    )
    event = Event("x", "custom.contribution", NOON, 1, {"requested_points": 80})
    result = evaluate(event, RuleSet([contribution]), PROGRAM, {1: Facts(1)})
    assert [(a.points, a.held) for a in result.awards] == [(50, True)]
    assert result.total == 0


def test_a_multiplier_does_not_pay_on_a_held_award_before_it_is_approved() -> None:
    # A campaign doubling every kind, reviewed awards among them: the held award waits for
    # its reviewer, and nothing of it, doubled or not, posts before (a rejection gives none).
    contribution = rule(
        "contribution", {"kind": "reviewed", "max_points": 50}, events=("custom.contribution",)
    )
    double = rule(
        "double",
        {"kind": "multiplier", "factor": "2", "applies_to": ["reviewed", "fixed"]},
        events=("custom.contribution",),
        priority=200,
    )
    thanks = rule("thanks", {"kind": "fixed", "points": 5}, events=("custom.contribution",))
    event = Event("x", "custom.contribution", NOON, 1, {"requested_points": 30})
    result = evaluate(event, RuleSet([contribution, thanks, double]), PROGRAM, {1: Facts(1)})
    assert [(a.rule, a.points, a.held) for a in result.awards] == [
        ("contribution", 30, True),
        ("thanks", 5, False),
        ("double", 5, False),
    ]
    assert result.total == 10


# --------------------------------------------------------------------------- caps


def test_tier_day_cap_posts_the_part_that_fits() -> None:
    # 普通会员单日最多 1000 积分: 900 already today, 300 more → 100 posted, 200 capped.
    program = Program(SHANGHAI, TIER_CAPS)
    event = order(("A", "x", 300))
    facts = {1: Facts(1, tier="普通", usage=Usage(day=900, month=900))}
    result = evaluate(event, RuleSet([rule("base", CATEGORY_RATES)]), program, facts)
    (award,) = result.awards
    assert (award.wanted, award.points, award.capped) == (300, 100, 200)
    assert award.cap == "tier_day (普通: 1000)"


def test_tier_month_cap_and_higher_tiers_fit_more() -> None:
    program = Program(SHANGHAI, TIER_CAPS)
    rules = RuleSet([rule("base", CATEGORY_RATES)])
    event = order(("A", "x", 1200))
    silver = {1: Facts(1, tier="银卡", usage=Usage(month=7500))}
    (award,) = evaluate(event, rules, program, silver).awards
    assert (award.points, award.cap) == (500, "tier_month (银卡: 8000)")
    gold = {1: Facts(1, tier="金卡", usage=Usage(month=7500))}
    (award,) = evaluate(event, rules, program, gold).awards
    assert (award.points, award.cap) == (1200, None)


def test_every_member_has_caps_the_untiered_and_tiers_the_caps_do_not_name() -> None:
    # 普通 < 银卡 < 新卡 < 金卡 < 钻石; the caps name 普通, 银卡 and 金卡 only.
    order_ = ("普通", "银卡", "新卡", "金卡", "钻石")
    program = Program(SHANGHAI, TIER_CAPS, tier_order=order_)
    rules = RuleSet([rule("base", CATEGORY_RATES)])
    event = order(("A", "x", 5000))
    cases = {
        None: "tier_day (普通: 1000)",  # no tier: the entry tier's caps
        "新卡": "tier_day (新卡: 1500)",  # the nearest lower tier named: 银卡
        "钻石": "tier_day (钻石: 2000)",  # 金卡
        "金卡plus": "tier_day (金卡plus: 1000)",  # not a tier of the order: the lowest named
    }
    for tier, cap in cases.items():
        (award,) = evaluate(event, rules, program, {1: Facts(1, tier=tier)}).awards
        assert (award.wanted, award.cap) == (5000, cap)
    # Below every named tier: the lowest named one.
    caps = ProgramCaps.model_validate({"by_tier": {"金卡": {"day": 2000}}})
    below = Program(SHANGHAI, caps, tier_order=order_)
    (award,) = evaluate(event, rules, below, {1: Facts(1, tier="银卡")}).awards
    assert award.cap == "tier_day (银卡: 2000)"
    assert tier_cap_of(caps.by_tier, (), "银卡") is None  # no tiers in the programme


def test_a_member_without_a_tier_earns_as_the_entry_tier() -> None:
    program = Program(SHANGHAI, tier_order=("普通", "银卡"))
    multiplier = rule("tier", {"kind": "multiplier", "by_tier": {"普通": "2", "银卡": "3"}})
    condition = rule("entry", {"kind": "fixed", "points": 5}, condition=lambda b: (
        b["member"]["tier"] == "普通"
    ))  # fmt: skip
    assert run(order(("A", "x", 100)), rule("base", CATEGORY_RATES), multiplier, condition,
               program=program) == {"base": 100, "entry": 5, "tier": 100}  # fmt: skip


def test_caps_count_earlier_awards_of_the_same_event() -> None:
    program = Program(SHANGHAI, TIER_CAPS)
    bonus = rule("full", {"kind": "threshold", "min_amount_fen": 50_000, "points": 200})
    result = evaluate(
        order(("A", "x", 900)),
        RuleSet([rule("base", CATEGORY_RATES), bonus]),
        program,
        {1: Facts(1, tier="普通")},
    )
    assert [(a.rule, a.points, a.capped) for a in result.awards] == [
        ("base", 900, 0),
        ("full", 100, 100),
    ]


def test_rule_caps_per_member_and_budgets() -> None:
    capped = rule("base", CATEGORY_RATES, caps={"per_member": {"week": 500}, "budget": 10_000})
    event = order(("A", "x", 400))
    used = Usage(by_rule={("base", "week"): 300})
    (award,) = evaluate(event, RuleSet([capped]), PROGRAM, {1: Facts(1, usage=used)}).awards
    assert (award.points, award.cap) == (200, "rule_week (base: 500)")
    (award,) = evaluate(
        event, RuleSet([capped]), PROGRAM, {1: Facts(1)}, Budgets(by_rule={"base": 9_950})
    ).awards
    assert (award.points, award.cap) == (50, "rule_budget (base: 10000)")
    program = Program(SHANGHAI, ProgramCaps(budget=1_000))
    (award,) = evaluate(
        event, RuleSet([capped]), program, {1: Facts(1)}, Budgets(program=1_000)
    ).awards
    assert (award.points, award.cap) == (0, "program_budget (1000)")


@given(
    wanted=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
    used_day=st.integers(0, 1000),
    used_month=st.integers(0, 5000),
)
def test_caps_never_let_a_day_or_month_overflow(
    wanted: list[int], used_day: int, used_month: int
) -> None:
    program = Program(SHANGHAI, TIER_CAPS)
    rules = [
        rule(f"r{i}", {"kind": "fixed", "points": w}, priority=i) for i, w in enumerate(wanted)
    ]
    facts = {1: Facts(1, tier="普通", usage=Usage(day=used_day, month=used_month))}
    result = evaluate(order(("A", "x", 1)), RuleSet(rules), program, facts)
    posted = [a.points for a in result.awards]
    assert all(0 <= a.points <= a.wanted for a in result.awards)
    room = max(0, min(1000 - used_day, 5000 - used_month))
    assert sum(posted) == min(sum(wanted), room)  # nothing lost that fits, nothing over
    for award in result.awards:
        assert (award.cap is None) == (award.points == award.wanted)


# --------------------------------------------------------------------------- stacking


def test_exclusive_group_takes_the_first_by_priority() -> None:
    anniversary = rule(
        "anniversary",
        {"kind": "multiplier", "factor": "2"},
        exclusive_group="campaign",
        priority=10,
    )
    double11 = rule(
        "double11", {"kind": "multiplier", "factor": "3"}, exclusive_group="campaign", priority=20
    )
    event = order(("A", "x", 100))
    result = evaluate(
        event,
        RuleSet([rule("base", CATEGORY_RATES), double11, anniversary]),
        PROGRAM,
        {1: Facts(1)},
    )
    assert [(a.rule, a.points) for a in result.awards] == [("base", 100), ("anniversary", 100)]
    assert any(s.rule == "double11" and "taken by anniversary" in s.why for s in result.skipped)


def test_stop_after_ends_the_pass() -> None:
    vip = rule(
        "vip",
        {"kind": "fixed", "points": 10},
        priority=1,
        stop_after=True,
        condition=lambda a: "vip" in a["member"]["tags"],
    )
    rules = (vip, rule("base", CATEGORY_RATES, priority=5))
    assert run(order(("A", "x", 100)), *rules, tags=frozenset({"vip"})) == {"vip": 10}
    assert run(order(("A", "x", 100)), *rules) == {"base": 100}


def test_a_condition_that_cannot_be_evaluated_refuses_the_event() -> None:
    def broken(_: Mapping[str, Any]) -> bool:
        raise ConditionFailed("no such key: 'nope'")

    with pytest.raises(EventRefused, match="rule base: its condition failed: no such key"):
        run(order(("A", "x", 1)), rule("base", CATEGORY_RATES, condition=broken))


def test_gray_release_share_within_two_percent_on_10000_members() -> None:
    for share in ("0.1", "0.3", "0.5"):
        members = sum(in_gray_share("new-rate", m, Decimal(share)) for m in range(1, 10_001))
        assert abs(members / 10_000 - float(share)) <= 0.02
    # Stable: the same members, and growing the share keeps everyone already in.
    small = {m for m in range(1, 2001) if in_gray_share("r", m, Decimal("0.2"))}
    large = {m for m in range(1, 2001) if in_gray_share("r", m, Decimal("0.4"))}
    assert small < large


def test_gray_share_applies_in_evaluation() -> None:
    gray = rule("new", {"kind": "fixed", "points": 5}, gray_share="0.5")
    fired = sum(bool(run(order(("A", "x", 1), member=m), gray)) for m in range(1, 2001))
    assert 900 <= fired <= 1100


# --------------------------------------------------------------------------- refunds


def test_reversal_in_proportion() -> None:
    # 300 points on a 300-yuan order; 100 yuan refunded → 100 back; then the rest → 200.
    assert (
        reversal_due(awarded=300, eligible_fen=30_000, refunded_fen=10_000, already_reversed=0)
        == 100
    )
    assert (
        reversal_due(awarded=300, eligible_fen=30_000, refunded_fen=30_000, already_reversed=100)
        == 200
    )


@given(
    awarded=st.integers(0, 10**6),
    parts=st.lists(st.integers(1, 10**5), min_size=1, max_size=8),
)
def test_refunding_everything_in_parts_takes_back_exactly_the_award(
    awarded: int, parts: list[int]
) -> None:
    eligible = sum(parts)
    refunded = taken = 0
    for part in parts:
        refunded += part
        due = reversal_due(
            awarded=awarded, eligible_fen=eligible, refunded_fen=refunded, already_reversed=taken
        )
        assert due >= 0
        taken += due
        assert taken <= awarded
    assert taken == awarded


# --------------------------------------------------------------------------- bad rules


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"kind": "spend_rate", "rate": "-1"}, "rate"),
        ({"kind": "streak", "ladder": {"3": 15}}, "day 1"),
        ({"kind": "random", "probability": "0.1", "minimum": 200, "maximum": 50}, "maximum"),
        ({"kind": "fixed"}, "points"),
        ({"kind": "bogus"}, "kind"),
        ({"kind": "fixed", "points": 5, "extra": 1}, "extra"),
    ],
)
def test_bad_rules_are_refused_with_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        rule("bad", params)


def test_a_window_must_end_after_it_starts() -> None:
    start = NOON.isoformat()
    with pytest.raises(ValidationError, match="ends_at"):
        rule(
            "w",
            {"kind": "fixed", "points": 1},
            starts_at=start,
            ends_at=(NOON - timedelta(days=1)).isoformat(),
        )


def test_a_late_check_in_neither_grows_nor_resets_the_run() -> None:
    ladder = rule("checkin", CHECK_IN, events=("member.checked_in",))
    facts = Facts(1, streaks={"member.checked_in": Streak(date(2026, 3, 4), 4)})
    late = Event("c-late", "member.checked_in", datetime(2026, 3, 2, 9, tzinfo=SHANGHAI), 1)
    result = evaluate(late, RuleSet([ladder]), PROGRAM, {1: facts})
    assert result.total == 0 and result.streaks == {}
    assert "before the run's last day 2026-03-04" in result.skipped[0].why


def test_an_award_too_large_refuses_the_event() -> None:
    huge = rule(
        "huge",
        {"kind": "per_unit", "field": "n", "points_per_unit": "1000"},
        events=("custom.big",),
    )
    with pytest.raises(EventRefused, match="more than"):
        run(Event("b", "custom.big", NOON, 1, {"n": 10**10}), huge)
    with pytest.raises(EventRefused, match="from 0 to"):
        run(Event("b", "custom.big", NOON, 1, {"n": "1e999999"}), huge)
