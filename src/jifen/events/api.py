"""HTTP routes of the events domain: send one event or a batch of up to 1,000, and read
what an event earned. Each event is keyed by its ``source`` and ``external_id``: sending it
again answers what it produced the first time. Awards held for review (reviewed rules') are
listed, and approved or rejected by another person than the one who sent their event."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from jifen.api.deps import Context, Read, Write, id_cursor, id_page
from jifen.api.schemas import LIMIT
from jifen.db.uow import UnitOfWork
from jifen.errors import JifenError
from jifen.events import service
from jifen.events.schemas import (
    AwardApprove,
    AwardReject,
    BatchIn,
    BatchItem,
    BatchResult,
    EventIn,
    EventResult,
    HeldAward,
    HeldAwardPage,
)

router = APIRouter(tags=["events"])

EVENTS = "/programs/{program}/events"
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.post(EVENTS, status_code=201, response_model=EventResult)
def send_event(
    program: str, body: EventIn, ctx: Annotated[Context, Depends(Write("events.write"))]
) -> JSONResponse:
    """Take one event in: stored once, evaluated against the rules live at its own time,
    its awards posted."""
    origin = _origin(ctx, body)
    return ctx.execute(
        lambda uow: service.ingest(
            uow, program_id=ctx.program_id, event=body, origin=origin, sent_by=ctx.actor
        ),
        target=f"event:{body.source}:{body.external_id}",
        status=201,
    )


def _origin(ctx: Context, event: EventIn) -> tuple[str | None, str | None]:
    """The merchant and store the event's points are posted for: a key scoped to a store
    sends only its own store's events (Forbidden otherwise)."""
    return ctx.merchant(None, service.store_of(event))


@router.post(EVENTS + "/batch", response_model=BatchResult)
def send_batch(
    program: str, body: BatchIn, ctx: Annotated[Context, Depends(Write("events.write"))]
) -> JSONResponse:
    """Up to 1,000 events in one request, with a result per item: a refused event (with its
    reason) does not keep the others out."""

    def work(uow: UnitOfWork) -> BatchResult:
        refused: dict[int, JifenError] = {}
        taken: list[tuple[int, EventIn, tuple[str | None, str | None]]] = []
        for index, event in enumerate(body.events):
            try:
                taken.append((index, event, _origin(ctx, event)))
            except JifenError as exc:
                refused[index] = exc
        outcomes = service.ingest_many(
            uow, program_id=ctx.program_id, events=[e for _, e, _ in taken],
            origins=[o for _, _, o in taken], sent_by=ctx.actor,
        )  # fmt: skip
        answers: dict[int, EventResult | Exception] = {**refused}
        answers.update((index, o) for (index, _, _), o in zip(taken, outcomes, strict=True))
        items: list[BatchItem] = []
        for index in range(len(body.events)):
            answer = answers[index]
            if isinstance(answer, JifenError):
                items.append(BatchItem(index=index, ok=False, code=answer.code,
                                       detail=answer.message(ctx.language)))  # fmt: skip
            elif isinstance(answer, Exception):
                raise answer  # not the event's fault: the request fails as a whole
            else:
                items.append(BatchItem(index=index, ok=True, result=answer))
        accepted = sum(item.ok for item in items)
        return BatchResult(accepted=accepted, refused=len(items) - accepted, items=items)

    return ctx.execute(work, target=f"events:batch:{len(body.events)}", summary=_batch_summary)


def _batch_summary(answer: dict[str, Any]) -> dict[str, Any]:
    """What the audit log keeps of a batch's answer: the counts, and each event's id and
    points or the code that refused it. The awards and skipped rules stay with the events
    (``GET …/events/{id}``): a thousand of them would make an entry of about a megabyte."""
    return {
        "accepted": answer["accepted"],
        "refused": answer["refused"],
        "items": [
            {"index": item["index"], "event_id": item["result"]["id"],
             "points": item["result"]["points"]}
            if item["ok"]
            else {"index": item["index"], "code": item["code"]}
            for item in answer["items"]
        ],
    }  # fmt: skip


@router.get(EVENTS + "/{event_id}", response_model=EventResult)
def get_event(
    program: str, event_id: Id, ctx: Annotated[Context, Depends(Read("events.read"))]
) -> EventResult:
    """An event and the awards it produced, each with the rule, the cap that bit, and the
    posting. Credentials of a merchant or store see the events made for it only (another's
    is answered as unknown)."""
    merchant, store = _scope(ctx)
    return ctx.db.run(
        lambda uow: service.get_event(
            uow, program_id=ctx.program_id, event_id=event_id, merchant=merchant, store=store
        ),
        read_only=True,
    )


def _scope(ctx: Context) -> tuple[str | None, str | None]:
    """The merchant and store the caller's grant is scoped to (None: any): it reads and
    decides only what was made for them."""
    grant = ctx.grant
    return (grant.merchant, grant.store) if grant is not None else (None, None)


AWARDS = "/programs/{program}/awards"


@router.get(AWARDS + "/held", response_model=HeldAwardPage)
def list_held_awards(
    program: str,
    ctx: Annotated[Context, Depends(Read("events.read"))],
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, LIMIT] = 50,
) -> HeldAwardPage:
    """Awards waiting for a reviewer, oldest first (of the events made for the caller's
    merchant or store, when its credentials are scoped to one)."""
    after = id_cursor(cursor)
    merchant, store = _scope(ctx)
    rows = ctx.db.run(
        lambda uow: service.held_awards(
            uow, program_id=ctx.program_id, after_id=after, limit=limit + 1, merchant=merchant,
            store=store,
        ),
        read_only=True,
    )  # fmt: skip
    items, next_cursor = id_page(rows, limit)
    return HeldAwardPage(items=items, next_cursor=next_cursor)


@router.post(AWARDS + "/{award_id}/approve", response_model=HeldAward)
def approve_award(
    program: str,
    award_id: Id,
    body: AwardApprove,
    ctx: Annotated[Context, Depends(Write("awards.decide"))],
) -> JSONResponse:
    """Post a held award (or less of it), once, within its rule's maximum and the caps of
    its day. Not the one who sent its event, nor its member."""
    merchant, store = _scope(ctx)
    return ctx.execute(
        lambda uow: service.approve_award(
            uow, program_id=ctx.program_id, award_id=award_id, decided_by=ctx.actor,
            decider_member=ctx.principal.member_id, points=body.points, note=body.note,
            merchant=merchant, store=store,
        ),
        target=f"award:{award_id}",
        action="awards.approve",
    )  # fmt: skip


@router.post(AWARDS + "/{award_id}/reject", response_model=HeldAward)
def reject_award(
    program: str,
    award_id: Id,
    body: AwardReject,
    ctx: Annotated[Context, Depends(Write("awards.decide"))],
) -> JSONResponse:
    """Decide that a held award posts nothing."""
    merchant, store = _scope(ctx)
    return ctx.execute(
        lambda uow: service.reject_award(
            uow, program_id=ctx.program_id, award_id=award_id, decided_by=ctx.actor,
            decider_member=ctx.principal.member_id, note=body.note, merchant=merchant,
            store=store,
        ),
        target=f"award:{award_id}",
        action="awards.reject",
    )  # fmt: skip
