"""HTTP routes of the expiry domain: giving back points frozen when they lapsed (the
policy's ``on_expiry: freeze``). The policy itself is part of the programme's settings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from jifen.api.deps import Context, Write
from jifen.db.uow import UnitOfWork
from jifen.errors import Forbidden
from jifen.expiry import service
from jifen.expiry.schemas import RestoredRead, RestoreExpired
from jifen.members import service as members_service

router = APIRouter(tags=["points"])

Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.post(
    "/programs/{program}/members/{member_id}/points/restore-expired",
    status_code=201,
    response_model=RestoredRead,
)
def restore_expired(
    program: str,
    member_id: Id,
    body: RestoreExpired,
    ctx: Annotated[Context, Depends(Write("points.freeze"))],
) -> JSONResponse:
    """Give back every point of the member frozen when it lapsed, as new lots with the
    validity a new earning gets now (nothing when none is frozen). The expiry run froze
    them for no merchant: credentials of one merchant or store cannot give them back."""
    if ctx.merchant_scope is not None or ctx.store_scope is not None:
        raise Forbidden(
            problem="Points frozen when they lapsed are the programme's own: credentials "
            "that act for one merchant or store cannot give them back.",
            problem_zh="过期时冻结的积分属于计划本身,仅代表单个商户或门店的凭据无权退还。",
        )

    def post(uow: UnitOfWork) -> RestoredRead:
        members_service.require_member(uow, program_id=ctx.program_id, member_id=member_id)
        released = service.restore_frozen(
            uow, program_id=ctx.program_id, member_id=member_id, key=ctx.ledger_key(),
            actor=ctx.actor, reason=body.reason,
        )  # fmt: skip
        return RestoredRead(
            member_id=member_id, points=sum(p.amount for p in released),
            debt_paid=-sum(p.debt_change for p in released), postings=released,
        )  # fmt: skip

    return ctx.execute(post, target=f"member:{member_id}", status=201)
