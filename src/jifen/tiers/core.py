"""The pure rules of tiers by score: a score from its parts, the tier a score reaches, what
an evaluation or an earning does to a member's tier, temporary upgrades and their end, the
tier a member held at an earlier moment, and when the scheduled evaluations fall.

Plain Python: the scheme, the member's standing, its score and the time come in, a decision
comes out. The rules, in short:

- a member moves **up** to the best tier its score reaches: at once when the scheme says
  ``upgrade_at_once``, otherwise at the next evaluation;
- a member moves **down** only at evaluation, and only when its score is below the retention
  line of the tier it holds; it then goes to the tier its score reaches;
- during a campaign, a score over the campaign that reaches ``share`` times a higher tier's
  threshold gives that tier for some months (a temporary upgrade); when it ends, the member
  goes back to the tier its evaluations gave it (``base_tier``), which evaluations during
  the upgrade keep moving.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Literal
from zoneinfo import ZoneInfo

from jifen.errors import StateConflict, TierNotDefined
from jifen.tiers.schemas import Schedule, ScoreParts, TemporaryUpgrade, TierLevel, TierScheme

Kind = Literal["evaluation", "upgrade", "temporary", "temporary_end", "manual"]

DEFAULT_ZONE = ZoneInfo("Asia/Shanghai")
"""A programme's time zone unless it names another (``programs.schemas``): the calendar
months of score windows and temporary upgrades are counted in it."""


@dataclass(frozen=True, slots=True)
class ScoreFacts:
    """What a member did in the window the score counts over."""

    spend_fen: int = 0
    """Money paid for orders, less what their refunds gave back (a refund counts in the
    window of the order it refunds)."""
    earned_points: int = 0
    """Points earned, less what was clawed back of them (a claw-back counts in the window
    of the earning it takes back)."""
    activity: int = 0
    """Events of the activity part's types."""


@dataclass(frozen=True, slots=True)
class Standing:
    """A member's tier as stored."""

    tier: str | None
    """The tier the member holds now (what rules and pricing read)."""
    base_tier: str | None = None
    """While a temporary upgrade lasts: the tier its evaluations give it."""
    temporary_until: datetime | None = None

    @property
    def temporary(self) -> bool:
        return self.temporary_until is not None

    @property
    def earned_tier(self) -> str | None:
        """The tier the member holds by its score, temporary upgrades aside."""
        return self.base_tier if self.temporary else self.tier


@dataclass(frozen=True, slots=True)
class Decision:
    """A member's standing after a decision, and why."""

    standing: Standing
    kind: Kind
    reason: str
    own: Decision | None = None
    """When the decision lends a tier: the change of the member's own tier it made first (a
    tier made its own, a new tier to return to), recorded before the lending."""


# --------------------------------------------------------------------------- scores


def _part(amount: int, per: int, score: int, weight_pct: int) -> int:
    # Whole blocks only (每满1000元): 999 yuan of a 1,000-yuan block counts nothing.
    return max(amount, 0) // per * score * weight_pct


def score(parts: ScoreParts, facts: ScoreFacts) -> int:
    """The tier score of ``facts``: the weighted sum of the parts, rounded down (the parts
    are summed in hundredths of a point, so the sum is exact)."""
    total = 0
    if parts.spend is not None:
        spend = parts.spend
        total += _part(facts.spend_fen, spend.per_yuan * 100, spend.score, spend.weight_pct)
    if parts.earned is not None:
        earned = parts.earned
        total += _part(facts.earned_points, earned.per_points, earned.score, earned.weight_pct)
    if parts.activity is not None:
        activity = parts.activity
        total += _part(facts.activity, activity.per_events, activity.score, activity.weight_pct)
    return total // 100


def rank(scheme: TierScheme, tier: str | None) -> int:
    """The tier's place among the scheme's levels (0: entry); -1 for no tier or one the
    scheme does not name."""
    for index, level in enumerate(scheme.levels):
        if level.tier == tier:
            return index
    return -1


def reached(scheme: TierScheme, value: int) -> TierLevel:
    """The best tier whose range ``value`` is in."""
    best = scheme.levels[0]
    for level in scheme.levels:
        if value >= level.min_score:
            best = level
    return best


def retention_line(level: TierLevel) -> int:
    return level.min_score if level.retention is None else level.retention


# --------------------------------------------------------------------------- decisions


def earned_tier(
    scheme: TierScheme, held: str | None, value: int, *, evaluation: bool
) -> tuple[str, Kind, str] | None:
    """Where ``value`` takes a member holding ``held`` (by its score), and why; None: it
    stays. Outside evaluation a member only moves up, and only with ``upgrade_at_once``."""
    target = reached(scheme, value)
    held_rank, target_rank = rank(scheme, held), rank(scheme, target.tier)
    kind: Kind = "evaluation" if evaluation else "upgrade"
    if target_rank > held_rank:
        if not evaluation and (not scheme.upgrade_at_once or target_rank == 0):
            # Outside evaluation the entry tier is not worth a change of its own.
            return None
        return target.tier, kind, f"score {value} reaches {target.tier} (from {target.min_score})"
    if target_rank < held_rank and evaluation:
        level = scheme.levels[held_rank]
        line = retention_line(level)
        if value < line:
            return (
                target.tier,
                kind,
                f"score {value} is below {level.tier}'s retention line {line}",
            )
    return None


def active_campaign(scheme: TierScheme, now: datetime) -> TemporaryUpgrade | None:
    """The campaign of temporary upgrades running at ``now`` (the first, if several)."""
    for campaign in scheme.temporary_upgrades:
        if campaign.starts_at <= now < campaign.ends_at:
            return campaign
    return None


def temporary_target(
    scheme: TierScheme, shown: str | None, campaign: TemporaryUpgrade, campaign_score: int
) -> TierLevel | None:
    """The best tier above ``shown`` whose threshold ``campaign_score`` passes by the
    campaign's share; None when there is none."""
    best = None
    for level in scheme.levels[rank(scheme, shown) + 1 :]:
        if level.min_score > 0 and campaign_score >= level.min_score * campaign.share:
            best = level
    return best


def decide(
    scheme: TierScheme,
    standing: Standing,
    value: int,
    *,
    now: datetime,
    evaluation: bool,
    campaign_score: int | None = None,
    zone: ZoneInfo = DEFAULT_ZONE,
) -> Decision | None:
    """What an evaluation (``evaluation``) or an earning does to ``standing`` given the
    member's score ``value`` and, during a campaign, its score over the campaign. None:
    nothing changes. A temporary upgrade lasts its months on the calendar of ``zone``, the
    programme's."""
    held = standing.earned_tier
    moved = earned_tier(scheme, held, value, evaluation=evaluation)
    base = moved[0] if moved is not None else held
    result: Decision | None = None
    if standing.temporary and rank(scheme, base) < rank(scheme, standing.tier):
        if base != standing.base_tier:
            # The member keeps its temporary tier; it will go back to this one instead: a
            # change of its own tier, recorded as such (its points take this tier's validity).
            result = Decision(
                Standing(standing.tier, base, standing.temporary_until),
                moved[1] if moved else "evaluation",
                f"the tier to return to is now {base}" + (f": {moved[2]}" if moved else ""),
            )
    elif moved is not None:
        result = Decision(Standing(base), moved[1], moved[2])
    elif standing.temporary and rank(scheme, base) >= rank(scheme, standing.tier):
        # Its score now holds what the campaign lent it: the tier is its own.
        result = Decision(
            Standing(base),
            "evaluation" if evaluation else "upgrade",
            f"score {value} holds {base} without the temporary upgrade",
        )
    if result is not None and made_own(standing, result.standing):
        # The tier code stays, but the member's standing changes: recorded as a change of
        # its own (its points take the tier's validity, as a member reaching it does).
        result = Decision(
            result.standing,
            result.kind,
            f"temporary {standing.tier} is the member's own now: {result.reason}",
        )
    campaign = active_campaign(scheme, now)
    if campaign is not None and campaign_score is not None:
        current = result.standing if result is not None else standing
        target = temporary_target(scheme, current.tier, campaign, campaign_score)
        if target is not None:
            until = add_local_months(now, campaign.months, zone)
            # A member with no tier yet (as each is at registration) goes back to the entry
            # tier: outside an evaluation its score gives it no other.
            returns_to = current.earned_tier or scheme.levels[0].tier
            return Decision(
                Standing(target.tier, returns_to, until),
                "temporary",
                f"{campaign.name}: campaign score {campaign_score} reaches "
                f"{campaign.share} × {target.tier}'s {target.min_score}; until "
                f"{until.isoformat()}",
                own=result,
            )
    return result


def made_own(before: Standing, after: Standing) -> bool:
    """Whether ``after`` makes the tier ``before`` held temporarily the member's own: the
    same tier, no longer lent."""
    return before.temporary and not after.temporary and after.tier == before.tier


def end_temporary(standing: Standing, now: datetime, entry: str) -> Decision | None:
    """The end of a temporary upgrade that is due: back to the tier evaluations gave, or to
    the ``entry`` tier when they gave none (an upgrade lent before any evaluation)."""
    if standing.temporary_until is None or standing.temporary_until > now:
        return None
    return Decision(
        Standing(standing.base_tier or entry),
        "temporary_end",
        f"temporary {standing.tier} ended at {standing.temporary_until.isoformat()}",
    )


# --------------------------------------------------------------------------- tier at a moment


@dataclass(frozen=True, slots=True)
class TierChange:
    """A recorded change of a member's tier: ``to_tier`` holds from ``at`` on."""

    at: datetime
    from_tier: str | None
    """None: the member had no tier."""
    to_tier: str


@dataclass(frozen=True, slots=True)
class TierTimeline:
    """A member's tier now and the changes recorded after some moment, in the order they
    were made: enough to tell the tier the member held at that moment or any later one."""

    current: str | None
    later: tuple[TierChange, ...] = ()

    def at(self, moment: datetime) -> str | None:
        """The tier held at ``moment`` (no earlier than the moment the changes were read
        after). A change counts from its own time on, so this is the tier the first change
        after ``moment`` changed from; the current tier when none came after. Walking back
        from the current tier, rather than forward from the changes before ``moment``,
        answers members whose tier was stored before changes were recorded, and reads no
        change at all for members whose tier has not changed since ``moment``."""
        for change in self.later:
            if change.at > moment:
                return change.from_tier
        return self.current


# --------------------------------------------------------------------------- time


def add_months(moment: datetime, months: int) -> datetime:
    """``moment`` moved by ``months`` calendar months (the day clamped to the month's end),
    on the calendar and wall clock of the zone ``moment`` carries."""
    total = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(total, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def add_local_months(moment: datetime, months: int, zone: ZoneInfo) -> datetime:
    """``moment`` moved by ``months`` calendar months of ``zone`` (the programme's: 1 July
    00:00 in Shanghai less three months is 1 April 00:00 there, not 31 March 16:00 UTC
    less three months), in UTC."""
    return add_months(moment.astimezone(zone), months).astimezone(UTC)


_PERIOD_MONTHS = {"monthly": 1, "quarterly": 3, "half_yearly": 6, "yearly": 12}


def _period_start(schedule: Schedule, moment: datetime, zone: ZoneInfo) -> datetime:
    """The start of the month, quarter, half-year or year ``moment`` is in, in ``zone``."""
    step = _PERIOD_MONTHS[schedule]
    local = moment.astimezone(zone)
    return datetime(local.year, (local.month - 1) // step * step + 1, 1, tzinfo=zone)


def last_evaluation_at(schedule: Schedule, at: datetime, zone: ZoneInfo) -> datetime:
    """The latest scheduled evaluation at or before ``at``: the start of the month, quarter,
    half-year or year it is in, in the programme's time zone, in UTC."""
    return _period_start(schedule, at, zone).astimezone(UTC)


def next_evaluation_at(schedule: Schedule, after: datetime, zone: ZoneInfo) -> datetime:
    """The first scheduled evaluation strictly after ``after``: the start of a month,
    quarter, half-year or year in the programme's time zone, in UTC."""
    start = _period_start(schedule, after, zone)
    while start <= after:
        start = add_months(start, _PERIOD_MONTHS[schedule])
    return start.astimezone(UTC)


def day_start(day: date, zone: ZoneInfo) -> datetime:
    """The first instant of ``day`` in ``zone``, in UTC: its midnight, or, on a day whose
    midnight the clocks skip (a change to summer time at 00:00), the instant they skip to."""
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


def window_start(scheme: TierScheme, now: datetime, zone: ZoneInfo = DEFAULT_ZONE) -> datetime:
    """Where the score's window starts for an evaluation at ``now``: ``window_months``
    calendar months earlier in ``zone``, the programme's, in UTC. An evaluation at the
    first instant of a day whose midnight was skipped (01:00 there) counts from the first
    instant of the day as many months before, as one at midnight would: the window joins
    the one before it."""
    local = now.astimezone(zone)
    if local.time() != time() and now == day_start(local.date(), zone):
        return day_start(add_months(local, -scheme.window_months).date(), zone)
    return add_local_months(now, -scheme.window_months, zone)


def require_defined(
    named: Mapping[str, Iterable[str]],
    known: list[str],
    kept: Mapping[str, Iterable[str]] | None = None,
) -> None:
    """Refuse a tier code named in a policy, a rule, the caps or a reward that is not one of
    ``known``, the programme's tier codes: stored, it would never match a member. ``named``
    maps where the codes were found (``expiry.by_tier``) to them; ``kept`` maps a place to
    the codes already stored there, which are not checked again (a change made for another
    reason is not held up by tiers changed since). A programme with no tiers yet has none to
    name."""
    for where, codes in named.items():
        allowed = set(known) | set((kept or {}).get(where, ()))
        for code in codes:
            if code not in allowed:
                raise TierNotDefined(
                    field=where, tier=code, known=", ".join(known) or "(none defined yet)",
                    known_zh="、".join(known) or "(尚未定义任何等级)",
                )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Naming:
    """Something stored that names tiers (a rule version, the caps, the settings, a
    reward): what it is and where in it the codes are, and what would make it stop naming
    them, in English and Chinese."""

    what: str
    """``rule spend-x (version 3)``"""
    what_zh: str
    place: str
    """``params.by_tier``"""
    tiers: tuple[str, ...]
    fix: str
    fix_zh: str


def namings(
    what: str, what_zh: str, named: Mapping[str, Iterable[str]], fix: str, fix_zh: str
) -> list[Naming]:
    """A :class:`Naming` of ``what`` for each place of ``named`` that names a tier."""
    return [
        Naming(what, what_zh, place, tuple(codes), fix, fix_zh)
        for place, codes in named.items()
        if codes
    ]


SHOWN = 5
"""The most namings a refusal to remove a tier lists."""


def require_unnamed(removed: Iterable[str], stored: Iterable[Naming]) -> None:
    """Refuse removing any of ``removed`` (in that order) that one of ``stored`` names:
    what names it would silently apply to no member. The refusal lists what names the
    first such tier (up to :data:`SHOWN` of them), each with how to stop it naming it."""
    stored = list(stored)
    for code in removed:
        naming = [n for n in stored if code in n.tiers]
        if not naming:
            continue
        shown, more = naming[:SHOWN], len(naming) - SHOWN
        places = "; ".join(f"{n.what} names {code} in {n.place} ({n.fix})" for n in shown)
        places_zh = ";".join(f"{n.what_zh}的 {n.place} 引用了 {code}({n.fix_zh})" for n in shown)
        raise StateConflict(
            problem=f"Tier {code!r} is still named, and would apply to no member there once "
            f"removed: {places}{f'; and {more} more' if more > 0 else ''}. Change these "
            "first, then remove the tier.",
            problem_zh=f"等级 {code!r} 仍被引用,删除后这些设置将不适用于任何会员:{places_zh}"
            f"{f';另有 {more} 处' if more > 0 else ''}。请先修改这些设置,再删除该等级。",
        )
