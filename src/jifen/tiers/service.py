"""Tier use cases: a programme's tiers; each member's current tier, set by staff or moved by
its score; evaluation of members chunk by chunk; upgrades as soon as an earning crosses a
threshold; temporary upgrades and their end; the record of every change; and the benefits
matrix that rules and pricing read.

For the job runner, one chunk at a time, each in its own transaction::

    ids = member_ids_page(uow, program_id=p, after_member_id=last, limit=1000)
    report = evaluate(uow, program_id=p, member_ids=ids, now=now, reason="2027-Q1")
    # ... until ids is empty; and, as often as wanted:
    ended = end_temporary(uow, program_id=p, now=now, limit=1000)  # until it returns 0

An evaluation reads a chunk's facts with three grouped queries (the members' tiers, their
orders and activity, their earnings) and writes only the members whose tier changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Select, bindparam, delete, select

from jifen.db import bulk
from jifen.db.bulk import among, among_bound
from jifen.db.uow import UnitOfWork
from jifen.db.upsert import upsert
from jifen.errors import InvalidInput, StateConflict, UnknownTier
from jifen.members import service as members_service
from jifen.members.models import members
from jifen.notify import service as notify_service
from jifen.notify.service import Notification
from jifen.points import service as points_service
from jifen.programs import service as programs_service
from jifen.programs.schemas import ProgramSettings
from jifen.rewards.schemas import RedemptionPolicy
from jifen.tiers import core
from jifen.tiers.models import member_tiers, tier_changes, tiers
from jifen.tiers.schemas import (
    EvaluationReport,
    MemberEvaluation,
    MemberTierRead,
    ScoreRead,
    TierChangeRead,
    TierDef,
    TierRead,
    TierScheme,
)

__all__ = [
    "after_earning",
    "birthday_gifts",
    "dry_run",
    "early_access",
    "earning_terms",
    "end_temporary",
    "evaluate",
    "evaluate_member",
    "history",
    "last_evaluation_at",
    "list_tiers",
    "member_ids_page",
    "member_tier",
    "moves_on_earning",
    "redemption_policy",
    "require_defined",
    "require_tiers",
    "require_unnamed",
    "scheme_of",
    "scored_event_types",
    "set_member_tier",
    "set_tiers",
    "settings_with_scheme",
    "tier_timelines",
    "tiers_at",
    "tiers_of",
]

EVALUATOR = "tiers"
"""The actor of scheduled evaluations and of upgrades made by earnings."""


def list_tiers(uow: UnitOfWork, *, program_id: int) -> list[TierRead]:
    rows = uow.conn.execute(_TIERS, {"program": program_id}).all()
    return [TierRead(code=r.code, name=r.name, rank=r.rank) for r in rows]


_TIERS = (
    select(tiers.c.code, tiers.c.name, tiers.c.rank)
    .where(tiers.c.program_id == bindparam("program"))
    .order_by(tiers.c.rank)
)


def set_tiers(
    uow: UnitOfWork, *, program_id: int, definitions: list[TierDef], check_named: bool = True
) -> list[TierRead]:
    """Replace the programme's tiers. A tier that members hold, that a temporary upgrade
    returns a member to when it ends, or that a rule, the caps, the settings or a reward
    names (:func:`require_unnamed`) cannot be removed; nor can the tiers stop being the
    levels of the programme's tier scheme, in rank order. A tier's name may change. With
    ``check_named`` False the caller calls :func:`require_unnamed` itself, once what it
    replaces in the same transaction is in place (a rule pack's rules and caps)."""
    codes = [d.code for d in definitions]
    ranks = [d.rank for d in definitions]
    if len(set(codes)) != len(codes) or len(set(ranks)) != len(ranks):
        raise InvalidInput(
            field="tiers",
            problem="each tier needs its own code and its own rank",
            problem_zh="每个等级的代码和级别都不能与其他等级重复",
        )
    held = uow.conn.execute(
        select(member_tiers.c.tier_code)
        .where(member_tiers.c.program_id == program_id, member_tiers.c.tier_code.not_in(codes))
        .limit(1)
    ).scalar_one_or_none()
    if held is not None:
        raise StateConflict(
            problem=f"Members hold tier {held!r}; move them to another tier before removing it.",
            problem_zh=f"仍有会员处于等级 {held!r};请先调整这些会员的等级再删除。",
        )
    returned_to = uow.conn.execute(
        select(member_tiers.c.base_tier_code)
        .where(
            member_tiers.c.program_id == program_id,
            member_tiers.c.temporary_until.is_not(None),
            member_tiers.c.base_tier_code.not_in(codes),
        )
        .limit(1)
    ).scalar_one_or_none()
    if returned_to is not None:
        raise StateConflict(
            problem=f"Members on a temporary upgrade return to tier {returned_to!r} when it "
            "ends; set their tier by hand, or wait for the upgrades to end, before removing it.",
            problem_zh=f"仍有临时升级的会员到期后将回到等级 {returned_to!r};请先手动设置这些会员"
            "的等级或等临时升级结束,再删除该等级。",
        )
    scheme = scheme_of(uow, program_id=program_id)
    ordered = [d.code for d in sorted(definitions, key=lambda d: d.rank)]
    if scheme is not None and ordered != [level.tier for level in scheme.levels]:
        named = ", ".join(level.tier for level in scheme.levels)
        raise StateConflict(
            problem=f"The programme's tier scheme ranks its members into {named}, in that "
            f"order; these tiers ({', '.join(ordered)}) would leave it stopping every "
            "evaluation. Keep those codes in that rank order (names may change), or set the "
            "tier scheme to none first and give the new one after.",
            problem_zh=f"本计划的等级方案按 {named} 的顺序评定会员;这些等级"
            f"({', '.join(ordered)})将使每次评定都无法进行。请保持这些代码及其级别顺序"
            "(名称可改),或先将等级方案设为空,改好等级后再设新方案。",
        )
    if check_named:
        removed = [t.code for t in list_tiers(uow, program_id=program_id) if t.code not in codes]
        require_unnamed(uow, program_id=program_id, removed=removed)
    uow.conn.execute(delete(tiers).where(tiers.c.program_id == program_id))
    uow.conn.execute(
        tiers.insert(),
        [
            {"program_id": program_id, "code": d.code, "name": d.name, "rank": d.rank}
            for d in definitions
        ],
    )
    uow.local.pop(f"tier_codes:{program_id}", None)
    return list_tiers(uow, program_id=program_id)


def require_unnamed(uow: UnitOfWork, *, program_id: int, removed: Sequence[str]) -> None:
    """Refuse removing any of the ``removed`` tiers while something stored still names it,
    which would then silently apply to no member: a rule version that is or may still go
    live (:func:`jifen.rules.service.tier_namings`), the earning caps, the programme's
    settings, or a reward not retired. StateConflict, saying what names it and how to
    change that. (The tier scheme's levels and benefits matrix are held by the scheme's
    own check in :func:`set_tiers`.)"""
    if not removed:
        return
    # Rules and rewards read the tiers through this module: imported here, not above.
    from jifen.rewards import service as rewards_service
    from jifen.rules import service as rules_service

    core.require_unnamed(
        removed,
        [
            *rules_service.tier_namings(uow, program_id=program_id),
            *programs_service.tier_namings(uow, program_id=program_id),
            *rewards_service.tier_namings(uow, program_id=program_id),
        ],
    )


def set_member_tier(
    uow: UnitOfWork, *, program_id: int, member_id: int, tier: str, reason: str, set_by: str
) -> MemberTierRead:
    """Put the member in ``tier`` from now on (ending any temporary upgrade); recorded as a
    manual change, also when it makes a lent tier the member's own (its points take the
    tier's validity, as when an evaluation does)."""
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    require_tiers(uow, program_id=program_id, codes=[tier])
    members_service.lock_members(uow, member_ids=[member_id])
    if members_service.closed_ids(uow, member_ids=[member_id]):
        raise StateConflict(
            problem=f"Member {member_id} is closed: its tier is not changed any more.",
            problem_zh=f"会员 {member_id} 已注销,不能再变更其等级。",
        )
    before = _standings(uow, [member_id]).get(member_id, core.Standing(None))
    now = uow.clock.now()
    upsert(
        uow,
        member_tiers,
        {
            "member_id": member_id,
            "program_id": program_id,
            "tier_code": tier,
            "since": now,
            "reason": reason,
            "set_by": set_by,
            "base_tier_code": None,
            "temporary_until": None,
        },
    )
    if before.tier != tier or core.made_own(before, core.Standing(tier)):
        _record(
            uow,
            program_id,
            [(member_id, before.tier, tier, None, "manual", reason or "set by hand", None)],
            now,
            set_by,
        )
    return MemberTierRead(member_id=member_id, tier=tier, since=now, reason=reason, set_by=set_by)


def require_tiers(uow: UnitOfWork, *, program_id: int, codes: Iterable[str]) -> None:
    """Refuse any of ``codes`` that is not a tier of the programme."""
    known = [t.code for t in list_tiers(uow, program_id=program_id)]
    for code in sorted(set(codes)):
        if code not in known:
            raise UnknownTier(tier=code, known=", ".join(known) or "(none defined)")


def require_defined(
    uow: UnitOfWork,
    *,
    program_id: int,
    named: Mapping[str, Iterable[str]],
    tiers: Iterable[str] | None = None,
    kept: Mapping[str, Iterable[str]] | None = None,
) -> None:
    """:func:`core.require_defined` against ``tiers``, the tiers the programme will have once
    the save is done: by default those it has (a rule pack passes its own)."""
    if tiers is None:
        tiers = [t.code for t in list_tiers(uow, program_id=program_id)]
    core.require_defined(named, list(tiers), kept)


def member_tier(uow: UnitOfWork, *, program_id: int, member_id: int) -> MemberTierRead:
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    row = uow.conn.execute(
        select(member_tiers).where(member_tiers.c.member_id == member_id)
    ).one_or_none()
    if row is None:
        return MemberTierRead(member_id=member_id, tier=None)
    return MemberTierRead(
        member_id=member_id,
        tier=row.tier_code,
        since=row.since,
        reason=row.reason,
        set_by=row.set_by,
        temporary_until=row.temporary_until,
        returns_to=row.base_tier_code if row.temporary_until is not None else None,
    )


def tiers_of(uow: UnitOfWork, *, member_ids: Iterable[int]) -> dict[int, str]:
    """The current tier of each of ``member_ids`` that has one."""
    ids = sorted(set(member_ids))
    if not ids:
        return {}
    rows = uow.conn.execute(
        select(member_tiers.c.member_id, member_tiers.c.tier_code).where(
            among(uow.dialect, member_tiers.c.member_id, ids)
        )
    ).all()
    return {r.member_id: r.tier_code for r in rows}


def tier_timelines(
    uow: UnitOfWork, *, since: Mapping[int, datetime]
) -> dict[int, core.TierTimeline]:
    """For each member of ``since``, what tells its tier at its moment there or any later
    one (:meth:`core.TierTimeline.at`): its current tier and the changes recorded after.

    One query reads the current tiers with the time each was last written; a second reads
    the changes, and only of the members whose tier was written after their moment (every
    recorded change writes the stored tier at the change's time, so a tier written no later
    than the moment has had no change since). Members asked about at the present time
    therefore cost the one query :func:`tiers_of` costs."""
    ids = sorted(since)
    if not ids:
        return {}
    rows = uow.conn.execute(_current_tiers_query(uow.dialect), {"ids": ids}).all()
    current = {int(r.member_id): str(r.tier_code) for r in rows}
    moved = sorted(int(r.member_id) for r in rows if r.since > since[int(r.member_id)])
    later: dict[int, list[core.TierChange]] = {}
    if moved:
        for r in uow.conn.execute(
            select(
                tier_changes.c.member_id, tier_changes.c.at, tier_changes.c.from_tier,
                tier_changes.c.to_tier,
            )
            .where(
                among(uow.dialect, tier_changes.c.member_id, moved),
                tier_changes.c.at > min(since[m] for m in moved),
            )
            .order_by(tier_changes.c.member_id, tier_changes.c.at, tier_changes.c.id)
        ):  # fmt: skip
            later.setdefault(int(r.member_id), []).append(
                core.TierChange(r.at, r.from_tier, r.to_tier)
            )
    return {m: core.TierTimeline(current.get(m), tuple(later.get(m, ()))) for m in ids}


@cache
def _current_tiers_query(dialect: str) -> Select[Any]:
    """The members' current tiers with when each was written (every event reads them)."""
    return select(member_tiers.c.member_id, member_tiers.c.tier_code, member_tiers.c.since).where(
        among_bound(dialect, member_tiers.c.member_id, "ids")
    )


def tiers_at(uow: UnitOfWork, *, member_ids: Iterable[int], moment: datetime) -> dict[int, str]:
    """The tier each of ``member_ids`` held at ``moment``, for those that held one (a change
    made at ``moment`` counts: its tier begins then). A temporary upgrade counts from the
    change that gave it to the change that ended it, as the earnings of that time read it
    (past its ``temporary_until`` it lasts until the job ends it)."""
    timelines = tier_timelines(uow, since=dict.fromkeys(member_ids, moment))
    return {m: tier for m, timeline in timelines.items() if (tier := timeline.at(moment))}


# --------------------------------------------------------------------------- the scheme


def scheme_of(uow: UnitOfWork, *, program_id: int) -> TierScheme | None:
    """The programme's tier scheme (None: tiers are set by hand only)."""
    return programs_service.get_settings(uow, program_id=program_id).tier_scheme


def _levels_match(uow: UnitOfWork, program_id: int, scheme: TierScheme) -> bool:
    key = f"tier_codes:{program_id}"
    codes: list[str] | None = uow.local.get(key)
    if codes is None:
        codes = [t.code for t in list_tiers(uow, program_id=program_id)]
        uow.local[key] = codes
    return codes == [level.tier for level in scheme.levels]


def _require_levels_match(uow: UnitOfWork, program_id: int, scheme: TierScheme) -> None:
    if not _levels_match(uow, program_id, scheme):
        known = ", ".join(t.code for t in list_tiers(uow, program_id=program_id))
        named = ", ".join(level.tier for level in scheme.levels)
        raise InvalidInput(
            field="levels",
            problem=f"the levels ({named}) must be the programme's tiers in rank order "
            f"({known or 'none defined'})",
            problem_zh=f"分数区间({named})必须与本计划的等级按级别顺序一致"
            f"({known or '尚未定义等级'})",
        )


def require_scheme_fits(
    uow: UnitOfWork, *, program_id: int, scheme: TierScheme | None, current: TierScheme | None
) -> None:
    """Refuse ``scheme``, put in place of ``current``, when its levels are not the
    programme's tiers in rank order: installed, it would move no member at an earning and
    stop every evaluation. A scheme left as it is is not checked (settings changed for
    another reason are not held up by tiers changed since)."""
    if scheme is not None and scheme != current:
        _require_levels_match(uow, program_id, scheme)


def settings_with_scheme(
    uow: UnitOfWork, *, program_id: int, scheme: TierScheme | None
) -> ProgramSettings:
    """The programme's settings with ``scheme`` in place of its tier scheme, checked against
    the programme's tiers (what a request for approval carries)."""
    if scheme is not None:
        _require_levels_match(uow, program_id, scheme)
    settings = programs_service.get_settings(uow, program_id=program_id)
    return settings.model_copy(update={"tier_scheme": scheme})


def last_evaluation_at(uow: UnitOfWork, *, program_id: int, at: datetime) -> datetime | None:
    """When the latest scheduled evaluation at or before ``at`` fell (None: no scheme)."""
    scheme = scheme_of(uow, program_id=program_id)
    if scheme is None:
        return None
    return core.last_evaluation_at(scheme.schedule, at, _zone(uow, program_id))


def _zone(uow: UnitOfWork, program_id: int) -> ZoneInfo:
    """The programme's time zone: its calendar months count the score's window and the
    months of a temporary upgrade."""
    return ZoneInfo(programs_service.time_zone(uow, program_id=program_id))


# --------------------------------------------------------------------------- facts


def member_ids_page(
    uow: UnitOfWork,
    *,
    program_id: int,
    after_member_id: int = 0,
    limit: int | None = 1000,
    up_to_member_id: int | None = None,
) -> list[int]:
    """The next chunk of the programme's member ids (up to ``up_to_member_id``), in id
    order."""
    return members_service.ids_page(
        uow, program_id=program_id, after_id=after_member_id, limit=limit,
        up_to_id=up_to_member_id,
    )  # fmt: skip


def _facts(
    uow: UnitOfWork, scheme: TierScheme, ids: list[int], since: datetime, until: datetime
) -> dict[int, core.ScoreFacts]:
    """What the score of each member counts over (since, until]: two grouped queries."""
    from jifen.events import service as events_service  # events reads tiers for its facts

    parts = scheme.parts
    activity_types = parts.activity.event_types if parts.activity is not None else frozenset()
    spent: Mapping[int, tuple[int, int]] = {}
    if parts.spend is not None or parts.activity is not None:
        spent = events_service.spend_and_counts(
            uow, member_ids=ids, since=since, until=until, counted_types=activity_types
        )
    earned: Mapping[int, int] = {}
    if parts.earned is not None:
        earned = points_service.earned_by(uow, member_ids=ids, since=since, until=until)
    return {
        member_id: core.ScoreFacts(
            spend_fen=spent.get(member_id, (0, 0))[0],
            earned_points=earned.get(member_id, 0),
            activity=spent.get(member_id, (0, 0))[1],
        )
        for member_id in ids
    }


def _standings(uow: UnitOfWork, ids: Iterable[int]) -> dict[int, core.Standing]:
    return {member_id: standing for member_id, (standing, _) in _written(uow, ids).items()}


def _written(uow: UnitOfWork, ids: Iterable[int]) -> dict[int, tuple[core.Standing, datetime]]:
    """Each member's stored standing, and when its tier was last set."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = uow.conn.execute(
        select(
            member_tiers.c.member_id,
            member_tiers.c.tier_code,
            member_tiers.c.base_tier_code,
            member_tiers.c.temporary_until,
            member_tiers.c.since,
        ).where(among(uow.dialect, member_tiers.c.member_id, wanted))
    ).all()
    return {
        int(r.member_id): (
            core.Standing(
                r.tier_code,
                r.base_tier_code if r.temporary_until is not None else None,
                r.temporary_until,
            ),
            r.since,
        )
        for r in rows
    }


def _as_of(
    uow: UnitOfWork, ids: Iterable[int], now: datetime
) -> tuple[dict[int, core.Standing], set[int]]:
    """The members' stored standings, and those of them whose tier was set after ``now``: a
    decision taken after the moment an evaluation scores at (an upgrade at once, a tier set
    by staff, while a long run or one resumed after a crash reaches them) stands, as the
    score it is compared with no longer holds."""
    written = _written(uow, ids)
    standings = {member_id: standing for member_id, (standing, _) in written.items()}
    return standings, {member_id for member_id, (_, since) in written.items() if since > now}


# --------------------------------------------------------------------------- evaluation


_INSTANT = timedelta(microseconds=1)
"""The finest step of the stored times."""


@dataclass(frozen=True)
class _Move:
    member_id: int
    before: core.Standing
    decision: core.Decision
    score: int | None
    campaign_score: int | None = None
    """What a lending is recorded with (``score`` for the rest)."""


def evaluate(
    uow: UnitOfWork,
    *,
    program_id: int,
    member_ids: Iterable[int],
    now: datetime,
    reason: str = "",
    actor: str = EVALUATOR,
    dry_run: bool = False,
) -> EvaluationReport:
    """Evaluate a chunk of the programme's members (ids as :func:`member_ids_page` gives
    them) as of ``now``: up to the tier their score reaches, down when it is below their
    tier's retention line. A member whose tier was set after ``now`` is left as it is (and
    counted unchanged): its score as of ``now`` no longer holds. Writes only the members
    whose tier changes (nothing when ``dry_run``); each change is recorded with ``reason``
    and announced."""
    scheme = scheme_of(uow, program_id=program_id)
    if scheme is None:
        raise StateConflict(
            problem="This programme has no tier scheme; set one before evaluating tiers.",
            problem_zh="本计划尚未设置等级评定方案,请先设置再评定。",
        )
    _require_levels_match(uow, program_id, scheme)
    return _run(
        uow, program_id, scheme, sorted(set(member_ids)), now,
        evaluation=True, reason=reason, actor=actor, dry_run=dry_run,
    )  # fmt: skip


def moves_on_earning(uow: UnitOfWork, *, program_id: int, now: datetime) -> bool:
    """Whether an earning can move a member's tier at once (a scheme that upgrades at once,
    or a campaign of temporary upgrades running at ``now``)."""
    scheme = scheme_of(uow, program_id=program_id)
    return scheme is not None and (
        scheme.upgrade_at_once or core.active_campaign(scheme, now) is not None
    )


def scored_event_types(uow: UnitOfWork, *, program_id: int) -> frozenset[str]:
    """The types of event that count in the tier score by themselves, whatever they earn:
    a paid order (the spend part) and the activity part's types. Points count through
    the earnings."""
    scheme = scheme_of(uow, program_id=program_id)
    if scheme is None:
        return frozenset()
    parts = scheme.parts
    spend = {"order.paid"} if parts.spend is not None else set()
    activity = parts.activity.event_types if parts.activity is not None else frozenset()
    return frozenset(spend | activity)


def after_earning(
    uow: UnitOfWork, *, program_id: int, member_ids: Iterable[int], now: datetime
) -> None:
    """Move up members whose earning, order or activity (:func:`scored_event_types`) just
    took their score over a threshold, when the scheme upgrades at once or a campaign of
    temporary upgrades runs. Cheap when neither: the settings are read once a transaction
    already."""
    if not moves_on_earning(uow, program_id=program_id, now=now):
        return
    scheme = scheme_of(uow, program_id=program_id)
    assert scheme is not None
    if not _levels_match(uow, program_id, scheme):
        return  # a scheme that no longer fits the tiers must not refuse an earning
    _run(
        uow, program_id, scheme, sorted(set(member_ids)), now,
        evaluation=False, reason="", actor=EVALUATOR, dry_run=False,
    )  # fmt: skip


def _scores(
    uow: UnitOfWork, scheme: TierScheme, ids: list[int], since: datetime, until: datetime
) -> dict[int, int]:
    facts = _facts(uow, scheme, ids, since, until)
    return {member_id: core.score(scheme.parts, facts[member_id]) for member_id in ids}


def _run(
    uow: UnitOfWork,
    program_id: int,
    scheme: TierScheme,
    ids: list[int],
    now: datetime,
    *,
    evaluation: bool,
    reason: str,
    actor: str,
    dry_run: bool,
) -> EvaluationReport:
    report = EvaluationReport(evaluated=len(ids), last_member_id=ids[-1] if ids else None)
    if evaluation and ids:  # a closed account is done with: its tier moves no more
        closed = members_service.closed_ids(uow, member_ids=ids)
        ids = [member_id for member_id in ids if member_id not in closed]
        report.evaluated = len(ids)
    if not ids:
        return report
    zone = _zone(uow, program_id)
    values = _scores(uow, scheme, ids, core.window_start(scheme, now, zone), now)
    campaign = core.active_campaign(scheme, now)
    # The campaign runs from its first instant (core.active_campaign), where the score's
    # facts count after ``since``: an order paid as the sale opens is the campaign's.
    campaign_values = (
        _scores(uow, scheme, ids, campaign.starts_at - _INSTANT, now)
        if campaign is not None
        else {}
    )
    standings, later = _as_of(uow, ids, now)

    def decide(member_id: int, standing: core.Standing) -> core.Decision | None:
        return core.decide(
            scheme, standing, values[member_id], now=now, evaluation=evaluation,
            campaign_score=campaign_values.get(member_id), zone=zone,
        )  # fmt: skip

    moves: dict[int, core.Decision] = {}
    for member_id in ids:
        if member_id in later:
            continue  # its tier was set after ``now``: that later decision stands
        decision = decide(member_id, standings.get(member_id, core.Standing(None)))
        if decision is not None:
            moves[member_id] = decision
    if moves and not dry_run:
        # Hold the movers (in id order, as earnings do) and decide again on what is stored
        # now: an earning may have moved one of them since the read above.
        members_service.lock_members(uow, member_ids=moves)
        standings, later = _as_of(uow, moves, now)
        closed = members_service.closed_ids(uow, member_ids=moves) if evaluation else set()
        moves = {
            member_id: decision
            for member_id in sorted(moves)
            if member_id not in later
            and member_id not in closed
            and (decision := decide(member_id, standings.get(member_id, core.Standing(None))))
        }
    for member_id in ids:
        before = standings.get(member_id, core.Standing(None))
        decision = moves.get(member_id)
        if decision is None or decision.standing.tier == before.tier:
            report.unchanged += 1
        elif decision.kind == "temporary":
            report.temporary += 1
        elif core.rank(scheme, decision.standing.tier) > core.rank(scheme, before.tier):
            report.upgraded += 1
        else:
            report.downgraded += 1
    if not dry_run:
        report.changes = _apply(
            uow,
            program_id,
            [
                _Move(
                    m, standings.get(m, core.Standing(None)), d, values[m], campaign_values.get(m)
                )
                for m, d in moves.items()
            ],
            now,
            actor,
            reason,
        )
    return report


def _apply(
    uow: UnitOfWork,
    program_id: int,
    moves: list[_Move],
    now: datetime,
    actor: str,
    reason: str = "",
) -> list[TierChangeRead]:
    """Write the moves (one statement per kind of write) and record each change they make:
    a new tier, a temporary tier made the member's own (from and to the same tier), a new
    tier for a temporary upgrade to return to (the same), and, for a decision that also
    lends a tier, the change of the member's own tier first, then the lending."""
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    changes: list[_Change] = []
    for move in moves:
        after = move.decision.standing
        assert after.tier is not None, "a decision always names a tier"
        held = move.before.tier
        why = ""
        for step in (move.decision.own, move.decision):
            if step is None:
                continue
            why = "; ".join(part for part in (reason, step.reason) if part)
            to = step.standing
            assert to.tier is not None, "a decision always names a tier"
            score = move.campaign_score if step.kind == "temporary" else move.score
            returns_to = to.base_tier if to.temporary else None
            changes.append((move.member_id, held, to.tier, returns_to, step.kind, why, score))
            held = to.tier
        values = {
            "member_id": move.member_id,
            "base_tier_code": after.base_tier if after.temporary else None,
            "temporary_until": after.temporary_until,
            "tier_code": after.tier,
            "since": now,
            "reason": why,
            "set_by": actor,
        }
        (inserts if move.before.tier is None else updates).append(values)
    bulk.insert_many(uow.conn, member_tiers, [{**v, "program_id": program_id} for v in inserts])
    bulk.update_many(uow.conn, member_tiers, "member_id", updates)
    return _record(uow, program_id, changes, now, actor)


_Change = tuple[int, str | None, str, str | None, core.Kind, str, int | None]
"""A change to record: member, from, to, the tier it returns to, kind, reason, score."""


def _record(
    uow: UnitOfWork,
    program_id: int,
    changes: list[_Change],
    now: datetime,
    actor: str,
) -> list[TierChangeRead]:
    """Record each change and announce it."""
    if not changes:
        return []
    rows = [
        {
            "program_id": program_id,
            "member_id": member_id,
            "from_tier": from_tier,
            "to_tier": to_tier,
            "returns_to": returns_to,
            "kind": kind,
            "reason": reason[:2000],
            "score": score,
            "at": now,
            "actor": actor[:120],
        }
        for member_id, from_tier, to_tier, returns_to, kind, reason, score in changes
    ]
    ids = [row[0] for row in bulk.insert_many(uow.conn, tier_changes, rows,
                                              returning=[tier_changes.c.id])]  # fmt: skip
    recorded = [
        TierChangeRead(id=int(change_id), **{k: v for k, v in row.items() if k != "program_id"})
        for change_id, row in zip(ids, rows, strict=True)
    ]
    _announce(uow, program_id, recorded)
    from jifen.expiry import service as expiry_service  # expiry reads tiers for validity

    expiry_service.on_tier_changes(
        uow, program_id=program_id,
        changes=[(c.id, c.member_id, c.own_tier, c.kind) for c in recorded],
    )  # fmt: skip
    return recorded


def _announce(uow: UnitOfWork, program_id: int, changes: Sequence[TierChangeRead]) -> None:
    """Raise ``member.tier_changed`` and put a note in the member's inbox, both in this
    transaction (the outbox sends them after commit), keyed by the change; all the changes
    of a chunk in a few statements."""
    announced: list[tuple[str, dict[str, Any]]] = []
    notes: list[Notification] = []
    for change in changes:
        data: dict[str, Any] = {
            "member_id": change.member_id,
            "previous_tier": change.from_tier or "-",
            "tier": change.to_tier,
            "returns_to": change.returns_to,
            "kind": change.kind,
            "reason": change.reason,
            "score": change.score,
            "at": change.at.isoformat(),
        }
        key = f"tier:{change.id}"
        announced.append((key, data))
        if change.from_tier is not None:  # a first placement is no news to the member
            # the same tier: a temporary upgrade made the member's own, or one that now
            # returns to another tier
            template = (
                "tier.changed" if change.from_tier != change.to_tier
                else "tier.returns" if change.returns_to is not None
                else "tier.kept"
            )  # fmt: skip
            notes.append(
                Notification(
                    program_id, change.member_id, template=template, data=data,
                    key=key, channels=("inbox",),
                )
            )  # fmt: skip
    notify_service.publish_many(
        uow, program_id=program_id, event_type="member.tier_changed", items=announced
    )
    notify_service.notify_many(uow, notes)


def end_temporary(uow: UnitOfWork, *, program_id: int, now: datetime, limit: int = 1000) -> int:
    """End up to ``limit`` temporary upgrades due by ``now`` (members go back to the tier
    their evaluations gave them); how many ended. Call again until it answers 0. A closed
    account is done with: its upgrade is left as it is, neither ended nor announced."""
    due = uow.conn.execute(
        select(member_tiers.c.member_id)
        .join(members, members.c.id == member_tiers.c.member_id)
        .where(
            member_tiers.c.program_id == program_id,
            member_tiers.c.temporary_until.is_not(None),
            member_tiers.c.temporary_until <= now,
            members.c.state != "closed",
        )
        .order_by(member_tiers.c.temporary_until, member_tiers.c.member_id)
        .limit(limit)
    ).scalars()
    ids = sorted(int(member_id) for member_id in due)
    if not ids:
        return 0
    members_service.lock_members(uow, member_ids=ids)
    closed = members_service.closed_ids(uow, member_ids=ids)  # closed since the search
    standings = {m: s for m, s in _standings(uow, ids).items() if m not in closed}
    entry = list_tiers(uow, program_id=program_id)[0].code  # members hold tiers: there is one
    moves = [
        _Move(member_id, standing, decision, None)
        for member_id, standing in standings.items()
        if (decision := core.end_temporary(standing, now, entry)) is not None
    ]
    _apply(uow, program_id, moves, now, EVALUATOR)
    return len(moves)


def evaluate_member(
    uow: UnitOfWork, *, program_id: int, member_id: int, actor: str
) -> MemberEvaluation:
    """Evaluate one member now, on demand (up or down, as a scheduled evaluation would)."""
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    now = uow.clock.now()
    report = evaluate(
        uow, program_id=program_id, member_ids=[member_id], now=now,
        reason="evaluated on demand", actor=actor,
    )  # fmt: skip
    return MemberEvaluation(
        member_id=member_id,
        score=member_score(uow, program_id=program_id, member_id=member_id, now=now),
        tier=member_tier(uow, program_id=program_id, member_id=member_id),
        change=report.changes[0] if report.changes else None,
    )


def member_score(uow: UnitOfWork, *, program_id: int, member_id: int, now: datetime) -> ScoreRead:
    """The member's score as of ``now`` and what it is made of."""
    scheme = scheme_of(uow, program_id=program_id)
    if scheme is None:
        raise StateConflict(
            problem="This programme has no tier scheme.", problem_zh="本计划尚未设置等级评定方案。"
        )
    since = core.window_start(scheme, now, _zone(uow, program_id))
    facts = _facts(uow, scheme, [member_id], since, now)[member_id]
    return ScoreRead(
        spend_fen=facts.spend_fen,
        earned_points=facts.earned_points,
        activity=facts.activity,
        score=core.score(scheme.parts, facts),
        since=since,
        until=now,
    )


def dry_run(
    uow: UnitOfWork, *, program_id: int, now: datetime, chunk: int = 1000
) -> EvaluationReport:
    """What an evaluation of the whole programme at ``now`` would do; nothing is written."""
    total = EvaluationReport()
    after = 0
    while ids := member_ids_page(uow, program_id=program_id, after_member_id=after, limit=chunk):
        part = evaluate(uow, program_id=program_id, member_ids=ids, now=now, dry_run=True)
        total.add(part)
        after = ids[-1]
    return total


def history(
    uow: UnitOfWork, *, program_id: int, member_id: int, before_id: int | None, limit: int
) -> tuple[list[TierChangeRead], int | None]:
    """The member's tier changes, newest first, before ``before_id``; and the cursor of the
    next page (None: no more)."""
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    query = select(tier_changes).where(tier_changes.c.member_id == member_id)
    if before_id is not None:
        query = query.where(tier_changes.c.id < before_id)
    rows = uow.conn.execute(query.order_by(tier_changes.c.id.desc()).limit(limit + 1)).all()
    items = [
        TierChangeRead(
            id=r.id, member_id=r.member_id, from_tier=r.from_tier, to_tier=r.to_tier,
            returns_to=r.returns_to, kind=r.kind, reason=r.reason, score=r.score, at=r.at,
            actor=r.actor,
        )
        for r in rows[:limit]
    ]  # fmt: skip
    return items, (items[-1].id if len(rows) > limit else None)


# --------------------------------------------------------------------------- benefits


def _scheme_at(uow: UnitOfWork, program_id: int, at: datetime | None) -> TierScheme | None:
    """The tier scheme of the policy in force at ``at`` (``None``: the current one)."""
    if at is None:
        return scheme_of(uow, program_id=program_id)
    return programs_service.settings_at(uow, program_id=program_id, at=at)[1].tier_scheme


def earning_terms(
    uow: UnitOfWork, *, program_id: int, at: datetime | None = None
) -> tuple[dict[str, Decimal], dict[str, tuple[int | None, int | None]]]:
    """What the benefits matrix gives earning: each tier's multiplier (those above 1), and
    each tier's daily and monthly caps (those it names); as the matrix was at ``at`` (an
    event's time), or is now."""
    scheme = _scheme_at(uow, program_id, at)
    if scheme is None or not scheme.benefits:
        return {}, {}
    multipliers = {
        tier: b.earn_multiplier for tier, b in scheme.benefits.items() if b.earn_multiplier > 1
    }
    caps = {
        tier: (b.daily_earn_cap, b.monthly_earn_cap)
        for tier, b in scheme.benefits.items()
        if b.daily_earn_cap is not None or b.monthly_earn_cap is not None
    }
    return multipliers, caps


def birthday_gifts(
    uow: UnitOfWork, *, program_id: int, at: datetime | None = None
) -> dict[str, int]:
    """The points each tier gets on its birthday (those above 0), by the matrix in force at
    ``at``, or now."""
    scheme = _scheme_at(uow, program_id, at)
    if scheme is None:
        return {}
    return {t: b.birthday_gift for t, b in scheme.benefits.items() if b.birthday_gift}


def early_access(uow: UnitOfWork, *, program_id: int) -> dict[str, int]:
    """The hours before a reward's sales start each tier may redeem it (those above 0)."""
    scheme = scheme_of(uow, program_id=program_id)
    if scheme is None:
        return {}
    return {t: b.early_access_hours for t, b in scheme.benefits.items() if b.early_access_hours}


def redemption_policy(uow: UnitOfWork, *, program_id: int) -> RedemptionPolicy:
    """The programme's redemption policy, with the benefits matrix's discount for each tier
    the policy gives no terms of its own (read once a transaction)."""
    return programs_service.derived(
        uow, program_id=program_id, name="redemption_policy", build=_with_matrix_discounts
    )


def _with_matrix_discounts(settings: ProgramSettings) -> RedemptionPolicy:
    policy = settings.redemption
    scheme = settings.tier_scheme
    if scheme is not None:
        added = {
            tier: policy.default.model_copy(update={"discount_pct": b.discount_pct})
            for tier, b in scheme.benefits.items()
            if b.discount_pct is not None and tier not in policy.tiers
        }
        if added:
            policy = policy.model_copy(update={"tiers": {**added, **policy.tiers}})
    return policy
