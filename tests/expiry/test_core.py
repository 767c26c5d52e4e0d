"""Expiry dates, dormancy and reminders with the scheme documents' numbers."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jifen.expiry import core
from jifen.expiry.schemas import Dormancy, ExpiryPolicy, Validity

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=SHANGHAI)  # type: ignore[misc]


def test_rolling_twelve_months_ends_with_the_day_a_year_later() -> None:
    twelve = Validity(kind="rolling", months=12)
    assert core.expires_at(twelve, at(2026, 3, 15, 14, 30), SHANGHAI) == at(2027, 3, 16)
    # 31 January + 1 month is the last day of February.
    one = Validity(kind="rolling", months=1)
    assert core.expires_at(one, at(2026, 1, 31, 9), SHANGHAI) == at(2026, 3, 1)
    days = Validity(kind="rolling", days=365)
    assert core.expires_at(days, at(2026, 3, 15, 23, 59), SHANGHAI) == at(2027, 3, 16)


def test_calendar_clearing_lapses_on_the_next_first_of_january_local_time() -> None:
    yearly = Validity(kind="calendar", years=1)
    # 次年1月1日清零: earned any day of 2026, gone at 2027-01-01 00:00 in Shanghai.
    assert core.expires_at(yearly, at(2026, 1, 1, 0, 0), SHANGHAI) == at(2027, 1, 1)
    assert core.expires_at(yearly, at(2026, 12, 31, 23, 59), SHANGHAI) == at(2027, 1, 1)
    # 2026-12-31 17:00 UTC is already 2027 in Shanghai.
    late = datetime(2026, 12, 31, 17, 0, tzinfo=UTC)
    assert core.expires_at(yearly, late, SHANGHAI) == at(2028, 1, 1)
    assert core.expires_at(Validity(kind="never"), late, SHANGHAI) is None


def test_validity_by_tier_as_the_documents_give_it() -> None:
    # 普通自然年, 银卡18个月, 金卡及以上长期有效
    policy = ExpiryPolicy(
        by_tier={
            "普通": Validity(kind="calendar"),
            "银卡": Validity(kind="rolling", months=18),
            "金卡": Validity(kind="never"),
            "钻石": Validity(kind="never"),
        }
    )
    earned = at(2026, 5, 10, 12)

    def lapse(tier: str | None) -> datetime | None:
        validity = core.validity_for(policy, default_days=365, tier=tier)
        return core.expires_at(validity, earned, SHANGHAI)

    assert lapse("普通") == at(2027, 1, 1)
    assert lapse("银卡") == at(2027, 11, 11)
    assert lapse("金卡") is None and lapse("钻石") is None
    assert lapse(None) == at(2027, 5, 11)  # no tier: the programme's 365 days
    assert core.validity_for(ExpiryPolicy(), default_days=None, tier=None).kind == "never"


def test_a_validity_says_what_it_means() -> None:
    with pytest.raises(ValueError, match="exactly one of months and days"):
        Validity(kind="rolling")
    with pytest.raises(ValueError, match="rolling validity only"):
        Validity(kind="calendar", months=3)


def test_dormancy_starts_twelve_months_after_the_last_activity_and_decays_monthly() -> None:
    rule = Dormancy(after_months=12, decay_pct=10)
    last = at(2026, 2, 10, 8)
    assert core.dormancy_state(rule, last_activity=last, now=at(2027, 2, 10, 7), zone=SHANGHAI) == (
        core.DormancyState(at(2027, 2, 10, 8), 0)
    )
    assert core.dormancy_state(rule, last_activity=last, now=at(2027, 2, 10, 8), zone=SHANGHAI)
    assert (
        core.dormancy_state(
            rule, last_activity=last, now=at(2027, 2, 10, 8), zone=SHANGHAI
        ).decays_due
        == 1
    )
    assert (
        core.dormancy_state(rule, last_activity=last, now=at(2027, 5, 9), zone=SHANGHAI).decays_due
        == 3
    )
    assert (
        core.dormancy_state(
            rule, last_activity=last, now=at(2027, 5, 10, 9), zone=SHANGHAI
        ).decays_due
        == 4
    )
    # 每月递减10%: 1,000 → 900 → 810 → 729; a small balance still decays.
    left = 1000
    for expected in (900, 810, 729):
        left -= core.decay_amount(left, 10)
        assert left == expected
    assert core.decay_amount(5, 10) == 1
    assert core.decay_amount(0, 10) == 0


@given(
    last=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)),  # noqa: DTZ001
    later_days=st.integers(min_value=0, max_value=2000),
    months=st.integers(min_value=1, max_value=24),
)
def test_decays_due_never_fall_as_time_passes(last: datetime, later_days: int, months: int) -> None:
    rule = Dormancy(after_months=months, decay_pct=10)
    start = last.replace(tzinfo=UTC)
    now = start + timedelta(days=later_days)
    one = core.dormancy_state(rule, last_activity=start, now=now, zone=SHANGHAI)
    two = core.dormancy_state(rule, last_activity=start, now=now + timedelta(days=1), zone=SHANGHAI)
    assert 0 <= one.decays_due <= two.decays_due <= one.decays_due + 1
    assert (one.decays_due > 0) == (now >= one.dormant_from)


def test_reminders_fall_due_on_the_days_before_each_expiry_date_and_stay_due_until_it() -> None:
    lapse = at(2027, 1, 1)
    days = [90, 30]
    assert core.reminders_due([lapse], now=at(2026, 10, 2, 23), days_before=days) == []
    assert core.reminders_due([lapse], now=at(2026, 10, 3, 10), days_before=days) == [(lapse, 90)]
    # a run that missed the day catches up (the caller sends each reminder once)
    assert core.reminders_due([lapse], now=at(2026, 10, 4, 10), days_before=days) == [(lapse, 90)]
    assert core.reminders_due([lapse], now=at(2026, 12, 2, 10), days_before=days) == [(lapse, 30)]
    # only the latest reminder day that has come: a 90-day reminder missed is not sent late
    assert core.reminders_due([lapse], now=at(2026, 12, 31, 23), days_before=days) == [(lapse, 30)]
    assert core.reminders_due([lapse], now=lapse, days_before=days) == []
    # 10月1日起: year-end clearing is announced from 1 October.
    assert core.year_end_reminder_due("10-01", now=at(2026, 9, 30, 23), zone=SHANGHAI) is None
    assert core.year_end_reminder_due("10-01", now=at(2026, 10, 1, 0, 5), zone=SHANGHAI) == 2026


@given(day=st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)), n=st.integers(0, 60))
def test_add_months_lands_in_the_right_month(day: date, n: int) -> None:
    moved = core.add_months(day, n)
    assert (moved.year * 12 + moved.month) - (day.year * 12 + day.month) == n
    assert moved.day <= day.day
