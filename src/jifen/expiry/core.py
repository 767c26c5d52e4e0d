"""Expiry dates, dormancy and reminders, as pure functions of a lot, a policy and the time.

Nothing here reads the clock or a database: the service passes the programme's time zone and
"now", so a test can walk through two years of schedules in a second.
"""

from __future__ import annotations

import calendar
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from jifen.expiry.schemas import Dormancy, ExpiryPolicy, Validity


def add_months(day: date, months: int) -> date:
    """The same day ``months`` later, or the last day of that month when it is shorter."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), tzinfo=zone)


def validity_for(policy: ExpiryPolicy, *, default_days: int | None, tier: str | None) -> Validity:
    """The validity a new lot of a member of ``tier`` gets under ``policy``."""
    if tier is not None and tier in policy.by_tier:
        return policy.by_tier[tier]
    if policy.validity is not None:
        return policy.validity
    if default_days is None:
        return _NEVER
    return _rolling(default_days)


_NEVER = Validity(kind="never")


@functools.lru_cache(maxsize=64)
def _rolling(days: int) -> Validity:
    """(One shared, never changed, instead of a model built for every lot.)"""
    return Validity(kind="rolling", days=days)


def expires_at(validity: Validity, start: datetime, zone: ZoneInfo) -> datetime | None:
    """When a lot whose points become usable at ``start`` lapses: a whole day of the
    programme (the midnight that ends it), so two twins of one request agree; ``None`` for
    points that never lapse."""
    day = start.astimezone(zone).date()
    if validity.kind == "never":
        return None
    if validity.kind == "calendar":
        return _midnight(date(day.year + validity.years, 1, 1), zone)
    if validity.months is not None:
        return _midnight(add_months(day, validity.months) + timedelta(days=1), zone)
    assert validity.days is not None
    return _midnight(day + timedelta(days=validity.days + 1), zone)


def later_of(current: datetime | None, proposed: datetime | None) -> datetime | None:
    """A lot's date after a tier change that may only extend it (``None`` is forever)."""
    if current is None or proposed is None:
        return None
    return max(current, proposed)


# --------------------------------------------------------------------------- dormancy


@dataclass(frozen=True, slots=True)
class DormancyState:
    dormant_from: datetime
    """When the member became (or will become) dormant: ``after_months`` after its last
    activity."""
    decays_due: int
    """How many monthly decays are due by now (0 while the member is active): the first at
    ``dormant_from``, then one a month."""


def dormancy_state(
    rule: Dormancy, *, last_activity: datetime, now: datetime, zone: ZoneInfo
) -> DormancyState:
    local = last_activity.astimezone(zone)
    clock = local.timetz().replace(tzinfo=None)

    def month(k: int) -> datetime:
        return datetime.combine(add_months(local.date(), rule.after_months + k), clock, zone)

    dormant_from = month(0)
    if now < dormant_from:
        return DormancyState(dormant_from, 0)
    today = now.astimezone(zone)
    k = (today.year - dormant_from.year) * 12 + today.month - dormant_from.month
    while month(k) > now:
        k -= 1
    return DormancyState(dormant_from, k + 1)


def decay_amount(available: int, pct: int) -> int:
    """What one month of dormancy holds back: ``pct`` % of what is available, rounded down,
    and at least one point while any is left (so a small balance also decays)."""
    if available <= 0:
        return 0
    return max(1, available * pct // 100)


# --------------------------------------------------------------------------- reminders


def reminders_due(
    expiry_dates: Iterable[datetime], *, now: datetime, days_before: Iterable[int]
) -> list[tuple[datetime, int]]:
    """(expiry date, offset) pairs whose reminder is due at ``now``: for each date not yet
    reached, the latest of its reminder days (``offset`` days before it) that has come. A
    run that missed that day catches up at its next run; the caller sends each pair once
    (and a reminder day passed since is no reason to send an earlier one)."""
    due = []
    for when in sorted(set(expiry_dates)):
        passed = [offset for offset in days_before if when - timedelta(days=offset) <= now]
        if passed and now < when:
            due.append((when, min(passed)))
    return due


def year_end_reminder_due(year_end_from: str, *, now: datetime, zone: ZoneInfo) -> int | None:
    """The year whose clearing members should hear of now (from ``MM-DD`` to the year's
    end), or ``None`` before that day."""
    local = now.astimezone(zone)
    month, day = (int(part) for part in year_end_from.split("-"))
    if (local.month, local.day) >= (month, day):
        return local.year
    return None
