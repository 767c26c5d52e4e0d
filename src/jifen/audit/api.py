"""HTTP routes of the audit domain: search the log, export it as CSV, verify its chains.

Every route needs ``audit.read``. A principal whose grants of it are scoped to programmes
sees only those programmes' entries; one holding it everywhere sees every entry, including
those outside any programme (staff users, roles), and alone verifies the chains, which run
through every programme's entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from jifen.api.deps import Context, Read, not_allowed
from jifen.api.schemas import LIMIT, NO_NUL, Instant, Page
from jifen.audit import service
from jifen.audit.schemas import AuditEntryRead, AuditProblemRead, AuditVerification
from jifen.errors import UnknownProgram
from jifen.programs import service as programs_service

router = APIRouter(tags=["audit"])


def _text(description: str) -> Any:
    """A text filter: at most 200 characters, no NUL."""
    return Query(max_length=200, pattern=NO_NUL, description=description)


@dataclass(frozen=True)
class AuditQuery:
    """The filters the search and the export share."""

    actor: str | None
    action: str | None
    target: str | None
    program: str | None
    since: Instant | None
    until: Instant | None


def audit_query(
    actor: Annotated[str | None, _text('Who acted, e.g. "staff:alice".')] = None,
    action: Annotated[str | None, _text('What was done, e.g. "points.earn".')] = None,
    target: Annotated[str | None, _text('On what, e.g. "member:42".')] = None,
    program: Annotated[str | None, _text("Programme code.")] = None,
    since: Annotated[Instant | None, Query(description="From this time (inclusive).")] = None,
    until: Annotated[Instant | None, Query(description="Before this time (exclusive).")] = None,
) -> AuditQuery:
    """The search's and the export's query parameters, read once for both."""
    return AuditQuery(actor, action, target, program, since, until)


Filters = Annotated[AuditQuery, Depends(audit_query)]


def _filter(ctx: Context, query: AuditQuery) -> service.AuditFilter:
    """The service's filter: the programmes ``ctx``'s grants of ``audit.read`` cover,
    narrowed to ``query.program``; 403 for a programme they do not cover, or that does not
    exist (unknown, 404, only to an auditor of every programme)."""
    allowed = ctx.principal.programs("audit.read")
    programs: set[int] | None = allowed
    if query.program is not None:
        code = query.program
        try:
            program = ctx.db.run(
                lambda uow: programs_service.get_program(uow, code=code), read_only=True
            )
        except UnknownProgram:
            if allowed is None:
                raise
            program = None  # refused as one it may not read: no answer tells it exists
        if program is None or (allowed is not None and program.id not in allowed):
            raise not_allowed(ctx.principal, "audit.read", code)
        programs = {program.id}
    return service.AuditFilter(
        programs=frozenset(programs) if programs is not None else None,
        actor=query.actor,
        action=query.action,
        target=query.target,
        since=query.since,
        until=query.until,
    )


@router.get("/audit", response_model=Page[AuditEntryRead])
def search_audit(
    ctx: Annotated[Context, Depends(Read("audit.read"))],
    query: Filters,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[AuditEntryRead]:
    """Audit entries, newest first; filter by actor, action, target, programme and time.
    Pass ``next_cursor`` back as ``cursor`` for the next page."""
    filters = _filter(ctx, query)
    items, next_cursor = ctx.db.run(
        lambda uow: service.search(uow, filters, cursor=cursor, limit=limit), read_only=True
    )
    return Page(items=items, next_cursor=next_cursor)


class CsvResponse(StreamingResponse):
    """A streamed CSV download."""

    media_type = "text/csv"


@router.get(
    "/audit/export.csv",
    response_class=CsvResponse,
    responses={
        200: {
            "description": "CSV (UTF-8 with a BOM), a header row, then one row per entry",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
def export_audit(
    ctx: Annotated[Context, Depends(Read("audit.read"))], query: Filters
) -> CsvResponse:
    """The entries the same filters select, newest first, as a CSV download: ``before``
    and ``after`` as JSON text; a cell that a spreadsheet would take for a formula starts
    with an apostrophe."""
    filters = _filter(ctx, query)
    stamp = ctx.db.clock.now().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return CsvResponse(
        service.csv_chunks(ctx.db, filters),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="jifen-audit-{stamp}.csv"'},
    )


@router.get("/audit/verify", response_model=AuditVerification)
def verify_audit(
    ctx: Annotated[Context, Depends(Read("audit.read", installation_wide=True))],
) -> AuditVerification:
    """Recompute every entry's hash and follow every chain to its head: ``ok`` when the log
    is as it was written, else each problem with the entry, stripe and position it is
    about. Reads the whole log: meant for an occasional check, not for polling. The chains
    run through every programme's entries, so the check is the installation's: it needs
    ``audit.read`` granted in every programme (an auditor of some programmes searches and
    exports their entries)."""
    with service.snapshot(ctx.db) as uow:
        report = service.verify_report(uow)
    return AuditVerification(
        ok=report.ok,
        entries=report.entries,
        chains=report.chains,
        problems=[
            AuditProblemRead(
                entry_id=problem.entry_id,
                stripe=problem.stripe,
                seq=problem.seq,
                problem=problem.message(ctx.language),
            )
            for problem in report.problems
        ],
    )
