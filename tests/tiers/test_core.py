"""The pure rules of tiers by score, with the scheme documents' numbers, and properties
that hold for any score and any standing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from jifen.tiers import core
from jifen.tiers.core import ScoreFacts, Standing
from jifen.tiers.schemas import TierScheme
from tests.tiers.scheme import scheme, scheme_json

NOW = datetime(2026, 4, 1, tzinfo=UTC)
SCHEME = scheme(upgrade_at_once=False)
AT_ONCE = scheme(upgrade_at_once=True)
CODES = ["普通", "银卡", "金卡", "钻石"]


def test_the_documents_parts_make_the_score() -> None:
    parts = SCHEME.parts
    # 每1000元40分: whole blocks of 1,000 yuan only
    assert core.score(parts, ScoreFacts(spend_fen=100_000)) == 40
    assert core.score(parts, ScoreFacts(spend_fen=99_999)) == 0
    assert core.score(parts, ScoreFacts(spend_fen=250_000)) == 80
    # 每1000积分得40分, and one point of score a check-in
    assert core.score(parts, ScoreFacts(earned_points=2_000)) == 80
    assert core.score(parts, ScoreFacts(activity=20)) == 20
    assert core.score(parts, ScoreFacts(100_000, 1_000, 21)) == 101
    # a refunded order can leave spend below zero in a window: it counts nothing
    assert core.score(parts, ScoreFacts(spend_fen=-50_000)) == 0


def test_weights_scale_a_part() -> None:
    weighted = TierScheme.model_validate(
        {**scheme_json(), "parts": {"spend": {"per_yuan": 1000, "score": 100, "weight_pct": 40}}}
    )
    assert core.score(weighted.parts, ScoreFacts(spend_fen=100_000)) == 40


def test_the_documents_ranges() -> None:
    assert [core.reached(SCHEME, s).tier for s in (0, 100, 101, 300, 301, 600, 601, 10**6)] == [
        "普通", "普通", "银卡", "银卡", "金卡", "金卡", "钻石", "钻石",
    ]  # fmt: skip


def test_a_gold_member_above_the_line_stays_and_below_it_drops_to_its_scores_tier() -> None:
    gold = Standing("金卡")
    # 250 is above 金卡's retention line 240: kept at evaluation
    assert core.decide(SCHEME, gold, 250, now=NOW, evaluation=True) is None
    assert core.decide(SCHEME, gold, 240, now=NOW, evaluation=True) is None
    # 230 is below it: down to the tier 230 reaches
    dropped = core.decide(SCHEME, gold, 230, now=NOW, evaluation=True)
    assert dropped is not None and dropped.standing.tier == "银卡"
    assert dropped.kind == "evaluation"
    assert dropped.reason == "score 230 is below 金卡's retention line 240"
    # far below: straight to the entry tier
    assert core.decide(SCHEME, gold, 50, now=NOW, evaluation=True).standing.tier == "普通"  # type: ignore[union-attr]
    # and never outside evaluation
    assert core.decide(SCHEME, gold, 0, now=NOW, evaluation=False) is None
    assert core.decide(AT_ONCE, gold, 0, now=NOW, evaluation=False) is None


def test_upgrades_at_once_only_when_the_scheme_says_so() -> None:
    member = Standing("普通")
    assert core.decide(SCHEME, member, 101, now=NOW, evaluation=False) is None
    up = core.decide(AT_ONCE, member, 101, now=NOW, evaluation=False)
    assert up is not None and (up.standing.tier, up.kind) == ("银卡", "upgrade")
    assert up.reason == "score 101 reaches 银卡 (from 101)"
    at_evaluation = core.decide(SCHEME, member, 700, now=NOW, evaluation=True)
    assert at_evaluation is not None and at_evaluation.standing.tier == "钻石"
    # a member without a tier is placed at evaluation, even in the entry tier
    placed = core.decide(SCHEME, Standing(None), 0, now=NOW, evaluation=True)
    assert placed is not None and placed.standing.tier == "普通"
    assert core.decide(AT_ONCE, Standing(None), 0, now=NOW, evaluation=False) is None


CAMPAIGN = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 12, tzinfo=UTC))
IN_CAMPAIGN = datetime(2026, 11, 11, 12, tzinfo=UTC)


def test_a_campaign_score_of_120_percent_of_a_threshold_lends_the_tier_for_a_month() -> None:
    promo = scheme(upgrade_at_once=False, campaigns=[CAMPAIGN])
    member = Standing("普通")
    # 120 % of 银卡's 101 is 121.2: 121 is not enough, 122 is
    assert (
        core.decide(promo, member, 0, now=IN_CAMPAIGN, evaluation=False, campaign_score=121) is None
    )
    lent = core.decide(promo, member, 0, now=IN_CAMPAIGN, evaluation=False, campaign_score=122)
    assert lent is not None and lent.kind == "temporary"
    assert lent.standing == Standing("银卡", "普通", datetime(2026, 12, 11, 12, tzinfo=UTC))
    # not outside the campaign
    after = CAMPAIGN[1] + timedelta(seconds=1)
    assert core.decide(promo, member, 0, now=after, evaluation=False, campaign_score=999) is None
    # it ends by itself, back to what evaluations gave
    assert core.end_temporary(lent.standing, datetime(2026, 12, 11, tzinfo=UTC), "普通") is None
    ended = core.end_temporary(lent.standing, datetime(2026, 12, 11, 12, tzinfo=UTC), "普通")
    assert ended is not None and ended.standing == Standing("普通")
    assert ended.kind == "temporary_end"


def test_a_temporary_upgrade_lasts_calendar_months_of_the_programmes_zone() -> None:
    shanghai = ZoneInfo("Asia/Shanghai")
    december = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC))
    promo = scheme(upgrade_at_once=False, campaigns=[december])
    # lent at 01:00 on 1 December in Shanghai (17:00 on 30 November in UTC): for December
    now = datetime(2026, 12, 1, 1, tzinfo=shanghai).astimezone(UTC)
    lent = core.decide(
        promo, Standing("普通"), 0, now=now, evaluation=False, campaign_score=122, zone=shanghai
    )
    assert lent is not None and lent.standing.temporary_until == datetime(
        2027, 1, 1, 1, tzinfo=shanghai
    )
    assert lent.standing.temporary_until.tzinfo == UTC


def test_a_member_with_no_tier_is_lent_one_and_goes_back_to_the_entry_tier() -> None:
    promo = scheme(upgrade_at_once=False, campaigns=[CAMPAIGN])
    # a member is registered without a tier; outside evaluation its score gives it none
    lent = core.decide(
        promo, Standing(None), 160, now=IN_CAMPAIGN, evaluation=False, campaign_score=160
    )
    assert lent is not None and lent.kind == "temporary"
    assert lent.standing == Standing("银卡", "普通", datetime(2026, 12, 11, 12, tzinfo=UTC))
    # an upgrade lent before the entry tier was recorded (no base) ends at the entry tier
    unrecorded = Standing("银卡", None, datetime(2026, 12, 11, 12, tzinfo=UTC))
    ended = core.end_temporary(unrecorded, datetime(2026, 12, 12, tzinfo=UTC), "普通")
    assert ended is not None and ended.standing == Standing("普通")


def test_an_evaluation_during_a_temporary_upgrade_moves_what_it_returns_to() -> None:
    until = datetime(2026, 12, 11, tzinfo=UTC)
    lent = Standing("金卡", "普通", until)
    # the score now reaches 银卡: the member keeps 金卡 for now and returns to 银卡
    kept = core.decide(SCHEME, lent, 150, now=NOW, evaluation=True)
    assert kept is not None and kept.standing == Standing("金卡", "银卡", until)
    # the score reaches 金卡 itself: the tier becomes its own
    own = core.decide(SCHEME, lent, 400, now=NOW, evaluation=True)
    assert own is not None and own.standing == Standing("金卡")


def test_the_scheme_is_checked() -> None:
    def refused(**changes: object) -> str:
        with pytest.raises(ValidationError) as caught:
            TierScheme.model_validate({**scheme_json(), **changes})
        return str(caught.value)

    levels = scheme_json()["levels"]
    assert "must start above" in refused(levels=[levels[0], levels[2], levels[1]])
    assert "entry tier starts at score 0" in refused(levels=levels[1:])
    assert "each tier once" in refused(levels=[*levels, levels[1]])
    high = [*levels[:3], {"tier": "钻石", "min_score": 601, "retention": 700}]
    assert "retention line 700 must be below its entry score 601" in refused(levels=high)
    assert "not among the levels" in refused(benefits={"黑卡": {}})
    assert "at least one part" in refused(parts={})
    start = datetime(2026, 11, 1, tzinfo=UTC).isoformat()
    campaign = {"starts_at": start, "ends_at": start}
    assert "ends_at must be after starts_at" in refused(temporary_upgrades=[campaign])


def test_quarterly_evaluations_fall_on_the_first_of_a_quarter_in_the_programmes_zone() -> None:
    zone = ZoneInfo("Asia/Shanghai")
    first = core.next_evaluation_at("quarterly", datetime(2026, 1, 1, 1, tzinfo=UTC), zone)
    assert first == datetime(2026, 3, 31, 16, tzinfo=UTC)  # 1 April, 00:00 in Shanghai
    assert core.next_evaluation_at("quarterly", first, zone) == datetime(
        2026, 6, 30, 16, tzinfo=UTC
    )
    assert core.next_evaluation_at("monthly", first, zone) == datetime(2026, 4, 30, 16, tzinfo=UTC)
    assert core.next_evaluation_at("yearly", first, zone) == datetime(2026, 12, 31, 16, tzinfo=UTC)
    # the latest scheduled evaluation at or before a moment
    assert core.last_evaluation_at("quarterly", first, zone) == first
    assert core.last_evaluation_at("quarterly", first - timedelta(seconds=1), zone) == datetime(
        2025, 12, 31, 16, tzinfo=UTC
    )
    assert core.last_evaluation_at("half_yearly", datetime(2026, 9, 9, tzinfo=UTC), zone) == (
        datetime(2026, 6, 30, 16, tzinfo=UTC)
    )
    assert core.add_months(datetime(2026, 1, 31, tzinfo=UTC), 1) == datetime(
        2026, 2, 28, tzinfo=UTC
    )


# --------------------------------------------------------------------------- properties

tiers = st.sampled_from([None, *CODES])
scores = st.integers(min_value=0, max_value=2_000)
schemes = st.sampled_from([SCHEME, AT_ONCE])


@given(schemes, tiers, scores)
def test_never_moves_down_outside_evaluation(
    scheme_: TierScheme, tier: str | None, value: int
) -> None:
    decision = core.decide(scheme_, Standing(tier), value, now=NOW, evaluation=False)
    if decision is not None:
        assert core.rank(scheme_, decision.standing.tier) > core.rank(scheme_, tier)


@given(schemes, st.sampled_from(CODES), scores)
def test_a_score_at_or_above_the_retention_line_keeps_the_tier(
    scheme_: TierScheme, tier: str, value: int
) -> None:
    level = scheme_.levels[core.rank(scheme_, tier)]
    decision = core.decide(scheme_, Standing(tier), value, now=NOW, evaluation=True)
    after = decision.standing.tier if decision is not None else tier
    if value >= core.retention_line(level):
        assert core.rank(scheme_, after) >= core.rank(scheme_, tier)
    else:
        assert after == core.reached(scheme_, value).tier


@given(schemes, tiers, scores, scores, st.booleans())
def test_a_higher_score_never_ends_in_a_lower_tier(
    scheme_: TierScheme, tier: str | None, low: int, high: int, evaluation: bool
) -> None:
    low, high = sorted((low, high))

    def outcome(value: int) -> int:
        decision = core.decide(scheme_, Standing(tier), value, now=NOW, evaluation=evaluation)
        return core.rank(scheme_, decision.standing.tier if decision is not None else tier)

    assert outcome(low) <= outcome(high)


@given(tiers, scores)
def test_an_evaluation_lands_where_its_score_says_or_keeps_a_retained_tier(
    tier: str | None, value: int
) -> None:
    decision = core.decide(SCHEME, Standing(tier), value, now=NOW, evaluation=True)
    after = decision.standing.tier if decision is not None else tier
    reached = core.reached(SCHEME, value).tier
    assert after == reached or (
        tier is not None
        and core.rank(SCHEME, tier) > core.rank(SCHEME, reached)
        and value >= core.retention_line(SCHEME.levels[core.rank(SCHEME, tier)])
    )
    # evaluating again at the same score changes nothing
    assert core.decide(SCHEME, Standing(after), value, now=NOW, evaluation=True) is None


# A member's history: the tier it started with, then changes at minutes from NOW (several
# may share a minute), each from the tier before it.
histories = st.tuples(
    tiers,
    st.lists(st.tuples(st.integers(min_value=0, max_value=5), st.sampled_from(CODES)), max_size=8),
)


def _changes(start: str | None, steps: list[tuple[int, str]]) -> list[core.TierChange]:
    changes, held, minute = [], start, 0
    for gap, tier in steps:
        minute += gap
        changes.append(core.TierChange(NOW + timedelta(minutes=minute), held, tier))
        held = tier
    return changes


@given(histories, st.integers(min_value=-1, max_value=45), st.integers(min_value=0, max_value=5))
def test_walking_back_from_the_current_tier_finds_the_tier_held_at_a_moment(
    history: tuple[str | None, list[tuple[int, str]]], minute: int, ahead: int
) -> None:
    start, steps = history
    changes = _changes(start, steps)
    current = changes[-1].to_tier if changes else start
    moment = NOW + timedelta(minutes=minute)
    # forward: the tier of the last change made at or before the moment
    held = start
    for change in changes:
        if change.at <= moment:
            held = change.to_tier
    # back, from the changes read after the moment or any earlier one
    read_after = moment - timedelta(minutes=ahead)
    later = tuple(c for c in changes if c.at > read_after)
    assert core.TierTimeline(current, later).at(moment) == held


def test_a_change_counts_from_its_own_time() -> None:
    upgrade = core.TierChange(NOW, "银卡", "金卡")
    timeline = core.TierTimeline("金卡", (upgrade,))
    assert timeline.at(NOW - timedelta(microseconds=1)) == "银卡"
    assert timeline.at(NOW) == "金卡"
    first = core.TierTimeline("普通", (core.TierChange(NOW, None, "普通"),))
    assert first.at(NOW - timedelta(seconds=1)) is None
    assert core.TierTimeline(None).at(NOW) is None
