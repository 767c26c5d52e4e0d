"""HTTP routes of the rules domain: rule versions and their lifecycle, dry runs, and the
programme's earning caps. Approving a version, and changing the caps, are requests that a
second staff user decides (``/approvals``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from jifen.api.deps import Context, Read, Write, id_cursor, id_page
from jifen.api.schemas import LIMIT, RequestBody
from jifen.approvals import service as approvals_service
from jifen.approvals.api import requester
from jifen.approvals.schemas import ApprovalRead
from jifen.db.uow import UnitOfWork
from jifen.events import service as events_service
from jifen.events.schemas import BacktestIn, BacktestReport, EventIn
from jifen.rules import service
from jifen.rules.schemas import (
    EventTypeDeclare,
    EventTypeRead,
    ProgramCaps,
    RuleActivate,
    RuleSpec,
    RuleState,
    RuleVersionRead,
)

router = APIRouter(tags=["rules"])

RULES = "/programs/{program}/rules"
VERSION = RULES + "/{version_id}"
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]
APPROVAL: dict[int | str, dict[str, Any]] = {
    202: {"model": ApprovalRead, "description": "Filed for a second person's approval"}
}


class RulePage(BaseModel):
    items: list[RuleVersionRead]
    next_cursor: str | None = None


class DryRunIn(RequestBody):
    """An event to evaluate without storing or posting anything: against ``rules`` when
    given (for example a draft), else against the rules live at the event's time."""

    event: EventIn
    rules: Annotated[list[RuleSpec], Field(max_length=200)] | None = None


class DryRunAward(BaseModel):
    rule: str
    kind: str
    member_id: int
    points: int
    wanted: int
    cap: str | None = None
    held: bool = False
    detail: dict[str, Any] = Field(default_factory=dict)


class DryRunOut(BaseModel):
    awards: list[DryRunAward]
    skipped: list[dict[str, str]]
    total: int


@router.get(RULES, response_model=RulePage)
def list_rules(
    program: str,
    ctx: Annotated[Context, Depends(Read("rules.read"))],
    code: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")] = None,
    state: RuleState | None = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, LIMIT] = 50,
) -> RulePage:
    """Rule versions in the order they were created; filter by rule code and state."""
    after = id_cursor(cursor)
    rows = ctx.db.run(
        lambda uow: service.list_versions(
            uow,
            program_id=ctx.program_id,
            code=code,
            state=state,
            after_id=after,
            limit=limit + 1,
        ),
        read_only=True,
    )
    items, next_cursor = id_page(rows, limit)
    return RulePage(items=items, next_cursor=next_cursor)


@router.post(RULES, status_code=201, response_model=RuleVersionRead)
def create_rule(
    program: str,
    body: RuleSpec,
    ctx: Annotated[Context, Depends(Write("rules.write", programme_wide=True))],
) -> JSONResponse:
    """A new draft: the first version of a rule, or the next version of an existing one."""
    return ctx.execute(
        lambda uow: service.create_version(
            uow, program_id=ctx.program_id, spec=body, created_by=ctx.actor
        ),
        target=f"rule:{body.code}",
        status=201,
    )


@router.get(VERSION, response_model=RuleVersionRead)
def get_rule(
    program: str, version_id: Id, ctx: Annotated[Context, Depends(Read("rules.read"))]
) -> RuleVersionRead:
    """One rule version."""
    return ctx.db.run(
        lambda uow: service.get_version(uow, program_id=ctx.program_id, version_id=version_id),
        read_only=True,
    )


@router.put(VERSION, response_model=RuleVersionRead)
def update_rule(
    program: str,
    version_id: Id,
    body: RuleSpec,
    ctx: Annotated[Context, Depends(Write("rules.write", programme_wide=True))],
) -> JSONResponse:
    """Change a draft (a submitted or approved version never changes: create a new one)."""
    return ctx.execute(
        lambda uow: service.update_draft(
            uow, program_id=ctx.program_id, version_id=version_id, spec=body
        ),
        target=f"rule_version:{version_id}",
    )


@router.post(VERSION + "/submit", status_code=202, response_model=ApprovalRead, responses=APPROVAL)
def submit_rule(
    program: str,
    version_id: Id,
    body: RuleActivate,
    ctx: Annotated[Context, Depends(Write("rules.write", programme_wide=True))],
) -> JSONResponse:
    """Submit a draft for approval; on approval it goes live at ``activate_at`` (or then)."""
    requested_by = requester(ctx)

    def file(uow: UnitOfWork) -> ApprovalRead:
        version = service.get_version(uow, program_id=ctx.program_id, version_id=version_id)
        approval = approvals_service.request(
            uow,
            program_id=ctx.program_id,
            action="rules.approve",
            params={
                "version_id": version_id,
                "activate_at": body.activate_at.isoformat() if body.activate_at else None,
            },
            summary=f"Approve rule {version.code} version {version.version}",
            requested_by=requested_by,
        )
        service.submit(
            uow, program_id=ctx.program_id, version_id=version_id, approval_id=approval.id
        )
        return approval

    return ctx.execute(file, target=f"rule_version:{version_id}", status=202)


def _transition(ctx: Context, version_id: int, action: str) -> JSONResponse:
    move = {"pause": service.pause, "resume": service.resume, "retire": service.retire}[action]
    return ctx.execute(
        lambda uow: move(uow, program_id=ctx.program_id, version_id=version_id),
        target=f"rule_version:{version_id}",
        action=f"rules.{action}",
    )


@router.post(VERSION + "/pause", response_model=RuleVersionRead)
def pause_rule(
    program: str,
    version_id: Id,
    ctx: Annotated[Context, Depends(Write("rules.write", programme_wide=True))],
) -> JSONResponse:
    """Stop an active version for now: events after this moment do not meet it."""
    return _transition(ctx, version_id, "pause")


@router.post(VERSION + "/resume", response_model=RuleVersionRead)
def resume_rule(
    program: str,
    version_id: Id,
    ctx: Annotated[Context, Depends(Write("rules.write", programme_wide=True))],
) -> JSONResponse:
    """Make a paused version live again from this moment."""
    return _transition(ctx, version_id, "resume")


@router.post(VERSION + "/retire", response_model=RuleVersionRead)
def retire_rule(
    program: str,
    version_id: Id,
    ctx: Annotated[Context, Depends(Write("rules.write", programme_wide=True))],
) -> JSONResponse:
    """End a version for good (its history stays)."""
    return _transition(ctx, version_id, "retire")


@router.post(RULES + "/dry-run", response_model=DryRunOut)
def dry_run(
    program: str, body: DryRunIn, ctx: Annotated[Context, Depends(Read("rules.write"))]
) -> DryRunOut:
    """What an event would earn, without storing or posting anything."""
    result = ctx.db.run(
        lambda uow: events_service.dry_run(
            uow, program_id=ctx.program_id, event=body.event, specs=body.rules
        ),
        read_only=True,
    )
    return DryRunOut(
        awards=[
            DryRunAward(
                rule=a.rule,
                kind=a.kind,
                member_id=a.member_id,
                points=a.points,
                wanted=a.wanted,
                cap=a.cap,
                held=a.held,
                detail=dict(a.detail),
            )
            for a in result.awards
        ],
        skipped=[{"rule": s.rule, "why": s.why} for s in result.skipped],
        total=result.total,
    )


@router.post(RULES + "/backtest", response_model=BacktestReport)
def backtest(
    program: str, body: BacktestIn, ctx: Annotated[Context, Depends(Read("rules.read"))]
) -> BacktestReport:
    """What the stored events of a period would have earned under proposed rules, against
    what they did earn: per rule, per tier, per day, and the members most affected."""
    return ctx.db.run(
        lambda uow: events_service.backtest(uow, program_id=ctx.program_id, request=body),
        read_only=True,
    )


class EventTypeList(BaseModel):
    items: list[EventTypeRead]


@router.get("/programs/{program}/event-types", response_model=EventTypeList)
def list_event_types(
    program: str, ctx: Annotated[Context, Depends(Read("rules.read"))]
) -> EventTypeList:
    """The programme's custom event types and their fields."""
    return EventTypeList(
        items=ctx.db.run(
            lambda uow: service.list_event_types(uow, program_id=ctx.program_id), read_only=True
        )
    )


@router.put("/programs/{program}/event-types/{name}", response_model=EventTypeRead)
def declare_event_type(
    program: str,
    name: Annotated[str, Path(pattern=r"^custom\.[a-z][a-z0-9_]{0,55}$")],
    body: EventTypeDeclare,
    ctx: Annotated[Context, Depends(Write("rules.write", programme_wide=True))],
) -> JSONResponse:
    """Declare the fields of ``custom.<name>`` events (their type, whether required); an
    event of the type that does not match is refused with the field."""
    return ctx.execute(
        lambda uow: service.declare_event_type(
            uow, program_id=ctx.program_id, name=name, body=body
        ),
        target=f"event_type:{name}",
    )


@router.get("/programs/{program}/earning-caps", response_model=ProgramCaps)
def get_caps(program: str, ctx: Annotated[Context, Depends(Read("rules.read"))]) -> ProgramCaps:
    """The programme's current earning limits per member by tier, and its budget (events
    of earlier times keep the caps in force then)."""
    return ctx.db.run(lambda uow: service.get_caps(uow, program_id=ctx.program_id), read_only=True)


@router.put(
    "/programs/{program}/earning-caps",
    status_code=202,
    response_model=ApprovalRead,
    responses=APPROVAL,
)
def put_caps(
    program: str,
    body: ProgramCaps,
    ctx: Annotated[Context, Depends(Write("rules.write", programme_wide=True))],
) -> JSONResponse:
    """Request new earning caps; they apply from when a second person approves them, to
    the events of that time on (an event of an earlier time sent later keeps the caps of
    its time)."""
    requested_by = requester(ctx)

    def file(uow: UnitOfWork) -> ApprovalRead:
        service.check_caps_tiers(uow, program_id=ctx.program_id, caps=body)
        return approvals_service.request(
            uow,
            program_id=ctx.program_id,
            action="rules.caps",
            params={"caps": body.model_dump(mode="json")},
            summary=f"Change the earning caps of programme {program}",
            requested_by=requested_by,
        )

    return ctx.execute(file, target=f"program:{program}", status=202)
