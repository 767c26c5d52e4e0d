"""HTTP routes of the tiers domain: the programme's tiers, each member's current tier and its
changes, the tier scheme and benefits matrix (changed by approval), evaluation on demand and
a dry run of a whole evaluation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from jifen.api.deps import Context, Read, Write, id_cursor
from jifen.api.schemas import Page
from jifen.approvals import service as approvals_service
from jifen.approvals.api import requester
from jifen.approvals.schemas import ApprovalRead
from jifen.db.uow import UnitOfWork
from jifen.errors import StateConflict, invalid_field
from jifen.tiers import service
from jifen.tiers.schemas import (
    BenefitsMatrix,
    DryRunIn,
    EvaluationReport,
    MemberEvaluation,
    MemberTierRead,
    MemberTierSet,
    TierChangeRead,
    TierRead,
    TierScheme,
    TierSchemeRead,
    TiersSet,
)

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
    program: str,
    body: TiersSet,
    ctx: Annotated[Context, Depends(Write("tiers.write", programme_wide=True))],
) -> JSONResponse:
    """Replace the programme's tiers. A tier members hold cannot be removed, and while the
    programme has a tier scheme its levels stay the tiers' codes in rank order (409
    ``state_conflict`` otherwise): set the scheme to none first to change them."""
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
    ctx: Annotated[Context, Depends(Write("tiers.write", programme_wide=True))],
) -> JSONResponse:
    """Put the member in a tier from now on (rules and caps read it). A member's tier counts
    at every merchant, so the grant must cover the whole programme."""
    return ctx.execute(
        lambda uow: service.set_member_tier(
            uow, program_id=ctx.program_id, member_id=member_id, tier=body.tier,
            reason=body.reason, set_by=ctx.actor,
        ),
        target=f"member:{member_id}",
    )  # fmt: skip


# --------------------------------------------------------------------------- tiers by score

SCHEME = "/programs/{program}/tiers/scheme"
BENEFITS = "/programs/{program}/tiers/benefits"


@router.get(SCHEME, response_model=TierSchemeRead)
def get_scheme(
    program: str, ctx: Annotated[Context, Depends(Read("tiers.read"))]
) -> TierSchemeRead:
    """How members' tiers follow their scores, and the benefits matrix (None: no scheme)."""
    return ctx.db.run(
        lambda uow: TierSchemeRead(scheme=service.scheme_of(uow, program_id=ctx.program_id)),
        read_only=True,
    )


def _file(ctx: Context, program: str, scheme: TierScheme | None, summary: str) -> JSONResponse:
    """File the programme's settings with ``scheme`` for a second person's approval, as
    every change of programme policy is."""
    requested_by = requester(ctx)

    def file(uow: UnitOfWork) -> ApprovalRead:
        settings = service.settings_with_scheme(uow, program_id=ctx.program_id, scheme=scheme)
        return approvals_service.request(
            uow,
            program_id=ctx.program_id,
            action="programs.settings",
            params={"settings": settings.model_dump(mode="json")},
            summary=summary,
            requested_by=requested_by,
        )

    return ctx.execute(file, target=f"program:{program}", status=202)


@router.put(
    SCHEME,
    status_code=202,
    response_model=ApprovalRead,
    responses={202: {"model": ApprovalRead, "description": "Filed for a second person's approval"}},
)
def put_scheme(
    program: str,
    body: TierScheme,
    ctx: Annotated[Context, Depends(Write("programs.settings", programme_wide=True))],
) -> JSONResponse:
    """Request a new tier scheme; it applies when a second person approves it."""
    return _file(ctx, program, body, f"Change the tier scheme of programme {program}")


@router.get(BENEFITS, response_model=BenefitsMatrix)
def get_benefits(
    program: str, ctx: Annotated[Context, Depends(Read("tiers.read"))]
) -> BenefitsMatrix:
    """What each tier gives: earn multiplier, redemption discount, caps, validity, early
    access and birthday gift."""
    scheme = ctx.db.run(
        lambda uow: service.scheme_of(uow, program_id=ctx.program_id), read_only=True
    )
    return BenefitsMatrix(benefits=scheme.benefits if scheme is not None else {})


@router.put(
    BENEFITS,
    status_code=202,
    response_model=ApprovalRead,
    responses={202: {"model": ApprovalRead, "description": "Filed for a second person's approval"}},
)
def put_benefits(
    program: str,
    body: BenefitsMatrix,
    ctx: Annotated[Context, Depends(Write("programs.settings", programme_wide=True))],
) -> JSONResponse:
    """Request a new benefits matrix (part of the tier scheme); it applies when a second
    person approves it."""
    scheme = ctx.db.run(
        lambda uow: service.scheme_of(uow, program_id=ctx.program_id), read_only=True
    )
    if scheme is None:
        raise StateConflict(
            problem="This programme has no tier scheme; set one (with its levels) first.",
            problem_zh="本计划尚未设置等级评定方案,请先设置(含分数区间)。",
        )
    try:
        changed = TierScheme.model_validate({**scheme.model_dump(), "benefits": body.benefits})
    except ValidationError as exc:
        raise invalid_field(exc, field="benefits") from exc
    return _file(ctx, program, changed, f"Change the tier benefits of programme {program}")


@router.post("/programs/{program}/tiers/dry-run", response_model=EvaluationReport)
def dry_run(
    program: str,
    ctx: Annotated[Context, Depends(Read("tiers.write", programme_wide=True))],
    body: DryRunIn | None = None,
) -> EvaluationReport:
    """How many members an evaluation now (or at ``at``) would move up and down; nothing
    is written. It reads the whole programme: the grant must cover it."""

    def run(uow: UnitOfWork) -> EvaluationReport:
        at = body.at if body is not None and body.at is not None else uow.clock.now()
        return service.dry_run(uow, program_id=ctx.program_id, now=at)

    return ctx.db.run(run, read_only=True)


@router.post(
    "/programs/{program}/members/{member_id}/tier/evaluate", response_model=MemberEvaluation
)
def evaluate_member(
    program: str,
    member_id: Id,
    ctx: Annotated[Context, Depends(Write("tiers.write", programme_wide=True))],
) -> JSONResponse:
    """Evaluate the member now, as a scheduled evaluation would: up or down by its score
    (a tier that counts at every merchant: the grant must cover the whole programme)."""
    return ctx.execute(
        lambda uow: service.evaluate_member(
            uow, program_id=ctx.program_id, member_id=member_id, actor=ctx.actor
        ),
        target=f"member:{member_id}",
    )


@router.get(
    "/programs/{program}/members/{member_id}/tier/changes", response_model=Page[TierChangeRead]
)
def tier_changes(
    program: str,
    member_id: Id,
    ctx: Annotated[Context, Depends(Read("tiers.read"))],
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Page[TierChangeRead]:
    """The member's tier changes, newest first, each with its kind, reason and score."""
    before = id_cursor(cursor) or None
    items, next_id = ctx.db.run(
        lambda uow: service.history(
            uow, program_id=ctx.program_id, member_id=member_id, before_id=before, limit=limit
        ),
        read_only=True,
    )
    return Page(items=items, next_cursor=str(next_id) if next_id is not None else None)
