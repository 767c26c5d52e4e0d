"""Every job jifen runs on a schedule: each a few lines calling its domain's service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from jifen.db.uow import Database, UnitOfWork
from jifen.events import service as events_service
from jifen.expiry import service as expiry_service
from jifen.jobs import service as jobs_service
from jifen.jobs.core import Chunk
from jifen.jobs.service import ChunkFn, Job, register
from jifen.members import service as members_service
from jifen.notify import service as notify_service
from jifen.points import integrity
from jifen.programs import service as programs_service
from jifen.rewards import service as rewards_service
from jifen.rewards.schemas import HoldsReport
from jifen.tiers import service as tiers_service

log = logging.getLogger("jifen.jobs")


def _expire(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    """The accounts are taken as ``jifen.points.service.expire_due`` says: several workers
    take accounts of their own (the job is ``shared``); the cursor counts them."""
    done = expiry_service.expire_chunk(uow, program_id=program_id, limit=size)
    figures = {"accounts": done.accounts, "lots": done.lots, "points": done.points}
    return Chunk(cursor=cursor + done.accounts, finished=done.found == 0, figures=figures)


# A chunk holds its members' accounts until it commits: at 200 accounts the earnings that
# meet one wait a few tens of milliseconds, where at 1,000 (no faster a run) a member's
# earnings waited long enough to cut their rate beside a year-end clearing from about half
# to an eighth of what it is without the job (bench/expiry.py, 20,000 members).
register(
    Job(
        "points.expire",
        "Expire (or freeze) lots due",
        "到期积分清零(或冻结)",
        _expire,
        size=200,
        shared=True,
    )
)


def _dormancy(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    done = expiry_service.dormancy_chunk(
        uow, program_id=program_id, after_member_id=cursor, limit=size
    )
    figures = {
        "members": done.members, "decays": done.decays, "decayed": done.decayed,
        "restored_members": done.restored_members, "restored": done.restored,
        "repaid": done.repaid,
    }  # fmt: skip
    return Chunk(cursor=done.last_member_id, finished=done.members < size, figures=figures)


register(Job("points.dormancy", "Dormancy decay and restoration", "休眠递减与恢复", _dormancy))


def _reminders(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    done = expiry_service.reminders_chunk(
        uow, program_id=program_id, after_member_id=cursor, limit=size
    )
    figures = {"members": done.members, "reminders": done.reminders}
    return Chunk(cursor=done.last_member_id, finished=done.members < size, figures=figures)


register(Job("points.reminders", "Expiry reminders", "积分到期提醒", _reminders))


ALERTED_PROBLEMS = 20
"""How many differences a reconciliation alert lists (the CLI lists them all)."""


def _reconcile(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    """Reconcile the programme's ledger (日终全量对账). Each difference is logged; a run that
    finds any tells staff (outbox, ``ledger.differences``) and subscribers (webhook of that
    type) once (差异告警)."""
    report = integrity.reconcile(uow, program_id=program_id)
    for problem in report.problems:
        log.error("reconciliation: %s", problem)
    if report.problems:
        at = uow.clock.now()
        key = f"ledger-differences:{round(at.timestamp())}"
        listed = [f"  {problem}" for problem in report.problems[:ALERTED_PROBLEMS]]
        if len(report.problems) > ALERTED_PROBLEMS:
            listed.append(f"  … {len(report.problems) - ALERTED_PROBLEMS} more")
        data = {
            "found": len(report.problems), "accounts": report.accounts, "lots": report.lots,
            "at": at.isoformat(), "problems": "\n".join(listed),
        }  # fmt: skip
        notify_service.publish(
            uow, program_id=program_id, event_type="ledger.differences", data=data, key=key
        )
        notify_service.notify(
            uow,
            notify_service.Notification(
                program_id=program_id, member_id=None, template="ledger.differences",
                data=data, key=key,
            ),
        )  # fmt: skip
    figures = {"accounts": report.accounts, "lots": report.lots, "problems": len(report.problems)}
    return Chunk(cursor=cursor, finished=True, figures=figures)


register(Job("ledger.reconcile", "Reconcile balances with lines", "对账", _reconcile))


def _vouchers(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    done = rewards_service.expire_vouchers(uow, program_id=program_id, limit=size)
    figures = {"vouchers": done.vouchers, "points_returned": done.points_returned,
               "fees": done.fees}  # fmt: skip
    return Chunk(cursor=cursor + done.vouchers, finished=done.found < size, figures=figures)


register(
    Job("rewards.expire_vouchers", "Expire unused vouchers", "过期未用券", _vouchers, size=200)
)


def _cancelling(cancel: Callable[..., HoldsReport]) -> ChunkFn:
    """A chunk that cancels up to its size of the orders ``cancel`` finds lapsed."""

    def chunk(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
        done = cancel(uow, program_id=program_id, limit=size)
        return Chunk(cursor + done.cancelled, done.found < size, {"cancelled": done.cancelled})

    return chunk


register(
    Job("rewards.expire_holds", "Lapse unconfirmed held redemptions", "取消未确认兑换",
        _cancelling(rewards_service.expire_holds))
)  # fmt: skip
register(
    Job("rewards.lapse_payments", "Lapse redemptions not paid in time", "取消超时未支付兑换",
        _cancelling(rewards_service.lapse_payments))
)  # fmt: skip


def _birthdays(db: Database, program_id: int) -> dict[str, int]:
    """Raise the birthdays of the programme's day, and of the days since the last run that
    no run did (the worker was down), as far back as ``jobs.service.RESUME_WITHIN``: each
    day is recorded as done once its members are raised."""
    name = "events.birthdays"
    zone = ZoneInfo(db.run(lambda uow: programs_service.time_zone(uow, program_id=program_id)))
    today = db.clock.now().astimezone(zone).date()
    last = db.run(
        lambda uow: jobs_service.last_done(uow, name=name, program_id=program_id),
        read_only=True,
    )
    first = today
    if last is not None:
        earliest = today - timedelta(days=jobs_service.RESUME_WITHIN.days)
        first = min(today, max(last.astimezone(zone).date() + timedelta(days=1), earliest))
    raised = 0
    for offset in range((today - first).days + 1):
        day = first + timedelta(days=offset)
        made = events_service.raise_birthdays(db, program_id=program_id, day=day)
        raised += made
        start = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)

        def record(uow: UnitOfWork, start: datetime = start, made: int = made) -> None:
            jobs_service.record_done(
                uow, name=name, program_id=program_id, moment=start, figures={"events": made}
            )

        db.run(record)
    return {"events": raised, "days": (today - first).days + 1}


register(Job("events.birthdays", "Birthday events", "生日事件", whole=_birthdays))


def _seal_fingerprints(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    """A chunk of events whose fingerprints are sealed (``events_service.seal_fingerprints``);
    the cursor is the last event id sealed."""
    done = events_service.seal_fingerprints(
        uow, program_id=program_id, after_event_id=cursor, limit=size
    )
    return Chunk(done.last_event_id or cursor, done.sealed < size, {"sealed": done.sealed})


register(
    Job("events.seal_fingerprints", "Seal the fingerprints of events stored before",
        "封存旧事件的指纹", _seal_fingerprints, size=5000)
)  # fmt: skip


def _evaluate_tiers(
    uow: UnitOfWork, program_id: int, cursor: int, size: int, *, dry_run: bool = False
) -> Chunk:
    """A chunk of the evaluation (a dry run goes chunk by chunk, counting the moves without
    making them: no member is held while it runs)."""
    if tiers_service.scheme_of(uow, program_id=program_id) is None:
        return Chunk(cursor, True, {"evaluated": 0})
    ids = tiers_service.member_ids_page(
        uow, program_id=program_id, after_member_id=cursor, limit=size
    )
    if not ids:
        return Chunk(cursor, True)
    figures = _evaluate_tier_members(uow, program_id, ids, dry_run=dry_run)
    return Chunk(ids[-1], len(ids) < size, figures)


def _count_tier_moves(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    return _evaluate_tiers(uow, program_id, cursor, size, dry_run=True)


def _tier_part_ends(uow: UnitOfWork, program_id: int, size: int) -> list[int]:
    if tiers_service.scheme_of(uow, program_id=program_id) is None:
        return []  # one part, which finds no scheme either
    return members_service.every_nth_id(uow, program_id=program_id, n=size)


def _evaluate_tier_part(
    uow: UnitOfWork, program_id: int, after: int, last: int | None
) -> dict[str, int]:
    """A part of the evaluation, as the workers share it out: members (after, last]."""
    if tiers_service.scheme_of(uow, program_id=program_id) is None:
        return {"evaluated": 0}
    ids = tiers_service.member_ids_page(
        uow, program_id=program_id, after_member_id=after, limit=None, up_to_member_id=last
    )
    return _evaluate_tier_members(uow, program_id, ids) if ids else {}


def _evaluate_tier_members(
    uow: UnitOfWork, program_id: int, ids: list[int], *, dry_run: bool = False
) -> dict[str, int]:
    now = uow.clock.now()
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    done = tiers_service.evaluate(
        uow, program_id=program_id, member_ids=ids, now=now,
        reason=f"evaluation of {now.astimezone(zone).date().isoformat()}", dry_run=dry_run,
    )  # fmt: skip
    return {"evaluated": done.evaluated, "upgraded": done.upgraded,
            "downgraded": done.downgraded, "temporary": done.temporary,
            "unchanged": done.unchanged}  # fmt: skip


def _evaluation_due(uow: UnitOfWork, program_id: int) -> bool:
    """Whether no evaluation has finished since the scheme's latest date (monthly,
    quarterly…): the worker fires the job daily and runs it on those dates, or at the first
    firing after one it missed. A date is caught up only for a programme evaluated before:
    a scheme new since its latest date (a fresh installation, tiers imported from another
    system) waits for its next date rather than re-tiering every member the next night."""
    now = uow.clock.now()
    since = tiers_service.last_evaluation_at(uow, program_id=program_id, at=now)
    if since is None or jobs_service.finished_since(
        uow, name="tiers.evaluate", program_id=program_id, since=since
    ):
        return False
    return since > now - timedelta(days=1) or jobs_service.finished_since(
        uow, name="tiers.evaluate", program_id=program_id, since=datetime.min.replace(tzinfo=UTC)
    )


def _evaluation_moment(uow: UnitOfWork, program_id: int, fired: datetime) -> datetime:
    """The moment a firing evaluates as of: the scheme's latest date at or before it (its
    first instant: 00:00 where the programme is, or the first instant of that day when the
    clocks skipped its midnight), so that a firing that comes late (the worker was down; a
    midnight the clocks skip, which the schedule passes over to the next one) scores the
    window ending at that date, and its run, recorded for that date, is done once. Of
    several dates missed, only the latest is evaluated: each evaluation scores its own
    window afresh, and members would otherwise be moved (and told) by the earlier ones
    only to be moved again at once."""
    due = tiers_service.last_evaluation_at(uow, program_id=program_id, at=fired)
    return fired if due is None else due


register(
    Job("tiers.evaluate", "Tier evaluation by score", "按积分评定等级", _evaluate_tiers,
        size=2000, due=_evaluation_due, moment=_evaluation_moment, part_ends=_tier_part_ends,
        part=_evaluate_tier_part, dry=_count_tier_moves)
)  # fmt: skip


def _end_temporary(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    ended = tiers_service.end_temporary(uow, program_id=program_id, now=uow.clock.now(), limit=size)
    return Chunk(cursor + ended, ended < size, {"ended": ended})


register(Job("tiers.end_temporary", "End temporary upgrades", "临时升级到期", _end_temporary))


def _restock_alerts(uow: UnitOfWork, program_id: int, cursor: int, size: int) -> Chunk:
    """Tell staff (outbox) and subscribers (webhook ``reward.stock_low``) of each open
    restock alert, once per alert."""
    told = 0
    alerts, more = rewards_service.open_alerts(
        uow, program_id=program_id, after_id=cursor, limit=size
    )
    for alert in alerts:
        key = f"stock-low:{alert.reward}:{round(alert.raised_at.timestamp())}"
        data = {
            "reward": alert.reward, "left": alert.stock_left,
            "safety_stock": alert.safety_stock, "raised_at": alert.raised_at.isoformat(),
        }  # fmt: skip
        notify_service.publish(
            uow, program_id=program_id, event_type="reward.stock_low", data=data, key=key
        )
        told += notify_service.notify(
            uow,
            notify_service.Notification(
                program_id=program_id, member_id=None, template="stock.low", data=data, key=key
            ),
        )
    return Chunk(alerts[-1].id if alerts else cursor, more is None, {"alerts": told})


register(Job("rewards.restock_alerts", "Restock alerts to staff", "补货提醒", _restock_alerts))


def _deliver(db: Database, program_id: int) -> dict[str, int]:
    """Send what the outbox holds that is due: the programme's, or every programme's when
    run for :data:`jobs_service.EVERY_PROGRAMME` (as the worker runs it)."""
    sent = {"sent": 0, "retrying": 0, "dead": 0, "lost": 0}
    only = None if program_id == jobs_service.EVERY_PROGRAMME else program_id
    while True:
        report = notify_service.deliver_due(db, limit=200, program_id=only)
        for name in sent:
            sent[name] += getattr(report, name)
        if report.sent + report.retrying + report.dead + report.lost < 200:
            return sent


register(Job("notify.deliver", "Send the outbox", "发送通知", whole=_deliver))
