"""What the notify use cases take and answer with: inbox messages, webhook subscriptions,
their deliveries, and the outbox as staff see it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from jifen.api.schemas import NO_NUL, RequestBody
from jifen.errors import Refusal
from jifen.points.schemas import POSTING_EVENTS
from jifen.rewards.schemas import OrderState

Channel = Literal["inbox", "email", "sms", "webhook"]
Status = Literal["pending", "sending", "sent", "dead"]
"""pending: waiting for its next attempt; sending: claimed by a sender; sent; dead: given
up after the last attempt (a webhook delivery can then be redelivered)."""

EVENT_TYPES: frozenset[str] = frozenset(
    {
        *POSTING_EVENTS.values(),
        *(f"reward_order.{state}" for state in get_args(OrderState)),
        "voucher.expired",
        "member.tier_changed",
        "reward.stock_low",
        "ledger.differences",
    }
)
"""Every event type jifen raises for webhooks (the README lists them)."""


def _an_event_type(value: str) -> str:
    """Refuse an event type jifen never raises (a typo such as "points.earnd"): a
    subscription to it would be accepted and never get a single event."""
    if value != "*" and value not in EVENT_TYPES:
        raise Refusal(
            f"{value!r} is no event type jifen raises: give one of "
            f'{", ".join(sorted(EVENT_TYPES))}, or "*" for every event',
            f"{value!r} 不是 jifen 会发出的事件类型:请从 {', '.join(sorted(EVENT_TYPES))} "
            '中选择,或用 "*" 订阅全部事件',
        )
    return value


EventType = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^(\*|[a-z0-9][a-z0-9_.-]*)$",
        examples=["points.earned"],
        description='An event type such as "points.earned" (see the README for every one), '
        'or "*" for every event.',
    ),
    AfterValidator(_an_event_type),
]
WebhookUrl = Annotated[
    str,
    Field(
        min_length=10,
        max_length=2000,
        pattern=r"^https?://[^\s\x00]+$",
        examples=["https://example.com/jifen/webhook"],
    ),
]


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class InboxMessageRead(_Read):
    id: int
    template: str
    title: str
    body: str
    created_at: datetime
    read_at: datetime | None
    """When the member read it; None while unread."""


class UnreadCount(_Read):
    unread: int


class WebhookCreate(RequestBody):
    url: WebhookUrl
    event_types: list[EventType] = Field(min_length=1, max_length=50)
    description: str = Field("", max_length=200, pattern=NO_NUL)
    active: bool = True
    allow_private: bool = False
    """Allow an address in a private, loopback or link-local range (an internal system).
    Only a holder of ``webhooks.allow_private`` may set it."""


class WebhookUpdate(RequestBody):
    """What to change; fields left out stay as they are."""

    url: WebhookUrl | None = None
    event_types: list[EventType] | None = Field(None, min_length=1, max_length=50)
    description: str | None = Field(None, max_length=200, pattern=NO_NUL)
    active: bool | None = None
    """False pauses the subscription: it is sent no new events, and the deliveries queued
    before wait (pending, due at no time) until it is resumed with true."""
    allow_private: bool | None = None


class SecretRotate(RequestBody):
    previous_valid_hours: int = Field(24, ge=0, le=720)
    """How long the previous secret keeps signing beside the new one (0: stop at once)."""


class WebhookRead(_Read):
    id: int
    url: str
    event_types: list[str]
    description: str
    active: bool
    allow_private: bool
    previous_secret_valid_until: datetime | None
    """While set and in the future, deliveries are signed with the previous secret too."""
    created_by: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class WebhookSecret(WebhookRead):
    secret: str
    """The signing secret: shown once, in this answer only. Keep it in the receiver."""


class AttemptRead(_Read):
    attempt: int
    status_code: int | None
    """The receiver's HTTP status; None when it gave none (refused, timed out)."""
    error: str | None
    duration_ms: int
    at: datetime


class DeliveryRead(_Read):
    id: int
    delivery_id: str
    """Sent as ``Jifen-Delivery``: the same on every attempt and on a redelivery."""
    event_type: str
    status: Status
    attempts: int
    next_attempt_at: datetime | None
    """None while pending: held until its paused subscription is resumed."""
    last_error: str | None
    sent_at: datetime | None
    created_at: datetime
    redelivery_of: int | None
    payload: str
    """The JSON body, exactly as signed and sent."""
    attempt_log: list[AttemptRead]


class OutboxRead(_Read):
    id: int
    channel: str
    recipient: str
    """Masked where it is personal."""
    member_id: int | None
    template: str
    subject: str | None
    body: str
    status: Status
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    sent_at: datetime | None
    created_at: datetime
    delivery_id: str | None


class MessageToMember(_Read):
    """A message the outbox holds for a member, as its personal-data export lists it."""

    id: int
    channel: str
    """inbox, email or sms."""
    template: str
    recipient: str
    """The address masked (``138****8000``, ``w***@example.cn``); ``(erased)`` once the
    member's personal data was erased."""
    status: Status
    created_at: datetime
    sent_at: datetime | None
