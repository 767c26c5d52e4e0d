"""Expiry use cases: the validity new lots get, the expiry run (clear or freeze), giving
frozen lapsed points back, dormancy decay and its restoration, and expiry reminders.

Every function here writes points only through the points service, so each change is a
posting with its history; the job runner calls the ``*_chunk`` functions one transaction
at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from jifen.clock import LATEST
from jifen.db.uow import UnitOfWork
from jifen.errors import InvalidInput
from jifen.expiry import core
from jifen.expiry.schemas import ExpiryPolicy, Validity
from jifen.ledger import Lot
from jifen.notify import service as notify_service
from jifen.points import service as points_service
from jifen.points.schemas import PostingRead
from jifen.programs import service as programs_service
from jifen.programs.schemas import ProgramSettings
from jifen.tiers import service as tiers_service
from jifen.tiers.schemas import TierChangeRead


def policy(uow: UnitOfWork, *, program_id: int) -> ExpiryPolicy:
    """The programme's expiry policy, with the tier benefits matrix's validity (rolling, in
    months) for each tier the policy names none of its own (read once a transaction)."""
    return programs_service.derived(
        uow, program_id=program_id, name="expiry_policy", build=_with_matrix_validity
    )


def _with_matrix_validity(settings: ProgramSettings) -> ExpiryPolicy:
    rules = settings.expiry
    scheme = settings.tier_scheme
    if scheme is not None:
        added = {
            tier: Validity(kind="rolling", months=b.validity_months)
            for tier, b in scheme.benefits.items()
            if b.validity_months is not None and tier not in rules.by_tier
        }
        if added:
            rules = rules.model_copy(update={"by_tier": {**added, **rules.by_tier}})
    return rules


def _zone(uow: UnitOfWork, program_id: int) -> ZoneInfo:
    return ZoneInfo(programs_service.time_zone(uow, program_id=program_id))


def lot_expiry(
    uow: UnitOfWork, *, program_id: int, start: datetime, tier: str | None = None
) -> datetime | None:
    """When a lot of a member of ``tier`` whose points become usable at ``start`` lapses
    under the programme's policy; ``None``: never."""
    settings = programs_service.get_settings(uow, program_id=program_id)
    validity = core.validity_for(
        policy(uow, program_id=program_id), default_days=settings.default_validity_days,
        tier=tier,
    )  # fmt: skip
    expires_at = core.expires_at(validity, start, _zone(uow, program_id))
    if expires_at is not None and expires_at >= LATEST:
        raise InvalidInput(
            field="available_at",
            problem="too far in the future to give the points a validity",
            problem_zh="时间距今太远,无法为积分设定有效期",
        )
    return expires_at


def lot_expiries(
    uow: UnitOfWork, *, program_id: int, start: datetime, member_ids: Sequence[int]
) -> dict[int, datetime | None]:
    """:func:`lot_expiry` for each member, reading tiers only when the policy depends on them."""
    tiers: dict[int, str] = {}
    if policy(uow, program_id=program_id).by_tier:
        tiers = tiers_service.tiers_of(uow, member_ids=member_ids)
    dates: dict[str | None, datetime | None] = {}
    for tier in {tiers.get(m) for m in member_ids}:
        dates[tier] = lot_expiry(uow, program_id=program_id, start=start, tier=tier)
    return {m: dates[tiers.get(m)] for m in member_ids}


def on_tier_changes(
    uow: UnitOfWork, *, program_id: int, changes: Sequence[tuple[int, int, str, str]]
) -> int:
    """Apply the policy's ``on_tier_change`` to members whose tier just changed, given as
    (change id, member id, the member's own tier after it, kind of change): with
    ``extend``, each open lot gets that tier's validity from when it became available where
    that is later, as one renewal posting a member. The own tier is the one a temporary
    upgrade returns to while it lasts (:attr:`TierChangeRead.own_tier`): an evaluation that
    raises it re-dates the lots then, and the upgrade's end, which goes back to it, moves
    none. Answers the members whose lots moved."""
    rules = policy(uow, program_id=program_id)
    if rules.on_tier_change == "keep":
        return 0
    settings = programs_service.get_settings(uow, program_id=program_id)
    zone = _zone(uow, program_id)
    renewed = 0
    for change_id, member_id, tier, kind in changes:
        if kind in _LENT:
            continue
        validity = core.validity_for(rules, default_days=settings.default_validity_days, tier=tier)

        def new_date(lot: Lot, validity: Validity = validity) -> datetime | None:
            return core.expires_at(validity, lot.available_at, zone)

        posting = points_service.renew(
            uow, member_id=member_id, key=f"tier-change:{change_id}", new_date=new_date,
            reason=f"validity of tier {tier}", actor="system",
        )  # fmt: skip
        renewed += posting is not None
    return renewed


_LENT = ("temporary", "temporary_end")
"""Kinds of tier change that lend a tier or take it back: under ``extend`` they move no lot."""


def tier_dates_missed(
    uow: UnitOfWork, *, program_id: int, member_id: int, lot_ids: Sequence[int]
) -> dict[int, datetime | None]:
    """For lots that points were just given back to (a refund, an unfreeze): the date those
    points would have now had they stayed on the lot, by the policy's ``on_tier_change:
    extend`` (``None``: never), where that is later than the lot's own date.

    A tier change extends only the lots that hold points at the time (a renewal moves what
    remains); points away then, spent or frozen (a dormancy decay, a redemption's hold),
    missed it, and given back to their lot they would lapse on its old date. So each tier
    change the member's record holds since the lot was made is replayed as
    :func:`on_tier_changes` made it, over the lot's date as it stood: one that came after
    that date had passed (the points were due already) moves it no more. The dates are of
    the policy in force now."""
    rules = policy(uow, program_id=program_id)
    if rules.on_tier_change != "extend" or not lot_ids:
        return {}
    made = points_service.lots_made(uow, lot_ids=lot_ids)
    if not made:
        return {}
    since = min(when for _, when in made)
    changes: list[TierChangeRead] = []
    cursor: int | None = None
    while True:
        page, cursor = tiers_service.history(
            uow, program_id=program_id, member_id=member_id, before_id=cursor, limit=100
        )
        changes.extend(c for c in page if c.at >= since)
        if cursor is None or (page and page[-1].at < since):
            break
    if not changes:
        return {}
    changes.sort(key=lambda c: (c.at, c.id))
    settings = programs_service.get_settings(uow, program_id=program_id)
    zone = _zone(uow, program_id)
    found: dict[int, datetime | None] = {}
    for lot, when in made:
        date = lot.expires_at
        for change in changes:
            if change.at < when or change.kind in _LENT:
                continue
            if date is None or date <= change.at:
                break
            validity = core.validity_for(
                rules, default_days=settings.default_validity_days, tier=change.own_tier
            )
            date = core.later_of(date, core.expires_at(validity, lot.available_at, zone))
        if date != lot.expires_at:
            found[lot.id] = date
    return found


# --------------------------------------------------------------------------- the expiry run


def expire_chunk(
    uow: UnitOfWork, *, program_id: int, limit: int = 1000
) -> points_service.ExpiryChunk:
    """Expire — or freeze, when the policy says so — the due lots of up to ``limit``
    member accounts; zero accounts means the run is over."""
    freeze = policy(uow, program_id=program_id).on_expiry == "freeze"
    chunk = points_service.expire_due(uow, program_id=program_id, limit=limit, freeze=freeze)
    if chunk.accounts and chunk.at and notify_service.may_publish(uow, program_id=program_id):
        # points.expired (or points.frozen) for each account, read back at once
        written = points_service.expiries(
            uow, program_id=program_id, account_ids=chunk.account_ids, at=chunk.at
        )
        notify_service.announce_postings(
            uow, program_id=program_id, postings=[(p, None, None) for p in written]
        )
    return chunk


def restore_frozen(
    uow: UnitOfWork, *, program_id: int, member_id: int, key: str, actor: str, reason: str
) -> list[PostingRead]:
    """Give back every point of the member that was frozen when it lapsed, as new lots with
    the validity a new earning would get now (a debt of the member is paid off first out of
    them: each release's ``debt_change``). Answers the releases (none when nothing is
    frozen); ``key`` makes the whole call idempotent."""
    now = uow.clock.now()
    tier = tiers_service.tiers_of(uow, member_ids=[member_id]).get(member_id)
    expires_at = lot_expiry(uow, program_id=program_id, start=now, tier=tier)
    released = []
    # Under the member's lock, as a claw-back unfreezes these freezes under it: a freeze
    # one emptied while this waited is not found open.
    points_service.lock_account(uow, member_id=member_id)
    frozen = points_service.open_freezes(
        uow, member_id=member_id, reason=points_service.FROZEN_AT_EXPIRY
    )
    for freeze_id, _, _ in frozen:
        released.append(
            points_service.release(
                uow, freeze_id=freeze_id, key=f"{key}:{freeze_id}", expires_at=expires_at,
                reason=reason, actor=actor,
            )
        )  # fmt: skip
    return released


# --------------------------------------------------------------------------- dormancy


@dataclass
class DormancyChunk:
    members: int = 0
    """Members looked at."""
    decays: int = 0
    decayed: int = 0
    """Points held back this run."""
    restored_members: int = 0
    restored: int = 0
    """Points given back (what the dormancy held back of members active again)."""
    repaid: int = 0
    """Of those, the points that paid off a debt of the member first, not spendable."""
    last_member_id: int = 0


DORMANCY_KEY = "dormancy:{member}:{since}:"


def last_activity(uow: UnitOfWork, *, member_ids: Sequence[int]) -> dict[int, datetime]:
    """When each member was last active (任意行为激活): its latest earning, spending or
    transfer of points of its own doing, its latest event (whatever it earned; not one
    jifen raises itself, as a birthday), or its latest redemption (one still held for its
    cooling-off too). An activity after a dormancy decay gives the decay back at the next
    run, and the dormancy clock starts again from it. Three statements a chunk of members;
    the event intake pays nothing for it."""
    # Imported here: events and rewards read expiry (for validity and for lapsed holds).
    from jifen.events import service as events_service
    from jifen.rewards import service as rewards_service

    active = points_service.last_activity(uow, member_ids=member_ids)
    for found in (
        events_service.last_own_events(uow, member_ids=member_ids),
        rewards_service.last_orders(uow, member_ids=member_ids),
    ):
        for member_id, when in found.items():
            if member_id not in active or when > active[member_id]:
                active[member_id] = when
    return active


def dormancy_chunk(
    uow: UnitOfWork, *, program_id: int, after_member_id: int, limit: int = 500
) -> DormancyChunk:
    """Dormancy for the next ``limit`` members holding points (by member id): a member
    active again gets back what its dormancy held back; a dormant one loses the monthly
    share of what is available for each month due (each month once, whenever it runs)."""
    report = DormancyChunk(last_member_id=after_member_id)
    rule = policy(uow, program_id=program_id).dormancy
    holders = points_service.holders_page(
        uow, program_id=program_id, after_member_id=after_member_id, limit=limit
    )
    if not holders:
        return report
    report.last_member_id = holders[-1]
    report.members = len(holders)
    if rule is None:
        # No dormancy any more: what earlier dormancies held back still comes back with the
        # member's next activity. Only members with frozen points can have any; only those
        # with a decay to give back are held.
        held = points_service.members_with_frozen(uow, member_ids=holders)
        decays = {
            member_id: found
            for member_id in held
            if (found := points_service.open_freezes(
                uow, member_id=member_id, key_prefix="dormancy:"
            ))
        }  # fmt: skip
        active = last_activity(uow, member_ids=sorted(decays)) if decays else {}
        for member_id, since in sorted(active.items()):
            if any(made < since for _, _, made in decays[member_id]):
                _give_back_decays(uow, report, member_id, made_before=since)
        return report
    zone = _zone(uow, program_id)
    now = uow.clock.now()
    active = last_activity(uow, member_ids=holders)
    for member_id in holders:
        last = active.get(member_id)
        if last is None:
            continue
        state = core.dormancy_state(rule, last_activity=last, now=now, zone=zone)
        # A decay made before the dormancy as the member's activity dates it now: the
        # member has been active since, or was not dormant then (an activity that reached
        # jifen late, a policy that waits longer now).
        _give_back_decays(uow, report, member_id, made_before=state.dormant_from)
        if not state.decays_due:
            continue
        # The decays of this dormancy are all those made since it began (the earlier ones
        # were given back above), whatever dormant_from the policy gave them when they were
        # made: a change of the policy's months moves dormant_from, not the months held.
        done = points_service.count_postings(
            uow, member_id=member_id, key_prefix=f"dormancy:{member_id}:",
            since=state.dormant_from,
        )  # fmt: skip
        prefix = DORMANCY_KEY.format(member=member_id, since=round(state.dormant_from.timestamp()))
        for month in range(done + 1, state.decays_due + 1):
            available = points_service.balance(uow, member_id=member_id).available
            amount = core.decay_amount(available, rule.decay_pct)
            if not amount:
                break
            points_service.freeze(
                uow, member_id=member_id, amount=amount, key=f"{prefix}{month}",
                reason=f"dormant since {state.dormant_from.date()}: month {month} decay",
                actor="system",
            )  # fmt: skip
            report.decays += 1
            report.decayed += amount
    return report


def _give_back_decays(
    uow: UnitOfWork, report: DormancyChunk, member_id: int, *, made_before: datetime
) -> None:
    """Give the member back its dormancy decays made before ``made_before``, under its
    lock, and count them in ``report``."""
    points_service.lock_account(uow, member_id=member_id)
    open_decays = points_service.open_freezes(uow, member_id=member_id, key_prefix="dormancy:")
    given_back = 0
    for freeze_id, _, created_at in open_decays:
        if created_at < made_before:
            back = points_service.unfreeze(
                uow, freeze_id=freeze_id, key=f"dormancy-restore:{freeze_id}",
                reason="active again: dormancy decay given back", actor="system",
            )  # fmt: skip
            given_back += back.amount
            report.repaid -= back.debt_change  # a debt is paid off first
    report.restored += given_back
    report.restored_members += given_back > 0


# --------------------------------------------------------------------------- reminders


def _by_day(dates: dict[datetime, int], zone: ZoneInfo) -> dict[datetime, int]:
    """Points by the day of ``zone`` they lapse on, keyed by the first moment that day."""
    days: dict[date, tuple[datetime, int]] = {}
    for when, points in sorted(dates.items()):
        day = when.astimezone(zone).date()
        first, total = days.get(day, (when, 0))
        days[day] = (first, total + points)
    return dict(days.values())


@dataclass
class ReminderChunk:
    members: int = 0
    reminders: int = 0
    last_member_id: int = 0
    keys: list[str] = field(default_factory=list)


def reminders_chunk(
    uow: UnitOfWork, *, program_id: int, after_member_id: int, limit: int = 500
) -> ReminderChunk:
    """Queue the expiry reminders due now for the next ``limit`` members with points that
    lapse within the longest reminder offset (or at the year end being announced): what
    lapses when, and rewards the member can afford. A reminder is queued once, ever."""
    from jifen.notify import service as notify_service
    from jifen.rewards import service as rewards_service

    rules = policy(uow, program_id=program_id).reminders
    zone = _zone(uow, program_id)
    now = uow.clock.now()
    horizon = now + timedelta(days=max(rules.days_before, default=0) + 1)
    year = None
    if rules.year_end_from is not None:
        year = core.year_end_reminder_due(rules.year_end_from, now=now, zone=zone)
        if year is not None:
            horizon = max(horizon, datetime(year + 1, 1, 1, tzinfo=zone) + timedelta(days=1))
    report = ReminderChunk(last_member_id=after_member_id)
    expiring = points_service.expiring_between(
        uow, program_id=program_id, start=now, end=horizon, after_member_id=after_member_id,
        limit=limit,
    )  # fmt: skip
    if not expiring:
        return report
    report.last_member_id = max(expiring)
    report.members = len(expiring)
    # A reminder names a day of the programme: the points of lots lapsing at other hours of
    # that day (a date given by the API) are announced with it, at its first.
    expiring = {member_id: _by_day(dates, zone) for member_id, dates in expiring.items()}
    wanted: dict[int, list[tuple[str, datetime, int | None]]] = {}
    for member_id, dates in sorted(expiring.items()):
        due: list[tuple[str, datetime, int | None]] = [
            (f"expiry-reminder:{member_id}:{when.astimezone(zone):%Y%m%d}:{offset}", when, offset)
            for when, offset in core.reminders_due(dates, now=now, days_before=rules.days_before)
        ]
        if year is not None:
            year_end = datetime(year + 1, 1, 1, tzinfo=zone)
            if year_end in dates:
                due.append((f"year-end-reminder:{member_id}:{year}", year_end, None))
        if due:
            wanted[member_id] = due
    # A reminder stays due until its date (a missed day is caught up): those sent already
    # are left out before their suggestions are worked out.
    sent = notify_service.queued_keys(
        uow, program_id=program_id, keys=[key for due in wanted.values() for key, _, _ in due]
    )
    for member_id, all_due in wanted.items():
        dates = expiring[member_id]
        due = [reminder for reminder in all_due if reminder[0] not in sent]
        if not due:
            continue
        schedule = "\n".join(
            f"  {when.astimezone(zone).date().isoformat()}  {points:,}"
            for when, points in sorted(dates.items())
        )
        offers: list[tuple[str, str, int]] = []
        if rules.suggestions:
            offer = rewards_service.what_can_i_get(uow, program_id=program_id, member_id=member_id)
            offers = [
                (a.reward.name.zh or a.reward.name.en, a.reward.name.en or a.reward.name.zh,
                 a.quote.points)
                for a in offer.now[: rules.suggestions]
            ]  # fmt: skip
        for key, when, offset in due:
            queued = notify_service.notify(
                uow,
                notify_service.Notification(
                    program_id=program_id,
                    member_id=member_id,
                    template="expiry.reminder",
                    data={
                        "expires_on": when.astimezone(zone).date().isoformat(),
                        "points": dates[when],
                        "days_before": offset if offset is not None else "",
                        "schedule": schedule,
                        "suggestions_zh": "\n".join(f"  {zh}({n:,} 积分)" for zh, _, n in offers)
                        or "  (暂无)",
                        "suggestions_en": "\n".join(f"  {en} ({n:,} points)" for _, en, n in offers)
                        or "  (none yet)",
                    },
                    key=key,
                    channels=tuple(rules.channels),
                ),
            )
            if queued:
                report.reminders += 1
                report.keys.append(key)
    return report
