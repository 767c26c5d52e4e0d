"""Maker–checker: a sensitive change is filed as a request and executes, exactly once, when
a second staff user approves it.

Exactly once rests on two guards in the approving transaction: the request moves from
``pending`` to ``approved`` by a conditional update that only one transaction can win, and
a ledger write made on approval uses the key ``approval:<id>``, which the ledger accepts
once. The execution runs in a savepoint: when the rules refuse it (the balance fell below
the adjustment), its writes are undone while the request is kept, marked ``failed`` with
the error, so that the requester sees why. A request that replaces a whole value (the
settings, the earning caps) keeps the value it replaced in its result, as ``replaced``.

Approval is refused (409, the request left pending) when its maker is no longer an active
staff user holding a permission that files it, or when a settings or caps request was filed
on a value that has changed since: approving it would silently undo that change. The maker
may withdraw its own pending request.

A request stays open for its programme's ``approval_ttl_hours`` (72 by default) after it was
filed, by the unit of work's clock. After that it has expired: approving it is refused (409)
and nothing executes; it must be filed again. Expiry is not stored (the ``status`` column
admits no such value): a ``pending`` request past its time reads ``expired``, and the queue
filters on that. A checker may still reject it and its maker withdraw it, which closes it in
the queue (and, for a submitted rule, sends the rule back), whoever of them is still there.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Row

from jifen.approvals.models import approvals
from jifen.approvals.schemas import ApprovalAction, ApprovalRead, ApprovalStatus
from jifen.auth import service as auth_service
from jifen.db.uow import UnitOfWork
from jifen.errors import (
    InvalidInput,
    JifenError,
    ScopeTooNarrow,
    StateConflict,
    Unauthenticated,
    UnknownApproval,
    WrongCaller,
)
from jifen.members import service as members_service
from jifen.notify import service as notify_service
from jifen.points import service as points_service
from jifen.programs import service as programs_service
from jifen.programs.schemas import APPROVAL_TTL_HOURS, CLOSING_POLICY, ProgramSettings
from jifen.rules import service as rules_service
from jifen.rules.schemas import ProgramCaps
from jifen.tiers import service as tiers_service


def request(
    uow: UnitOfWork,
    *,
    program_id: int,
    action: ApprovalAction,
    params: dict[str, Any],
    summary: str,
    requested_by: int,
) -> ApprovalRead:
    """File a request; nothing executes until another staff user approves it."""
    if action not in _EXECUTORS:
        raise InvalidInput(
            field="action",
            problem=f"{action!r} is not a change that needs approval",
            problem_zh=f"{action!r} 不是需要审批的变更",
        )
    now = uow.clock.now()
    base = _BASES.get(action)
    approval_id = uow.conn.execute(
        approvals.insert().returning(approvals.c.id),
        {
            "program_id": program_id,
            "action": action,
            "params": params,
            "summary": summary,
            "status": "pending",
            "requested_by": requested_by,
            "requested_at": now,
            "based_on": base[0](uow, program_id) if base is not None else None,
        },
    ).scalar_one()
    return get(uow, program_id=program_id, approval_id=int(approval_id))


def get(uow: UnitOfWork, *, program_id: int, approval_id: int) -> ApprovalRead:
    """One request of the programme."""
    return _read(_row(uow, program_id, approval_id), _ttl(uow, program_id), uow.clock.now())


def list_approvals(
    uow: UnitOfWork,
    *,
    program_id: int,
    status: ApprovalStatus | None = None,
    action: ApprovalAction | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[ApprovalRead], str | None]:
    """The programme's requests, newest first, and the cursor of the next page (if any).
    ``pending`` lists the requests still open, ``expired`` those pending past their time."""
    ttl, now = _ttl(uow, program_id), uow.clock.now()
    query = select(approvals).where(approvals.c.program_id == program_id)
    if status == "pending":
        query = query.where(approvals.c.status == "pending", approvals.c.requested_at > now - ttl)
    elif status == "expired":
        query = query.where(approvals.c.status == "pending", approvals.c.requested_at <= now - ttl)
    elif status is not None:
        query = query.where(approvals.c.status == status)
    if action is not None:
        query = query.where(approvals.c.action == action)
    if cursor is not None:
        query = query.where(approvals.c.id < _decode_cursor(cursor))
    rows = uow.conn.execute(query.order_by(approvals.c.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = _encode_cursor(page[-1].id) if len(rows) > limit and page else None
    return [_read(row, ttl, now) for row in page], next_cursor


def approve(
    uow: UnitOfWork, *, approval_id: int, program_id: int, decided_by: int, note: str = ""
) -> ApprovalRead:
    """Approve and execute the request, once. A refused execution leaves it ``failed``."""

    def may_approve(filed: Row[Any]) -> None:
        _still_open(uow, filed)
        _maker_still_may(uow, filed)
        _still_on_its_base(uow, filed)
        check = _BEFORE_APPROVING.get(filed.action)
        if check is not None:
            check(uow, filed, decided_by)

    row = _decide(uow, program_id, approval_id, decided_by, note, "approved", may_approve)
    execute = _EXECUTORS[row.action]
    try:
        # A savepoint: a refused execution's writes are undone, the decision is kept.
        with uow.savepoint():
            outcome = execute(uow, row)
    except JifenError as exc:
        outcome = {"code": exc.code, "message": exc.message("en"), "message_zh": exc.message("zh")}
        uow.conn.execute(
            approvals.update()
            .where(approvals.c.id == approval_id)
            .values(status="failed", result=outcome)
        )
    else:
        uow.conn.execute(
            approvals.update().where(approvals.c.id == approval_id).values(result=outcome)
        )
    return get(uow, program_id=program_id, approval_id=approval_id)


def reject(
    uow: UnitOfWork, *, approval_id: int, program_id: int, decided_by: int, note: str = ""
) -> ApprovalRead:
    """Reject the request: nothing executes."""
    row = _decide(uow, program_id, approval_id, decided_by, note, "rejected")
    on_reject = _ON_REJECT.get(row.action)
    if on_reject is not None:
        on_reject(uow, row)
    return get(uow, program_id=program_id, approval_id=approval_id)


def withdraw(
    uow: UnitOfWork, *, approval_id: int, program_id: int, withdrawn_by: int, note: str = ""
) -> ApprovalRead:
    """The maker takes back its own pending request: nothing executes, and nobody can
    approve it any more (a submitted rule goes back as a rejection would send it). An
    expired request may be withdrawn too: that closes it in the queue, and releases its rule."""
    row = _row(uow, program_id, approval_id)
    if row.requested_by != withdrawn_by:
        raise WrongCaller(
            problem=f"Approval request {approval_id} is not yours; only its maker withdraws "
            "it (a checker rejects it).",
            problem_zh=f"审批申请 {approval_id} 不是您提交的;只有提交人可以撤回(审批人可驳回)。",
        )
    if row.status != "pending":
        raise _already_decided(approval_id, row.status)
    _move(uow, approval_id, status="withdrawn", decided_at=uow.clock.now(), decision_note=note)
    on_reject = _ON_REJECT.get(row.action)
    if on_reject is not None:
        on_reject(uow, row)
    return get(uow, program_id=program_id, approval_id=approval_id)


# --------------------------------------------------------------------------- deciding


def _decide(
    uow: UnitOfWork,
    program_id: int,
    approval_id: int,
    decided_by: int,
    note: str,
    status: str,
    check: Callable[[Row[Any]], None] | None = None,
) -> Row[Any]:
    """Move another person's open request to ``status``, once ``check`` (if any) passes."""
    row = _row(uow, program_id, approval_id)
    if row.requested_by == decided_by:
        raise WrongCaller(
            problem=f"Approval request {approval_id} is your own; another person must decide it.",
            problem_zh=f"审批申请 {approval_id} 是您本人提交的,须由他人审批。",
        )
    if row.status != "pending":
        raise _already_decided(approval_id, row.status)
    if row.action in _PROGRAMME_WIDE:
        _decider_covers_programme(uow, row, decided_by)
    if check is not None:
        check(row)
    _move(
        uow, approval_id, status=status, decided_by=decided_by, decided_at=uow.clock.now(),
        decision_note=note,
    )  # fmt: skip
    return row


def _decider_covers_programme(uow: UnitOfWork, row: Row[Any], decided_by: int) -> None:
    """A change of the programme's policy binds every merchant: it is decided (either way)
    by someone whose grant to decide covers the whole programme, as its maker's to file
    it must."""
    decider = auth_service.staff_principal(uow, decided_by, session_id=None)
    if not decider.covers("approvals.decide", program_id=row.program_id):
        raise ScopeTooNarrow(
            problem=f"Approval request {row.id} changes the programme's policy, which binds "
            "every merchant: deciding it needs approvals.decide granted for the whole "
            "programme, not for one merchant or store.",
            problem_zh=f"审批申请 {row.id} 变更的是约束所有商户的计划政策:须拥有覆盖整个计划的"
            " approvals.decide 权限才能审批,单个商户或门店的授权不够。",
        )


def _move(uow: UnitOfWork, approval_id: int, **values: Any) -> None:
    """Move the request out of 'pending'. Only one transaction can: a concurrent twin waits
    on the row and then matches nothing."""
    moved = uow.conn.execute(
        approvals.update()
        .where(approvals.c.id == approval_id, approvals.c.status == "pending")
        .values(**values)
    )
    if moved.rowcount != 1:
        raise _already_decided(approval_id, "decided")


def _still_open(uow: UnitOfWork, row: Row[Any]) -> None:
    """A request is decided within its programme's time to live; after that it has expired,
    and nothing about it executes: the change it asked for may no longer be wanted."""
    ttl = _ttl(uow, row.program_id)
    expires_at = row.requested_at + ttl
    if uow.clock.now() >= expires_at:
        hours = int(ttl / timedelta(hours=1))
        at = expires_at.isoformat(timespec="seconds")
        raise StateConflict(
            problem=f"Approval request {row.id} expired at {at}, {hours} hours after it was "
            "filed; nothing was executed. File the request again if the change is still "
            "wanted (its maker may withdraw this one).",
            problem_zh=f"审批申请 {row.id} 已于 {at} 过期(提交后 {hours} 小时),未执行任何"
            "操作。如仍需此变更,请重新提交申请(提交人可撤回本申请)。",
        )


def _maker_still_may(uow: UnitOfWork, row: Row[Any]) -> None:
    """A request stands for its maker: one whose account was disabled, or who no longer
    holds a permission that files it in this programme (for a change of the programme's
    policy: for the whole programme, not one merchant or store), cannot have it executed."""
    needs = _FILED_UNDER[row.action]
    try:
        maker = auth_service.staff_principal(uow, row.requested_by, session_id=None)
    except Unauthenticated:  # the account is disabled
        maker = None
    wide = row.action in _PROGRAMME_WIDE
    if maker is None or not any(
        maker.covers(p, program_id=row.program_id)
        if wide
        else maker.allows(p, program_id=row.program_id)
        for p in needs
    ):
        where = "for the whole programme" if wide else "in this programme"
        where_zh = "拥有覆盖整个计划的" if wide else "在本计划中拥有"
        raise StateConflict(
            problem=f"Approval request {row.id} cannot be approved: its maker is no longer an "
            f"active staff user holding {' or '.join(needs)} {where}. Reject it, or have "
            "someone who may file it again.",
            problem_zh=f"审批申请 {row.id} 无法批准:提交人已不是{where_zh} "
            f"{' 或 '.join(needs)} 权限的在职员工。请驳回,或由有权限的人重新提交。",
        )


def _still_on_its_base(uow: UnitOfWork, row: Row[Any]) -> None:
    """A settings or caps request replaces the whole value: approved after another change,
    it would undo that change. Requests filed before bases were kept have none.

    The programme's row is locked first: of two such requests approved at once, the second
    waits for the first to commit and then finds its base changed (read before the first
    committed, both would pass, and the second would silently undo the first)."""
    base = _BASES.get(row.action)
    if base is None or row.based_on is None:
        return
    programs_service.lock_program(uow, program_id=row.program_id)
    current, what, what_zh = base
    if current(uow, row.program_id) != row.based_on:
        raise StateConflict(
            problem=f"Approval request {row.id} was filed on {what} that have changed since; "
            "approving it would undo that change. File the request again on the current "
            f"{what}, and reject or withdraw this one.",
            problem_zh=f"审批申请 {row.id} 所依据的{what_zh}此后已被更改,批准它会撤销那次更改。"
            f"请基于当前{what_zh}重新提交申请,并驳回或撤回本申请。",
        )


def _already_decided(approval_id: int, status: str) -> StateConflict:
    return StateConflict(
        problem=f"Approval request {approval_id} is already {status}; it can be decided only once.",
        problem_zh=f"审批申请 {approval_id} 已处理({status}),只能审批一次。",
    )


# --------------------------------------------------------------------------- executing


def _adjust(uow: UnitOfWork, row: Row[Any]) -> dict[str, Any]:
    params = row.params
    members_service.require_member(uow, program_id=row.program_id, member_id=params["member_id"])
    expires_at = params.get("expires_at")
    posting = points_service.adjust(
        uow,
        member_id=params["member_id"],
        amount=params["amount"],
        key=f"approval:{row.id}",
        reason=params["reason"],
        actor=params["actor"],
        expires_at=datetime.fromisoformat(expires_at) if expires_at else None,
    )
    notify_service.announce_postings(
        uow, program_id=row.program_id, postings=[(posting, None, None)]
    )
    return {"posting": posting.model_dump(mode="json")}


def _clear(uow: UnitOfWork, row: Row[Any]) -> dict[str, Any]:
    params = row.params
    member_id = params["member_id"]
    members_service.require_member(uow, program_id=row.program_id, member_id=member_id)
    # What is available when the request is approved, not when it was filed: read under
    # the account's lock, so that a spend cannot take part of it before the clearing does.
    points_service.lock_account(uow, member_id=member_id)
    available = points_service.balance(uow, member_id=member_id).available
    if available == 0:
        return {"posting": None, "cleared": 0}
    posting = points_service.adjust(
        uow,
        member_id=member_id,
        amount=-available,
        key=f"approval:{row.id}",
        reason=params["reason"],
        actor=params["actor"],
    )
    notify_service.announce_postings(
        uow, program_id=row.program_id, postings=[(posting, None, None)]
    )
    return {"posting": posting.model_dump(mode="json"), "cleared": available}


def _settings(uow: UnitOfWork, row: Row[Any]) -> dict[str, Any]:
    settings = ProgramSettings.model_validate(row.params["settings"])
    replaced = programs_service.get_settings(uow, program_id=row.program_id)
    # The tiers may have changed since it was filed.
    tiers_service.require_scheme_fits(
        uow, program_id=row.program_id, scheme=settings.tier_scheme, current=replaced.tier_scheme
    )
    programs_service.set_settings(uow, program_id=row.program_id, settings=settings)
    return {
        "settings": settings.model_dump(mode="json"),
        "replaced": replaced.model_dump(mode="json"),
    }


def _approve_rule(uow: UnitOfWork, row: Row[Any]) -> dict[str, Any]:
    activate_at = row.params.get("activate_at")
    decider = _decider(uow, row)
    version = rules_service.approve(
        uow,
        program_id=row.program_id,
        version_id=row.params["version_id"],
        approved_by=decider,
        activate_at=datetime.fromisoformat(activate_at) if activate_at else None,
    )
    return {"rule": version.model_dump(mode="json")}


def _not_the_rules_author(uow: UnitOfWork, row: Row[Any], decided_by: int) -> None:
    """Whoever submitted it, a rule's author is no second person to approve it."""
    draft = rules_service.get_version(
        uow, program_id=row.program_id, version_id=row.params["version_id"]
    )
    if draft.created_by == f"staff:{auth_service.get_staff(uow, staff_id=decided_by).username}":
        raise WrongCaller(
            problem=f"You wrote rule {draft.code} version {draft.version}; another person "
            "must approve it.",
            problem_zh=f"规则 {draft.code} 第 {draft.version} 版由您编写,须由他人审批。",
        )


def _reject_rule(uow: UnitOfWork, row: Row[Any]) -> None:
    rules_service.reject(uow, program_id=row.program_id, version_id=row.params["version_id"])


def _caps(uow: UnitOfWork, row: Row[Any]) -> dict[str, Any]:
    caps = ProgramCaps.model_validate(row.params["caps"])
    replaced = rules_service.get_caps(uow, program_id=row.program_id)
    rules_service.set_caps(uow, program_id=row.program_id, caps=caps)
    return {"caps": caps.model_dump(mode="json"), "replaced": replaced.model_dump(mode="json")}


def _digest(value: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _settings_now(uow: UnitOfWork, program_id: int) -> str:
    settings = programs_service.get_settings(uow, program_id=program_id).model_dump(mode="json")
    # Fields that came after the bases: each left out at its default, the digest is the one
    # a request filed before it was kept, so that request still matches unchanged settings.
    for name, default in _ADDED_LATER.items():
        if settings[name] == default:
            del settings[name]
    return _digest(settings)


_ADDED_LATER = {"approval_ttl_hours": APPROVAL_TTL_HOURS, "closing_policy": CLOSING_POLICY}
"""Settings added after requests were first digested, and their defaults."""


def _caps_now(uow: UnitOfWork, program_id: int) -> str:
    return _digest(rules_service.get_caps(uow, program_id=program_id).model_dump(mode="json"))


def _decider(uow: UnitOfWork, row: Row[Any]) -> str:
    """The approver named as staff are everywhere else (``staff:<username>``)."""
    decided_by = uow.conn.execute(
        select(approvals.c.decided_by).where(approvals.c.id == row.id)
    ).scalar_one()
    return f"staff:{auth_service.get_staff(uow, staff_id=decided_by).username}"


_EXECUTORS: dict[str, Callable[[UnitOfWork, Row[Any]], dict[str, Any]]] = {
    "points.adjust": _adjust,
    "points.clear": _clear,
    "programs.settings": _settings,
    "rules.approve": _approve_rule,
    "rules.caps": _caps,
}

_BASES: dict[str, tuple[Callable[[UnitOfWork, int], str], str, str]] = {
    "programs.settings": (_settings_now, "settings", "设置"),
    "rules.caps": (_caps_now, "earning caps", "积分上限"),
}
"""Requests that replace a whole value: a digest of it now, and its name in both languages."""

_FILED_UNDER: dict[str, tuple[str, ...]] = {
    "points.adjust": ("points.adjust",),
    "points.clear": ("points.clear",),
    "programs.settings": ("programs.settings",),  # the tier scheme's routes file under it too
    "rules.approve": ("rules.write",),
    "rules.caps": ("rules.write",),
}
"""The permissions that file each kind of request (any one): its maker must still hold one."""

_PROGRAMME_WIDE = frozenset({"programs.settings", "rules.approve", "rules.caps"})
"""Requests that change the programme's policy: filed under a grant covering the whole
programme (no merchant, no store), which their maker must still hold."""

_BEFORE_APPROVING: dict[str, Callable[[UnitOfWork, Row[Any], int], None]] = {
    "rules.approve": _not_the_rules_author,
}
"""Checks that refuse an approval and leave the request pending for someone else."""

_ON_REJECT: dict[str, Callable[[UnitOfWork, Row[Any]], None]] = {
    "rules.approve": _reject_rule,
}
"""What a rejection undoes besides the decision (a submitted rule goes back to rejected)."""


# --------------------------------------------------------------------------- reading


def _row(uow: UnitOfWork, program_id: int, approval_id: int) -> Row[Any]:
    row = uow.conn.execute(
        select(approvals).where(approvals.c.id == approval_id, approvals.c.program_id == program_id)
    ).one_or_none()
    if row is None:
        raise UnknownApproval(approval_id=approval_id)
    return row


def _ttl(uow: UnitOfWork, program_id: int) -> timedelta:
    """How long the programme's requests stay open."""
    settings = programs_service.get_settings(uow, program_id=program_id)
    return timedelta(hours=settings.approval_ttl_hours)


def _read(row: Row[Any], ttl: timedelta, now: datetime) -> ApprovalRead:
    """The request as it stands at ``now``: a pending one past its time reads ``expired``."""
    if row.status != "pending":
        return ApprovalRead.model_validate(row._mapping)
    expires_at = row.requested_at + ttl
    status = "expired" if now >= expires_at else "pending"
    return ApprovalRead.model_validate({**row._mapping, "status": status, "expires_at": expires_at})


def _encode_cursor(approval_id: int) -> str:
    return base64.urlsafe_b64encode(f"approval:{approval_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, value = text.split(":")
        number = int(value)
        if prefix != "approval" or not 0 < number < 2**63:
            raise ValueError(text)
        return number
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            field="cursor",
            problem="not a cursor this API gave out; start again without one",
            problem_zh="不是本 API 给出的游标;请不带游标重新开始",
        ) from exc
