"""Rule use cases: versions and their lifecycle (draft → submitted → approved by a second
person → scheduled / active → paused → retired), the programme's caps, the budgets of
budgeted rules, and the rule set that was active at a given moment.

An approved version is immutable: editing a rule makes a new version. Activating a version
ends the activation of the rule's earlier versions at the same instant, so at any moment at
most one version of a rule is live, and an event is evaluated against the versions live at
the event's own time. The caps are kept the same way, every version with the time it took
effect, and an event is capped by those in force at its own time.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, get_args

from pydantic import BaseModel
from sqlalchemy import Row, Text, and_, bindparam, cast, func, or_, select

from jifen.db.prepared import Prepared, Read, read_one
from jifen.db.uow import UnitOfWork
from jifen.db.upsert import insert_missing, upsert
from jifen.errors import InvalidInput, StateConflict, UnknownRule
from jifen.events.schemas import CATALOGUE, sample_payload
from jifen.rules import conditions
from jifen.rules.core import ConditionFailed, Event, Facts, Rule, RuleSet, activation
from jifen.rules.models import (
    earning_caps,
    event_types,
    rule_activations,
    rule_budgets,
    rule_versions,
)
from jifen.rules.schemas import (
    AWARD_KINDS,
    BirthdayGift,
    EventTypeDeclare,
    EventTypeRead,
    Multiplier,
    PerUnit,
    ProgramCaps,
    RulePack,
    RuleSpec,
    RuleVersionRead,
)
from jifen.tiers import service as tiers_service
from jifen.tiers.core import Naming, namings

PROGRAM_BUDGET = "*"


def compile_rule(spec: RuleSpec, version: int = 1) -> Rule:
    """``spec`` ready to evaluate; InvalidInput when its condition does not compile."""
    condition = conditions.compile_condition(spec.condition) if spec.condition else None
    return Rule(spec, version, condition)


# --------------------------------------------------------------------------- versions


def create_version(
    uow: UnitOfWork, *, program_id: int, spec: RuleSpec, created_by: str
) -> RuleVersionRead:
    """A new draft: version 1 of a new rule, or the next version of an existing one."""
    compile_rule(spec)  # refuse a condition that does not compile before storing it
    _check_tiers(uow, program_id, spec)
    latest = uow.conn.execute(
        select(func.max(rule_versions.c.version)).where(
            rule_versions.c.program_id == program_id, rule_versions.c.code == spec.code
        )
    ).scalar_one()
    version_id = uow.conn.execute(
        rule_versions.insert().returning(rule_versions.c.id),
        {
            "program_id": program_id,
            "code": spec.code,
            "version": (latest or 0) + 1,
            "spec": spec.model_dump(mode="json"),
            "state": "draft",
            "created_by": created_by,
            "created_at": uow.clock.now(),
        },
    ).scalar_one()
    return get_version(uow, program_id=program_id, version_id=int(version_id))


def update_draft(
    uow: UnitOfWork, *, program_id: int, version_id: int, spec: RuleSpec
) -> RuleVersionRead:
    """Change a draft. Anything past draft is frozen: create a new version instead."""
    row = _row(uow, program_id, version_id)
    _require_state(row, "draft", "changed")
    if spec.code != row.code:
        raise InvalidInput(
            field="code",
            problem=f"a version of {row.code!r} keeps its code",
            problem_zh=f"规则 {row.code!r} 的各版本须沿用同一代码,不能修改",
        )
    compile_rule(spec)
    _check_tiers(uow, program_id, spec)
    uow.conn.execute(
        rule_versions.update()
        .where(rule_versions.c.id == version_id)
        .values(spec=spec.model_dump(mode="json"))
    )
    return get_version(uow, program_id=program_id, version_id=version_id)


def submit(
    uow: UnitOfWork, *, program_id: int, version_id: int, approval_id: int | None
) -> RuleVersionRead:
    """Mark a draft as waiting for approval (under ``approval_id`` when filed through the
    API's approvals; a rule pack loaded by the CLI passes None)."""
    row = _row(uow, program_id, version_id)
    _require_state(row, "draft", "submitted")
    _check_tiers(uow, program_id, RuleSpec.model_validate(row.spec))  # changed since written?
    _move(uow, version_id, "draft", state="submitted", approval_id=approval_id)
    return get_version(uow, program_id=program_id, version_id=version_id)


def approve(
    uow: UnitOfWork,
    *,
    program_id: int,
    version_id: int,
    approved_by: str,
    activate_at: datetime | None = None,
) -> RuleVersionRead:
    """The second person's yes: the version is frozen and goes live at ``activate_at``
    (default now), ending the live activation of the rule's other versions then."""
    row = _row(uow, program_id, version_id)
    _hold_rule(uow, row)
    _require_state(row, "submitted", "approved")
    spec = RuleSpec.model_validate(row.spec)
    compile_rule(spec)  # still valid under today's compiler
    _check_event_types(uow, program_id, spec)
    _check_multiplier(spec)
    _check_tiers(uow, program_id, spec)  # the tiers may have changed since it was written
    now = uow.clock.now()
    start = max(activate_at or now, now)
    _move(uow, version_id, "submitted", state="active", approved_by=approved_by, approved_at=now)
    _end_other_versions(uow, row, start)
    _activate(uow, program_id, version_id, start)
    return get_version(uow, program_id=program_id, version_id=version_id)


def reject(uow: UnitOfWork, *, program_id: int, version_id: int) -> RuleVersionRead:
    row = _row(uow, program_id, version_id)
    _require_state(row, "submitted", "rejected")
    _move(uow, version_id, "submitted", state="rejected")
    return get_version(uow, program_id=program_id, version_id=version_id)


def pause(uow: UnitOfWork, *, program_id: int, version_id: int) -> RuleVersionRead:
    """Stop a live version for now (:func:`resume` makes it live again). A version approved
    for a later start cannot be paused: resumed, it would go live before the date a second
    person approved (and end its predecessor early)."""
    row = _row(uow, program_id, version_id)
    _require_state(row, "active", "paused")
    now = uow.clock.now()
    starts = _scheduled_start(uow, version_id, now)
    if starts is not None:
        raise StateConflict(
            problem=f"Rule {row.code} version {row.version} has not started: it goes live at "
            f"{starts.isoformat()}. Only a live version can be paused; retire it, or have a "
            "new version approved for another start.",
            problem_zh=f"规则 {row.code} 第 {row.version} 版尚未开始,将于 {starts.isoformat()} "
            "生效。只有已生效的版本才能暂停;请停用它,或另建新版本按新的开始时间审批。",
        )
    _close_activation(uow, version_id, now)
    _move(uow, version_id, "active", state="paused")
    return get_version(uow, program_id=program_id, version_id=version_id)


def resume(uow: UnitOfWork, *, program_id: int, version_id: int) -> RuleVersionRead:
    row = _row(uow, program_id, version_id)
    _hold_rule(uow, row)
    _require_state(row, "paused", "resumed")
    _check_event_types(uow, program_id, RuleSpec.model_validate(row.spec))  # changed since?
    now = uow.clock.now()
    _end_other_versions(uow, row, now)
    _activate(uow, program_id, version_id, now)
    _move(uow, version_id, "paused", state="active")
    return get_version(uow, program_id=program_id, version_id=version_id)


def retire(uow: UnitOfWork, *, program_id: int, version_id: int) -> RuleVersionRead:
    """End a version for good. A version retired before its scheduled start never goes
    live, and the version its approval was to end then stays live: the rule keeps the
    version it has, as if the successor had not been approved."""
    row = _row(uow, program_id, version_id)
    _hold_rule(uow, row)
    if row.state not in ("active", "paused"):
        _require_state(row, "active", "retired")
    now = uow.clock.now()
    starts = _scheduled_start(uow, version_id, now)
    _close_activation(uow, version_id, now)
    _move(uow, version_id, row.state, state="retired")
    if starts is not None:
        _keep_predecessor(uow, row, starts)
    return get_version(uow, program_id=program_id, version_id=version_id)


def _scheduled_start(uow: UnitOfWork, version_id: int, now: datetime) -> datetime | None:
    """When a version approved for a later start goes live (``None``: it has started)."""
    start: datetime | None = uow.conn.execute(
        select(func.min(rule_activations.c.active_from)).where(
            rule_activations.c.version_id == version_id,
            rule_activations.c.active_to.is_(None),
            rule_activations.c.active_from > now,
        )
    ).scalar_one()
    return start


def _keep_predecessor(uow: UnitOfWork, row: Row[Any], starts: datetime) -> None:
    """Undo what approving ``row`` for ``starts`` did to the rule's live version: its
    activation, set to end then, stays open, and it is active again (it never stopped)."""
    same_rule = select(rule_versions.c.id).where(
        rule_versions.c.program_id == row.program_id,
        rule_versions.c.code == row.code,
        rule_versions.c.id != row.id,
    )
    ending = uow.conn.execute(
        select(rule_activations.c.id, rule_activations.c.version_id).where(
            rule_activations.c.version_id.in_(same_rule),
            rule_activations.c.active_to == starts,
        )
    ).all()
    for activation_id, other_id in ending:
        uow.conn.execute(
            rule_activations.update()
            .where(rule_activations.c.id == activation_id)
            .values(active_to=None)
        )
        _move(uow, other_id, "retired", state="active")


def get_version(uow: UnitOfWork, *, program_id: int, version_id: int) -> RuleVersionRead:
    return _read(uow, _row(uow, program_id, version_id))


def list_versions(
    uow: UnitOfWork,
    *,
    program_id: int,
    code: str | None = None,
    state: str | None = None,
    after_id: int = 0,
    limit: int = 50,
) -> list[RuleVersionRead]:
    """Versions in the order they were created, after ``after_id``; filter by rule code and
    stored state."""
    query = select(rule_versions).where(
        rule_versions.c.program_id == program_id, rule_versions.c.id > after_id
    )
    if code is not None:
        query = query.where(rule_versions.c.code == code)
    if state is not None:
        query = query.where(rule_versions.c.state == state)
    rows = uow.conn.execute(query.order_by(rule_versions.c.id).limit(limit)).all()
    return [_read(uow, row) for row in rows]


def rules_at(uow: UnitOfWork, *, program_id: int, moment: datetime) -> RuleSet:
    """The rule versions that were live at ``moment``: what an event of that time meets.
    The programme's activations are read once a transaction (a batch of events shares them).

    The live set changes only where a period starts or ends: between two such moments every
    event meets the same set, found once and then by a binary search of those moments."""
    periods = live_periods(uow, program_id=program_id)
    key = f"rule_timeline:{program_id}"
    timeline: Timeline | None = uow.local.get(key)
    if timeline is None or timeline.periods is not periods:
        timeline = Timeline(periods)
        uow.local[key] = timeline
    return timeline.at(moment)


class Timeline:
    """The live rule sets of a list of periods, by the stretch of time between the moments
    where one starts or ends."""

    def __init__(self, periods: list[tuple[Rule, datetime, datetime | None]]) -> None:
        self.periods = periods
        self.bounds = sorted({m for _, start, end in periods for m in (start, end) if m})
        self.sets: dict[int, RuleSet] = {}

    def at(self, moment: datetime) -> RuleSet:
        stretch = bisect_right(self.bounds, moment)  # the bounds at or before ``moment``
        found = self.sets.get(stretch)
        if found is None:
            found = RuleSet(
                rule
                for rule, start, end in self.periods
                if start <= moment and (end is None or moment < end)
            )
            self.sets[stretch] = found
        return found


def live_periods(
    uow: UnitOfWork, *, program_id: int
) -> list[tuple[Rule, datetime, datetime | None]]:
    """:func:`activations`, read once a transaction (a batch of events shares them)."""
    key = f"activations:{program_id}"
    if key not in uow.local:
        uow.local[key] = activations(uow, program_id=program_id)
    periods: list[tuple[Rule, datetime, datetime | None]] = uow.local[key]
    return periods


def activations(
    uow: UnitOfWork, *, program_id: int
) -> list[tuple[Rule, datetime, datetime | None]]:
    """Every period a rule version was (or is) live, with the version ready to evaluate:
    for replaying many events without a query each."""
    rows = uow.conn.execute(_ACTIVATIONS, {"program": program_id}).all()
    return [(_stored(r.id, r.spec, r.version), r.active_from, r.active_to) for r in rows]


_ACTIVATIONS = (
    select(
        rule_versions.c.id, cast(rule_versions.c.spec, Text).label("spec"),
        rule_versions.c.version, rule_activations.c.active_from, rule_activations.c.active_to,
    )
    .join(rule_activations, rule_activations.c.version_id == rule_versions.c.id)
    .where(rule_activations.c.program_id == bindparam("program"))
)  # fmt: skip
"""Every activation of a programme, with its version's spec as the text stored."""


@lru_cache(maxsize=4096)
def _stored(version_id: int, spec_text: str, version: int) -> Rule:
    """A version as stored (its spec's text), ready to evaluate: read, checked and compiled
    once, not again by every transaction that reads the programme's activations. Keyed by
    the version's id and text: an approved version never changes."""
    return compile_rule(RuleSpec.model_validate_json(spec_text), version)


def _canonical(spec: Mapping[str, Any]) -> str:
    return RuleSpec.model_validate(spec).model_dump_json()


# --------------------------------------------------------------------------- caps, budgets


def get_caps(uow: UnitOfWork, *, program_id: int, at: datetime | None = None) -> ProgramCaps:
    """The programme's caps in force at ``at``; without a time, the current ones (the last
    set). See :func:`caps_at`."""
    return caps_at(uow, program_id=program_id, at=at).caps


@dataclass(frozen=True)
class CapsVersion:
    """The programme's caps as set at ``since``: they cap the events from then until the
    next caps were set. ``since`` is ``None`` for the time before any caps were set (no
    limits)."""

    since: datetime | None
    caps: ProgramCaps


NO_CAPS = CapsVersion(None, ProgramCaps())


def caps_at(uow: UnitOfWork, *, program_id: int, at: datetime | None = None) -> CapsVersion:
    """The caps in force at ``at`` (an event's time): the version set last at or before
    it, none before the first; without a time, the current version. Caps take effect when
    they are set (approved), as a rule version goes live when it is approved, so an event
    sent late is capped as it would have been at its own time.

    The budget of a version bounds the programme's running total of points awarded under
    a budget (``budgets_spent`` under :data:`PROGRAM_BUDGET`), whenever its events come in:
    an event is held to the budget figure in force at its time, and its points count in
    the total only when that version has a budget (points earned under none count in
    none, as an award made before its rule had a budget counts in none of the rule's).

    The current version is read once a transaction (with others, see :func:`caps_read`);
    the earlier ones only for an event older than it, once a transaction too."""
    history: _CapsHistory | None = uow.local.get(f"caps:{program_id}")
    if history is None:
        history = read_one(uow.conn, _history_read(uow, program_id))
    current = history.current
    if at is None or current.since is None or current.since <= at:
        return current
    if history.versions is None:
        rows = uow.conn.execute(_CAPS_VERSIONS, {"program": program_id}).all()
        history.versions = [CapsVersion(since, _caps_of(text)) for since, text in rows]
        history.starts = [since for since, _ in rows]
    before = bisect_right(history.starts, at)  # the versions set at or before ``at``
    return history.versions[before - 1] if before else NO_CAPS


@dataclass
class _CapsHistory:
    """A programme's caps as a transaction has read them: the current version, and every
    version (oldest first, with the times they were set) once an earlier time was asked
    about."""

    current: CapsVersion
    versions: list[CapsVersion] | None = None
    starts: list[datetime] = field(default_factory=list)


def caps_read(uow: UnitOfWork, program_id: int) -> Read[ProgramCaps]:
    """The current caps (:func:`get_caps`) as a read to run together with others (nothing
    to read when the transaction has read them already)."""
    history = _history_read(uow, program_id)
    return Read(history.query, history.params, lambda row: history.answer(row).current.caps)


def _history_read(uow: UnitOfWork, program_id: int) -> Read[_CapsHistory]:
    key = f"caps:{program_id}"
    if key in uow.local:
        cached: _CapsHistory = uow.local[key]
        return Read(None, {}, lambda _: cached)

    def answer(row: Any) -> _CapsHistory:
        current = NO_CAPS if row is None else CapsVersion(row[0], _caps_of(row[1]))
        history = uow.local[key] = _CapsHistory(current)
        return history

    return Read(_CURRENT_CAPS, {"program": program_id}, answer)


def _caps_of(stored: str | None) -> ProgramCaps:
    """Caps as stored (their JSON text; a JSON null: none)."""
    value = json.loads(stored) if stored is not None else None
    return ProgramCaps.model_validate(value) if value is not None else ProgramCaps()


_CURRENT_CAPS = Prepared(
    select(earning_caps.c.active_from, cast(earning_caps.c.caps, Text))
    .where(earning_caps.c.program_id == bindparam("program"))
    .order_by(earning_caps.c.active_from.desc())
    .limit(1)
)
_CAPS_VERSIONS = (
    select(earning_caps.c.active_from, cast(earning_caps.c.caps, Text))
    .where(earning_caps.c.program_id == bindparam("program"))
    .order_by(earning_caps.c.active_from)
)


def check_caps_tiers(uow: UnitOfWork, *, program_id: int, caps: ProgramCaps) -> None:
    """Refuse caps naming a tier the programme does not define: its limits would bind no
    member. A code the stored caps already name is not checked again."""
    tiers_service.require_defined(
        uow, program_id=program_id, named={"by_tier": list(caps.by_tier)},
        kept={"by_tier": list(get_caps(uow, program_id=program_id).by_tier)},
    )  # fmt: skip


def set_caps(uow: UnitOfWork, *, program_id: int, caps: ProgramCaps) -> ProgramCaps:
    """New caps for the programme, in force from now: the events of earlier times keep the
    caps of their time (:func:`caps_at`), which stay on record. Refused when they name a
    tier the programme does not define (a code the current caps name already is not
    checked again). Caps set twice at the same instant: the second replace the first."""
    check_caps_tiers(uow, program_id=program_id, caps=caps)
    uow.local.pop(f"caps:{program_id}", None)
    upsert(
        uow,
        earning_caps,
        {"program_id": program_id, "active_from": uow.clock.now(),
         "caps": caps.model_dump(mode="json")},
    )  # fmt: skip
    return caps


def budgets_spent(
    uow: UnitOfWork, *, program_id: int, codes: list[str], lock: bool = True
) -> dict[str, int]:
    """What budgeted rules (and the programme, under ``"*"``) have awarded so far; with
    ``lock``, their rows stay locked until the transaction ends so that two events cannot
    both take the last points of a budget."""
    if not codes:
        return {}
    if lock:  # a budget's row exists before it is locked: the first two spends queue too
        insert_missing(
            uow,
            rule_budgets,
            [{"program_id": program_id, "rule_code": code, "spent": 0} for code in codes],
        )
    query = (
        select(rule_budgets.c.rule_code, rule_budgets.c.spent)
        .where(rule_budgets.c.program_id == program_id, rule_budgets.c.rule_code.in_(codes))
        .order_by(rule_budgets.c.rule_code)
    )
    if lock and uow.dialect == "postgresql":
        query = query.with_for_update()
    return {r.rule_code: int(r.spent) for r in uow.conn.execute(query).all()}


def lock_budgets(uow: UnitOfWork, *, program_id: int) -> None:
    """Hold every budget row of the programme, in code order (a batch of events takes them
    before any event does, so two batches cannot hold them in opposite orders)."""
    if uow.dialect != "postgresql":
        return
    uow.conn.execute(
        select(rule_budgets.c.rule_code)
        .where(rule_budgets.c.program_id == program_id)
        .order_by(rule_budgets.c.rule_code)
        .with_for_update()
    )


def add_to_budgets(uow: UnitOfWork, *, program_id: int, spent: Mapping[str, int]) -> None:
    for code, points in sorted(spent.items()):
        if points == 0:
            continue
        upsert(
            uow,
            rule_budgets,
            {"program_id": program_id, "rule_code": code, "spent": points},
            {"spent": rule_budgets.c.spent + points},
        )


# --------------------------------------------------------------------------- helpers


def _row(uow: UnitOfWork, program_id: int, version_id: int) -> Row[Any]:
    row = uow.conn.execute(
        select(rule_versions).where(
            rule_versions.c.id == version_id, rule_versions.c.program_id == program_id
        )
    ).one_or_none()
    if row is None:
        raise UnknownRule(version_id=version_id)
    return row


def _hold_rule(uow: UnitOfWork, row: Row[Any]) -> None:
    """Hold every version of ``row``'s rule until the transaction ends: of two versions
    made live at once, the second waits and then ends the first, so that one version of
    the rule is live at a time. SQLite's writers are serial already."""
    if uow.dialect != "postgresql":
        return
    uow.conn.execute(
        select(rule_versions.c.id)
        .where(rule_versions.c.program_id == row.program_id, rule_versions.c.code == row.code)
        .order_by(rule_versions.c.id)
        .with_for_update()
    )


def _require_state(row: Row[Any], expected: str, becoming: str) -> None:
    if row.state != expected:
        raise StateConflict(
            problem=f"Rule {row.code} version {row.version} is {row.state}; only a "
            f"{expected} version can be {becoming}.",
            problem_zh=f"规则 {row.code} 第 {row.version} 版当前为 {row.state},"
            f"只有 {expected} 状态的版本才能变为 {becoming}。",
        )


def _move(uow: UnitOfWork, version_id: int, expected: str, **values: Any) -> None:
    """Change the version's state, only from ``expected``: of two racing transitions one
    matches nothing and is refused."""
    moved = uow.conn.execute(
        rule_versions.update()
        .where(rule_versions.c.id == version_id, rule_versions.c.state == expected)
        .values(**values)
    ).rowcount
    if moved != 1:
        raise StateConflict(
            problem=f"Rule version {version_id} changed meanwhile; read it again.",
            problem_zh=f"规则版本 {version_id} 已被他人修改,请重新读取。",
        )


def _forget_activations(uow: UnitOfWork) -> None:
    """Drop what this transaction read of the rules' activations (they are changing)."""
    for key in [k for k in uow.local if k.startswith(("activations:", "rule_timeline:"))]:
        del uow.local[key]


def _activate(uow: UnitOfWork, program_id: int, version_id: int, start: datetime) -> None:
    _forget_activations(uow)
    uow.conn.execute(
        rule_activations.insert(),
        {"version_id": version_id, "program_id": program_id, "active_from": start},
    )


def _close_activation(uow: UnitOfWork, version_id: int, end: datetime) -> None:
    _forget_activations(uow)
    open_ = and_(
        rule_activations.c.version_id == version_id, rule_activations.c.active_to.is_(None)
    )
    # A scheduled activation that has not begun is dropped rather than ended before it starts.
    uow.conn.execute(rule_activations.delete().where(open_, rule_activations.c.active_from > end))
    uow.conn.execute(rule_activations.update().where(open_).values(active_to=end))


def _end_other_versions(uow: UnitOfWork, row: Row[Any], at: datetime) -> None:
    # A paused version ends too: resumed, it would replace the version a second person
    # approved after it.
    others = select(rule_versions.c.id, rule_versions.c.state).where(
        rule_versions.c.program_id == row.program_id,
        rule_versions.c.code == row.code,
        rule_versions.c.id != row.id,
        rule_versions.c.state.in_(("active", "paused")),
    )
    for other_id, state in uow.conn.execute(others).all():
        _close_activation(uow, other_id, at)
        _move(uow, other_id, state, state="retired")
    # A version already retired by a scheduled successor is live until that one starts:
    # it ends at ``at`` too, so that one version of the rule is live at a time.
    same_rule = select(rule_versions.c.id).where(
        rule_versions.c.program_id == row.program_id,
        rule_versions.c.code == row.code,
        rule_versions.c.id != row.id,
    )
    uow.conn.execute(
        rule_activations.update()
        .where(rule_activations.c.version_id.in_(same_rule), rule_activations.c.active_to > at)
        .values(active_to=at)
    )


def _read(uow: UnitOfWork, row: Row[Any]) -> RuleVersionRead:
    latest = uow.conn.execute(
        select(rule_activations.c.active_from, rule_activations.c.active_to)
        .where(rule_activations.c.version_id == row.id)
        .order_by(rule_activations.c.active_from.desc())
        .limit(1)
    ).one_or_none()
    status = row.state
    if status == "active" and latest is not None and latest.active_from > uow.clock.now():
        status = "scheduled"
    return RuleVersionRead(
        id=row.id,
        code=row.code,
        version=row.version,
        spec=RuleSpec.model_validate(row.spec),
        status=status,
        created_by=row.created_by,
        created_at=row.created_at,
        approval_id=row.approval_id,
        approved_by=row.approved_by,
        approved_at=row.approved_at,
        active_from=latest.active_from if latest else None,
        active_to=latest.active_to if latest else None,
    )


def load_pack(
    uow: UnitOfWork, *, program_id: int, pack: RulePack, actor: str, activate: bool
) -> list[RuleVersionRead]:
    """Install a rule pack: its tiers and caps, and a new version of each of its rules —
    drafts for operators to submit, or (``activate``, for an installation or the demo run by
    whoever runs the server) approved and live at once. Every rule is compiled first, so a
    pack with a bad rule changes nothing. A rule whose newest version is the pack's own
    (loaded before) gets no new version: loading a pack twice changes nothing twice."""
    for spec in pack.rules:
        try:
            compile_rule(spec)
        except InvalidInput as exc:
            raise InvalidInput(
                field=f"rules.{spec.code}.{exc.params['field']}",
                problem=exc.params["problem"],
                problem_zh=exc.params["problem_zh"],
            ) from exc
    _check_pack_tiers(uow, program_id, pack)
    removed: list[str] = []
    if pack.tiers:
        kept = {t.code for t in pack.tiers}
        removed = [t.code for t in tiers_service.list_tiers(uow, program_id=program_id)
                   if t.code not in kept]  # fmt: skip
        # Checked once the pack's caps and rules are in place: they may replace what names
        # a tier it drops.
        tiers_service.set_tiers(
            uow, program_id=program_id, definitions=pack.tiers, check_named=False
        )
    if pack.caps is not None:
        set_caps(uow, program_id=program_id, caps=pack.caps)
    replaced = frozenset(spec.code for spec in pack.rules) if activate else frozenset()
    for name, declared in pack.event_types.items():
        declare_event_type(uow, program_id=program_id, name=name, body=declared, replaced=replaced)
    versions = []
    for spec in pack.rules:
        same = _same_version(uow, program_id, spec, activate)
        if same is not None:  # loaded before, as it is: no new version of it
            versions.append(same)
            continue
        version = create_version(uow, program_id=program_id, spec=spec, created_by=actor)
        if activate:
            submit(uow, program_id=program_id, version_id=version.id, approval_id=None)
            version = approve(uow, program_id=program_id, version_id=version.id, approved_by=actor)
        versions.append(version)
    tiers_service.require_unnamed(uow, program_id=program_id, removed=removed)
    return versions


def _tiers_named(spec: RuleSpec) -> dict[str, list[str]]:
    """The tier codes a rule names, by where: a multiplier's or a birthday gift's
    ``by_tier``, and those its condition compares the member's tier with."""
    params = spec.params
    by_tier = params.by_tier if isinstance(params, Multiplier | BirthdayGift) else {}
    compared = conditions.tiers_compared(spec.condition) if spec.condition else ()
    return {"params.by_tier": list(by_tier), "condition": list(compared)}


def _check_tiers(uow: UnitOfWork, program_id: int, spec: RuleSpec) -> None:
    """Refuse a rule naming a tier the programme does not define: its factor or gift would
    reach no member, its condition never (or always) hold for one."""
    tiers_service.require_defined(uow, program_id=program_id, named=_tiers_named(spec))


_NAMING = ("submitted", "approved", "active", "paused")
"""States of a version that is live, or may go live without another approval."""


def tier_namings(uow: UnitOfWork, *, program_id: int) -> list[Naming]:
    """Where the programme's rules and caps name tiers, for refusing to remove one of them.
    The rule versions counted are those that are live or may go live without a new
    version: submitted, scheduled, active, paused, and a version retired by a successor
    approved for a later start (live until then). A draft is not counted: it reaches no
    member, and a tier it names is refused when it is submitted or approved; nor are
    rejected and retired versions."""
    live = select(rule_activations.c.version_id).where(
        rule_activations.c.program_id == program_id,
        or_(rule_activations.c.active_to.is_(None),
            rule_activations.c.active_to > uow.clock.now()),
    )  # fmt: skip
    rows = uow.conn.execute(
        select(rule_versions.c.code, rule_versions.c.version, rule_versions.c.state,
               rule_versions.c.spec)
        .where(
            rule_versions.c.program_id == program_id,
            or_(rule_versions.c.state.in_(_NAMING), rule_versions.c.id.in_(live)),
        )
        .order_by(rule_versions.c.code, rule_versions.c.version)
    ).all()  # fmt: skip
    found = [
        naming
        for row in rows
        for naming in namings(
            f"rule {row.code} (version {row.version})", f"规则 {row.code} 第 {row.version} 版",
            _tiers_named(RuleSpec.model_validate(row.spec)), *_UNNAMING[row.state],
        )
    ]  # fmt: skip
    caps = {"by_tier": list(get_caps(uow, program_id=program_id).by_tier)}
    return found + namings("the earning caps setting", "积分上限设置", caps,
                           "set the caps without it", "请修改积分上限去掉该等级")  # fmt: skip


_RETIRE = (
    "retire it, or have a new version without it approved, which ends this one",
    "请停用该版本,或另建不含该等级的新版本并审批,生效时替换该版本",
)
_UNNAMING = {
    "submitted": ("have it rejected, then submit a version without it",
                  "请驳回该版本,再提交不含该等级的版本"),
    "approved": _RETIRE,
    "active": _RETIRE,
    "paused": _RETIRE,
    "retired": ("it stays live until the version approved after it starts: remove the "
                "tier after that", "该版本在其后获批的版本生效前仍然有效,请在此之后再删除该等级"),
}  # fmt: skip
"""How a version in each state stops naming a tier, in English and Chinese."""


def _check_pack_tiers(uow: UnitOfWork, program_id: int, pack: RulePack) -> None:
    """Refuse a pack whose rules or caps name a tier that the programme will not have once
    it is loaded: the pack's own tiers when it brings some (they replace the programme's),
    else the programme's. Checked before anything is written, naming the rule."""
    tiers = [t.code for t in pack.tiers] if pack.tiers else None
    named = {
        f"rules.{spec.code}.{place}": codes
        for spec in pack.rules
        for place, codes in _tiers_named(spec).items()
    }
    kept: dict[str, list[str]] = {}
    if pack.caps is not None:
        named["caps.by_tier"] = list(pack.caps.by_tier)
        if tiers is None:  # the caps' own codes kept, as set_caps keeps them
            kept["caps.by_tier"] = list(get_caps(uow, program_id=program_id).by_tier)
    tiers_service.require_defined(uow, program_id=program_id, named=named, tiers=tiers, kept=kept)


# --------------------------------------------------------------------------- custom events


def _check_multiplier(spec: RuleSpec) -> None:
    """InvalidInput unless a multiplier names only kinds of award the rules give: a
    misspelt one would multiply nothing, and the campaign pay nothing extra."""
    params = spec.params
    if not isinstance(params, Multiplier):
        return
    unknown = sorted(params.applies_to - AWARD_KINDS)
    if not params.applies_to or unknown:
        kinds = ", ".join(sorted(AWARD_KINDS))
        named = ", ".join(map(repr, unknown))
        raise InvalidInput(
            field="params.applies_to",
            problem=(f"{named} is no kind of award a rule gives" if unknown
                     else "names no kind of award: it would multiply nothing")
            + f"; name the kinds it multiplies among {kinds}",
            problem_zh=(f"{'、'.join(map(repr, unknown))} 不是任何规则给出的奖励类型" if unknown
                        else "未指定奖励类型:该倍数规则不会乘任何奖励")
            + f";请从 {kinds} 中指定要乘的类型",
        )  # fmt: skip


def _check_event_types(uow: UnitOfWork, program_id: int, spec: RuleSpec) -> None:
    """InvalidInput unless each of the rule's event types is the catalogue's or a custom one
    the programme declared, and a per-unit rule's field is a number of each: such a rule
    would never fire, or refuse every event of its type."""
    for name in sorted(spec.event_types):
        if name == "order.refunded":
            raise InvalidInput(
                field="event_types",
                problem="no rule awards on order.refunded: a refund takes back, in "
                "proportion, what its order earned; to award on returns (关怀积分), send "
                "them as a custom.<name> event and put the rule on that",
                problem_zh="order.refunded 事件不适用任何规则:退款按比例收回其订单所得积分;"
                "如需对退货给予积分(关怀积分),请以 custom.<名称> 事件发送,并将规则设在该事件上",
            )
        model = CATALOGUE.get(name)
        declared = event_type(uow, program_id=program_id, name=name) if model is None else None
        if model is None and declared is None:
            known = ", ".join(sorted(CATALOGUE))
            raise InvalidInput(
                field="event_types",
                problem=f"{name!r} is no event type of the catalogue ({known}) nor a custom "
                "one declared in this programme",
                problem_zh=f"{name!r} 既不是目录中的事件类型({known}),"
                "也不是本计划已声明的自定义事件类型",
            )
        if spec.condition:
            payload = sample_payload(model) if model is not None else _declared_sample(declared)
            _try_condition(uow, program_id, spec, name, payload)
            if declared is not None:  # its optional fields may be left out: tried without
                bare = _declared_sample(declared, optional=False)
                if bare != payload:
                    _try_condition(uow, program_id, spec, name, bare, optional=True)
            elif model is not None:  # its optional fields may be empty: tried so
                empty = _optional_fields(model)
                if empty:
                    nulls = {**payload, **dict.fromkeys(empty)}
                    _try_condition(uow, program_id, spec, name, nulls, empty=empty)
        if isinstance(spec.params, PerUnit):
            numbers = _number_fields(model, declared)
            if spec.params.field not in numbers:
                have = ", ".join(sorted(numbers)) or "none"
                raise InvalidInput(
                    field="params.field",
                    problem=f"{name} events have no number {spec.params.field!r} (their "
                    f"numbers: {have})",
                    problem_zh=f"{name} 事件没有数值字段 {spec.params.field!r}(其数值字段:"
                    f"{'、'.join(sorted(numbers)) or '无'})",
                )


_SAMPLE_VALUES = {"string": "x", "integer": 1, "number": 1.0, "boolean": False}


def _declared_sample(declared: EventTypeRead | None, *, optional: bool = True) -> dict[str, Any]:
    """A payload of a declared custom type: every field, or (``optional`` False) only its
    required ones."""
    assert declared is not None
    return {
        name: _SAMPLE_VALUES[field.type]
        for name, field in declared.fields.items()
        if optional or field.required
    }


def _optional_fields(model: type[BaseModel]) -> list[str]:
    """The fields of a catalogue payload that may be empty (null)."""
    return [
        name for name, info in model.model_fields.items() if type(None) in get_args(info.annotation)
    ]


def _try_condition(
    uow: UnitOfWork, program_id: int, spec: RuleSpec, event_type: str, payload: dict[str, Any],
    optional: bool = False, empty: Sequence[str] = (),
) -> None:  # fmt: skip
    """InvalidInput when the rule's condition reads a field that no ``event_type`` event, or
    no member, has: tried on an event with every field of its type, it would refuse every
    event of the type once approved. With ``optional``, ``payload`` leaves out the type's
    optional fields: a condition reading one without has(...) would refuse every event
    that leaves it out. With ``empty``, those fields of ``payload`` are null: a condition
    that cannot take them so would refuse every event that leaves them empty."""
    now = uow.clock.now()
    declared = [t.name for t in list_event_types(uow, program_id=program_id)]
    event = Event(key="sample", type=event_type, occurred_at=now, member_id=1, payload=payload)
    facts = Facts(
        member_id=1, tier="x", tags=frozenset({"x"}), registered_at=now, region="x",
        birthday=now.date(), counts=dict.fromkeys([*CATALOGUE, *declared], 0),
    )  # fmt: skip
    condition = compile_rule(spec).condition
    assert condition is not None
    try:
        condition(activation(event, facts))
    except ConditionFailed as exc:
        missing = _MISSING_KEY.search(str(exc))
        if empty and "null_type" in str(exc):
            fields = ", ".join(empty)
            raise InvalidInput(
                field="condition",
                problem=f"fails on {event_type} events without {fields} ({exc}); such events "
                f"are common, and the condition would refuse each: test it first, as in "
                f"event.{empty[0]} != null && ...",
                problem_zh=f"对不带 {'、'.join(empty)} 的 {event_type} 事件无法求值({exc});"
                f"此类事件很常见,该条件会拒绝每一个:请先判断,如 event.{empty[0]} != null && ...",
            ) from exc
        if missing is None:  # a sample value it cannot take (a time in a text field): fine
            return
        if optional:
            raise InvalidInput(
                field="condition",
                problem=f"reads {missing.group(1)!r}, which {event_type} events may leave out "
                "(the condition would refuse every such event); test it first with "
                f"has(event.{missing.group(1)})",
                problem_zh=f"读取了 {missing.group(1)!r},而 {event_type} 事件可以不带该字段"
                f"(该条件会拒绝所有此类事件);请先用 has(event.{missing.group(1)}) 判断",
            ) from exc
        raise InvalidInput(
            field="condition",
            problem=f"reads {missing.group(1)!r}, which {event_type} events and their members "
            "do not have (the condition would refuse every such event); check the name, or "
            "test it first with has(...)",
            problem_zh=f"读取了 {missing.group(1)!r},而 {event_type} 事件及其会员没有该字段"
            "(该条件会拒绝所有此类事件);请检查字段名,或先用 has(...) 判断",
        ) from exc


_MISSING_KEY = re.compile(r'Key not found in map\s*:\s*"?([^"]*)"?')


def _number_fields(model: type[BaseModel] | None, declared: EventTypeRead | None) -> set[str]:
    """The payload fields of an event type that hold numbers."""
    if declared is not None:
        return {f for f, spec in declared.fields.items() if spec.type in ("integer", "number")}
    assert model is not None
    return {name for name, info in model.model_fields.items() if info.annotation in (int, float)}


def _same_version(
    uow: UnitOfWork, program_id: int, spec: RuleSpec, activate: bool
) -> RuleVersionRead | None:
    """The rule's newest version if it has ``spec`` already and is as far on as the load
    asks (live or approved for ``activate``; else anything but rejected or retired)."""
    row = uow.conn.execute(
        select(rule_versions)
        .where(rule_versions.c.program_id == program_id, rule_versions.c.code == spec.code)
        .order_by(rule_versions.c.version.desc())
        .limit(1)
    ).first()
    if row is None or _canonical(row.spec) != spec.model_dump_json():
        return None
    wanted = ("approved", "active") if activate else ("draft", "submitted", "approved", "active")
    return _read(uow, row) if row.state in wanted else None


def declare_event_type(
    uow: UnitOfWork, *, program_id: int, name: str, body: EventTypeDeclare,
    replaced: frozenset[str] = frozenset(),
) -> EventTypeRead:  # fmt: skip
    """Declare (or change) the payload of the programme's ``custom.<name>`` events. The
    rules live on them must still work with the fields (but those of ``replaced``, whose
    new versions a rule pack makes live with it)."""
    upsert(
        uow,
        event_types,
        {
            "program_id": program_id,
            "name": name,
            "fields": {k: v.model_dump() for k, v in body.fields.items()},
            "description": body.description,
            "updated_at": uow.clock.now(),
        },
    )
    uow.local.pop(f"event_types:{program_id}", None)
    _check_live_rules(uow, program_id, name, replaced)
    return EventTypeRead(name=name, fields=body.fields, description=body.description)


def _check_live_rules(
    uow: UnitOfWork, program_id: int, name: str, replaced: frozenset[str]
) -> None:
    """InvalidInput when a rule on ``name`` events, live or to go live, no longer works with
    their fields as now declared (a field it reads gone, optional, or no longer a number):
    it would refuse every event of the type, or never fire."""
    now = uow.clock.now()
    live = {
        rule.spec.code: rule
        for rule, _, end in live_periods(uow, program_id=program_id)
        if name in rule.spec.event_types
        and (end is None or end > now)
        and rule.spec.code not in replaced
    }
    for code, rule in sorted(live.items()):
        try:
            _check_event_types(uow, program_id, rule.spec)
        except InvalidInput as exc:
            raise InvalidInput(
                field="fields",
                problem=f"rule {code} version {rule.version}, live on {name} events, would "
                f"not work with these fields: {exc.message('en')}",
                problem_zh=f"规则 {code} 第 {rule.version} 版在 {name} 事件上生效,"
                f"与这些字段不符:{exc.message('zh')}",
            ) from exc


def list_event_types(uow: UnitOfWork, *, program_id: int) -> list[EventTypeRead]:
    """The programme's custom event types (read once a transaction)."""
    key = f"event_types:{program_id}"
    if key not in uow.local:
        rows = uow.conn.execute(
            select(event_types)
            .where(event_types.c.program_id == program_id)
            .order_by(event_types.c.name)
        ).all()
        uow.local[key] = [
            EventTypeRead(name=r.name, fields=r.fields, description=r.description) for r in rows
        ]
    declared: list[EventTypeRead] = uow.local[key]
    return declared


def event_type(uow: UnitOfWork, *, program_id: int, name: str) -> EventTypeRead | None:
    for declared in list_event_types(uow, program_id=program_id):
        if declared.name == name:
            return declared
    return None
