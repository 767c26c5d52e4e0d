"""HTTP routes of the points domain: balances, lots, history and every change of points.

Each write checks, in the transaction that posts, that the members it names belong to the
programme (and, to earn, spend or transfer, are active), posts through the points service
with the request's ledger key, and records the merchant and store it was made for. Manual
adjustments above the programme's threshold and clearing a member's points are filed as
approval requests instead (202).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from jifen.api.deps import Context, Read, Write
from jifen.api.schemas import Instant
from jifen.approvals import service as approvals_service
from jifen.approvals.api import requester
from jifen.approvals.schemas import ApprovalRead
from jifen.db import prepared
from jifen.db.uow import UnitOfWork
from jifen.errors import Forbidden, StateConflict, UnknownPosting
from jifen.expiry import service as expiry_service
from jifen.members import service as members_service
from jifen.notify import service as notify_service
from jifen.points import service
from jifen.points.schemas import (
    AdjustCreate,
    BalanceSummary,
    ClearCreate,
    EarnCreate,
    FreezeCreate,
    GiveBackCreate,
    HistoryPage,
    LotPage,
    PostingRead,
    SpendCreate,
    TransferCreate,
)
from jifen.programs import service as programs_service
from jifen.programs.schemas import ProgramSettings
from jifen.rewards import service as rewards_service
from jifen.tiers import service as tiers_service

router = APIRouter(tags=["points"])

MEMBER = "/programs/{program}/members/{member_id}"
POSTING = "/programs/{program}/postings/{posting_id}"

Id = Annotated[int, Path(ge=1, le=2**63 - 1)]
KindName = Literal[
    "earn",
    "spend",
    "refund",
    "reverse",
    "adjust",
    "transfer",
    "freeze",
    "unfreeze",
    "expire",
    "renew",
]
APPROVAL: dict[int | str, dict[str, Any]] = {
    202: {"model": ApprovalRead, "description": "Filed for a second person's approval"}
}


def _member(uow: UnitOfWork, ctx: Context, member_id: int, *, transacting: bool = False) -> None:
    members_service.require_member(
        uow, program_id=ctx.program_id, member_id=member_id, transacting=transacting
    )


def _checks(
    ctx: Context,
    *member_ids: int,
    transacting: bool = False,
    settings: bool = False,
    locking: bool = False,
) -> Callable[[UnitOfWork], list[prepared.Read[Any]]]:
    """:func:`_member` for each member a write names, as the first reads of
    ``ctx.execute``: one round trip with the look-up of a stored answer. With ``settings``,
    the programme's policy as of this very transaction too, in the same round trip; with
    ``locking``, the (one) member's points account, held for the posting that follows
    (its key is the request's)."""

    def reads(uow: UnitOfWork) -> list[prepared.Read[Any]]:
        found: list[prepared.Read[Any]] = [
            members_service.require_member_read(
                program_id=ctx.program_id, member_id=member_id, transacting=transacting
            )
            for member_id in member_ids
        ]
        if settings:
            found.append(programs_service.settings_read(uow, ctx.program_id))
        if locking:
            (member_id,) = member_ids
            key = ctx.ledger_key()
            found.append(service.lock_account_read(uow, member_id=member_id, key=key))
        # Whether the programme has webhooks to tell of the posting (:func:`_announce`).
        found.append(notify_service.subscriptions_read(uow, ctx.program_id))
        return found

    return reads


def _announce(
    uow: UnitOfWork, ctx: Context, posting: PostingRead, merchant: str | None = None,
    store: str | None = None,
) -> PostingRead:  # fmt: skip
    """Tell the programme's webhooks of the posting (``points.<kind>``), in its transaction."""
    notify_service.announce_postings(
        uow, program_id=ctx.program_id, postings=[(posting, merchant, store)]
    )
    return posting


def _settings(ctx: Context) -> ProgramSettings:
    return ctx.db.run(
        lambda uow: programs_service.get_settings(uow, program_id=ctx.program_id), read_only=True
    )


def _adjustment_policy(uow: UnitOfWork, ctx: Context) -> tuple[int, int]:
    """The programme's approval threshold, and what the caller adjusted directly lately
    (its turn to adjust then held until the transaction ends)."""
    settings = programs_service.get_settings(uow, program_id=ctx.program_id)
    lately = service.adjusted_lately(uow, program_id=ctx.program_id, actor=ctx.actor)
    return settings.adjust_approval_threshold, lately


# --------------------------------------------------------------------------- reads


@router.get(f"{MEMBER}/points", response_model=BalanceSummary)
def get_balance(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Read("points.read"))]
) -> JSONResponse:
    """Balance, what is available, pending, overdue, frozen and owed, and what expires when."""

    def read(uow: UnitOfWork) -> BalanceSummary:
        _member(uow, ctx, member_id)
        return service.balance(uow, member_id=member_id)

    # The busiest read: answered as pydantic dumps it, without FastAPI validating the
    # summary again against the response model it was built as.
    return JSONResponse(ctx.db.run(read, read_only=True).model_dump(mode="json"))


@router.get(f"{MEMBER}/points/lots", response_model=LotPage)
def list_lots(
    program: str,
    member_id: Id,
    ctx: Annotated[Context, Depends(Read("points.read"))],
    open_only: bool = True,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> LotPage:
    """The member's lots, earliest expiry first; ``open_only`` leaves out spent ones."""

    def read(uow: UnitOfWork) -> LotPage:
        _member(uow, ctx, member_id)
        return service.lots_page(
            uow, member_id=member_id, open_only=open_only, cursor=cursor, limit=limit
        )

    return ctx.db.run(read, read_only=True)


@router.get(f"{MEMBER}/points/history", response_model=HistoryPage)
def get_history(
    program: str,
    member_id: Id,
    ctx: Annotated[Context, Depends(Read("points.read"))],
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    kind: Annotated[list[KindName] | None, Query()] = None,
    since: Annotated[Instant | None, Query()] = None,
    until: Annotated[Instant | None, Query()] = None,
) -> HistoryPage:
    """The member's postings, newest first; filter by ``kind`` (repeatable) and time."""

    def read(uow: UnitOfWork) -> HistoryPage:
        _member(uow, ctx, member_id)
        return service.history(
            uow,
            member_id=member_id,
            cursor=cursor,
            limit=limit,
            kinds=kind,
            since=since,
            until=until,
        )

    return ctx.db.run(read, read_only=True)


@router.get(POSTING, response_model=PostingRead)
def get_posting(
    program: str, posting_id: Id, ctx: Annotated[Context, Depends(Read("points.read"))]
) -> PostingRead:
    """One posting of the programme."""
    return ctx.db.run(
        lambda uow: service.get_posting(uow, program_id=ctx.program_id, posting_id=posting_id),
        read_only=True,
    )


# --------------------------------------------------------------------------- member writes


def _default_expiry(
    uow: UnitOfWork, ctx: Context, member_id: int, available_at: datetime | None
) -> datetime | None:
    """The programme's validity for the member, counted from when the points become
    available."""
    start = max(uow.clock.now(), available_at) if available_at else uow.clock.now()
    return expiry_service.lot_expiries(
        uow, program_id=ctx.program_id, start=start, member_ids=[member_id]
    )[member_id]


@router.post(f"{MEMBER}/points/earn", status_code=201, response_model=PostingRead)
def earn(
    program: str,
    member_id: Id,
    body: EarnCreate,
    ctx: Annotated[Context, Depends(Write("points.earn"))],
) -> JSONResponse:
    """Credit points; without ``expires_at`` they keep the programme's default validity. A
    tier scheme that upgrades at once moves the member up as an event's earning would."""
    merchant, store = ctx.merchant(body.merchant, body.store)

    def post(uow: UnitOfWork) -> PostingRead:
        expires_at = body.expires_at
        if expires_at is None:
            expires_at = _default_expiry(uow, ctx, member_id, body.available_at)
        posting = service.earn(
            uow,
            member_id=member_id,
            amount=body.amount,
            key=ctx.ledger_key(),
            available_at=body.available_at,
            expires_at=expires_at,
            reason=body.reason,
            actor=ctx.actor,
        )
        service.record_origin(uow, posting_id=posting.id, merchant=merchant, store=store)
        _announce(uow, ctx, posting, merchant, store)
        # As an event's earning does: a scheme that upgrades at once (or a campaign of
        # temporary upgrades) moves the member up in this transaction.
        tiers_service.after_earning(
            uow, program_id=ctx.program_id, member_ids=[member_id], now=uow.clock.now()
        )
        return posting

    # The default validity reads the programme's policy, and so does the tier scheme's
    # upgrade at once; the account the posting locks is locked in the same round trip.
    first = _checks(ctx, member_id, transacting=True, settings=True, locking=True)
    return ctx.execute(
        post, target=f"member:{member_id}", status=201, first=first,
        combine=service.account_key(member_id),
    )  # fmt: skip


@router.post(f"{MEMBER}/points/spend", status_code=201, response_model=PostingRead)
def spend(
    program: str,
    member_id: Id,
    body: SpendCreate,
    ctx: Annotated[Context, Depends(Write("points.spend"))],
) -> JSONResponse:
    """Debit spendable points, earliest-expiring first."""
    merchant, store = ctx.merchant(body.merchant, body.store)

    def post(uow: UnitOfWork) -> PostingRead:
        posting = service.spend(
            uow,
            member_id=member_id,
            amount=body.amount,
            key=ctx.ledger_key(),
            reason=body.reason,
            actor=ctx.actor,
        )
        service.record_origin(uow, posting_id=posting.id, merchant=merchant, store=store)
        return _announce(uow, ctx, posting, merchant, store)

    first = _checks(ctx, member_id, transacting=True)
    return ctx.execute(
        post, target=f"member:{member_id}", status=201, first=first,
        combine=service.account_key(member_id),
    )  # fmt: skip


@router.post(
    f"{MEMBER}/points/adjust", status_code=201, response_model=PostingRead, responses=APPROVAL
)
def adjust(
    program: str,
    member_id: Id,
    body: AdjustCreate,
    ctx: Annotated[Context, Depends(Write("points.adjust"))],
) -> JSONResponse:
    """A manual correction; above the programme's threshold it waits for approval (202).
    An operator's own adjustments of the last 24 hours count together: one that brings
    their sum (credits and debits alike) above the threshold waits too, so that a large
    adjustment split into small ones does not go without a second person. The sum is read,
    and the adjustment posted or filed, in one transaction that holds the operator's turn:
    adjustments sent at once are counted one after another."""

    def adjust_or_file(uow: UnitOfWork) -> PostingRead | ApprovalRead:
        threshold, lately = _adjustment_policy(uow, ctx)
        if lately + abs(body.amount) > threshold:
            return _file_adjustment(uow, ctx, member_id, body)
        posting = service.adjust(
            uow,
            member_id=member_id,
            amount=body.amount,
            key=ctx.ledger_key(),
            reason=body.reason,
            actor=ctx.actor,
            expires_at=body.expires_at,
        )
        return _announce(uow, ctx, posting)

    first = _checks(ctx, member_id, settings=True)  # the threshold is the policy's
    return ctx.execute(
        adjust_or_file, target=f"member:{member_id}", status=_posted_or_filed, first=first
    )


def _file_adjustment(
    uow: UnitOfWork, ctx: Context, member_id: int, body: AdjustCreate
) -> ApprovalRead:
    """File the adjustment for a second person's approval, unless it could never execute."""
    service.check_adjustment(
        uow,
        member_id=member_id,
        amount=body.amount,
        reason=body.reason,
        actor=ctx.actor,
        expires_at=body.expires_at,
    )
    return approvals_service.request(
        uow,
        program_id=ctx.program_id,
        action="points.adjust",
        params={
            "member_id": member_id,
            "amount": body.amount,
            "reason": body.reason,
            "expires_at": body.expires_at.isoformat() if body.expires_at else None,
            "actor": ctx.actor,
        },
        summary=f"Adjust member {member_id} by {body.amount:+d} points: {body.reason}",
        requested_by=requester(ctx),
    )


def _posted_or_filed(result: BaseModel) -> int:
    return 202 if isinstance(result, ApprovalRead) else 201


@router.post(f"{MEMBER}/points/freeze", status_code=201, response_model=PostingRead)
def freeze(
    program: str,
    member_id: Id,
    body: FreezeCreate,
    ctx: Annotated[Context, Depends(Write("points.freeze"))],
) -> JSONResponse:
    """Hold spendable points away from the member, for example during a review. The freeze
    records the merchant and store its credentials act for: only credentials covering them
    release it (one made by the programme's own staff, risk control, is released by them
    only)."""
    merchant, store = ctx.merchant(None)

    def post(uow: UnitOfWork) -> PostingRead:
        posting = service.freeze(
            uow,
            member_id=member_id,
            amount=body.amount,
            key=ctx.ledger_key(),
            reason=body.reason,
            actor=ctx.actor,
        )
        service.record_origin(uow, posting_id=posting.id, merchant=merchant, store=store)
        return _announce(uow, ctx, posting, merchant, store)

    first = _checks(ctx, member_id)
    return ctx.execute(
        post, target=f"member:{member_id}", status=201, first=first,
        combine=service.account_key(member_id),
    )  # fmt: skip


@router.post(
    f"{MEMBER}/points/clear", status_code=202, response_model=ApprovalRead, responses=APPROVAL
)
def clear(
    program: str,
    member_id: Id,
    body: ClearCreate,
    ctx: Annotated[Context, Depends(Write("points.clear"))],
) -> JSONResponse:
    """Request clearing the member's available points; executes when a second person approves."""
    requested_by = requester(ctx)

    def file(uow: UnitOfWork) -> ApprovalRead:
        return approvals_service.request(
            uow,
            program_id=ctx.program_id,
            action="points.clear",
            params={"member_id": member_id, "reason": body.reason, "actor": ctx.actor},
            summary=f"Clear the available points of member {member_id}: {body.reason}",
            requested_by=requested_by,
        )

    first = _checks(ctx, member_id)
    return ctx.execute(file, target=f"member:{member_id}", status=202, first=first)


@router.post(f"{MEMBER}/points/transfer", status_code=201, response_model=PostingRead)
def transfer(
    program: str,
    member_id: Id,
    body: TransferCreate,
    ctx: Annotated[Context, Depends(Write("points.transfer"))],
) -> JSONResponse:
    """Move spendable points to another member of the programme, where the programme allows."""
    settings = _settings(ctx)
    if not settings.transfers_enabled:
        raise StateConflict(
            problem="This programme does not allow transfers between members.",
            problem_zh="本计划不允许会员之间转赠积分。",
        )
    if settings.transfer_max is not None and body.amount > settings.transfer_max:
        raise StateConflict(
            problem=f"A transfer may move at most {settings.transfer_max} points in this "
            f"programme; {body.amount} were asked for.",
            problem_zh=f"本计划单次转赠最多 {settings.transfer_max} 积分,本次申请 {body.amount}。",
        )

    def post(uow: UnitOfWork) -> PostingRead:
        posting = service.transfer(
            uow,
            from_member_id=member_id,
            to_member_id=body.to_member_id,
            amount=body.amount,
            key=ctx.ledger_key(),
            reason=body.reason,
            actor=ctx.actor,
        )
        return _announce(uow, ctx, posting)

    first = _checks(ctx, member_id, body.to_member_id, transacting=True)
    return ctx.execute(post, target=f"member:{member_id}", status=201, first=first)


# --------------------------------------------------------------------------- give-backs


def _own_posting(uow: UnitOfWork, ctx: Context, posting_id: int) -> PostingRead:
    """The programme's posting, if the caller's scope covers the merchant (and, for
    credentials of one store, the store) it was made for. Another merchant's or store's
    posting is unknown (404) to them, as a missing one is, so that no one learns which ids
    are whose by trying to give them back; one made for no merchant (the programme's own),
    or for the merchant at no store, is refused (403)."""
    posting = service.get_posting(uow, program_id=ctx.program_id, posting_id=posting_id)
    scope, at = ctx.merchant_scope, ctx.store_scope
    if scope is None and at is None:
        return posting
    merchant, store = service.origin_of(uow, posting_id=posting_id)
    if scope is not None and merchant is None:
        raise Forbidden(
            problem=f"Posting {posting_id} was made for no merchant: it is the programme's "
            f"own, and credentials of merchant {scope!r} cannot give it back.",
            problem_zh=f"记录 {posting_id} 不属于任何商户,为计划本身所有;商户 {scope!r} "
            "的凭据无权退还、冲正或解冻。",
        )
    if scope is not None and merchant != scope:
        raise UnknownPosting(posting_id=posting_id, expected="points", expected_zh="积分")
    if at is not None and store is None:
        raise Forbidden(
            problem=f"Posting {posting_id} was made at none of the merchant's stores: it is "
            f"the merchant's own, and credentials of store {at!r} cannot give it back.",
            problem_zh=f"记录 {posting_id} 不属于任何门店,为商户本身所有;门店 {at!r} "
            "的凭据无权退还、冲正或解冻。",
        )
    if at is not None and store != at:
        raise UnknownPosting(posting_id=posting_id, expected="points", expected_zh="积分")
    return posting


def _give_back(
    ctx: Context,
    posting_id: int,
    body: GiveBackCreate,
    operation: Any,
    *,
    unfreezing: bool = False,
) -> JSONResponse:
    merchant, store = ctx.merchant(None)

    def post(uow: UnitOfWork) -> PostingRead:
        original = _own_posting(uow, ctx, posting_id)
        if unfreezing and original.kind == "freeze" and original.reason == service.FROZEN_AT_EXPIRY:
            # Back on their own lots, past their date, the points could not be used.
            raise StateConflict(
                problem=f"Posting {posting_id} froze points when their lots lapsed: unfrozen "
                "onto those lots, past their date, the member could not use them. Give them "
                f"back as new points with POST …/members/{original.member_id}/points/"
                "restore-expired instead.",
                problem_zh=f"记录 {posting_id} 冻结的是过期时的积分:解冻回原批次(已过期)后"
                f"会员也无法使用。请改用 POST …/members/{original.member_id}/points/"
                "restore-expired 以新积分返还。",
            )
        order = (  # only a spend or a hold pays for a redemption
            rewards_service.order_paid_by(uow, program_id=ctx.program_id, posting_id=posting_id)
            if original.kind in ("spend", "freeze")
            else None
        )
        if order is not None:  # its stock, voucher and state must follow: the order does it
            raise StateConflict(
                problem=f"Posting {posting_id} paid for redemption order {order}; cancel or "
                f"return the order (POST …/orders/{order}/cancel or /return) instead.",
                problem_zh=f"记录 {posting_id} 是兑换订单 {order} 的支付;请取消或退回该订单"
                f"(POST …/orders/{order}/cancel 或 /return)。",
            )
        posting: PostingRead = operation(
            uow,
            posting_id,
            key=ctx.ledger_key(),
            amount=body.amount,
            reason=body.reason,
            actor=ctx.actor,
        )
        service.record_origin(uow, posting_id=posting.id, merchant=merchant, store=store)
        ctx.audit_before = {"posting_id": original.id, "kind": original.kind}
        return _announce(uow, ctx, posting, merchant, store)

    return ctx.execute(post, target=f"posting:{posting_id}", status=201)


@router.post(f"{POSTING}/refund", status_code=201, response_model=PostingRead)
def refund(
    program: str,
    posting_id: Id,
    body: GiveBackCreate,
    ctx: Annotated[Context, Depends(Write("points.refund"))],
) -> JSONResponse:
    """Give back all (no ``amount``) or part of a spend, to exactly the lots it took. A
    member with a debt (``debt_change``) pays it off first out of what comes back."""
    return _give_back(
        ctx, posting_id, body, lambda uow, p, **kw: service.refund(uow, spend_id=p, **kw)
    )


@router.post(f"{POSTING}/reverse", status_code=201, response_model=PostingRead)
def reverse(
    program: str,
    posting_id: Id,
    body: GiveBackCreate,
    ctx: Annotated[Context, Depends(Write("points.reverse"))],
) -> JSONResponse:
    """Claw back all or part of an earning: its own points first, then the member's other
    points (pending ones too); what they cannot cover becomes debt."""
    return _give_back(
        ctx, posting_id, body, lambda uow, p, **kw: service.reverse(uow, earn_id=p, **kw)
    )


@router.post(f"{POSTING}/unfreeze", status_code=201, response_model=PostingRead)
def unfreeze(
    program: str,
    posting_id: Id,
    body: GiveBackCreate,
    ctx: Annotated[Context, Depends(Write("points.freeze"))],
) -> JSONResponse:
    """Release all or part of a freeze back to the lots it held; a member that owes pays its
    debt first out of what comes back (``debt_change``). Credentials of one merchant
    (or store) release only a freeze made for it; one made for no merchant (risk control,
    an order's hold) is the programme's own, and refused to them (403). Points the expiry
    run froze when they lapsed are refused (409): their lots are past their date, and
    ``…/points/restore-expired`` gives them back as new points."""
    return _give_back(
        ctx,
        posting_id,
        body,
        lambda uow, p, **kw: service.unfreeze(uow, freeze_id=p, **kw),
        unfreezing=True,
    )
