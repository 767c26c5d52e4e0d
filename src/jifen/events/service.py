"""Event use cases: take an event in once, evaluate it against the rules live at its own
time, post what it earns, and keep why.

Every door (the API, a batch, a CSV import, a stream consumer) ends in :func:`ingest`, in
the caller's transaction. An event is keyed by (programme, source, external id): sent again
with the same content it answers what it produced the first time; with other content it is
refused. ``order.refunded`` takes back, through the ledger's claw-back, the points its order
earned in the proportion of the money refunded.
"""

from __future__ import annotations

import calendar
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from functools import lru_cache
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from sqlalchemy import Row, RowMapping, func, select

from jifen.api.schemas import NO_NUL
from jifen.db.bulk import among
from jifen.db.uow import Database, UnitOfWork
from jifen.db.upsert import upsert
from jifen.errors import IdempotencyConflict, InvalidInput, OrderNotSeen, UnknownEvent
from jifen.events.models import event_awards, events, member_counters
from jifen.events.schemas import (
    CATALOGUE,
    AwardRead,
    BacktestIn,
    BacktestReport,
    Compared,
    EventIn,
    EventResult,
    OrderPaid,
    OrderRefunded,
)
from jifen.expiry import service as expiry_service
from jifen.members import service as members_service
from jifen.points import service as points_service
from jifen.programs import service as programs_service
from jifen.rules import core
from jifen.rules import service as rules_service
from jifen.rules.schemas import EventTypeRead, ProgramCaps, RuleSpec, TierCap
from jifen.tiers import service as tiers_service

ACTOR = "rules"
FUTURE_TOLERANCE = timedelta(minutes=5)
"""How far ahead of jifen's clock an event's time may be (the sender's clock may be fast)."""


# --------------------------------------------------------------------------- validation


def parse_payload(
    event_type: str, payload: Mapping[str, Any], declared: EventTypeRead | None = None
) -> dict[str, Any]:
    """The payload checked against the event type's schema (for ``custom.<name>``, the one
    the programme ``declared``), as plain JSON values; InvalidInput naming the field
    otherwise."""
    model: type[BaseModel] | None = CATALOGUE.get(event_type)
    if model is None and not event_type.startswith("custom."):
        known = ", ".join(sorted(CATALOGUE))
        raise InvalidInput(
            field="type",
            problem=f"unknown event type {event_type!r}; use one of {known}, or custom.<name>",
            problem_zh=f"未知的事件类型 {event_type!r};可用类型:{known},或 custom.<名称>",
        )
    if model is None:
        if declared is None:
            raise InvalidInput(
                field="type",
                problem=f"{event_type!r} is not declared in this programme; declare its "
                f"fields first (PUT …/event-types/{event_type})",
                problem_zh=f"本计划尚未声明事件类型 {event_type!r};"
                f"请先声明其字段(PUT …/event-types/{event_type})",
            )
        model = _custom_model(event_type, declared.model_dump_json())
    try:
        parsed = model.model_validate(dict(payload))
        return parsed.model_dump(mode="json", exclude_none=declared is not None)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in ("payload", *first["loc"]))
        raise InvalidInput(
            field=where, problem=first["msg"], problem_zh=f"取值不符合要求({first['msg']})"
        ) from exc


_FIELD_TYPES: dict[str, Any] = {
    "string": Annotated[str, Field(max_length=2000, pattern=NO_NUL)],
    "integer": Annotated[int, Field(ge=-(2**62), le=2**62)],
    "number": Annotated[float, Field(allow_inf_nan=False)],
    "boolean": bool,
}


@lru_cache(maxsize=1024)
def _custom_model(name: str, declared_json: str) -> type[BaseModel]:
    """A model of a declared custom event type (cached by its declaration)."""
    declared = EventTypeRead.model_validate_json(declared_json)
    fields: dict[str, Any] = {
        field: (
            _FIELD_TYPES[spec.type] if spec.required else _FIELD_TYPES[spec.type] | None,
            ... if spec.required else None,
        )
        for field, spec in declared.fields.items()
    }
    model: type[BaseModel] = create_model(
        name.replace(".", "_"), __config__=ConfigDict(extra="forbid", strict=True), **fields
    )
    return model


def _parsed(uow: UnitOfWork, program_id: int, event: EventIn) -> dict[str, Any]:
    declared = None
    if event.type.startswith("custom."):
        declared = rules_service.event_type(uow, program_id=program_id, name=event.type)
    return parse_payload(event.type, event.payload, declared)


def _fingerprint(event: EventIn, payload: Mapping[str, Any]) -> str:
    text = json.dumps(
        {
            "type": event.type,
            "occurred_at": event.occurred_at.isoformat(),
            "member_id": event.member_id,
            "member_ref": event.member_ref,
            "payload": payload,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- ingest


def ingest(
    uow: UnitOfWork,
    *,
    program_id: int,
    event: EventIn,
    origin: tuple[str | None, str | None] = (None, None),
) -> EventResult:
    """Store ``event`` once, evaluate it and post its awards, all in the caller's transaction;
    the postings record ``origin``, the merchant and store they were made for."""
    payload = _parsed(uow, program_id, event)
    if event.occurred_at > uow.clock.now() + FUTURE_TOLERANCE:
        raise InvalidInput(
            field="occurred_at",
            problem=f"{event.occurred_at.isoformat()} is in the future; send an event once it "
            "has happened (a sender's clock may be at most 5 minutes fast)",
        )
    request_hash = _fingerprint(event, payload)
    replay = _replay(uow, program_id, event, request_hash)
    if replay is not None:
        return replay

    member_id = _member_id(uow, program_id, event, transacting=True)
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    # The event's members are held from here to the commit: one event of a member at a
    # time, so that the checks and the facts read below stay true until it is written.
    inviter = payload.get("inviter_member_id")
    members_service.lock_members(
        uow, member_ids=[member_id, *([inviter] if isinstance(inviter, int) else [])]
    )
    replay = _replay(uow, program_id, event, request_hash)  # a twin may have committed meanwhile
    if replay is not None:
        return replay
    subject, amount = _order_fields(event.type, payload, member_id)
    if event.type in ("order.paid", "member.birthday"):
        _refuse_twice(uow, program_id, event.type, str(subject))
    event_id = int(
        uow.conn.execute(
            events.insert().returning(events.c.id),
            {
                "program_id": program_id,
                "source": event.source,
                "external_id": event.external_id,
                "type": event.type,
                "member_id": member_id,
                "occurred_at": event.occurred_at,
                "received_at": uow.clock.now(),
                "payload": payload,
                "request_hash": request_hash,
                "subject": subject,
                "amount_fen": amount,
            },
        ).scalar_one()
    )
    core_event = to_core_event(event, member_id, payload)
    if event.type == "order.refunded":
        awards, points, skipped = _refund(uow, program_id, event_id, core_event, zone)
    else:
        awards, points, skipped = _evaluate_and_post(
            uow, program_id, event_id, core_event, zone, origin
        )
    _count(uow, member_id, event.type)
    return EventResult(
        id=event_id,
        source=event.source,
        external_id=event.external_id,
        type=event.type,
        member_id=member_id,
        occurred_at=event.occurred_at.astimezone(UTC),
        points=points,
        awards=awards,
        skipped=skipped,
    )


def _replay(
    uow: UnitOfWork, program_id: int, event: EventIn, request_hash: str
) -> EventResult | None:
    """The stored result when this event was taken in before; a conflict when its id was
    used for another event."""
    stored = uow.conn.execute(
        select(events).where(
            events.c.program_id == program_id,
            events.c.source == event.source,
            events.c.external_id == event.external_id,
        )
    ).one_or_none()
    if stored is None:
        return None
    if stored.request_hash != request_hash:
        raise IdempotencyConflict(key=f"{event.source}:{event.external_id}")
    return _result(uow, stored, replayed=True)


def _refuse_twice(uow: UnitOfWork, program_id: int, event_type: str, subject: str) -> None:
    """An order earns once, a birthday once a year: the same one under another event id is
    refused (a sender that retries must keep the event's id)."""
    earlier = uow.conn.execute(
        select(events.c.source, events.c.external_id).where(
            events.c.program_id == program_id,
            events.c.subject == subject,
            events.c.type == event_type,
        )
    ).first()
    if earlier is None:
        return
    what, what_zh = (
        (f"order {subject!r}", f"订单 {subject!r}")
        if event_type == "order.paid"
        else (f"the birthday {subject!r}", f"生日 {subject!r}")
    )
    raise InvalidInput(
        field="payload.order_id" if event_type == "order.paid" else "payload.year",
        problem=f"{what} was already sent as event {earlier.source}:{earlier.external_id}; "
        "resend that event to get its result",
        problem_zh=f"{what_zh} 已作为事件 {earlier.source}:{earlier.external_id} "
        "发送过;如需结果请重发该事件",
    )


def lock_for_batch(uow: UnitOfWork, *, program_id: int, batch: Sequence[EventIn]) -> None:
    """Before a transaction ingests many events: hold every member they concern, all at
    once and in id order. Each event then finds its members already held, so two batches
    sharing members wait for each other instead of deadlocking (which would cost a retry of
    the whole batch)."""
    ids = {e.member_id for e in batch if e.member_id is not None}
    ids.update(
        members_service.ids_by_refs(
            uow, program_id=program_id, refs=[e.member_ref for e in batch if e.member_ref]
        ).values()
    )
    for e in batch:
        inviter = e.payload.get("inviter_member_id")
        if isinstance(inviter, int) and not isinstance(inviter, bool):
            ids.add(inviter)
    members_service.lock_members(uow, member_ids=ids)
    rules_service.lock_budgets(uow, program_id=program_id)


def to_core_event(event: EventIn, member_id: int, payload: Mapping[str, Any]) -> core.Event:
    """The event as the pure evaluation sees it."""
    lines: tuple[core.OrderLine, ...] = ()
    if event.type == "order.paid":
        order = OrderPaid.model_validate(payload)
        lines = tuple(
            core.OrderLine(
                line.sku, line.category, line.quantity, line.amount_fen, line.paid_with_points
            )
            for line in order.lines
        )
    return core.Event(
        key=f"{event.source}:{event.external_id}",
        type=event.type,
        occurred_at=event.occurred_at,
        member_id=member_id,
        payload=payload,
        lines=lines,
    )


def _order_fields(
    event_type: str, payload: Mapping[str, Any], member_id: int
) -> tuple[str | None, int | None]:
    if event_type == "order.paid":
        order = OrderPaid.model_validate(payload)
        return order.order_id, sum(li.amount_fen for li in order.lines if not li.paid_with_points)
    if event_type == "order.refunded":
        return OrderRefunded.model_validate(payload).order_id, None
    if event_type == "member.birthday":
        return f"{member_id}:{payload['year']}", None
    return None, None


def facts_of(
    uow: UnitOfWork,
    *,
    program_id: int,
    member_ids: Iterable[int],
    event_type: str,
    day: date,
    rule_codes: Iterable[str],
    lock: bool = False,
) -> dict[int, core.Facts]:
    """What the rules read about each member, as of the event's day. With ``lock`` the
    members are held first (in id order) until the transaction ends: one event of a member
    at a time, so that the caps, counters and streaks read here are written back before a
    concurrent event of the same member reads them."""
    ids = sorted(set(member_ids))
    profiles = members_service.rule_facts(uow, program_id=program_id, member_ids=ids, lock=lock)
    tiers = tiers_service.tiers_of(uow, member_ids=ids)
    codes = set(rule_codes)
    facts: dict[int, core.Facts] = {}
    for member_id in ids:
        profile = profiles[member_id]
        counters = uow.conn.execute(
            select(member_counters).where(member_counters.c.member_id == member_id)
        ).all()
        streaks = {
            c.event_type: core.Streak(c.streak_day, c.streak_length)
            for c in counters
            if c.streak_day is not None
        }
        facts[member_id] = core.Facts(
            member_id=member_id,
            tier=tiers.get(member_id),
            tags=frozenset(profile.tags),
            registered_at=profile.created_at,
            region=profile.region,
            birthday=profile.birthday,
            counts={c.event_type: int(c.seen) for c in counters},
            streaks=streaks,
            usage=_usage(uow, member_id, day, codes),
        )
    return facts


def _usage(uow: UnitOfWork, member_id: int, day: date, codes: set[str]) -> core.Usage:
    """Points awarded to the member (held ones aside) on ``day``, in its week and month, and
    by rule over those periods and its whole life."""
    # Whole periods, not up to the event's day: an event that arrives late (its day earlier
    # than awards already made) still sees everything its week and month have earned.
    month_start = day.replace(day=1)
    month_end = (month_start + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    week_start = day - timedelta(days=day.weekday())
    week_end = week_start + timedelta(days=6)
    since, until = min(month_start, week_start), max(month_end, week_end)
    rows = uow.conn.execute(
        select(event_awards.c.rule_code, event_awards.c.local_day, func.sum(event_awards.c.points))
        .where(
            event_awards.c.member_id == member_id,
            event_awards.c.held.is_(False),
            event_awards.c.local_day >= since,
            event_awards.c.local_day <= until,
        )
        .group_by(event_awards.c.rule_code, event_awards.c.local_day)
    ).all()
    total_day = total_month = 0
    by_rule: dict[tuple[str, str], int] = {}
    for code, when, points in rows:
        points = int(points or 0)
        periods = []
        if when == day:
            total_day += points
            periods.append("day")
        if month_start <= when <= month_end:
            total_month += points
            periods.append("month")
        if week_start <= when <= week_end:
            periods.append("week")
        if code in codes:
            for period in periods:
                by_rule[(code, period)] = by_rule.get((code, period), 0) + points
    if codes:
        lifetime = uow.conn.execute(
            select(event_awards.c.rule_code, func.sum(event_awards.c.points))
            .where(
                event_awards.c.member_id == member_id,
                event_awards.c.held.is_(False),
                event_awards.c.rule_code.in_(sorted(codes)),
            )
            .group_by(event_awards.c.rule_code)
        ).all()
        for code, points in lifetime:
            by_rule[(code, "lifetime")] = int(points or 0)
    return core.Usage(day=total_day, month=total_month, by_rule=by_rule)


def _evaluate(
    uow: UnitOfWork,
    program_id: int,
    event: core.Event,
    zone: ZoneInfo,
    rules: core.RuleSet,
    *,
    lock_budgets: bool,
) -> tuple[core.Evaluation, ProgramCaps, list[str]]:
    """The pure evaluation with what it needs loaded: the members' facts, the caps and the
    budgets spent (locked when the awards are going to be posted)."""
    candidates = rules.by_type.get(event.type, [])
    caps = rules_service.get_caps(uow, program_id=program_id)
    day = core.local_day(event.occurred_at, zone)
    recipients = {event.member_id}
    inviter = event.payload.get("inviter_member_id")
    if event.type == "referral.completed" and isinstance(inviter, int):
        members_service.require_member(uow, program_id=program_id, member_id=inviter)
        recipients.add(inviter)
    facts = facts_of(
        uow,
        program_id=program_id,
        member_ids=recipients,
        event_type=event.type,
        day=day,
        rule_codes=[r.spec.code for r in candidates if r.spec.caps.per_member],
        lock=lock_budgets,
    )
    budgeted = sorted(r.spec.code for r in candidates if r.spec.caps.budget is not None)
    if caps.budget is not None:
        budgeted.append(rules_service.PROGRAM_BUDGET)
    spent = rules_service.budgets_spent(
        uow, program_id=program_id, codes=budgeted, lock=lock_budgets
    )
    budgets = core.Budgets(by_rule=spent, program=spent.get(rules_service.PROGRAM_BUDGET, 0))
    multipliers, tier_caps = tiers_service.earning_terms(uow, program_id=program_id)
    if tier_caps:
        # The benefits matrix's caps, for the tiers the earning caps leave without one.
        matrix = {tier: TierCap(day=day, month=month) for tier, (day, month) in tier_caps.items()}
        caps = caps.model_copy(update={"by_tier": {**matrix, **caps.by_tier}})
    program = core.Program(zone, caps, tier_multipliers=multipliers)
    return core.evaluate(event, rules, program, facts, budgets), caps, budgeted


def dry_run(
    uow: UnitOfWork, *, program_id: int, event: EventIn, specs: list[RuleSpec] | None = None
) -> core.Evaluation:
    """What ``event`` would earn under ``specs`` (or the rules live at its time), with the
    members' facts as they are now; nothing is stored or posted."""
    payload = _parsed(uow, program_id, event)
    member_id = _member_id(uow, program_id, event)
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    if specs is None:
        rules = rules_service.rules_at(uow, program_id=program_id, moment=event.occurred_at)
    else:
        rules = core.RuleSet(rules_service.compile_rule(spec) for spec in specs)
    core_event = to_core_event(event, member_id, payload)
    return _evaluate(uow, program_id, core_event, zone, rules, lock_budgets=False)[0]


def _member_id(
    uow: UnitOfWork, program_id: int, event: EventIn, *, transacting: bool = False
) -> int:
    """The event's member, of this programme (and, ``transacting``, able to earn now)."""
    if event.member_id is not None:
        members_service.require_member(
            uow, program_id=program_id, member_id=event.member_id, transacting=transacting
        )
        return event.member_id
    assert event.member_ref is not None
    member = members_service.find_member(uow, program_id=program_id, external_ref=event.member_ref)
    if transacting:
        members_service.require_member(
            uow, program_id=program_id, member_id=member.id, transacting=True
        )
    return member.id


def _evaluate_and_post(
    uow: UnitOfWork,
    program_id: int,
    event_id: int,
    event: core.Event,
    zone: ZoneInfo,
    origin: tuple[str | None, str | None],
) -> tuple[list[AwardRead], int, list[dict[str, str]]]:
    """Evaluate and post; the awards, the points posted, and the rules skipped with why."""
    rules = rules_service.rules_at(uow, program_id=program_id, moment=event.occurred_at)
    result, caps, budgeted = _evaluate(uow, program_id, event, zone, rules, lock_budgets=True)
    day = core.local_day(event.occurred_at, zone)

    settings = programs_service.get_settings(uow, program_id=program_id)
    now = uow.clock.now()
    # When the points become available, in the event's own time: an order's after the
    # return window. Validity counts from then, so an event sent late (an import of last
    # year's orders) earns points that expire when they would have.
    usable_from = event.occurred_at
    if event.type == "order.paid" and settings.return_window_days:
        usable_from += timedelta(days=settings.return_window_days)
    available_at = usable_from if usable_from > now else None
    # Validity by the policy (and the member's tier where the policy says so).
    expiries = expiry_service.lot_expiries(
        uow, program_id=program_id, start=usable_from,
        member_ids=sorted({a.member_id for a in result.awards}),
    )  # fmt: skip
    # What each award posts: nothing held, nothing that would be expired already.
    posted: list[tuple[core.Award, int, str | None]] = []
    for award in result.awards:
        points, cap = award.points, award.cap
        expires_at = expiries[award.member_id]
        if points > 0 and not award.held and expires_at is not None and expires_at <= now:
            points, cap = 0, "expired before it was recorded"
        posted.append((award, points, cap))
    # One posting a member: the event's points arrive together, as one line of its history;
    # the awards keep the detail of which rule gave how much.
    postings: dict[int, int] = {}
    for member_id in sorted({a.member_id for a, points, _ in posted if points > 0 and not a.held}):
        mine = [(a, p) for a, p, _ in posted if a.member_id == member_id and p > 0 and not a.held]
        postings[member_id] = points_service.earn(
            uow,
            member_id=member_id,
            amount=sum(p for _, p in mine),
            key=f"event:{event_id}:{member_id}",
            available_at=available_at,
            expires_at=expiries[member_id],
            reason=f"{event.type} {event.key}: " + ", ".join(f"{a.rule} {p}" for a, p in mine),
            actor=ACTOR,
        ).id
        merchant, store = origin
        points_service.record_origin(
            uow, posting_id=postings[member_id], merchant=merchant, store=store
        )
    new_spent: dict[str, int] = {}
    for award, points, _ in posted:
        if points > 0 and not award.held:
            if award.rule in budgeted:
                new_spent[award.rule] = new_spent.get(award.rule, 0) + points
            if caps.budget is not None:
                key = rules_service.PROGRAM_BUDGET
                new_spent[key] = new_spent.get(key, 0) + points
    stored = _store_awards(
        uow,
        program_id,
        event_id,
        [
            (
                award,
                points,
                cap,
                postings.get(award.member_id) if points > 0 and not award.held else None,
                None,
            )
            for award, points, cap in posted
        ],
        day,
    )
    rules_service.add_to_budgets(uow, program_id=program_id, spent=new_spent)
    for (member_id, event_type), streak in result.streaks.items():
        _keep_streak(uow, member_id, event_type, streak)
    total = sum(points for award, points, _ in posted if not award.held)
    skipped = [{"rule": s.rule, "why": s.why} for s in result.skipped]
    _set_outcome(uow, event_id, total, skipped)
    if postings:
        # A tier scheme that upgrades at once (or a campaign of temporary upgrades) moves
        # the members up now; without one this reads only the settings, already read.
        tiers_service.after_earning(uow, program_id=program_id, member_ids=postings, now=now)
    return stored, total, skipped


def _store_awards(
    uow: UnitOfWork,
    program_id: int,
    event_id: int,
    awards: list[tuple[core.Award, int, str | None, int | None, int | None]],
    day: date,
) -> list[AwardRead]:
    """Each (award, points posted, cap that bit, posting, award it reverses), in one go;
    the awards as an answer shows them."""
    if not awards:
        return []
    rows = [
        {
            "event_id": event_id,
            "program_id": program_id,
            "member_id": award.member_id,
            "rule_code": award.rule,
            "rule_version": award.version,
            "kind": award.kind,
            "wanted": award.wanted,
            "points": points,
            "cap": cap,
            "held": award.held,
            "posting_id": posting_id,
            "reverses_id": reverses_id,
            "local_day": day,
            "detail": json.loads(json.dumps(dict(award.detail), default=_json_default)),
        }
        for award, points, cap, posting_id, reverses_id in awards
    ]
    uow.conn.execute(event_awards.insert(), rows)
    return [_award_read(row) for row in rows]


def _award_read(row: Mapping[str, Any] | RowMapping) -> AwardRead:
    return AwardRead(
        rule=row["rule_code"],
        version=row["rule_version"],
        kind=row["kind"],
        member_id=row["member_id"],
        points=int(row["points"]),
        wanted=int(row["wanted"]),
        cap=row["cap"],
        held=bool(row["held"]),
        posting_id=row["posting_id"],
        detail=dict(row["detail"] or {}),
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    return str(value)


def _set_outcome(uow: UnitOfWork, event_id: int, total: int, skipped: list[dict[str, str]]) -> None:
    """Keep on the event what it posted and why the other rules did not fire."""
    if total or skipped:
        uow.conn.execute(
            events.update().where(events.c.id == event_id).values(points=total, skipped=skipped)
        )


def _refund(
    uow: UnitOfWork, program_id: int, event_id: int, event: core.Event, zone: ZoneInfo
) -> tuple[list[AwardRead], int, list[dict[str, str]]]:
    """Take back the order's points in the proportion of the money refunded so far."""
    refund = OrderRefunded.model_validate(event.payload)
    order = uow.conn.execute(
        select(events).where(
            events.c.program_id == program_id,
            events.c.subject == refund.order_id,
            events.c.type == "order.paid",
        )
    ).first()
    if order is None:
        raise OrderNotSeen(order_id=refund.order_id)
    if order.member_id != event.member_id:
        raise InvalidInput(
            field="member", problem=f"order {refund.order_id!r} belongs to another member"
        )
    # Money by sku: what the order paid (lines bought with points earned nothing), and what
    # the refunds so far, this one included, gave back.
    paid_by_sku: dict[str, int] = {}
    for bought in OrderPaid.model_validate(order.payload).lines:
        if not bought.paid_with_points:
            paid_by_sku[bought.sku] = paid_by_sku.get(bought.sku, 0) + bought.amount_fen
    paid = sum(paid_by_sku.values())
    refunded_by_sku: dict[str, int] = {}
    earlier_whole = False
    earlier_refunds = uow.conn.execute(
        select(events.c.payload).where(
            events.c.program_id == program_id,
            events.c.subject == refund.order_id,
            events.c.type == "order.refunded",
            events.c.id != event_id,
        )
    ).scalars()
    for earlier_payload in earlier_refunds:
        before = OrderRefunded.model_validate(earlier_payload)
        earlier_whole = earlier_whole or before.whole
        for back in before.lines:
            refunded_by_sku[back.sku] = refunded_by_sku.get(back.sku, 0) + back.amount_fen
    earlier = paid if earlier_whole else min(paid, sum(refunded_by_sku.values()))
    for index, line in enumerate(refund.lines):
        if line.sku not in paid_by_sku:
            raise InvalidInput(
                field=f"payload.lines.{index}.sku",
                problem=f"{line.sku!r} is not a line of order {refund.order_id!r} paid in money",
            )
        refunded_by_sku[line.sku] = refunded_by_sku.get(line.sku, 0) + line.amount_fen
        if refunded_by_sku[line.sku] > paid_by_sku[line.sku]:
            raise InvalidInput(
                field=f"payload.lines.{index}.amount_fen",
                problem=f"refunds of {line.sku!r} would come to {refunded_by_sku[line.sku]} "
                f"fen, more than the {paid_by_sku[line.sku]} it cost",
            )
    everything = refund.whole or earlier_whole
    if everything:
        refunded_by_sku = dict(paid_by_sku)
    amount = paid - earlier if refund.whole else sum(line.amount_fen for line in refund.lines)
    if amount <= 0 or earlier >= paid:
        raise InvalidInput(
            field="payload", problem=f"order {refund.order_id!r} has nothing left to refund"
        )
    uow.conn.execute(events.update().where(events.c.id == event_id).values(amount_fen=amount))
    originals = uow.conn.execute(
        select(event_awards).where(
            event_awards.c.event_id == order.id,
            event_awards.c.reverses_id.is_(None),
            event_awards.c.posting_id.is_not(None),
        )
    ).all()
    taken = (
        dict(
            uow.conn.execute(
                select(event_awards.c.reverses_id, func.sum(event_awards.c.points))
                .where(event_awards.c.reverses_id.in_([o.id for o in originals]))
                .group_by(event_awards.c.reverses_id)
            ).all()
        )
        if originals
        else {}
    )
    dues: list[tuple[Row[Any], int]] = []
    for original in originals:
        # An award weighs its lines as it was computed (points by sku for a spend rate and
        # what multiplies it), any other award by the money of each line.
        weights = (original.detail or {}).get("weights") or paid_by_sku
        share = (
            Fraction(1)
            if everything
            else core.refunded_share(weights, paid_by_sku, refunded_by_sku)
        )
        due = core.reversal_due(
            awarded=int(original.points),
            eligible_fen=share.denominator,
            refunded_fen=share.numerator,
            already_reversed=-int(taken.get(original.id) or 0),
        )
        if due > 0:
            dues.append((original, due))
    # One claw-back a posting (the order's points of one member), the awards it covers kept.
    reversals: dict[int, int] = {}
    for posting_id in sorted({int(o.posting_id) for o, _ in dues}):
        reversals[posting_id] = points_service.reverse(
            uow,
            earn_id=posting_id,
            key=f"event:{event_id}:reverse:{posting_id}",
            amount=sum(due for o, due in dues if o.posting_id == posting_id),
            reason=f"order {refund.order_id} refunded",
            actor=ACTOR,
        ).id
    # A reversal counts on the day of the award it takes back, so that a refund gives no
    # room under today's caps (nor the lifetime's) to earn again.
    stored: list[AwardRead] = []
    for original_day in sorted({o.local_day for o, _ in dues}):
        stored += _store_awards(
            uow,
            program_id,
            event_id,
            [
                (
                    core.Award(
                        rule=o.rule_code,
                        version=o.rule_version,
                        kind="reversal",
                        member_id=o.member_id,
                        points=-due,
                        wanted=-due,
                        detail={"order_id": refund.order_id, "refunded_fen": amount},
                    ),
                    -due,
                    None,
                    reversals[int(o.posting_id)],
                    o.id,
                )
                for o, due in dues
                if o.local_day == original_day
            ],
            original_day,
        )
    total = -sum(due for _, due in dues)
    _set_outcome(uow, event_id, total, [])
    return stored, total, []


def _count(uow: UnitOfWork, member_id: int, event_type: str) -> None:
    _counter(uow, member_id, event_type, {"seen": 1}, {"seen": member_counters.c.seen + 1})


def _keep_streak(uow: UnitOfWork, member_id: int, event_type: str, streak: core.Streak) -> None:
    values = {"streak_day": streak.last_day, "streak_length": streak.length}
    _counter(uow, member_id, event_type, {"seen": 0, **values}, values)


def _counter(
    uow: UnitOfWork,
    member_id: int,
    event_type: str,
    new: Mapping[str, Any],
    change: Mapping[str, Any],
) -> None:
    """Insert the member's counter row for ``event_type``, or change the one there."""
    upsert(uow, member_counters, {"member_id": member_id, "event_type": event_type, **new}, change)


# --------------------------------------------------------------------------- reading


def get_event(uow: UnitOfWork, *, program_id: int, event_id: int) -> EventResult:
    row = uow.conn.execute(
        select(events).where(events.c.id == event_id, events.c.program_id == program_id)
    ).one_or_none()
    if row is None:
        raise UnknownEvent(event_id=event_id)
    return _result(uow, row, replayed=False)


def _result(
    uow: UnitOfWork, row: Row[Any], *, replayed: bool, skipped: list[dict[str, str]] | None = None
) -> EventResult:
    awards = uow.conn.execute(
        select(event_awards).where(event_awards.c.event_id == row.id).order_by(event_awards.c.id)
    ).all()
    return EventResult(
        id=row.id,
        source=row.source,
        external_id=row.external_id,
        type=row.type,
        member_id=row.member_id,
        occurred_at=row.occurred_at,
        points=int(row.points),
        awards=[_award_read(a._mapping) for a in awards],
        skipped=list(row.skipped or []) if skipped is None else skipped,
        replayed=replayed,
    )


# --------------------------------------------------------------------------- birthdays


def raise_birthdays(db: Database, *, program_id: int, day: date, chunk: int = 500) -> int:
    """Send ``member.birthday`` for every active member born on ``day`` (in the programme's
    calendar; those born on 29 February on the 28th in other years), at the start of that
    day, a chunk of members a transaction. Keyed by member and year: running it again for
    the same day raises nothing new. Returns the events raised this time."""
    zone = ZoneInfo(db.run(lambda uow: programs_service.time_zone(uow, program_id=program_id)))
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    days = {day.day}
    if day.month == 2 and day.day == 28 and not calendar.isleap(day.year):
        days.add(29)
    raised, after = 0, 0
    while True:

        def one_chunk(uow: UnitOfWork, after: int = after) -> tuple[int, int | None]:
            ids = members_service.born_on(
                uow, program_id=program_id, month=day.month, days=days, after_id=after,
                limit=chunk,
            )  # fmt: skip
            made = 0
            for member_id in ids:
                event = EventIn(
                    source="jifen", external_id=f"birthday:{member_id}:{day.year}",
                    type="member.birthday", occurred_at=start, member_id=member_id,
                    payload={"year": day.year},
                )  # fmt: skip
                made += not ingest(uow, program_id=program_id, event=event).replayed
            return made, (ids[-1] if len(ids) == chunk else None)

        made, after_next = db.run(one_chunk)
        raised += made
        if after_next is None:
            return raised
        after = after_next


# --------------------------------------------------------------------------- backtest

_BACKTEST_CHUNK = 1000


def backtest(uow: UnitOfWork, *, program_id: int, request: BacktestIn) -> BacktestReport:
    """What the stored events of a period would have earned under a proposed change of the
    rules, against what they did earn: per rule, per tier, per day and per member. Nothing
    is stored or posted; events are read a chunk at a time."""
    proposed_specs = request.rules
    replacing = {spec.code for spec in proposed_specs} | set(request.drop)
    proposed_rules = [rules_service.compile_rule(spec, version=0) for spec in proposed_specs]
    live = rules_service.activations(uow, program_id=program_id)
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    caps = rules_service.get_caps(uow, program_id=program_id)
    program = core.Program(zone, caps)
    sums: dict[str, dict[str, Compared]] = {"rule": {}, "tier": {}, "day": {}, "member": {}}
    replay = _Replay(uow, program_id, request.since, zone)
    total_actual = total_proposed = replayed = 0
    after: tuple[datetime, int] | None = None
    while True:
        query = select(events).where(
            events.c.program_id == program_id,
            events.c.occurred_at >= request.since,
            events.c.occurred_at < request.until,
            events.c.type != "order.refunded",
        )
        if after is not None:
            query = query.where(
                (events.c.occurred_at > after[0])
                | ((events.c.occurred_at == after[0]) & (events.c.id > after[1]))
            )
        chunk = uow.conn.execute(
            query.order_by(events.c.occurred_at, events.c.id).limit(_BACKTEST_CHUNK)
        ).all()
        if not chunk:
            break
        after = (chunk[-1].occurred_at, chunk[-1].id)
        actual_awards = _actual_awards(uow, [row.id for row in chunk])
        for row in chunk:
            replayed += 1
            moment = row.occurred_at
            live_now = [
                r for r, start, end in live if start <= moment and (not end or moment < end)
            ]
            rule_set = core.RuleSet(
                [r for r in live_now if r.spec.code not in replacing] + proposed_rules
            )
            event = _stored_event(row)
            facts = replay.facts(event, rule_set)
            result = core.evaluate(event, rule_set, program, facts, replay.budgets)
            replay.record(event, result)
            day = core.local_day(moment, zone).isoformat()
            for award in result.awards:
                if award.held or not award.points:
                    continue
                tier = facts[award.member_id].tier or "-"
                for kind, key in (
                    ("rule", award.rule),
                    ("tier", tier),
                    ("day", day),
                    ("member", str(award.member_id)),
                ):
                    sums[kind].setdefault(key, Compared(key=key)).proposed += award.points
                total_proposed += award.points
            for member_id, rule, points in actual_awards.get(row.id, []):
                tier = replay.tier(member_id)
                for kind, key in (
                    ("rule", rule),
                    ("tier", tier),
                    ("day", day),
                    ("member", str(member_id)),
                ):
                    sums[kind].setdefault(key, Compared(key=key)).actual += points
                total_actual += points
    members = sorted(sums["member"].values(), key=lambda c: (-abs(c.difference), c.key))
    return BacktestReport(
        events=replayed,
        actual=total_actual,
        proposed=total_proposed,
        by_rule=sorted(sums["rule"].values(), key=lambda c: c.key),
        by_tier=sorted(sums["tier"].values(), key=lambda c: c.key),
        by_day=sorted(sums["day"].values(), key=lambda c: c.key),
        members=[m for m in members[: request.top] if m.difference],
        notes=[
            "Members are taken at their current tier and profile.",
            "Caps, budgets and streaks count from the start of the period.",
            "Refunds are not replayed; actual points are those first awarded, before refunds.",
        ],
    )


def _stored_event(row: Row[Any]) -> core.Event:
    request = EventIn(
        source=row.source,
        external_id=row.external_id,
        type=row.type,
        occurred_at=row.occurred_at,
        member_id=row.member_id,
        payload=row.payload,
    )
    return to_core_event(request, row.member_id, row.payload)


def _actual_awards(uow: UnitOfWork, event_ids: list[int]) -> dict[int, list[tuple[int, str, int]]]:
    rows = uow.conn.execute(
        select(
            event_awards.c.event_id,
            event_awards.c.member_id,
            event_awards.c.rule_code,
            event_awards.c.points,
        ).where(
            event_awards.c.event_id.in_(event_ids),
            event_awards.c.held.is_(False),
            event_awards.c.reverses_id.is_(None),
        )
    ).all()
    found: dict[int, list[tuple[int, str, int]]] = {}
    for event_id, member_id, rule, points in rows:
        found.setdefault(event_id, []).append((member_id, rule, int(points)))
    return found


class _Replay:
    """The members' facts as the replay goes: profiles and tiers as they are now, counts of
    earlier events, and streaks, usage and budgets counted within the replay."""

    def __init__(self, uow: UnitOfWork, program_id: int, since: datetime, zone: ZoneInfo) -> None:
        self.uow = uow
        self.zone = zone
        self.program_id = program_id
        self.since = since
        self.known: dict[int, core.Facts] = {}
        self.tiers: dict[int, str | None] = {}
        self.usage: dict[tuple[int, str, str], int] = {}
        self.budgets = core.Budgets(by_rule={}, program=0)

    def tier(self, member_id: int) -> str:
        if member_id not in self.tiers:
            self._load([member_id])
        return self.tiers.get(member_id) or "-"

    def _load(self, member_ids: list[int]) -> None:
        missing = [m for m in member_ids if m not in self.known]
        if not missing:
            return
        tiers = tiers_service.tiers_of(self.uow, member_ids=missing)
        profiles = members_service.rule_facts(
            self.uow, program_id=self.program_id, member_ids=missing
        )
        before = self.uow.conn.execute(
            select(events.c.member_id, events.c.type, func.count())
            .where(events.c.member_id.in_(missing), events.c.occurred_at < self.since)
            .group_by(events.c.member_id, events.c.type)
        ).all()
        counts: dict[int, dict[str, int]] = {}
        for member_id, kind, count in before:
            counts.setdefault(member_id, {})[kind] = int(count)
        for member_id in missing:
            profile = profiles.get(member_id)
            self.tiers[member_id] = tiers.get(member_id)
            self.known[member_id] = core.Facts(
                member_id=member_id,
                tier=tiers.get(member_id),
                tags=frozenset(profile.tags) if profile else frozenset(),
                registered_at=profile.created_at if profile else None,
                region=profile.region if profile else None,
                birthday=profile.birthday if profile else None,
                counts=counts.get(member_id, {}),
            )

    def _buckets(self, moment: datetime) -> dict[str, str]:
        """The period each cap counts over, for an event at ``moment`` (programme days)."""
        day = core.local_day(moment, self.zone)
        year, week, _ = day.isocalendar()
        return {
            "day": f"day:{day}",
            "week": f"week:{year}-{week}",
            "month": f"month:{day:%Y-%m}",
            "lifetime": "lifetime",
        }

    def facts(self, event: core.Event, rules: core.RuleSet) -> dict[int, core.Facts]:
        ids = [event.member_id]
        inviter = event.payload.get("inviter_member_id")
        if isinstance(inviter, int):
            ids.append(inviter)
        self._load(ids)
        buckets = self._buckets(event.occurred_at)
        codes = {rule.spec.code for rule in rules.by_type.get(event.type, [])}
        out = {}
        for member_id in ids:
            by_rule = {
                (code, period): self.usage.get((member_id, code, bucket), 0)
                for code in codes
                for period, bucket in buckets.items()
            }
            out[member_id] = replace(
                self.known[member_id],
                usage=core.Usage(
                    day=self.usage.get((member_id, "*", buckets["day"]), 0),
                    month=self.usage.get((member_id, "*", buckets["month"]), 0),
                    by_rule=by_rule,
                ),
            )
        return out

    def record(self, event: core.Event, result: core.Evaluation) -> None:
        member = self.known[event.member_id]
        counts = dict(member.counts)
        counts[event.type] = counts.get(event.type, 0) + 1
        streaks = dict(member.streaks)
        for (member_id, kind), streak in result.streaks.items():
            if member_id == event.member_id:
                streaks[kind] = streak
        self.known[event.member_id] = replace(member, counts=counts, streaks=streaks)
        buckets = self._buckets(event.occurred_at)
        spent = dict(self.budgets.by_rule)
        program = self.budgets.program
        for award in result.awards:
            if award.held or not award.points:
                continue
            for slot in (
                (award.member_id, "*", buckets["day"]),
                (award.member_id, "*", buckets["month"]),
                *((award.member_id, award.rule, bucket) for bucket in buckets.values()),
            ):
                self.usage[slot] = self.usage.get(slot, 0) + award.points
            spent[award.rule] = spent.get(award.rule, 0) + award.points
            program += award.points
        self.budgets = core.Budgets(by_rule=spent, program=program)


def spend_and_counts(
    uow: UnitOfWork,
    *,
    member_ids: Iterable[int],
    since: datetime,
    until: datetime,
    counted_types: Iterable[str] = (),
) -> dict[int, tuple[int, int]]:
    """For each of ``member_ids``: the money its orders paid in (``since``, ``until``] less
    what refunds gave back, in fen, and how many events of ``counted_types`` it had then.
    One grouped query; members with nothing are left out."""
    ids = sorted(set(member_ids))
    if not ids:
        return {}
    counted = sorted(set(counted_types))
    rows = uow.conn.execute(
        select(events.c.member_id, events.c.type, func.sum(events.c.amount_fen), func.count())
        .where(
            among(uow.dialect, events.c.member_id, ids),
            events.c.occurred_at > since,
            events.c.occurred_at <= until,
            events.c.type.in_(sorted({"order.paid", "order.refunded", *counted})),
        )
        .group_by(events.c.member_id, events.c.type)
    ).all()
    found: dict[int, tuple[int, int]] = {}
    for member_id, event_type, amount, count in rows:
        spend, seen = found.get(int(member_id), (0, 0))
        if event_type == "order.paid":
            spend += int(amount or 0)
        elif event_type == "order.refunded":
            spend -= int(amount or 0)
        if event_type in counted:
            seen += int(count)
        found[int(member_id)] = (spend, seen)
    return found
