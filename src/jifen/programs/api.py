"""HTTP routes of programmes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from jifen.api.deps import Context, Read, Write, id_cursor, id_page
from jifen.api.schemas import IdCursor, Limit, Page
from jifen.approvals import service as approvals_service
from jifen.approvals.api import requester
from jifen.approvals.schemas import ApprovalRead
from jifen.db.uow import UnitOfWork
from jifen.errors import Forbidden
from jifen.programs import service
from jifen.programs.schemas import ProgramCreate, ProgramRead, ProgramSettings
from jifen.tiers import service as tiers_service

router = APIRouter(tags=["programmes"])


@router.get("/programs")
def list_programs(
    ctx: Annotated[Context, Depends(Read("programs.read"))],
    cursor: IdCursor = None,
    limit: Limit = 50,
) -> Page[ProgramRead]:
    """The programmes the caller can see, oldest first."""
    after = id_cursor(cursor)
    visible = ctx.principal.programs("programs.read")
    rows = ctx.db.run(
        lambda uow: service.list_programs(uow, after_id=after, limit=limit + 1, among=visible),
        read_only=True,
    )
    items, next_cursor = id_page(rows, limit)
    return Page(items=items, next_cursor=next_cursor)


@router.post("/programs", status_code=201, response_model=ProgramRead)
def create_program(
    body: ProgramCreate, ctx: Annotated[Context, Depends(Write("programs.write"))]
) -> JSONResponse:
    """Create a programme with its own system accounts: an installation-wide act, for an
    unscoped grant only (one scoped to a programme or merchant administers just that)."""
    if not ctx.principal.everywhere(ctx.permission):
        raise Forbidden(
            problem="Only an installation-wide grant of programs.write creates programmes.",
            problem_zh="只有全系统范围的 programs.write 授权可以创建计划。",
        )
    return ctx.execute(
        lambda uow: service.create_program(
            uow, code=body.code, name=body.name, time_zone=body.time_zone
        ),
        target=f"program:{body.code}",
        status=201,
    )


@router.get("/programs/{program}")
def get_program(
    program: str, ctx: Annotated[Context, Depends(Read("programs.read"))]
) -> ProgramRead:
    """One programme, by its code."""
    assert ctx.program is not None
    return ctx.db.run(lambda uow: service.get_program(uow, code=program), read_only=True)


@router.get("/programs/{program}/settings", response_model=ProgramSettings)
def get_settings(
    program: str, ctx: Annotated[Context, Depends(Read("programs.read"))]
) -> ProgramSettings:
    """The programme's policy: approval threshold, transfers, return window, validity."""
    return ctx.db.run(
        lambda uow: service.get_settings(uow, program_id=ctx.program_id), read_only=True
    )


@router.put(
    "/programs/{program}/settings",
    status_code=202,
    response_model=ApprovalRead,
    responses={202: {"model": ApprovalRead, "description": "Filed for a second person's approval"}},
)
def put_settings(
    program: str,
    body: ProgramSettings,
    ctx: Annotated[Context, Depends(Write("programs.settings", programme_wide=True))],
) -> JSONResponse:
    """Request new settings (the whole policy); they apply when a second person approves.
    A new tier scheme must name the programme's tiers in rank order (422 on ``levels``)."""
    requested_by = requester(ctx)

    def file(uow: UnitOfWork) -> ApprovalRead:
        current = service.get_settings(uow, program_id=ctx.program_id)
        tiers_service.require_scheme_fits(
            uow, program_id=ctx.program_id, scheme=body.tier_scheme, current=current.tier_scheme
        )
        service.require_tiers_defined(uow, program_id=ctx.program_id, settings=body)
        return approvals_service.request(
            uow,
            program_id=ctx.program_id,
            action="programs.settings",
            params={"settings": body.model_dump(mode="json")},
            summary=f"Change the settings of programme {program}",
            requested_by=requested_by,
        )

    return ctx.execute(file, target=f"program:{program}", status=202)
