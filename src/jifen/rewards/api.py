"""HTTP routes of the rewards domain: the catalogue, what a member can get, redemptions,
orders and their fulfilment, and vouchers at the till."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_args

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from jifen.api.deps import Context, Read, Write, id_cursor
from jifen.api.schemas import LIMIT, IdCursor, Page
from jifen.db.uow import UnitOfWork
from jifen.errors import WrongCaller
from jifen.members import service as members_service
from jifen.rewards import service
from jifen.rewards.schemas import (
    OrderAction,
    OrderPayment,
    OrderRead,
    OrderState,
    Quote,
    RedemptionCreate,
    Restock,
    RewardCreate,
    RewardDef,
    RewardKind,
    RewardRead,
    RewardState,
    RewardStateSet,
    StockAlert,
    VoucherRead,
    VoucherState,
    VoucherUse,
    VoucherUsed,
    WhatCanIGet,
)

router = APIRouter(tags=["rewards"])

PROGRAM = "/programs/{program}"
MEMBER = "/programs/{program}/members/{member_id}"
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]
RewardCode = Annotated[str, Path(min_length=1, max_length=64)]
VoucherCode = Annotated[str, Path(min_length=1, max_length=32)]
Action = Literal["confirm", "ship", "deliver", "cancel", "return"]


# --------------------------------------------------------------------------- the catalogue


@router.get(f"{PROGRAM}/rewards", response_model=Page[RewardRead])
def list_rewards(
    program: str,
    ctx: Annotated[Context, Depends(Read("rewards.read"))],
    kind: RewardKind | None = None,
    category: Annotated[str | None, Query(max_length=64)] = None,
    state: RewardState | None = None,
    min_points: Annotated[int | None, Query(ge=0, le=10**12)] = None,
    max_points: Annotated[int | None, Query(ge=0, le=10**12)] = None,
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[RewardRead]:
    """The catalogue, filtered by kind, category, state and a range of base points (a price
    band: ``min_points=500&max_points=999``)."""
    after = id_cursor(cursor)
    items, next_cursor = ctx.db.run(
        lambda uow: service.list_rewards(
            uow, program_id=ctx.program_id, kind=kind, category=category, state=state,
            min_points=min_points, max_points=max_points, after_id=after, limit=limit,
        ),
        read_only=True,
    )  # fmt: skip
    return Page(items=items, next_cursor=next_cursor)


@router.post(f"{PROGRAM}/rewards", status_code=201, response_model=RewardRead)
def create_reward(
    program: str,
    body: RewardCreate,
    ctx: Annotated[Context, Depends(Write("rewards.write", programme_wide=True))],
) -> JSONResponse:
    """Add a reward to the catalogue."""
    return ctx.execute(
        lambda uow: service.create_reward(uow, program_id=ctx.program_id, body=body),
        target=f"reward:{body.code}",
        status=201,
    )


@router.get(f"{PROGRAM}/rewards/{{code}}", response_model=RewardRead)
def get_reward(
    program: str, code: RewardCode, ctx: Annotated[Context, Depends(Read("rewards.read"))]
) -> RewardRead:
    """One reward, with its stock left."""
    return ctx.db.run(
        lambda uow: service.get_reward(uow, program_id=ctx.program_id, code=code), read_only=True
    )


@router.put(f"{PROGRAM}/rewards/{{code}}", response_model=RewardRead)
def update_reward(
    program: str,
    code: RewardCode,
    body: RewardDef,
    ctx: Annotated[Context, Depends(Write("rewards.write", programme_wide=True))],
) -> JSONResponse:
    """Replace a reward's terms (its kind and stock stay; orders made keep their price)."""
    return ctx.execute(
        lambda uow: service.update_reward(uow, program_id=ctx.program_id, code=code, body=body),
        target=f"reward:{code}",
    )


@router.post(f"{PROGRAM}/rewards/{{code}}/state", response_model=RewardRead)
def set_reward_state(
    program: str,
    code: RewardCode,
    body: RewardStateSet,
    ctx: Annotated[Context, Depends(Write("rewards.write", programme_wide=True))],
) -> JSONResponse:
    """Pause, resume (``active``) or retire a reward."""
    return ctx.execute(
        lambda uow: service.set_state(uow, program_id=ctx.program_id, code=code, state=body.state),
        target=f"reward:{code}",
    )


@router.post(f"{PROGRAM}/rewards/{{code}}/stock", response_model=RewardRead)
def restock(
    program: str,
    code: RewardCode,
    body: Restock,
    ctx: Annotated[Context, Depends(Write("rewards.write", programme_wide=True))],
) -> JSONResponse:
    """Add units to the stock; clears the restock alert once above the safety stock."""
    return ctx.execute(
        lambda uow: service.restock(uow, program_id=ctx.program_id, code=code, add=body.add),
        target=f"reward:{code}",
    )


@router.get(f"{PROGRAM}/rewards/{{code}}/votes", response_model=dict[str, int])
def vote_tally(
    program: str, code: RewardCode, ctx: Annotated[Context, Depends(Read("rewards.read"))]
) -> dict[str, int]:
    """Votes cast for each option of a vote."""
    return ctx.db.run(
        lambda uow: service.vote_tally(uow, program_id=ctx.program_id, code=code), read_only=True
    )


@router.get(f"{PROGRAM}/stock-alerts", response_model=Page[StockAlert])
def stock_alerts(
    program: str,
    ctx: Annotated[Context, Depends(Read("rewards.read"))],
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[StockAlert]:
    """Rewards at or below their safety stock, until restocked; the oldest alert first."""
    after = id_cursor(cursor)
    items, next_cursor = ctx.db.run(
        lambda uow: service.open_alerts(
            uow, program_id=ctx.program_id, after_id=after, limit=limit
        ),
        read_only=True,
    )
    return Page(items=items, next_cursor=next_cursor)


# --------------------------------------------------------------------------- for a member


def _member(uow: UnitOfWork, ctx: Context, member_id: int) -> None:
    members_service.require_member(uow, program_id=ctx.program_id, member_id=member_id)


Shown = TypeVar("Shown", OrderRead, VoucherRead)


def _seen(ctx: Context, read: Shown) -> Shown:
    """An order or voucher as the caller may see it. A voucher's code is the member's
    secret (whoever holds it spends it): whole to the member itself, to staff and API keys
    masked but for its last 4 characters."""
    return read if ctx.principal.kind == "member" else read.masked()


def _merchant_seen(ctx: Context) -> str | None:
    """The merchant whose orders and vouchers of a member the caller sees: a member sees all
    its own (those it made in its app and at any merchant's till); credentials of one
    merchant see that merchant's only."""
    return None if ctx.principal.kind == "member" else ctx.merchant_scope


def _store_seen(ctx: Context) -> str | None:
    """The store whose orders of a member the caller sees (``None``: any its merchant scope
    covers): credentials of one store (a cashier's) see the orders made at it only."""
    return None if ctx.principal.kind == "member" else ctx.store_scope


def _audited_order(answer: dict[str, Any]) -> dict[str, Any]:
    """What the audit log keeps of a redemption's answer: the voucher's code masked (the
    answer hands it whole to whoever redeemed, a till redeeming for a member at its
    counter; the log is read by many)."""
    return OrderRead.model_validate(answer).masked().model_dump(mode="json")


@router.get(f"{MEMBER}/rewards", response_model=WhatCanIGet)
def what_can_i_get(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Read("rewards.read"))]
) -> WhatCanIGet:
    """What the member can redeem now, and what is within reach and how many points short."""
    return ctx.db.run(
        lambda uow: service.what_can_i_get(uow, program_id=ctx.program_id, member_id=member_id),
        read_only=True,
    )


@router.get(f"{MEMBER}/rewards/{{code}}/quote", response_model=Quote)
def quote(
    program: str,
    member_id: Id,
    code: RewardCode,
    ctx: Annotated[Context, Depends(Read("rewards.read"))],
    quantity: Annotated[int, Query(ge=1, le=1000)] = 1,
) -> Quote:
    """The member's price for the reward now, with how it was reached."""
    return ctx.db.run(
        lambda uow: service.quote(
            uow, program_id=ctx.program_id, member_id=member_id, code=code, quantity=quantity
        ),
        read_only=True,
    )


@router.post(f"{MEMBER}/redemptions", status_code=201, response_model=OrderRead)
def redeem(
    program: str,
    member_id: Id,
    body: RedemptionCreate,
    ctx: Annotated[Context, Depends(Write("rewards.redeem"))],
) -> JSONResponse:
    """Redeem a reward: stock, points and the order in one transaction. Above the tier's
    cooling-off line the order is ``held`` with the points frozen until the member confirms
    it after ``hold_until``. The cash part's ``payment_ref`` comes from the till's or the
    payment system's credentials, never from the member's own app. Without one, a reward
    with a cash part makes an order ``awaiting_payment``: its points frozen and its stock
    taken, the cash due (``cash_fen``) to be paid by ``pay_by``, when it lapses unless the
    payment system has confirmed it (``POST …/orders/{order_id}/paid``)."""
    if ctx.principal.kind == "member" and body.payment_ref is not None:
        raise WrongCaller(
            problem="A member cannot name the payment of a cash part; the till or the payment "
            "system that took the payment sends the redemption with its reference.",
            problem_zh="会员不能自行提供现金部分的支付流水号;由收款的收银台或支付系统"
            "携带流水号提交兑换。",
        )
    merchant, store = ctx.merchant(body.merchant, body.store)
    return ctx.execute(
        lambda uow: service.redeem(
            uow, program_id=ctx.program_id, member_id=member_id, body=body,
            key=ctx.ledger_key(), actor=ctx.actor, merchant=merchant, store=store,
        ),
        target=f"member:{member_id}",
        status=201,
        summary=_audited_order,
    )  # fmt: skip


@router.get(f"{MEMBER}/orders", response_model=Page[OrderRead])
def member_orders(
    program: str,
    member_id: Id,
    ctx: Annotated[Context, Depends(Read("orders.read"))],
    state: OrderState | None = None,
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[OrderRead]:
    """The member's redemption orders, newest first (credentials of one merchant: its
    own; of one store: those made at it)."""
    before = id_cursor(cursor)

    def read(uow: UnitOfWork) -> tuple[list[OrderRead], str | None]:
        _member(uow, ctx, member_id)
        return service.list_orders(
            uow, program_id=ctx.program_id, member_id=member_id, state=state,
            merchant=_merchant_seen(ctx), store=_store_seen(ctx), after_id=before, limit=limit,
        )  # fmt: skip

    items, next_cursor = ctx.db.run(read, read_only=True)
    return Page(items=[_seen(ctx, item) for item in items], next_cursor=next_cursor)


@router.get(f"{MEMBER}/orders/{{order_id}}", response_model=OrderRead)
def member_order(
    program: str,
    member_id: Id,
    order_id: Id,
    ctx: Annotated[Context, Depends(Read("orders.read"))],
) -> OrderRead:
    """One of the member's orders, with how its price was reached and every step
    (credentials of one merchant: one of its own; of one store: one made at it)."""
    order = ctx.db.run(
        lambda uow: service.get_order(
            uow,
            program_id=ctx.program_id,
            order_id=order_id,
            member_id=member_id,
            merchant=_merchant_seen(ctx),
            store=_store_seen(ctx),
        ),
        read_only=True,
    )
    return _seen(ctx, order)


@router.post(
    f"{MEMBER}/orders/{{order_id}}/confirm",
    response_model=OrderRead,
    openapi_extra={"x-member-only": True},  # staff and keys holding the permission: 403
)
def confirm_held(
    program: str,
    member_id: Id,
    order_id: Id,
    ctx: Annotated[Context, Depends(Write("rewards.redeem"))],
) -> JSONResponse:
    """The member confirms its held redemption once its cooling-off has passed (in its own
    app: staff and API keys cannot confirm for it)."""
    if ctx.principal.kind != "member":
        raise WrongCaller(
            problem=f"Only member {member_id} confirms its held redemption, in its own app, "
            "after the cooling-off; staff and API keys cannot confirm it (they may cancel it).",
            problem_zh=f"冷静期结束后,只能由会员 {member_id} 本人在其应用中确认该待确认兑换;"
            "员工和 API 密钥不能代为确认(可以取消)。",
        )
    return ctx.execute(
        lambda uow: service.confirm_held(
            uow, program_id=ctx.program_id, member_id=member_id, order_id=order_id,
            actor=ctx.actor,
        ),
        target=f"order:{order_id}",
    )  # fmt: skip


@router.post(f"{MEMBER}/orders/{{order_id}}/cancel", response_model=OrderRead)
def cancel_own(
    program: str,
    member_id: Id,
    order_id: Id,
    body: OrderAction,
    ctx: Annotated[Context, Depends(Write("rewards.redeem"))],
) -> JSONResponse:
    """Cancel a redemption not yet shipped (also one awaiting payment or its cooling-off):
    the points go back to the lots they came from."""
    return ctx.execute(
        lambda uow: _seen(ctx, service.move(
            uow, program_id=ctx.program_id, order_id=order_id, action="cancel",
            actor=ctx.actor, note=body.note, member_id=member_id,
            merchant=_merchant_seen(ctx), store=_store_seen(ctx),
        )),
        target=f"order:{order_id}",
    )  # fmt: skip


@router.get(f"{MEMBER}/vouchers", response_model=Page[VoucherRead])
def member_vouchers(
    program: str,
    member_id: Id,
    ctx: Annotated[Context, Depends(Read("orders.read"))],
    state: VoucherState | None = None,
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[VoucherRead]:
    """The member's vouchers, newest first (credentials of one merchant: those of its own
    orders)."""
    before = id_cursor(cursor)

    def read(uow: UnitOfWork) -> tuple[list[VoucherRead], str | None]:
        _member(uow, ctx, member_id)
        return service.member_vouchers(
            uow, program_id=ctx.program_id, member_id=member_id, state=state,
            merchant=_merchant_seen(ctx), before_id=before, limit=limit,
        )  # fmt: skip

    items, next_cursor = ctx.db.run(read, read_only=True)
    return Page(items=[_seen(ctx, item) for item in items], next_cursor=next_cursor)


# --------------------------------------------------------------------------- staff


@router.get(f"{PROGRAM}/orders", response_model=Page[OrderRead])
def list_orders(
    program: str,
    ctx: Annotated[Context, Depends(Read("orders.read"))],
    state: OrderState | None = None,
    reward: Annotated[str | None, Query(max_length=64)] = None,
    member_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[OrderRead]:
    """Redemption orders, newest first: ``state=created`` is the fulfilment queue.
    Credentials of one merchant see its orders only; of one store, those made at it."""
    before = id_cursor(cursor)
    items, next_cursor = ctx.db.run(
        lambda uow: service.list_orders(
            uow, program_id=ctx.program_id, member_id=member_id, state=state, reward=reward,
            merchant=ctx.merchant_scope, store=ctx.store_scope, after_id=before, limit=limit,
        ),
        read_only=True,
    )  # fmt: skip
    return Page(items=[_seen(ctx, item) for item in items], next_cursor=next_cursor)


@router.get(f"{PROGRAM}/orders/{{order_id}}", response_model=OrderRead)
def get_order(
    program: str, order_id: Id, ctx: Annotated[Context, Depends(Read("orders.read"))]
) -> OrderRead:
    """One order (credentials of one merchant: one of its own; of one store: one made at
    it)."""
    order = ctx.db.run(
        lambda uow: service.get_order(
            uow,
            program_id=ctx.program_id,
            order_id=order_id,
            merchant=ctx.merchant_scope,
            store=ctx.store_scope,
        ),
        read_only=True,
    )
    return _seen(ctx, order)


@router.post(f"{PROGRAM}/orders/{{order_id}}/paid", response_model=OrderRead)
def pay_order(
    program: str,
    order_id: Id,
    body: OrderPayment,
    ctx: Annotated[Context, Depends(Write("orders.pay"))],
) -> JSONResponse:
    """The till or the payment system confirms that the cash part of an order
    ``awaiting_payment`` is paid (``amount_fen``: its ``cash_fen``, exactly). The order moves
    on: ``held`` if the member's cooling-off applies, else its points are debited and it is
    fulfilled. The same payment sent again answers the order as it is; a payment for an
    order no longer awaiting one (cancelled, lapsed, paid) is refused (409), with the amount
    to refund. Credentials that act for one merchant pay that merchant's orders only, and
    those of one store the orders made at it (another's is unknown to them, 404); an order
    made in the member's own app belongs to no merchant and is paid with the programme's
    own (the payment system's key)."""
    return ctx.execute(
        lambda uow: _seen(ctx, service.pay_order(
            uow, program_id=ctx.program_id, order_id=order_id, payment_ref=body.payment_ref,
            amount_fen=body.amount_fen, actor=ctx.actor, merchant=ctx.merchant_scope,
            store=ctx.store_scope,
        )),
        target=f"order:{order_id}",
    )  # fmt: skip


def _move_order(action: Action) -> Callable[..., JSONResponse]:
    """The route of one move. Each action has a path of its own (not one ``{action}``
    parameter), so that no route of a move answers ``…/paid`` too."""

    def move_order(
        program: str,
        order_id: Id,
        body: OrderAction,
        ctx: Annotated[Context, Depends(Write("orders.fulfil"))],
    ) -> JSONResponse:
        """Move an order on: ``confirm``, ``ship`` (with ``tracking``), ``deliver``,
        ``cancel`` (before shipping) or ``return`` (after): the last two give the points and
        stock back."""
        return ctx.execute(
            lambda uow: _seen(ctx, service.move(
                uow, program_id=ctx.program_id, order_id=order_id, action=action,
                actor=ctx.actor, note=body.note, tracking=body.tracking,
                merchant=ctx.merchant_scope, store=ctx.store_scope,
            )),
            target=f"order:{order_id}",
        )  # fmt: skip

    return move_order


for _action in get_args(Action):
    router.post(
        f"{PROGRAM}/orders/{{order_id}}/{_action}", response_model=OrderRead,
        name=f"{_action}_order",
    )(_move_order(_action))  # fmt: skip


@router.get(f"{PROGRAM}/vouchers/{{code}}", response_model=VoucherRead)
def get_voucher(
    program: str, code: VoucherCode, ctx: Annotated[Context, Depends(Read("orders.read"))]
) -> VoucherRead:
    """A voucher by the code the member shows (whole: the caller has it). Credentials of
    one merchant do not find the voucher of another merchant's order."""
    return ctx.db.run(
        lambda uow: service.get_voucher(
            uow, program_id=ctx.program_id, code=code, merchant=ctx.merchant_scope
        ),
        read_only=True,
    )


@router.post(f"{PROGRAM}/vouchers/{{code}}/use", response_model=VoucherUsed)
def use_voucher(
    program: str,
    code: VoucherCode,
    body: VoucherUse,
    ctx: Annotated[Context, Depends(Write("vouchers.redeem"))],
) -> JSONResponse:
    """Accept a voucher at a till (a cashier's own store); a coupon also answers what it
    takes off ``order_amount_fen``. A voucher is accepted once, whichever till asks first.
    The voucher of an order made for one merchant is accepted at that merchant's tills only
    (to any other it is unknown, 404); one of an order made in the member's own app, at
    any."""
    _, store = ctx.merchant(None, body.store)
    return ctx.execute(
        lambda uow: service.use_voucher(
            uow, program_id=ctx.program_id, code=code, store=store, actor=ctx.actor,
            order_amount_fen=body.order_amount_fen, merchant=ctx.merchant_scope,
        ),
        target=f"voucher:{service.typed_code(code)}",  # as stored, however it was typed
    )  # fmt: skip
