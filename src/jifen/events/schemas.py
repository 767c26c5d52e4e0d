"""The event catalogue: each event type with its typed payload, and what ingesting one
answers. A payload field that is missing, misspelt or of the wrong type is refused with the
field named; amounts are integer fen, never negative."""

from __future__ import annotations

from datetime import date, datetime
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    computed_field,
    model_validator,
)

from jifen.api.schemas import NO_NUL, Instant, RequestBody
from jifen.errors import Refusal
from jifen.rules.schemas import RuleSpec

Fen = Annotated[StrictInt, Field(ge=0, le=10**12)]
"""An amount of money in fen, a JSON whole number: ``true``, ``100.0`` or the text ``"100.00"``
(yuan, most likely, a hundred times the fen it would be read as) are refused."""
Ref = Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL)]
Short = Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)]


class OrderLineIn(RequestBody):
    sku: Ref
    category: Short = "default"
    quantity: Annotated[StrictInt, Field(ge=1, le=10**6)] = 1
    amount_fen: Fen
    """What the line cost in money, after discounts."""
    paid_with_points: bool = False
    """Bought by redeeming points: such a line earns nothing."""


class OrderPaid(RequestBody):
    order_id: Ref
    store: Short | None = None
    channel: Annotated[str, Field(min_length=1, max_length=32, pattern=NO_NUL)] = "store"
    pickup: bool = False
    """Collected in store (到店核销)."""
    lines: Annotated[list[OrderLineIn], Field(min_length=1, max_length=500)]


class RefundLineIn(RequestBody):
    sku: Ref
    amount_fen: Fen


class OrderRefunded(RequestBody):
    order_id: Ref
    lines: Annotated[list[RefundLineIn], Field(max_length=500)] = Field(default_factory=list)
    """The refunded lines; leave it empty with ``whole`` for the whole order."""
    whole: bool = False

    @model_validator(mode="after")
    def _something(self) -> OrderRefunded:
        if not self.whole and not self.lines:
            raise Refusal(
                "give the refunded lines, or whole: true", "请给出退款的明细行,或 whole: true"
            )
        return self


class Nothing(RequestBody):
    """An event that carries no data of its own."""


class ReviewPosted(RequestBody):
    review_id: Ref
    media: Literal["text", "image", "video"] = "text"


class ReviewLiked(RequestBody):
    review_id: Ref
    likes: Annotated[StrictInt, Field(ge=0, le=10**9)]


class ReviewFeatured(RequestBody):
    review_id: Ref


class ReferralCompleted(RequestBody):
    """The invited member (the event's member) completed its first order. The inviter's id
    is a JSON number: ``true`` or ``"5"`` is refused here, where the rules that pay the
    inviter would refuse it later and a dry run or a backtest would read ``true`` as 1."""

    inviter_member_id: Annotated[StrictInt, Field(ge=1, le=2**63 - 1)]


class QuizAnswered(RequestBody):
    quiz_id: Ref
    correct_answers: Annotated[StrictInt, Field(ge=0, le=1000)]
    completed: bool = False


class ActivityAttended(RequestBody):
    activity_id: Ref
    hours: Annotated[StrictFloat, Field(ge=0, le=24, allow_inf_nan=False)]


class Birthday(RequestBody):
    year: Annotated[StrictInt, Field(ge=1900, le=9999)]


class Custom(RequestBody):
    """``custom.<name>``: any JSON object (its declared schema is checked by the service)."""

    model_config = ConfigDict(extra="allow")


CATALOGUE: dict[str, type[RequestBody]] = {
    "order.paid": OrderPaid,
    "order.refunded": OrderRefunded,
    "member.registered": Nothing,
    "member.profile_completed": Nothing,
    "member.logged_in": Nothing,
    "member.checked_in": Nothing,
    "review.posted": ReviewPosted,
    "review.liked": ReviewLiked,
    "review.featured": ReviewFeatured,
    "referral.completed": ReferralCompleted,
    "quiz.answered": QuizAnswered,
    "activity.attended": ActivityAttended,
    "member.birthday": Birthday,
}


def sample_payload(model: type[BaseModel]) -> dict[str, Any]:
    """A payload of ``model`` with every field present, as plain JSON values (text ``"x"``,
    numbers 1, one line in a list): what a rule's condition is tried on before it is
    approved, so that a field no event of the type has is found then, not on every event."""
    return {name: _sample(info.annotation) for name, info in model.model_fields.items()}


def _sample(annotation: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _sample(args[0])
    if origin is Literal:
        return args[0]
    if origin in (Union, UnionType):
        return _sample(next(a for a in args if a is not type(None)))
    if origin is list:
        return [_sample(args[0])]
    if origin is dict or annotation is dict:
        return {}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sample_payload(annotation)
    return {str: "x", bool: False, int: 1, float: 1.0}.get(annotation, "x")


class EventIn(RequestBody):
    """One event from a source system."""

    source: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    """The sending system (pos, app, crm): with ``external_id``, what makes the event unique."""
    external_id: Ref
    type: Annotated[
        str, Field(min_length=3, max_length=64, pattern=r"^[a-z][a-z0-9_]*\.[a-z0-9_.]+$")
    ]
    occurred_at: Instant
    member_id: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    member_ref: Ref | None = None
    """The member's external reference, instead of ``member_id``."""
    payload: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_member(self) -> EventIn:
        if (self.member_id is None) == (self.member_ref is None):
            raise Refusal(
                "name the member by member_id or by member_ref (exactly one)",
                "请用 member_id 或 member_ref 指明会员(二者只能给一个)",
            )
        return self


class AwardRead(BaseModel):
    rule: str
    version: int
    kind: str
    member_id: int
    points: int
    wanted: int
    cap: str | None = None
    held: bool = False
    posting_id: int | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class EventResult(BaseModel):
    """What an event produced; the same answer when the event is sent again."""

    id: int
    source: str
    external_id: str
    type: str
    member_id: int
    occurred_at: datetime
    points: int
    """Points posted for it (negative for a refund's take-back)."""
    awards: list[AwardRead]
    skipped: list[dict[str, str]] = Field(default_factory=list)
    """Rules that did not fire, and why."""
    replayed: bool = False


class HeldAward(BaseModel):
    """An award held for a reviewer (a reviewed rule's), or decided: what it asks, for whom,
    on which event, and the decision."""

    id: int
    event_id: int
    event_type: str
    source: str
    external_id: str
    member_id: int
    rule: str
    version: int
    wanted: int
    """What the rule computed: what the event asked, up to the rule's maximum."""
    points: int
    """While held, what it would post; once decided, what posted (0 when rejected)."""
    cap: str | None = None
    local_day: date
    detail: dict[str, Any] = Field(default_factory=dict)
    decision: Literal["approved", "rejected"] | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    posting_id: int | None = None


class HeldAwardPage(BaseModel):
    items: list[HeldAward]
    next_cursor: str | None = None


class AwardApprove(RequestBody):
    points: Annotated[int, Field(ge=1, le=10**12)] | None = None
    """Less than the award asks (never more than the rule's maximum); default: what it asks."""
    note: Annotated[str, Field(max_length=500, pattern=NO_NUL)] = ""


class AwardReject(RequestBody):
    note: Annotated[str, Field(max_length=500, pattern=NO_NUL)] = ""


class BatchIn(RequestBody):
    events: Annotated[list[EventIn], Field(min_length=1, max_length=1000)]


class BatchItem(BaseModel):
    index: int
    ok: bool
    result: EventResult | None = None
    code: str | None = None
    detail: str | None = None


class BatchResult(BaseModel):
    accepted: int
    refused: int
    items: list[BatchItem]


class BacktestIn(RequestBody):
    """Replay the stored events of ``since``–``until`` under a proposed change of the rules:
    ``rules`` replace the live versions with the same code (or add new rules), ``drop``
    takes rules out."""

    since: Instant
    until: Instant
    rules: Annotated[list[RuleSpec], Field(max_length=200)] = Field(default_factory=list)
    drop: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=200)] = Field(
        default_factory=list
    )
    top: Annotated[int, Field(ge=1, le=200)] = 20

    @model_validator(mode="after")
    def _range(self) -> BacktestIn:
        if self.until <= self.since:
            raise Refusal("until must be after since", "until 须晚于 since")
        return self


class Compared(BaseModel):
    """Points actually awarded and what the proposal would have awarded."""

    key: str
    actual: int = 0
    proposed: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def difference(self) -> int:
        return self.proposed - self.actual


class BacktestReport(BaseModel):
    events: int
    """Events replayed (refunds are not replayed: they take back what their order earned)."""
    actual: int
    proposed: int
    by_rule: list[Compared]
    by_tier: list[Compared]
    by_day: list[Compared]
    members: list[Compared]
    """The members whose points change most, largest change first."""
    notes: list[str]
