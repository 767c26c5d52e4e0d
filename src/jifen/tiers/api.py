"""HTTP routes of the tiers domain: the programme's tiers and each member's current tier."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from jifen.api.deps import Context, Read, Write
from jifen.tiers import service
from jifen.tiers.schemas import MemberTierRead, MemberTierSet, TierRead, TiersSet

router = APIRouter(tags=["tiers"])

Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


class TierList(BaseModel):
    items: list[TierRead]


@router.get("/programs/{program}/tiers", response_model=TierList)
def list_tiers(program: str, ctx: Annotated[Context, Depends(Read("tiers.read"))]) -> TierList:
    """The programme's tiers, entry tier first."""
    items = ctx.db.run(
        lambda uow: service.list_tiers(uow, program_id=ctx.program_id), read_only=True
    )
    return TierList(items=items)


@router.put("/programs/{program}/tiers", response_model=TierList)
def set_tiers(
    program: str, body: TiersSet, ctx: Annotated[Context, Depends(Write("tiers.write"))]
) -> JSONResponse:
    """Replace the programme's tiers (a tier members hold cannot be removed)."""
    return ctx.execute(
        lambda uow: TierList(
            items=service.set_tiers(uow, program_id=ctx.program_id, definitions=body.tiers)
        ),
        target=f"program:{program}",
    )


@router.get("/programs/{program}/members/{member_id}/tier", response_model=MemberTierRead)
def get_member_tier(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Read("tiers.read"))]
) -> MemberTierRead:
    """The member's current tier, since when and why."""
    return ctx.db.run(
        lambda uow: service.member_tier(uow, program_id=ctx.program_id, member_id=member_id),
        read_only=True,
    )


@router.put("/programs/{program}/members/{member_id}/tier", response_model=MemberTierRead)
def set_member_tier(
    program: str,
    member_id: Id,
    body: MemberTierSet,
    ctx: Annotated[Context, Depends(Write("tiers.write"))],
) -> JSONResponse:
    """Put the member in a tier from now on (rules and caps read it)."""
    return ctx.execute(
        lambda uow: service.set_member_tier(
            uow, program_id=ctx.program_id, member_id=member_id, tier=body.tier,
            reason=body.reason, set_by=ctx.actor,
        ),
        target=f"member:{member_id}",
    )  # fmt: skip
