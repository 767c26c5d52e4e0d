"""HTTP routes of the notify domain: a member's in-app inbox, webhook subscriptions with
their deliveries, and the outbox for staff.

A webhook subscription receives the events of every merchant of its programme, and the
outbox holds every member's messages: both are the programme's, managed and read under a
grant covering the whole programme (``programme_wide``), never one of a merchant or store."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from jifen.api.deps import Context, Read, Write, id_cursor
from jifen.api.schemas import LIMIT, IdCursor, Page
from jifen.db.uow import UnitOfWork
from jifen.errors import Forbidden
from jifen.notify import service
from jifen.notify.schemas import (
    Channel,
    DeliveryRead,
    InboxMessageRead,
    OutboxRead,
    SecretRotate,
    Status,
    UnreadCount,
    WebhookCreate,
    WebhookRead,
    WebhookSecret,
    WebhookUpdate,
)

router = APIRouter(tags=["notifications"])

PROGRAM = "/programs/{program}"
INBOX = "/programs/{program}/members/{member_id}/inbox"
WEBHOOK = "/programs/{program}/webhooks/{webhook_id}"
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]
ALLOW_PRIVATE = "webhooks.allow_private"


# --------------------------------------------------------------------------- the inbox


@router.get(INBOX, response_model=Page[InboxMessageRead])
def list_inbox(
    program: str,
    member_id: Id,
    ctx: Annotated[Context, Depends(Read("inbox.read"))],
    unread_only: bool = False,
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[InboxMessageRead]:
    """The member's in-app messages, newest first."""
    after = id_cursor(cursor)
    items, next_cursor = ctx.db.run(
        lambda uow: service.list_inbox(
            uow, program_id=ctx.program_id, member_id=member_id, unread_only=unread_only,
            after_id=after, limit=limit,
        ),
        read_only=True,
    )  # fmt: skip
    return Page(items=items, next_cursor=next_cursor)


@router.get(f"{INBOX}/unread-count", response_model=UnreadCount)
def unread_count(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Read("inbox.read"))]
) -> UnreadCount:
    """How many of the member's messages are unread (the badge on the bell)."""
    return UnreadCount(
        unread=ctx.db.run(
            lambda uow: service.unread_count(uow, program_id=ctx.program_id, member_id=member_id),
            read_only=True,
        )
    )


@router.post(f"{INBOX}/{{message_id}}/read", response_model=InboxMessageRead)
def mark_read(
    program: str,
    member_id: Id,
    message_id: Id,
    ctx: Annotated[Context, Depends(Write("inbox.write"))],
) -> JSONResponse:
    """Mark one message read."""
    return ctx.execute(
        lambda uow: service.mark_read(
            uow, program_id=ctx.program_id, member_id=member_id, message_id=message_id
        ),
        target=f"member:{member_id}",
    )


@router.post(f"{INBOX}/read-all", response_model=UnreadCount)
def mark_all_read(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Write("inbox.write"))]
) -> JSONResponse:
    """Mark every message read; answers the unread count left (0)."""

    def work(uow: UnitOfWork) -> UnreadCount:
        service.mark_all_read(uow, program_id=ctx.program_id, member_id=member_id)
        return UnreadCount(unread=0)

    return ctx.execute(work, target=f"member:{member_id}")


# --------------------------------------------------------------------------- webhooks


def _may_allow_private(ctx: Context) -> bool:
    """Whether the caller holds ``webhooks.allow_private`` for the whole programme."""
    return ctx.principal.covers(ALLOW_PRIVATE, program_id=ctx.program_id)


def _check_allow_private(ctx: Context, wanted: bool | None) -> None:
    """Only a holder of ``webhooks.allow_private`` may let a webhook reach private ranges."""
    if wanted and not _may_allow_private(ctx):
        raise Forbidden(
            problem=f"{ctx.principal.name} may not set allow_private ({ALLOW_PRIVATE}): "
            "webhooks to private or loopback addresses need an operator's permission.",
            problem_zh=f"{ctx.principal.name} 无权设置 allow_private({ALLOW_PRIVATE}):"
            "指向私有或环回地址的 Webhook 需经运营人员明确允许。",
        )


@router.get(f"{PROGRAM}/webhooks", response_model=Page[WebhookRead])
def list_webhooks(
    program: str,
    ctx: Annotated[Context, Depends(Read("webhooks.read", programme_wide=True))],
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[WebhookRead]:
    """The programme's webhook subscriptions."""
    after = id_cursor(cursor)
    items, next_cursor = ctx.db.run(
        lambda uow: service.list_webhooks(
            uow, program_id=ctx.program_id, after_id=after, limit=limit
        ),
        read_only=True,
    )
    return Page(items=items, next_cursor=next_cursor)


@router.post(f"{PROGRAM}/webhooks", status_code=201, response_model=WebhookSecret)
def create_webhook(
    program: str,
    body: WebhookCreate,
    ctx: Annotated[Context, Depends(Write("webhooks.write", programme_wide=True))],
) -> JSONResponse:
    """Subscribe an address to events. The answer carries the signing secret, this once:
    each delivery is signed ``Jifen-Signature: t=<unix>,v1=<HMAC-SHA256(secret, t.body)>``."""
    _check_allow_private(ctx, body.allow_private)
    return ctx.execute(
        lambda uow: service.create_webhook(
            uow, program_id=ctx.program_id, body=body, actor=ctx.actor
        ),
        target=f"webhook:{body.url[:100]}",
        status=201,
        shown_once=frozenset({"secret"}),
    )


@router.get(WEBHOOK, response_model=WebhookRead)
def get_webhook(
    program: str,
    webhook_id: Id,
    ctx: Annotated[Context, Depends(Read("webhooks.read", programme_wide=True))],
) -> WebhookRead:
    return ctx.db.run(
        lambda uow: service.get_webhook(uow, program_id=ctx.program_id, webhook_id=webhook_id),
        read_only=True,
    )


@router.patch(WEBHOOK, response_model=WebhookRead)
def update_webhook(
    program: str,
    webhook_id: Id,
    body: WebhookUpdate,
    ctx: Annotated[Context, Depends(Write("webhooks.write", programme_wide=True))],
) -> JSONResponse:
    """Change the address, the event types, the description, or pause (``active``: a paused
    subscription gets no new events; the deliveries already queued wait for it to be
    resumed). A subscription allowed to reach private addresses gets a new address only
    from a holder of ``webhooks.allow_private`` (or with ``allow_private`` set to false)."""
    _check_allow_private(ctx, body.allow_private)
    return ctx.execute(
        lambda uow: service.update_webhook(
            uow,
            program_id=ctx.program_id,
            webhook_id=webhook_id,
            body=body,
            may_allow_private=_may_allow_private(ctx),
        ),
        target=f"webhook:{webhook_id}",
    )


@router.delete(WEBHOOK, response_model=WebhookRead)
def delete_webhook(
    program: str,
    webhook_id: Id,
    ctx: Annotated[Context, Depends(Write("webhooks.write", programme_wide=True))],
) -> JSONResponse:
    """Delete a subscription: no new events; its delivery log is kept."""
    return ctx.execute(
        lambda uow: service.delete_webhook(uow, program_id=ctx.program_id, webhook_id=webhook_id),
        target=f"webhook:{webhook_id}",
    )


@router.post(f"{WEBHOOK}/rotate", response_model=WebhookSecret)
def rotate_secret(
    program: str,
    webhook_id: Id,
    body: SecretRotate,
    ctx: Annotated[Context, Depends(Write("webhooks.write", programme_wide=True))],
) -> JSONResponse:
    """A new signing secret, shown this once; the previous one keeps signing beside it for
    ``previous_valid_hours`` (default 24), so receivers can switch without losing events."""
    return ctx.execute(
        lambda uow: service.rotate_secret(
            uow, program_id=ctx.program_id, webhook_id=webhook_id,
            previous_valid_for=timedelta(hours=body.previous_valid_hours),
        ),
        target=f"webhook:{webhook_id}",
        shown_once=frozenset({"secret"}),
    )  # fmt: skip


@router.get(f"{WEBHOOK}/deliveries", response_model=Page[DeliveryRead])
def list_deliveries(
    program: str,
    webhook_id: Id,
    ctx: Annotated[Context, Depends(Read("webhooks.read", programme_wide=True))],
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[DeliveryRead]:
    """The delivery log: each delivery, newest first, with every attempt (status code,
    error, duration)."""
    after = id_cursor(cursor)
    items, next_cursor = ctx.db.run(
        lambda uow: service.list_deliveries(
            uow, program_id=ctx.program_id, webhook_id=webhook_id, after_id=after, limit=limit
        ),
        read_only=True,
    )
    return Page(items=items, next_cursor=next_cursor)


@router.post(
    f"{WEBHOOK}/deliveries/{{delivery}}/redeliver", status_code=201, response_model=DeliveryRead
)
def redeliver(
    program: str,
    webhook_id: Id,
    delivery: Id,
    ctx: Annotated[Context, Depends(Write("webhooks.write", programme_wide=True))],
) -> JSONResponse:
    """Send a delivery again (the same event, body and ``Jifen-Delivery`` id)."""
    return ctx.execute(
        lambda uow: service.redeliver(
            uow, program_id=ctx.program_id, webhook_id=webhook_id, delivery=delivery
        ),
        target=f"webhook:{webhook_id}",
        status=201,
    )


# --------------------------------------------------------------------------- the outbox


@router.get(f"{PROGRAM}/outbox", response_model=Page[OutboxRead])
def list_outbox(
    program: str,
    ctx: Annotated[Context, Depends(Read("notifications.read", programme_wide=True))],
    channel: Channel | None = None,
    status: Status | None = None,
    member_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    cursor: IdCursor = None,
    limit: Annotated[int, LIMIT] = 50,
) -> Page[OutboxRead]:
    """Every message of the programme, newest first, with its delivery state."""
    after = id_cursor(cursor)
    items, next_cursor = ctx.db.run(
        lambda uow: service.list_outbox(
            uow, program_id=ctx.program_id, channel=channel, status=status,
            member_id=member_id, after_id=after, limit=limit,
        ),
        read_only=True,
    )  # fmt: skip
    return Page(items=items, next_cursor=next_cursor)
