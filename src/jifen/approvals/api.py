"""HTTP routes of the approvals domain: the queue of maker–checker requests and decisions.

A request undecided past its programme's ``approval_ttl_hours`` reads ``expired``; approving
it is answered 409, and a checker's rejection or its maker's withdrawal closes it.

A decision whose execution the rules refuse (the member no longer has the points) is kept
as ``failed``, with the error in ``result``, and answered 409 with that error.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query
from fastapi.responses import JSONResponse

from jifen.api.deps import Context, Read, Write
from jifen.api.problems import problem
from jifen.api.schemas import Page
from jifen.approvals import service
from jifen.approvals.schemas import ApprovalAction, ApprovalDecision, ApprovalRead, ApprovalStatus
from jifen.db.uow import UnitOfWork
from jifen.errors import Forbidden

router = APIRouter(tags=["approvals"])

APPROVALS = "/programs/{program}/approvals"
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


def requester(ctx: Context) -> int:
    """The staff user filing a request; only staff file (and only staff decide)."""
    if ctx.principal.kind != "staff":
        raise Forbidden(
            problem="Only staff users file and decide approval requests.",
            problem_zh="只有员工账号可以提交或审批审批申请。",
        )
    return ctx.principal.id


@router.get(APPROVALS, response_model=Page[ApprovalRead])
def list_approvals(
    program: str,
    ctx: Annotated[Context, Depends(Read("approvals.read"))],
    status: ApprovalStatus | None = None,
    action: ApprovalAction | None = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Page[ApprovalRead]:
    """The programme's requests, newest first; filter by ``status`` and ``action``
    (``expired``: undecided past the programme's ``approval_ttl_hours``)."""
    items, next_cursor = ctx.db.run(
        lambda uow: service.list_approvals(
            uow,
            program_id=ctx.program_id,
            status=status,
            action=action,
            cursor=cursor,
            limit=limit,
        ),
        read_only=True,
    )
    return Page(items=items, next_cursor=next_cursor)


@router.get(APPROVALS + "/{approval_id}", response_model=ApprovalRead)
def get_approval(
    program: str, approval_id: Id, ctx: Annotated[Context, Depends(Read("approvals.read"))]
) -> ApprovalRead:
    """One request."""
    return ctx.db.run(
        lambda uow: service.get(uow, program_id=ctx.program_id, approval_id=approval_id),
        read_only=True,
    )


def _answer(ctx: Context, response: JSONResponse) -> JSONResponse:
    """The decision, or, when its execution failed, a 409 problem with the error."""
    body = json.loads(bytes(response.body))
    if response.status_code != 200 or body.get("status") != "failed":
        return response
    error = body.get("result") or {}
    zh = ctx.language == "zh"
    detail = error.get("message_zh" if zh else "message", "")
    prefix = f"审批申请 {body['id']} 执行失败:" if zh else f"Approval {body['id']} failed: "
    return problem(409, str(error.get("code", "approval_failed")), prefix + detail)


@router.post(APPROVALS + "/{approval_id}/approve", response_model=ApprovalRead)
def approve(
    program: str,
    approval_id: Id,
    ctx: Annotated[Context, Depends(Write("approvals.decide"))],
    body: Annotated[ApprovalDecision | None, Body()] = None,
) -> JSONResponse:
    """Approve another person's request; it executes now, once."""
    decided_by = requester(ctx)
    note = body.note if body else ""

    def decide(uow: UnitOfWork) -> ApprovalRead:
        decided = service.approve(
            uow,
            approval_id=approval_id,
            program_id=ctx.program_id,
            decided_by=decided_by,
            note=note,
        )
        ctx.audit_before = _replaced(decided)
        return decided

    return _answer(ctx, ctx.execute(decide, target=f"approval:{approval_id}"))


def _replaced(decided: ApprovalRead) -> dict[str, Any] | None:
    """What an approved replacement of a whole value (the settings, the earning caps)
    replaced, under that value's name: the audit entry's ``before``."""
    result = decided.result or {}
    if decided.status != "approved" or "replaced" not in result:
        return None
    return {name: result["replaced"] for name in ("settings", "caps") if name in result}


@router.post(APPROVALS + "/{approval_id}/reject", response_model=ApprovalRead)
def reject(
    program: str,
    approval_id: Id,
    ctx: Annotated[Context, Depends(Write("approvals.decide"))],
    body: Annotated[ApprovalDecision | None, Body()] = None,
) -> JSONResponse:
    """Reject another person's request; nothing executes."""
    decided_by = requester(ctx)
    note = body.note if body else ""

    def decide(uow: UnitOfWork) -> ApprovalRead:
        return service.reject(
            uow,
            approval_id=approval_id,
            program_id=ctx.program_id,
            decided_by=decided_by,
            note=note,
        )

    return ctx.execute(decide, target=f"approval:{approval_id}")


@router.post(APPROVALS + "/{approval_id}/withdraw", response_model=ApprovalRead)
def withdraw(
    program: str,
    approval_id: Id,
    ctx: Annotated[Context, Depends(Write("approvals.withdraw"))],
    body: Annotated[ApprovalDecision | None, Body()] = None,
) -> JSONResponse:
    """Withdraw your own pending request; nothing executes, and nobody can approve it."""
    withdrawn_by = requester(ctx)
    note = body.note if body else ""

    def take_back(uow: UnitOfWork) -> ApprovalRead:
        return service.withdraw(
            uow,
            approval_id=approval_id,
            program_id=ctx.program_id,
            withdrawn_by=withdrawn_by,
            note=note,
        )

    return ctx.execute(take_back, target=f"approval:{approval_id}")
