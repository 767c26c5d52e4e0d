"""Event use cases: take an event in once, evaluate it against the rules live at its own
time, post what it earns, and keep why.

Every door (the API, a batch, a CSV import, a stream consumer) ends in :func:`ingest_many`, in
the caller's transaction. An event is keyed by (programme, source, external id): sent again
with the same content it answers what it produced the first time; with other content it is
refused. ``order.refunded`` takes back, through the ledger's claw-back, the points its order
earned in the proportion of the money refunded.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from functools import cache, lru_cache
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Row,
    RowMapping,
    Select,
    String,
    bindparam,
    case,
    false,
    func,
    literal_column,
    select,
    text,
    true,
    union_all,
)
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from jifen import crypto
from jifen.api.schemas import NO_NUL, nul_checked
from jifen.db.bulk import among, among_bound, insert_many
from jifen.db.prepared import Read, read_together
from jifen.db.uow import Database, UnitOfWork, is_transient
from jifen.db.upsert import upsert_many
from jifen.errors import (
    Forbidden,
    IdempotencyConflict,
    InvalidInput,
    JifenError,
    OrderNotSeen,
    StateConflict,
    UnknownAward,
    UnknownEvent,
    UnknownMember,
    invalid_field,
)
from jifen.events.models import (
    ONCE_TYPES,
    SEALED,
    UNSEALED,
    event_awards,
    events,
    member_counters,
)
from jifen.events.schemas import (
    CATALOGUE,
    AwardRead,
    BacktestIn,
    BacktestReport,
    Compared,
    EventIn,
    EventResult,
    HeldAward,
    OrderPaid,
    OrderRefunded,
)
from jifen.expiry import service as expiry_service
from jifen.members import service as members_service
from jifen.members.core import PersonalValues
from jifen.members.models import members
from jifen.members.schemas import MemberFacts
from jifen.notify import service as notify_service
from jifen.points import service as points_service
from jifen.points.schemas import PostingRead
from jifen.programs import service as programs_service
from jifen.rules import core
from jifen.rules import service as rules_service
from jifen.rules.schemas import EventTypeRead, ProgramCaps, Reviewed, RuleSpec, TierCap
from jifen.tiers import service as tiers_service
from jifen.tiers.core import TierTimeline

ACTOR = "rules"
OWN_SOURCE = "jifen"
"""The source of the events jifen raises by itself (birthdays): their earnings are posted by
the system actor (``points_service.SYSTEM``), so they are no member activity."""
NO_COUNTS = dict.fromkeys(CATALOGUE, 0)
"""A member's counters before any event: every type of the catalogue at 0, so that a
condition on ``member.counts['order.paid']`` reads 0 for a member's first order."""
FUTURE_TOLERANCE = timedelta(minutes=5)
"""How far ahead of jifen's clock an event's time may be (the sender's clock may be fast)."""


# --------------------------------------------------------------------------- validation


def parse_payload(
    event_type: str, payload: Mapping[str, Any], declared: EventTypeRead | None = None
) -> dict[str, Any]:
    """The payload checked against the event type's schema (for ``custom.<name>``, the one
    the programme ``declared``), as plain JSON values; InvalidInput naming the field
    otherwise."""
    return _parse(event_type, payload, declared)[0]


def _parse(
    event_type: str, payload: Mapping[str, Any], declared: EventTypeRead | None
) -> tuple[dict[str, Any], BaseModel]:
    """:func:`parse_payload`, and the validated model it dumped."""
    model: type[BaseModel] | None = CATALOGUE.get(event_type)
    if model is None and not event_type.startswith("custom."):
        known = ", ".join(sorted(CATALOGUE))
        raise InvalidInput(
            field="type",
            problem=f"unknown event type {event_type!r}; use one of {known}, or custom.<name>",
            problem_zh=f"未知的事件类型 {event_type!r};可用类型:{known},或 custom.<名称>",
        )
    if model is None:
        if declared is None:
            raise InvalidInput(
                field="type",
                problem=f"{event_type!r} is not declared in this programme; declare its "
                f"fields first (PUT …/event-types/{event_type})",
                problem_zh=f"本计划尚未声明事件类型 {event_type!r};"
                f"请先声明其字段(PUT …/event-types/{event_type})",
            )
        model = _custom_model(event_type, declared.model_dump_json())
    try:
        parsed = model.model_validate(dict(payload))
    except ValidationError as exc:
        raise invalid_field(exc, within="payload") from exc
    return parsed.model_dump(mode="json", exclude_none=declared is not None), parsed


_FIELD_TYPES: dict[str, Any] = {
    "string": Annotated[str, Field(max_length=2000, pattern=NO_NUL)],
    "integer": Annotated[int, Field(ge=-(2**62), le=2**62)],
    "number": Annotated[float, Field(allow_inf_nan=False)],
    "boolean": bool,
}


@lru_cache(maxsize=1024)
def _custom_model(name: str, declared_json: str) -> type[BaseModel]:
    """A model of a declared custom event type (cached by its declaration). Its fields are
    numbered and read and written under the names declared (their aliases), so that a name
    a model keeps for itself (``model_dump``, ``json``) is a field like any other."""
    declared = EventTypeRead.model_validate_json(declared_json)
    fields: dict[str, Any] = {
        f"field_{index}": (
            _FIELD_TYPES[spec.type] if spec.required else _FIELD_TYPES[spec.type] | None,
            Field(... if spec.required else None, alias=field),
        )
        for index, (field, spec) in enumerate(declared.fields.items())
    }
    config = ConfigDict(
        extra="forbid", strict=True, validate_by_name=False, serialize_by_alias=True
    )
    model: type[BaseModel] = create_model(name.replace(".", "_"), __config__=config, **fields)
    return model


def _parsed(uow: UnitOfWork, program_id: int, event: EventIn) -> tuple[dict[str, Any], BaseModel]:
    """The event's payload as plain JSON values, and the model it was validated as."""
    declared = None
    if event.type.startswith("custom."):
        declared = rules_service.event_type(uow, program_id=program_id, name=event.type)
    with nul_checked():  # the event's validation walked its payload
        return _parse(event.type, event.payload, declared)


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
"""The JSON an event's fingerprint digests (made once: ``json.dumps`` with options builds an
encoder each call)."""


def _canonical(event: EventIn, payload: Mapping[str, Any]) -> str:
    return _CANONICAL.encode(
        {
            "type": event.type,
            "occurred_at": event.occurred_at.isoformat(),
            "member_id": event.member_id,
            "member_ref": event.member_ref,
            "payload": payload,
        }
    )


def _fingerprint(event: EventIn, payload: Mapping[str, Any]) -> str:
    """An event's canonical text's keyed HMAC (:func:`jifen.crypto.event_fingerprint`),
    which a copy of the database alone cannot test guesses of its member reference (often
    a phone number) or payload against. The event is stored with it sealed
    (:func:`_sealed`)."""
    return crypto.event_fingerprint(_canonical(event, payload))


def _legacy_fingerprint(event: EventIn, payload: Mapping[str, Any]) -> str:
    """The unkeyed SHA-256 the events stored before the keyed fingerprint carried (until
    :func:`seal_fingerprints` sealed it): a resend of one of them is still known by it."""
    return hashlib.sha256(_canonical(event, payload).encode()).hexdigest()


SEALED_FINGERPRINT = SEALED
"""How a sealed fingerprint starts (:func:`_sealed`)."""


def _sealed(fingerprint: str) -> str:
    """What an event is stored with of its fingerprint: the marker and 57 hex digits of the
    keyed HMAC of it (still 64 characters). Whatever the fingerprint was (the unkeyed
    SHA-256 events were stored with before, or the keyed one), nothing a guess could be
    tested against without the installation's key is left, while the event sent again is
    still known. A new event is stored sealed; the ones stored before are sealed by
    :func:`seal_fingerprints` (the job ``events.seal_fingerprints``), or by
    :func:`erase_fingerprints` when their member is erased first."""
    return _cut_seal(crypto.event_fingerprint(SEALED_FINGERPRINT + fingerprint))


def _same_event(stored: str, event: EventIn, payload: Mapping[str, Any], keyed: str) -> bool:
    """Whether an event stored with fingerprint ``stored`` is the one sent again, whose
    keyed fingerprint is ``keyed``, or the unkeyed one of an event stored before
    fingerprints were keyed (worked out only when the keyed one does not match); either of
    them sealed (:func:`_sealed`) or, stored before sealing and not sealed yet, as it is.
    Compared in constant time."""
    sealed = stored.startswith(SEALED_FINGERPRINT)
    if hmac.compare_digest(stored, _sealed(keyed) if sealed else keyed):
        return True
    legacy = _legacy_fingerprint(event, payload)
    if hmac.compare_digest(stored, _sealed(legacy) if sealed else legacy):
        return True
    return _same_under_earlier_keys(stored, _canonical(event, payload), legacy)


def _cut_seal(seal: str) -> str:
    return SEALED_FINGERPRINT + seal[: 64 - len(SEALED_FINGERPRINT)]


def _same_under_earlier_keys(stored: str, canonical: str, legacy: str) -> bool:
    """Whether ``stored`` is the fingerprint of ``canonical`` (sealed or not) made with one
    of the secret keys the current one replaced (``JIFEN_PREVIOUS_SECRET_KEYS``), or sealed
    with one: an event stored before the key changed is known when sent again. The seal
    and the fingerprint inside it need not be of the same key: an old key's bare
    fingerprint (stored by the release before sealing) is sealed under the key current
    when :func:`seal_fingerprints` or :func:`erase_fingerprints` come by, and the unkeyed
    one (``legacy``) sealed before the key changed is sealed under the old key. Compared in
    constant time."""
    earlier = crypto.event_fingerprints(canonical)
    if not earlier:
        return False
    if not stored.startswith(SEALED_FINGERPRINT):
        return any(hmac.compare_digest(stored, fingerprint) for fingerprint in earlier)
    seals = [
        *crypto.event_fingerprints(SEALED_FINGERPRINT + legacy),
        *(
            seal
            for fingerprint in earlier
            for seal in (
                crypto.event_fingerprint(SEALED_FINGERPRINT + fingerprint),
                *crypto.event_fingerprints(SEALED_FINGERPRINT + fingerprint),
            )
        ),
    ]
    return any(hmac.compare_digest(stored, _cut_seal(seal)) for seal in seals)


# --------------------------------------------------------------------------- ingest

Origin = tuple[str | None, str | None]
"""The merchant and store an event's points are posted for."""

ONCE_PER_RULE = ("review.liked",)
"""Events that come again for the same subject (a review's like count, as it grows): each
rule awards once a subject, on the first of them its condition holds for."""


def store_of(event: EventIn) -> str | None:
    """The store an event names in its payload (an order's ``store``), if any: where its
    points are posted for, whichever door it came through."""
    store = event.payload.get("store")
    return store if isinstance(store, str) else None


def ingest(
    uow: UnitOfWork,
    *,
    program_id: int,
    event: EventIn,
    origin: Origin = (None, None),
    sent_by: str | None = None,
) -> EventResult:
    """Store ``event`` once, evaluate it and post its awards, all in the caller's transaction;
    the postings record ``origin``, the merchant and store they were made for, and the event
    who sent it (``sent_by``: the API's principal)."""
    outcome = ingest_many(
        uow, program_id=program_id, events=[event], origins=[origin], sent_by=sent_by
    )[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def ingest_many(
    uow: UnitOfWork,
    *,
    program_id: int,
    events: Sequence[EventIn],
    origins: Sequence[Origin] | None = None,
    sent_by: str | None = None,
) -> list[EventResult | Exception]:
    """Take ``events`` in, in order, in the caller's transaction: each ends as if it had
    been ingested alone after the ones before it, with its result, or the error that
    refused it (nothing of a refused event is kept; the others go on).

    The work is done together: the members, accounts and budgets are held at once (in id
    and code order, so that concurrent batches wait rather than deadlock), what the rules
    read is loaded in a few queries, the events are evaluated one after another against
    those facts kept up to date in memory, and what they produce is written in a few
    statements. A refund, and a member's second event when earning can move its tier,
    start a new group written before they are read. Should a group's writing fail, its
    events are taken again one at a time, each failing alone.

    Errors that concern the whole transaction (a lost race, the connection gone) are raised.
    """
    none: Origin = (None, None)
    chosen = list(origins) if origins is not None else [none] * len(events)
    return _Intake(uow, program_id, sent_by).take(list(events), chosen)


@dataclass(slots=True)
class _Item:
    index: int
    event: EventIn
    origin: Origin
    payload: dict[str, Any]
    request_hash: str
    """The event's keyed fingerprint (:func:`_fingerprint`); it is stored sealed."""
    day: date
    """The event's day in the programme's time zone."""
    member_id: int | None = None
    parsed_order: OrderPaid | None = None
    subject_amount: tuple[str | None, int | None] | None = None
    """:meth:`subject`, worked out once (the member is known by then)."""
    rules: core.RuleSet | None = None
    """The rules live at the event's time, once looked up."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.event.source, self.event.external_id)

    @property
    def inviter(self) -> int | None:
        inviter = self.payload.get("inviter_member_id")
        return inviter if isinstance(inviter, int) and not isinstance(inviter, bool) else None

    def order(self) -> OrderPaid | None:
        """An ``order.paid`` event's order, validated once (None for other types)."""
        if self.parsed_order is None and self.event.type == "order.paid":
            self.parsed_order = OrderPaid.model_validate(self.payload)
        return self.parsed_order

    def subject(self) -> tuple[str | None, int | None]:
        """What the event happens to (see :func:`subject_of`), and an order's amount in
        fen."""
        if self.subject_amount is None:
            assert self.member_id is not None
            subject = subject_of(
                self.event.type, self.payload, self.member_id, self.day, merchant=self.origin[0]
            )
            self.subject_amount = (subject, _amount_of(self.event.type, self.order()))
        return self.subject_amount


@dataclass(slots=True)
class _Decision:
    """What one event produces, decided before anything of its group is written."""

    item: _Item
    member_id: int
    subject: str | None
    amount_fen: int | None
    day: date
    awards: list[tuple[core.Award, int, str | None]]  # (award, points posted, cap that bit)
    postings: dict[int, tuple[int, str, datetime | None]]  # member: (points, reason, expiry)
    available_at: datetime | None
    total: int
    skipped: list[dict[str, str]]
    result: EventResult | None = None


@dataclass(slots=True)
class _Group:
    """A group's decisions and what they change, kept apart until it is written."""

    spent: dict[str, int]
    decisions: list[_Decision] = field(default_factory=list)
    outcomes: dict[int, EventResult | Exception] = field(default_factory=dict)
    echoes: list[tuple[int, _Decision]] = field(default_factory=list)
    done: dict[tuple[str, str], tuple[str, _Decision]] = field(default_factory=dict)
    taken: dict[tuple[str, str], tuple[str, str, str | None]] = field(default_factory=dict)
    awarded: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)
    counters: dict[tuple[int, str], list[Any]] = field(default_factory=dict)


# The intake's reads, built once a backend (their values bound when they run): every event
# runs them, and building a statement costs more Python than running it.


@cache
def _stored_query(dialect: str, taking: bool) -> Select[Any] | CompoundSelect[Any]:
    """The events of the given keys (a superset: each source with each id), ``taking``
    false; with ``taking``, after them the events of once-only types that took the given
    subjects, ``taking`` true."""
    stored = select(events, false().label("taking")).where(
        # the key's index: programme, source, external id
        events.c.program_id == bindparam("program"),
        among_bound(dialect, events.c.source, "sources", String()),
        among_bound(dialect, events.c.external_id, "external", String()),
    )
    if not taking:
        return stored
    took = select(events, true().label("taking")).where(
        events.c.program_id == bindparam("program"),
        among_bound(dialect, events.c.subject, "subjects", String()),
        events.c.type.in_(ONCE_TYPES),
    )
    return union_all(stored, took)


@cache
def _stored_awards_query(dialect: str) -> Select[Any]:
    return (
        select(event_awards)
        .where(among_bound(dialect, event_awards.c.event_id, "events"))
        .order_by(event_awards.c.id)
    )


@cache
def _awarded_query(dialect: str) -> Select[Any]:
    """The rules that awarded on the given subjects of events that come again."""
    return (
        select(events.c.type, events.c.subject, event_awards.c.rule_code)
        .join(event_awards, event_awards.c.event_id == events.c.id)
        .where(
            events.c.program_id == bindparam("program"),
            among_bound(dialect, events.c.subject, "subjects", String()),
            events.c.type.in_(ONCE_PER_RULE),
            event_awards.c.reverses_id.is_(None),
        )
    )


@cache
def _counters_query(dialect: str) -> Select[Any]:
    return select(member_counters).where(among_bound(dialect, member_counters.c.member_id, "ids"))


@cache
def _by_day_query(dialect: str) -> Select[Any]:
    """Points awarded (held ones aside) to the members by rule and day, over a span."""
    return (
        select(
            event_awards.c.member_id, event_awards.c.rule_code, event_awards.c.local_day,
            func.sum(event_awards.c.points),
        )
        .where(
            among_bound(dialect, event_awards.c.member_id, "ids"),
            event_awards.c.held.is_(False),
            event_awards.c.local_day >= bindparam("since"),
            event_awards.c.local_day <= bindparam("until"),
        )
        .group_by(event_awards.c.member_id, event_awards.c.rule_code, event_awards.c.local_day)
    )  # fmt: skip


@cache
def _lifetime_query(dialect: str) -> Select[Any]:
    """Points awarded (held ones aside) to the members by the given rules, ever."""
    return (
        select(event_awards.c.member_id, event_awards.c.rule_code,
               func.sum(event_awards.c.points))
        .where(
            among_bound(dialect, event_awards.c.member_id, "ids"),
            event_awards.c.held.is_(False),
            event_awards.c.rule_code.in_(bindparam("codes", expanding=True)),
        )
        .group_by(event_awards.c.member_id, event_awards.c.rule_code)
    )  # fmt: skip


class _Intake:
    """One call of :func:`ingest_many`: what it has read and held, and the outcomes."""

    def __init__(self, uow: UnitOfWork, program_id: int, sent_by: str | None = None) -> None:
        self.uow = uow
        self.program_id = program_id
        self.sent_by = sent_by
        self.zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
        self.now = uow.clock.now()
        self.outcomes: dict[int, EventResult | Exception] = {}
        self.done: dict[tuple[str, str], tuple[str, _Decision]] = {}
        self.stored: dict[tuple[str, str], Row[Any]] = {}
        self.taking: list[Row[Any]] = []
        """The events that took the subjects of the events of once-only types."""
        self.stored_awards: dict[int, list[AwardRead]] = {}
        self.taken: dict[tuple[str, str], tuple[str, str, str | None]] = {}
        """(type, subject) -> the (source, external id, merchant) of the event that took it."""
        self.awarded: dict[tuple[str, str], set[str]] = {}
        self.profiles: dict[int, MemberFacts] = {}
        self.spent: dict[str, int] = {}
        self.budgeted: set[str] = set()
        self.terms: _Terms | None = None
        """The programme's terms, read for the first events decided."""

    def take(self, events: list[EventIn], origins: list[Origin]) -> list[EventResult | Exception]:
        items: list[_Item] = []
        for index, (sent, origin) in enumerate(zip(events, origins, strict=True)):
            event = _in_utc(sent)
            try:
                payload, model = _parsed(self.uow, self.program_id, event)
                _not_ahead(event, self.now)
                day = core.local_day(event.occurred_at, self.zone)
                item = _Item(index, event, origin, payload, _fingerprint(event, payload), day)
                if isinstance(model, OrderPaid):
                    item.parsed_order = model
                items.append(item)
            except JifenError as exc:
                self.outcomes[index] = exc
        if items:
            self._hold_and_read(items)
            for group in self._groups(items):
                self._take_group(group)
        return [self.outcomes[index] for index in range(len(events))]

    # ------------------------------------------------------------------ reading, holding

    def _hold_and_read(self, items: list[_Item]) -> None:
        uow, program_id = self.uow, self.program_id
        wanted = [i.event.member_ref for i in items if i.event.member_id is None]
        refs = members_service.ids_by_refs(
            uow, program_id=program_id, refs=[ref for ref in wanted if ref]
        )
        for item in items:
            item.member_id = (
                item.event.member_id
                if item.event.member_id is not None
                else refs.get(item.event.member_ref or "")
            )
        ids = {i.member_id for i in items if i.member_id is not None}
        ids.update(i.inviter for i in items if i.inviter is not None)
        # Members, then budgets, then accounts, each in order: every batch takes them so.
        # The budgets are the ones its events' rules draw on, taken at once; a refund gives
        # back to whichever rules its order earned from, so a batch with one holds them all.
        self.profiles = members_service.lock_for_rules(uow, program_id=program_id, member_ids=ids)
        # What the programme's terms say, in one round trip on PostgreSQL (each read once a
        # transaction): with whether it has webhooks, which spares a programme without any
        # reading them (SQLite, where each read is a statement, reads them when it writes).
        reads: list[Read[Any]] = [
            rules_service.caps_read(uow, program_id),
            programs_service.settings_read(uow, program_id),
        ]
        if uow.dialect == "postgresql":
            reads.append(notify_service.subscriptions_read(uow, program_id))
        read_together(uow.conn, *reads)
        if any(item.event.type == "order.refunded" for item in items):
            rules_service.lock_budgets(uow, program_id=program_id)
        for item in items:
            moment = item.event.occurred_at
            item.rules = rules_service.rules_at(uow, program_id=program_id, moment=moment)
            for rule in item.rules.by_type.get(item.event.type, []):
                if rule.spec.caps.budget is not None:
                    self.budgeted.add(rule.spec.code)
            # The programme's budget, when the caps of the event's time have one.
            if rules_service.get_caps(uow, program_id=program_id, at=moment).budget is not None:
                self.budgeted.add(rules_service.PROGRAM_BUDGET)
        self.spent = rules_service.budgets_spent(
            uow, program_id=program_id, codes=sorted(self.budgeted), lock=True
        )
        points_service.hold_accounts(uow, member_ids=[m for m in ids if m in self.profiles])
        self._read_stored(items)
        self._read_taken(items)

    def _read_stored(self, items: list[_Item]) -> None:
        """The events of these keys taken in before, with their awards; and in the same
        statement the events that took the subjects of these events that happen once (for
        :meth:`_read_taken`)."""
        external = sorted({i.event.external_id for i in items})
        sources = sorted({i.event.source for i in items})
        wanted = {i.key for i in items}
        subjects = sorted(
            {
                str(item.subject()[0])
                for item in items
                if item.member_id is not None and item.event.type in ONCE_TYPES
            }
        )
        params: dict[str, Any] = {"program": self.program_id, "sources": sources,
                                  "external": external}  # fmt: skip
        if subjects:
            params["subjects"] = subjects
        rows = self.uow.conn.execute(_stored_query(self.uow.dialect, bool(subjects)), params)
        stored: list[Row[Any]] = []
        self.taking = []
        for row in rows:
            (self.taking if row.taking else stored).append(row)
        self.stored = {
            (r.source, r.external_id): r for r in stored if (r.source, r.external_id) in wanted
        }
        if self.stored:
            ids = [r.id for r in self.stored.values()]
            awards = self.uow.conn.execute(
                _stored_awards_query(self.uow.dialect), {"events": ids}
            ).all()
            for award in awards:
                self.stored_awards.setdefault(award.event_id, []).append(
                    _award_read(award._mapping)
                )

    def _read_taken(self, items: list[_Item]) -> None:
        """The subjects of these events that happen once, already taken by events under
        other ids (read with the stored events); and the rules that already awarded on the
        subjects of events that come again (a review's likes)."""
        again = {
            str(item.subject()[0])
            for item in items
            if item.member_id is not None and item.event.type in ONCE_PER_RULE
        }
        self.taken = {
            (r.type, r.subject): (r.source, r.external_id, r.merchant) for r in self.taking
        }
        if again:
            awarded = self.uow.conn.execute(
                _awarded_query(self.uow.dialect),
                {"program": self.program_id, "subjects": sorted(again)},
            ).all()
            for kind, subject, code in awarded:
                self.awarded.setdefault((kind, subject), set()).add(code)

    def _groups(self, items: list[_Item]) -> Iterable[list[_Item]]:
        """The events cut where one must see the others written: a refund (alone), and a
        member's next event when earning can move its tier."""
        moving = tiers_service.moves_on_earning(
            uow=self.uow, program_id=self.program_id, now=self.now
        )
        group: list[_Item] = []
        whose: set[int | None] = set()
        for item in items:
            concerned = {item.member_id, item.inviter} - {None}
            if item.event.type == "order.refunded" or (moving and concerned & whose):
                if group:
                    yield group
                group, whose = [], set()
            if item.event.type == "order.refunded":
                yield [item]
                continue
            group.append(item)
            whose |= concerned
        if group:
            yield group

    # ------------------------------------------------------------------ a group

    def _take_group(self, items: list[_Item]) -> None:
        group = _Group(spent=dict(self.spent))
        try:
            with self.uow.savepoint():
                if items[0].event.type == "order.refunded":
                    self._refund_one(items[0], group)
                else:
                    self._decide_all(items, group)
                    self._write(group)
        except Exception as exc:
            clash = _once_clash(exc)
            if not clash and (
                is_transient(exc) or isinstance(exc, OperationalError | InterfaceError)
            ):
                raise
            if len(items) > 1:  # find the one at fault: each again, alone
                for item in items:
                    self._take_group([item])
            else:
                self.outcomes[items[0].index] = self._clashed(items[0], exc) if clash else exc
            return
        for index, decision in group.echoes:
            assert decision.result is not None
            group.outcomes[index] = decision.result.model_copy(update={"replayed": True})
        self.outcomes.update(group.outcomes)
        self.done.update(group.done)
        self.taken.update(group.taken)
        for subject, codes in group.awarded.items():
            self.awarded.setdefault(subject, set()).update(codes)
        self.spent = group.spent

    def _check(self, item: _Item, group: _Group) -> EventResult | _Decision | None:
        """Before an event is decided: its stored result when it was taken in before (or
        the decision of its twin earlier in this call); None when it is new. Raises what
        refuses it."""
        event = item.event
        earlier = group.done.get(item.key) or self.done.get(item.key)
        stored = self.stored.get(item.key)
        if earlier is not None or stored is not None:
            if earlier is not None:
                same = hmac.compare_digest(earlier[0], item.request_hash)
            else:
                assert stored is not None
                same = _same_event(stored.request_hash, event, item.payload, item.request_hash)
            if not same:
                raise IdempotencyConflict(key=f"{event.source}:{event.external_id}")
            if earlier is not None:
                return earlier[1]
            assert stored is not None
            return self._stored_result(stored)
        if item.member_id is None:
            raise UnknownMember(member_id=event.member_ref or "")
        profile = self.profiles.get(item.member_id)
        if profile is None:
            raise UnknownMember(member_id=item.member_id)
        # A refund takes back what its order earned, whatever the member's state since:
        # a frozen or banned member must not keep the points of goods it returned. A closed
        # one's points were settled at closing: its refund is refused, and takes nothing
        # back (nor makes a debt on the closed account, which the ledger refuses too).
        if event.type != "order.refunded" or profile.state not in ("frozen", "banned"):
            members_service.require_active(profile)
        if event.type == "member.birthday":
            _check_birthday(item, profile.birthday, self.zone)
        inviter = item.inviter
        if (
            event.type == "referral.completed"
            and inviter is not None
            and inviter not in self.profiles
        ):
            raise UnknownMember(member_id=inviter)
        if event.type in ONCE_TYPES:
            subject = str(item.subject()[0])
            twin = group.taken.get((event.type, subject)) or self.taken.get((event.type, subject))
            if twin is not None:
                raise _sent_twice(item, *twin)
        return None

    def _clashed(self, item: _Item, exc: Exception) -> Exception:
        """What refuses an event whose subject the once-only index found taken though it
        was not seen taken before (by a transaction that committed meanwhile): the event
        that took it. The same event sent at once twice is a lost race: raised, so that
        the whole transaction runs again and answers it as a replay."""
        subject = item.subject()[0]
        twin = self.uow.conn.execute(
            select(events.c.source, events.c.external_id, events.c.merchant).where(
                events.c.program_id == self.program_id,
                events.c.type == item.event.type,
                events.c.subject == subject,
            )
        ).first()
        if twin is None:
            field, what, what_zh = _once_what(item)
            return InvalidInput(
                field=field,
                problem=f"{what} clashes with another event; send it again later",
                problem_zh=f"{what_zh} 与另一事件冲突;请稍后重发",
            )
        if (twin.source, twin.external_id) == item.key:
            raise exc
        return _sent_twice(item, twin.source, twin.external_id, twin.merchant)

    def _stored_result(self, row: Row[Any]) -> EventResult:
        return _result_of(row, self.stored_awards.get(row.id, []), replayed=True)

    def _answered(self, item: _Item, group: _Group, found: EventResult | _Decision) -> None:
        if isinstance(found, EventResult):
            group.outcomes[item.index] = found
        elif found.result is not None:
            group.outcomes[item.index] = found.result.model_copy(update={"replayed": True})
        else:
            group.echoes.append((item.index, found))

    def _decide_all(self, items: list[_Item], group: _Group) -> None:
        ids = {i.member_id for i in items if i.member_id in self.profiles}
        ids.update(i.inviter for i in items if i.inviter in self.profiles)
        days = [i.day for i in items]
        # The earliest time each member's tier is read at: its events' and its invitations'.
        moments: dict[int, datetime] = {}
        for item in items:
            for member_id in (item.member_id, item.inviter):
                if member_id in self.profiles:
                    assert member_id is not None
                    earlier = moments.get(member_id, item.event.occurred_at)
                    moments[member_id] = min(earlier, item.event.occurred_at)
        tallies = _Tallies.load(
            self.uow, {m: self.profiles[m] for m in ids if m is not None}, days,
            _capped_codes(self.uow, self.program_id), moments,
        )  # fmt: skip
        if self.terms is None:
            self.terms = _Terms(self.uow, self.program_id, self.zone)
        for item, day in zip(items, days, strict=True):
            try:
                found = self._check(item, group)
                if found is not None:
                    self._answered(item, group, found)
                    continue
                self._decide(item, day, group, tallies, self.terms.at(item.event.occurred_at))
            except JifenError as exc:
                group.outcomes[item.index] = exc

    def _decide(
        self, item: _Item, day: date, group: _Group, tallies: _Tallies, terms: core.Program
    ) -> None:
        uow, event, member_id = self.uow, item.event, item.member_id
        assert member_id is not None
        subject, amount = item.subject()
        core_event = to_core_event(event, member_id, item.payload, item.order())
        if event.type in ONCE_PER_RULE:
            once = (event.type, str(subject))
            before = self.awarded.get(once, set()) | group.awarded.get(once, set())
            core_event = replace(core_event, awarded_before=frozenset(before))
        rules = item.rules or rules_service.rules_at(
            uow, program_id=self.program_id, moment=event.occurred_at
        )
        candidates = rules.by_type.get(event.type, [])
        codes = {r.spec.code for r in candidates if r.spec.caps.per_member}
        recipients = [member_id]
        if event.type == "referral.completed" and item.inviter is not None:
            recipients.append(item.inviter)
        facts = {m: tallies.facts(m, day, codes, event.occurred_at) for m in recipients}
        budgets = core.Budgets(
            by_rule=group.spent, program=group.spent.get(rules_service.PROGRAM_BUDGET, 0)
        )
        result = core.evaluate(core_event, rules, terms, facts, budgets)

        settings = programs_service.get_settings(uow, program_id=self.program_id)
        # When the points become available, in the event's own time: an order's after the
        # return window. Validity counts from then, so an event sent late (an import of last
        # year's orders) earns points that expire when they would have.
        usable_from = event.occurred_at
        if event.type == "order.paid" and settings.return_window_days:
            usable_from += timedelta(days=settings.return_window_days)
        expiries = {
            m: expiry_service.lot_expiry(
                uow, program_id=self.program_id, start=usable_from, tier=tallies.tier(m)
            )
            for m in {a.member_id for a in result.awards}
        }
        # What each award posts: nothing held, nothing that would be expired already.
        posted: list[tuple[core.Award, int, str | None]] = []
        for award in result.awards:
            points, cap = award.points, award.cap
            expires_at = expiries[award.member_id]
            if points > 0 and not award.held and expires_at is not None and expires_at <= self.now:
                points, cap = 0, "expired before it was recorded"
            posted.append((award, points, cap))
        # One posting a member: the event's points arrive together, as one line of its
        # history; the awards keep the detail of which rule gave how much.
        postings: dict[int, tuple[int, str, datetime | None]] = {}
        for owner in sorted({a.member_id for a, p, _ in posted if p > 0 and not a.held}):
            mine = [(a, p) for a, p, _ in posted if a.member_id == owner and p > 0 and not a.held]
            reason = f"{event.type} {core_event.key}: " + ", ".join(
                f"{a.rule} {p}" for a, p in mine
            )
            postings[owner] = (sum(p for _, p in mine), reason, expiries[owner])
        budgeted = _budgeted(candidates, terms.caps)
        for n, (award, points, cap) in enumerate(posted):
            if points > 0 and not award.held:
                counted = [c for c in (award.rule, rules_service.PROGRAM_BUDGET) if c in budgeted]
                for code in counted:
                    group.spent[code] = group.spent.get(code, 0) + points
                    group.added[code] = group.added.get(code, 0) + points
                posted[n] = (replace(award, detail=_counted_in(award.detail, counted)), points, cap)
        decision = _Decision(
            item=item, member_id=member_id, subject=subject, amount_fen=amount, day=day,
            awards=posted, postings=postings,
            available_at=usable_from if usable_from > self.now else None,
            total=sum(points for award, points, _ in posted if not award.held),
            skipped=[{"rule": s.rule, "why": s.why} for s in result.skipped],
        )  # fmt: skip
        group.decisions.append(decision)
        group.done[item.key] = (item.request_hash, decision)
        if event.type in ONCE_TYPES:
            group.taken[(event.type, str(subject))] = (*item.key, item.origin[0])
        elif event.type in ONCE_PER_RULE:
            group.awarded.setdefault((event.type, str(subject)), set()).update(
                award.rule for award in result.awards
            )
        # What the next events of these members read.
        tallies.record(member_id, event.type, day, result, posted)
        counter = group.counters.setdefault((member_id, event.type), [0, None, 0])
        counter[0] += 1
        for (owner, kind), streak in result.streaks.items():
            counter = group.counters.setdefault((owner, kind), [0, None, 0])
            counter[1], counter[2] = streak.last_day, streak.length

    def _write(self, group: _Group) -> None:
        uow, decisions = self.uow, group.decisions
        if decisions:
            rows = [
                {
                    "program_id": self.program_id, "source": d.item.event.source,
                    "external_id": d.item.event.external_id, "type": d.item.event.type,
                    "member_id": d.member_id, "occurred_at": d.item.event.occurred_at,
                    "received_at": self.now, "payload": d.item.payload,
                    "request_hash": _sealed(d.item.request_hash), "subject": d.subject,
                    "amount_fen": d.amount_fen, "points": d.total, "skipped": d.skipped,
                    "merchant": d.item.origin[0], "store": d.item.origin[1],
                    "sent_by": self.sent_by,
                }
                for d in decisions
            ]  # fmt: skip
            event_ids = [
                int(i) for (i,) in insert_many(uow.conn, events, rows, returning=[events.c.id])
            ]
            earnings: list[points_service.Earning] = []
            owners: list[tuple[_Decision, int]] = []
            for decision, event_id in zip(decisions, event_ids, strict=True):
                for owner, (points, reason, expires_at) in decision.postings.items():
                    earnings.append(points_service.Earning(
                        member_id=owner, amount=points, key=f"event:{event_id}:{owner}",
                        available_at=decision.available_at, expires_at=expires_at,
                        reason=reason, actor=_actor(decision.item.event.source),
                    ))  # fmt: skip
                    owners.append((decision, owner))
            earned = points_service.earn_many(uow, earnings)
            posting_ids = [posting.id for posting in earned]
            posting_of = {
                (id(d), owner): p for (d, owner), p in zip(owners, posting_ids, strict=True)
            }
            points_service.record_origins(
                uow, [(p, *d.item.origin) for (d, _), p in zip(owners, posting_ids, strict=True)]
            )
            if notify_service.may_publish(uow, program_id=self.program_id):
                notify_service.announce_postings(
                    uow, program_id=self.program_id,
                    postings=[(p, *d.item.origin)
                              for (d, _), p in zip(owners, earned, strict=True)],
                )  # fmt: skip
            award_rows: list[dict[str, Any]] = []
            for decision, event_id in zip(decisions, event_ids, strict=True):
                mine = _award_rows(
                    self.program_id, event_id, decision.day,
                    [
                        (award, points, cap,
                         posting_of.get((id(decision), award.member_id))
                         if points > 0 and not award.held else None, None)
                        for award, points, cap in decision.awards
                    ],
                )  # fmt: skip
                award_rows += mine
                decision.result = EventResult(
                    id=event_id, source=decision.item.event.source,
                    external_id=decision.item.event.external_id, type=decision.item.event.type,
                    member_id=decision.member_id,
                    occurred_at=decision.item.event.occurred_at.astimezone(UTC),
                    points=decision.total, awards=[_award_read(row) for row in mine],
                    skipped=decision.skipped,
                )  # fmt: skip
                group.outcomes[decision.item.index] = decision.result
            insert_many(uow.conn, event_awards, award_rows)
        rules_service.add_to_budgets(uow, program_id=self.program_id, spent=group.added)
        _add_counters(uow, group.counters)
        # An order's spend and an event of the activity part count in the tier score
        # whatever they earn (a member past its earning cap, a check-in no rule rewards).
        scored = tiers_service.scored_event_types(uow, program_id=self.program_id)
        movers = {owner for d in decisions for owner in d.postings} | {
            d.member_id
            for d in decisions
            if d.member_id is not None and d.item.event.type in scored
        }
        if movers:
            # A tier scheme that upgrades at once (or a campaign of temporary upgrades)
            # moves the members up now; without one this reads only the settings.
            tiers_service.after_earning(
                uow, program_id=self.program_id, member_ids=movers, now=self.now
            )

    def _refund_one(self, item: _Item, group: _Group) -> None:
        """A refund, read and written alone: it reads what the order earned."""
        found = self._check(item, group)
        if found is not None:
            self._answered(item, group, found)
            return
        uow, event, member_id = self.uow, item.event, item.member_id
        assert member_id is not None
        subject, amount = item.subject()
        event_id = int(
            uow.conn.execute(
                events.insert().returning(events.c.id),
                {
                    "program_id": self.program_id, "source": event.source,
                    "external_id": event.external_id, "type": event.type,
                    "member_id": member_id, "occurred_at": event.occurred_at,
                    "received_at": self.now, "payload": item.payload,
                    "request_hash": _sealed(item.request_hash), "subject": subject,
                    "amount_fen": amount,
                    "merchant": item.origin[0], "store": item.origin[1],
                    "sent_by": self.sent_by,
                },
            ).scalar_one()
        )  # fmt: skip
        core_event = to_core_event(event, member_id, item.payload, item.order())
        awards, points, given_back = _refund(
            uow, self.program_id, event_id, core_event, self.zone, item.origin
        )
        for code, back in given_back.items():  # what the batch's next events read
            if code in group.spent:
                group.spent[code] -= back
        _add_counters(uow, {(member_id, event.type): [1, None, 0]})
        result = EventResult(
            id=event_id, source=event.source, external_id=event.external_id, type=event.type,
            member_id=member_id, occurred_at=event.occurred_at.astimezone(UTC), points=points,
            awards=awards,
        )  # fmt: skip
        group.outcomes[item.index] = result
        group.done[item.key] = (item.request_hash, _Decision(
            item=item, member_id=member_id, subject=subject, amount_fen=amount,
            day=core.local_day(event.occurred_at, self.zone), awards=[], postings={},
            available_at=None, total=points, skipped=[], result=result,
        ))  # fmt: skip


def _in_utc(event: EventIn) -> EventIn:
    """``event`` with its time in Python's own UTC when it was sent in UTC (as most are):
    the same instant, written the same. An event's time is compared with the rules', the
    tiers' and the clock's, all in that time zone object, and two times compare some ten
    times faster when they share it than when each has its own (as parsed times do)."""
    moment = event.occurred_at
    if moment.tzinfo is UTC or moment.utcoffset() != timedelta(0):
        return event
    return event.model_copy(update={"occurred_at": moment.replace(tzinfo=UTC)})


def _not_ahead(event: EventIn, now: datetime) -> None:
    if event.occurred_at > now + FUTURE_TOLERANCE:
        raise InvalidInput(
            field="occurred_at",
            problem=f"{event.occurred_at.isoformat()} is in the future; send an event once it "
            "has happened (a sender's clock may be at most 5 minutes fast)",
            problem_zh=f"{event.occurred_at.isoformat()} 是未来的时间;请在事件发生后再发送"
            "(发送方的时钟最多允许快 5 分钟)",
        )


def _sent_twice(item: _Item, source: str, external_id: str, merchant: str | None) -> InvalidInput:
    """An event that happens once to its subject (see :func:`subject_of`) sent again under
    another event id is refused: a sender that retries must keep the event's id. The event
    that took it is named only to a sender of the same merchant: another merchant's event
    ids are not its business."""
    field, what, what_zh = _once_what(item)
    if merchant != item.origin[0]:
        return InvalidInput(
            field=field,
            problem=f"{what} was already sent, by another merchant; it is counted once",
            problem_zh=f"{what_zh} 已由其他商户发送过;只计一次",
        )
    return InvalidInput(
        field=field,
        problem=f"{what} was already sent as event {source}:{external_id}; "
        "resend that event to get its result",
        problem_zh=f"{what_zh} 已作为事件 {source}:{external_id} 发送过;如需结果请重发该事件",
    )


def _once_clash(exc: BaseException) -> bool:
    """Whether ``exc`` is the once-only index refusing a subject already taken."""
    orig = exc.orig if isinstance(exc, IntegrityError) else exc  # the hot path: the driver's
    if not isinstance(orig, psycopg.errors.UniqueViolation | sqlite3.IntegrityError):
        return False
    text = str(orig)
    return "uq_events_once" in text or "events.program_id, events.type, events.subject" in text


def _once_what(item: _Item) -> tuple[str, str, str]:
    """The field that makes an event once-only, and what it happens to, in English and
    Chinese."""
    payload, day, kind = item.payload, item.day, item.event.type
    ref = {"order": "order_id", "review": "review_id", "quiz": "quiz_id", "activity": "activity_id"}
    what = {k: repr(payload.get(v)) for k, v in ref.items()}
    year = payload.get("year")
    field, en, zh = {
        "order.paid": ("payload.order_id", f"order {what['order']}", f"订单 {what['order']}"),
        "member.birthday": (
            "payload.year", f"the member's birthday of {year}", f"该会员 {year} 年的生日",
        ),
        "referral.completed": (
            "member_id", "the referral of this member (a member is referred once)",
            "该会员的推荐(每位会员只能被推荐一次)",
        ),
        "member.registered": (
            "member_id", "the registration of this member (a member registers once)",
            "该会员的注册(每位会员只注册一次)",
        ),
        "member.profile_completed": (
            "member_id", "the completed profile of this member (awarded once a member)",
            "该会员的资料完善(每位会员只奖励一次)",
        ),
        "review.posted": (
            "payload.review_id", f"the posting of review {what['review']}",
            f"评价 {what['review']} 的发布",
        ),
        "review.featured": (
            "payload.review_id", f"the featuring of review {what['review']}",
            f"评价 {what['review']} 的精选",
        ),
        "quiz.answered": (
            "payload.quiz_id", f"quiz {what['quiz']} answered by this member",
            f"该会员对问答 {what['quiz']} 的作答",
        ),
        "activity.attended": (
            "payload.activity_id", f"activity {what['activity']} attended by this member",
            f"该会员对活动 {what['activity']} 的参加",
        ),
    }.get(kind) or (
        "occurred_at", f"the member's check-in of {day} (one a day)",
        f"该会员在 {day} 的签到(每天一次)",
    )  # fmt: skip
    return field, en, zh


def _add_counters(uow: UnitOfWork, counters: Mapping[tuple[int, str], list[Any]]) -> None:
    """Add to each (member, event type) counter the events seen; set its streak where a
    streak was given (day and length)."""
    rows = [
        {"member_id": member_id, "event_type": kind, "seen": seen, "streak_day": day,
         "streak_length": length}
        for (member_id, kind), (seen, day, length) in sorted(counters.items())
    ]  # fmt: skip
    upsert_many(uow, member_counters, rows, _counted)


def _counted(new: Any) -> dict[str, Any]:
    """What a counter becomes when ``new`` (the row refused) adds to it."""
    return {
        "seen": member_counters.c.seen + new.seen,
        "streak_day": func.coalesce(new.streak_day, member_counters.c.streak_day),
        "streak_length": case(
            (new.streak_day.is_(None), member_counters.c.streak_length),
            else_=new.streak_length,
        ),
    }


def _capped_codes(uow: UnitOfWork, program_id: int) -> set[str]:
    """The rules (of any version) with caps per member: their lifetime totals are read."""
    return {
        rule.spec.code
        for rule, _, _ in rules_service.live_periods(uow, program_id=program_id)
        if rule.spec.caps.per_member
    }


class _Terms:
    """The programme as the evaluation reads it, for events of any time: its zone, the caps
    in force at the event's time (with the caps of the benefits matrix then in force for
    the tiers the earning caps leave without one), the matrix's multipliers and birthday
    gifts then, and its tiers in order (for members without a tier, and tiers the caps do
    not name). Made once for each version of the caps and of the policy the events meet,
    which the events under them share."""

    def __init__(self, uow: UnitOfWork, program_id: int, zone: ZoneInfo) -> None:
        self.uow = uow
        self.program_id = program_id
        order = tuple(tier.code for tier in tiers_service.list_tiers(uow, program_id=program_id))
        self.common = core.Program(zone, tier_order=order, draw_key=crypto.draw_key())
        self.made: dict[tuple[datetime | None, datetime | None], core.Program] = {}
        """The terms made so far, by the time their caps were set (``None``: none were) and
        the time their policy was replaced (``None``: it is the current one)."""

    def at(self, moment: datetime) -> core.Program:
        """The terms of an event at ``moment``."""
        uow, program_id = self.uow, self.program_id
        version = rules_service.caps_at(uow, program_id=program_id, at=moment)
        replaced, _ = programs_service.settings_at(uow, program_id=program_id, at=moment)
        made = self.made.get((version.since, replaced))
        if made is None:
            multipliers, tier_caps = tiers_service.earning_terms(
                uow, program_id=program_id, at=moment
            )
            matrix = {
                tier: TierCap(day=day, month=month) for tier, (day, month) in tier_caps.items()
            }
            caps = version.caps
            if matrix:
                caps = caps.model_copy(update={"by_tier": {**matrix, **caps.by_tier}})
            gifts = tiers_service.birthday_gifts(uow, program_id=program_id, at=moment)
            made = replace(
                self.common, caps=caps, tier_multipliers=multipliers, birthday_gifts=gifts
            )
            self.made[(version.since, replaced)] = made
        return made


@lru_cache(maxsize=4096)
def _periods(day: date) -> tuple[date, date, date, date]:
    """The month and the week (Monday to Sunday) of ``day``: first and last days of each."""
    month_start = day.replace(day=1)
    month_end = (month_start + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    week_start = day - timedelta(days=day.weekday())
    return month_start, month_end, week_start, week_start + timedelta(days=6)


@dataclass(slots=True)
class _Tally:
    """What the rules read about one member, kept current as a batch's events are decided."""

    profile: MemberFacts
    tiers: TierTimeline
    """The member's tier now and its changes since the batch's earliest event of it."""
    counts: dict[str, int] = field(default_factory=dict)
    streaks: dict[str, core.Streak] = field(default_factory=dict)
    by_day: dict[tuple[str, date], int] = field(default_factory=dict)
    """Points awarded (held ones aside) by rule and programme day, over the days read."""
    lifetime: dict[str, int] = field(default_factory=dict)
    """Points awarded by each rule capped per member, ever."""


class _Tallies:
    def __init__(self, tallies: dict[int, _Tally]) -> None:
        self.tallies = tallies

    @classmethod
    def load(
        cls, uow: UnitOfWork, profiles: Mapping[int, MemberFacts], days: Sequence[date],
        codes: set[str], moments: Mapping[int, datetime],
    ) -> _Tallies:  # fmt: skip
        """The members' tiers from their ``moments`` on (the earliest time each one's tier
        is read at), counters and awards over the months and weeks of ``days``: a query
        each, whatever the number of members, and one more for the tier changes when some
        member's tier changed after its moment."""
        ids = sorted(profiles)
        timelines = tiers_service.tier_timelines(uow, since={m: moments[m] for m in ids})
        tallies = {m: _Tally(profiles[m], timelines[m]) for m in ids}
        if not ids:
            return cls(tallies)
        for row in uow.conn.execute(_counters_query(uow.dialect), {"ids": ids}):
            tally = tallies[row.member_id]
            tally.counts[row.event_type] = int(row.seen)
            if row.streak_day is not None:
                tally.streaks[row.event_type] = core.Streak(row.streak_day, row.streak_length)
        # Whole periods, not up to the event's day: an event that arrives late (its day
        # earlier than awards already made) still sees everything its week and month earned.
        periods = [_periods(day) for day in days]
        since = min(min(p[0], p[2]) for p in periods)
        until = max(max(p[1], p[3]) for p in periods)
        for member_id, code, day, points in uow.conn.execute(
            _by_day_query(uow.dialect), {"ids": ids, "since": since, "until": until}
        ):
            tallies[member_id].by_day[(code, day)] = int(points or 0)
        if codes:
            for member_id, code, points in uow.conn.execute(
                _lifetime_query(uow.dialect), {"ids": ids, "codes": sorted(codes)}
            ):
                tallies[member_id].lifetime[code] = int(points or 0)
        return cls(tallies)

    def tier(self, member_id: int) -> str | None:
        """The member's current tier (what the validity of the points it gets now follows:
        a change of tier re-dates its open lots)."""
        return self.tallies[member_id].tiers.current

    def facts(self, member_id: int, day: date, codes: set[str], at: datetime) -> core.Facts:
        """What the rules read about the member for an event at ``at`` on ``day``: the
        tier it held then, its profile and counters as they are, its usage of ``day``."""
        tally = self.tallies[member_id]
        profile = tally.profile
        return core.Facts(
            member_id=member_id, tier=tally.tiers.at(at), state=profile.state,
            tags=frozenset(profile.tags),
            registered_at=profile.created_at, region=profile.region, birthday=profile.birthday,
            counts={**NO_COUNTS, **tally.counts}, streaks=dict(tally.streaks),
            usage=self._usage(tally, day, codes),
        )  # fmt: skip

    @staticmethod
    def _usage(tally: _Tally, day: date, codes: set[str]) -> core.Usage:
        """Points awarded to the member on ``day``, in its week and month, and by rule over
        those periods and its whole life."""
        month_start, month_end, week_start, week_end = _periods(day)
        total_day = total_month = 0
        by_rule: dict[tuple[str, str], int] = {}
        for (code, when), points in tally.by_day.items():
            periods = []
            if when == day:
                total_day += points
                periods.append("day")
            if month_start <= when <= month_end:
                total_month += points
                periods.append("month")
            if week_start <= when <= week_end:
                periods.append("week")
            if code in codes:
                for period in periods:
                    by_rule[(code, period)] = by_rule.get((code, period), 0) + points
        for code in codes:
            if code in tally.lifetime:
                by_rule[(code, "lifetime")] = tally.lifetime[code]
        return core.Usage(day=total_day, month=total_month, by_rule=by_rule)

    def record(
        self, member_id: int, event_type: str, day: date, result: core.Evaluation,
        posted: Sequence[tuple[core.Award, int, str | None]],
    ) -> None:  # fmt: skip
        """What an event decided, as the member's next events read it."""
        tally = self.tallies[member_id]
        tally.counts[event_type] = tally.counts.get(event_type, 0) + 1
        for (owner, kind), streak in result.streaks.items():
            self.tallies[owner].streaks[kind] = streak
        for award, points, _ in posted:
            if award.held:
                continue
            earner = self.tallies[award.member_id]
            earner.by_day[(award.rule, day)] = earner.by_day.get((award.rule, day), 0) + points
            earner.lifetime[award.rule] = earner.lifetime.get(award.rule, 0) + points


def to_core_event(
    event: EventIn, member_id: int, payload: Mapping[str, Any], order: OrderPaid | None = None
) -> core.Event:
    """The event as the pure evaluation sees it (``order``: the payload of an ``order.paid``
    already validated)."""
    lines: tuple[core.OrderLine, ...] = ()
    if event.type == "order.paid":
        order = order or OrderPaid.model_validate(payload)
        lines = tuple(
            core.OrderLine(
                line.sku, line.category, line.quantity, line.amount_fen, line.paid_with_points
            )
            for line in order.lines
        )
    return core.Event(
        key=f"{event.source}:{event.external_id}",
        type=event.type,
        occurred_at=event.occurred_at,
        member_id=member_id,
        payload=payload,
        lines=lines,
    )


def _check_birthday(item: _Item, born: date | None, zone: ZoneInfo) -> None:
    """A birthday is of the year it happens in, in the member's birthday month where the
    member's birthday is known: the once-a-year guard is keyed on that year, so another
    year (or a birthday in the wrong month) would pay a second gift."""
    day = core.local_day(item.event.occurred_at, zone)
    year = item.payload.get("year")
    if year != day.year:
        raise InvalidInput(
            field="payload.year",
            problem=f"a member.birthday happens in the year it is sent for: {year} is not the "
            f"year of its occurred_at in the programme's time zone ({day.year})",
            problem_zh=f"member.birthday 事件的年份须与其发生时间(计划时区)所在年份一致:"
            f"{year} 不是 {day.year}",
        )
    if born is not None and born.month != day.month:
        raise InvalidInput(
            field="occurred_at",
            problem=f"the member's birthday is in month {born.month}, not in month "
            f"{day.month} when this member.birthday happens",
            problem_zh=f"该会员的生日在 {born.month} 月,而此 member.birthday 事件发生在 "
            f"{day.month} 月",
        )


_SUBJECT_LENGTH = 128
"""The subject column's length: a longer subject is kept as its digest."""


def order_subject(merchant: str | None, order_id: str) -> str:
    """The subject of an order's events: its id qualified by the merchant it was sent for,
    as each merchant's till numbers its own orders. ``<merchant>/<order id>``, the merchant
    with ``%`` and ``/`` escaped (``%25``, ``%2F``) so that its first ``/`` ends it; an
    order of no merchant keeps its bare id, led by a ``/`` when the id holds one (a
    merchant is never empty), so that no two (merchant, order id) pairs share a subject.
    Migration 0017 writes the same in SQL."""
    if merchant is None:
        text = f"/{order_id}" if "/" in order_id else order_id
    else:
        text = merchant.replace("%", "%25").replace("/", "%2F") + "/" + order_id
    return _fitted(text)


def _fitted(text: str) -> str:
    """A subject as the column keeps it: a longer one as its digest."""
    if len(text) <= _SUBJECT_LENGTH:
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def subject_of(
    event_type: str, payload: Mapping[str, Any], member_id: int, day: date,
    merchant: str | None = None,
) -> str | None:  # fmt: skip
    """What an event happens to, unique per programme and event type for the types that
    happen once to it (:data:`ONCE_TYPES`): an order of the merchant it is sent for (see
    :func:`order_subject`; its refunds share it), a member's birthday of a year, the
    invited member of a referral, a review's id (its likes share it), a quiz or an
    activity of a member, a member's check-in of a day (``day``, in the programme's time
    zone), the member of a registration or a completed profile. None for the others."""
    if event_type in ("order.paid", "order.refunded"):
        return order_subject(merchant, str(payload["order_id"]))
    if event_type == "member.birthday":
        text = f"{member_id}:{payload['year']}"
    elif event_type in ("referral.completed", "member.registered", "member.profile_completed"):
        text = str(member_id)
    elif event_type in ("review.posted", "review.featured", "review.liked"):
        text = str(payload["review_id"])
    elif event_type == "quiz.answered":
        text = f"{member_id}:{payload['quiz_id']}"
    elif event_type == "activity.attended":
        text = f"{member_id}:{payload['activity_id']}"
    elif event_type == "member.checked_in":
        text = f"{member_id}:{day.isoformat()}"
    else:
        return None
    return _fitted(text)


def _amount_of(event_type: str, order: OrderPaid | None) -> int | None:
    """An order's amount paid in money (a refund's is set once it is worked out)."""
    if event_type == "order.paid" and order is not None:
        return sum(line.amount_fen for line in order.lines if not line.paid_with_points)
    return None


def facts_of(
    uow: UnitOfWork, *, program_id: int, member_ids: Iterable[int], at: datetime, day: date,
    rule_codes: Iterable[str],
) -> dict[int, core.Facts]:  # fmt: skip
    """What the rules read about each member for an event at ``at`` (on ``day``, its
    programme day): the tier held at ``at``, the usage of ``day``."""
    profiles = members_service.rule_facts(uow, program_id=program_id, member_ids=member_ids)
    codes = set(rule_codes)
    tallies = _Tallies.load(uow, profiles, [day], codes, dict.fromkeys(profiles, at))
    return {m: tallies.facts(m, day, codes, at) for m in profiles}


def dry_run(
    uow: UnitOfWork, *, program_id: int, event: EventIn, specs: list[RuleSpec] | None = None
) -> core.Evaluation:
    """What ``event`` would earn under ``specs`` (or the rules live at its time), with the
    members' tiers at its time and their other facts as they are now; nothing is stored or
    posted."""
    payload, _ = _parsed(uow, program_id, event)
    member_id = _member_id(uow, program_id, event)
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    if specs is None:
        rules = rules_service.rules_at(uow, program_id=program_id, moment=event.occurred_at)
    else:
        rules = core.RuleSet(rules_service.compile_rule(spec) for spec in specs)
    core_event = to_core_event(event, member_id, payload)
    candidates = rules.by_type.get(event.type, [])
    recipients = {member_id}
    inviter = payload.get("inviter_member_id")
    if event.type == "referral.completed" and isinstance(inviter, int):
        members_service.require_member(uow, program_id=program_id, member_id=inviter)
        recipients.add(inviter)
    facts = facts_of(
        uow, program_id=program_id, member_ids=recipients, at=event.occurred_at,
        day=core.local_day(event.occurred_at, zone),
        rule_codes=[r.spec.code for r in candidates if r.spec.caps.per_member],
    )  # fmt: skip
    terms = _Terms(uow, program_id, zone).at(event.occurred_at)
    budgeted = sorted(_budgeted(candidates, terms.caps))
    spent = rules_service.budgets_spent(uow, program_id=program_id, codes=budgeted, lock=False)
    budgets = core.Budgets(by_rule=spent, program=spent.get(rules_service.PROGRAM_BUDGET, 0))
    return core.evaluate(core_event, rules, terms, facts, budgets)


def _member_id(uow: UnitOfWork, program_id: int, event: EventIn) -> int:
    """The event's member, of this programme."""
    if event.member_id is not None:
        members_service.require_member(uow, program_id=program_id, member_id=event.member_id)
        return event.member_id
    assert event.member_ref is not None
    return members_service.find_member(uow, program_id=program_id, external_ref=event.member_ref).id


def _store_awards(
    uow: UnitOfWork,
    program_id: int,
    event_id: int,
    awards: list[tuple[core.Award, int, str | None, int | None, int | None]],
    day: date,
) -> list[AwardRead]:
    """Each (award, points posted, cap that bit, posting, award it reverses), in one go;
    the awards as an answer shows them."""
    rows = _award_rows(program_id, event_id, day, awards)
    if rows:
        uow.conn.execute(event_awards.insert(), rows)
    return [_award_read(row) for row in rows]


def _actor(source: str) -> str:
    """Who posts an event's earnings: jifen itself for the events it raises, else the rules."""
    return points_service.SYSTEM if source == OWN_SOURCE else ACTOR


def _award_rows(
    program_id: int,
    event_id: int,
    day: date,
    awards: list[tuple[core.Award, int, str | None, int | None, int | None]],
) -> list[dict[str, Any]]:
    return [
        {
            "event_id": event_id,
            "program_id": program_id,
            "member_id": award.member_id,
            "rule_code": award.rule,
            "rule_version": award.version,
            "kind": award.kind,
            "wanted": award.wanted,
            "points": points,
            "cap": cap,
            "held": award.held,
            "posting_id": posting_id,
            "reverses_id": reverses_id,
            "local_day": day,
            "detail": _plain(award.detail),
        }
        for award, points, cap, posting_id, reverses_id in awards
    ]


def _award_read(row: Mapping[str, Any] | RowMapping) -> AwardRead:
    return AwardRead(
        rule=row["rule_code"],
        version=row["rule_version"],
        kind=row["kind"],
        member_id=row["member_id"],
        points=int(row["points"]),
        wanted=int(row["wanted"]),
        cap=row["cap"],
        held=bool(row["held"]),
        posting_id=row["posting_id"],
        detail=dict(row["detail"] or {}),
    )


_NATIVE = (str, int, float, bool, type(None))
_EXACTLY_NATIVE = frozenset(_NATIVE)
"""The types of :data:`_NATIVE` themselves: a value of one is kept without a call."""


def _plain(value: Any) -> Any:
    """An award's detail as JSON values (as ``json`` would write and read it back, sets
    sorted, anything else as its text), without writing it out."""
    if isinstance(value, _NATIVE):
        return value
    if isinstance(value, Mapping):
        # Most values of a detail are numbers and texts: kept as they are, with no call.
        return {
            k if type(k) is str else _key(k): v if type(v) in _EXACTLY_NATIVE else _plain(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(_plain(v) for v in value)
    return str(value)


def _key(key: Any) -> str:
    """A mapping's key as JSON writes it."""
    if isinstance(key, str):
        return key
    return json.dumps(key) if isinstance(key, _NATIVE) else str(key)


def _set_outcome(uow: UnitOfWork, event_id: int, total: int, skipped: list[dict[str, str]]) -> None:
    """Keep on the event what it posted and why the other rules did not fire."""
    if total or skipped:
        uow.conn.execute(
            events.update().where(events.c.id == event_id).values(points=total, skipped=skipped)
        )


def _paid_order(
    uow: UnitOfWork, program_id: int, order_id: str, member_id: int, merchant: str | None
) -> Row[Any] | None:
    """The ``order.paid`` event of the order a refund names, of the merchant it is sent
    for. One sent for no merchant (programme-wide credentials, a stream) finds the order
    sent for no merchant by that id, or else the member's order by that id of whichever
    merchant sent it; should several merchants' orders of the member carry the id, it is
    refused: which order is meant needs the merchant."""
    found = uow.conn.execute(
        select(events).where(
            events.c.program_id == program_id,
            events.c.subject == order_subject(merchant, order_id),
            events.c.type == "order.paid",
        )
    ).first()
    if merchant is not None or found is not None:
        return found
    # The merchants' orders by that id are looked for among the member's own events (its
    # index), not through the whole programme: an order of another member is not the one
    # this refund can take points back from.
    theirs = uow.conn.execute(
        select(events).where(
            events.c.member_id == member_id,
            events.c.program_id == program_id,
            events.c.type == "order.paid",
            events.c.merchant.is_not(None),
            events.c.payload["order_id"].as_string() == order_id,
        )
    ).all()
    if len(theirs) > 1:
        merchants = ", ".join(sorted(repr(row.merchant) for row in theirs))
        raise InvalidInput(
            field="payload.order_id",
            problem=f"order {order_id!r} was paid through several merchants ({merchants}); "
            "send the refund with the credentials of the merchant whose order it is",
            problem_zh=f"订单 {order_id!r} 在多个商户下支付过({merchants});"
            "请使用该订单所属商户的凭据发送退款",
        )
    return theirs[0] if theirs else None


def _refund(
    uow: UnitOfWork,
    program_id: int,
    event_id: int,
    event: core.Event,
    zone: ZoneInfo,
    origin: Origin,
) -> tuple[list[AwardRead], int, dict[str, int]]:
    """Take back the order's points in the proportion of the money refunded so far, and give
    back to the budgets what is taken back. A refund sent for a merchant (or a store of it)
    refunds only an order paid through it: another merchant's order is not one it has seen.
    Returns the awards, the points and what each budget got back."""
    refund = OrderRefunded.model_validate(event.payload)
    merchant, store = origin
    order = _paid_order(uow, program_id, refund.order_id, event.member_id, merchant)
    if order is None or (store is not None and order.store != store):
        raise OrderNotSeen(order_id=refund.order_id)
    if order.member_id != event.member_id:
        raise InvalidInput(
            field="member",
            problem=f"order {refund.order_id!r} belongs to another member",
            problem_zh=f"订单 {refund.order_id!r} 属于另一位会员",
        )
    # Money by sku: what the order paid (lines bought with points earned nothing), and what
    # the refunds so far, this one included, gave back.
    paid_by_sku: dict[str, int] = {}
    for bought in OrderPaid.model_validate(order.payload).lines:
        if not bought.paid_with_points:
            paid_by_sku[bought.sku] = paid_by_sku.get(bought.sku, 0) + bought.amount_fen
    paid = sum(paid_by_sku.values())
    refunded_by_sku: dict[str, int] = {}
    earlier_whole = False
    earlier_refunds = uow.conn.execute(
        select(events.c.payload).where(
            events.c.program_id == program_id,
            events.c.subject == order.subject,
            events.c.type == "order.refunded",
            events.c.id != event_id,
        )
    ).scalars()
    for earlier_payload in earlier_refunds:
        before = OrderRefunded.model_validate(earlier_payload)
        earlier_whole = earlier_whole or before.whole
        for back in before.lines:
            refunded_by_sku[back.sku] = refunded_by_sku.get(back.sku, 0) + back.amount_fen
    earlier = paid if earlier_whole else min(paid, sum(refunded_by_sku.values()))
    for index, line in enumerate(refund.lines):
        if line.sku not in paid_by_sku:
            raise InvalidInput(
                field=f"payload.lines.{index}.sku",
                problem=f"{line.sku!r} is not a line of order {refund.order_id!r} paid in money",
                problem_zh=f"{line.sku!r} 不是订单 {refund.order_id!r} 中以现金支付的商品行",
            )
        refunded_by_sku[line.sku] = refunded_by_sku.get(line.sku, 0) + line.amount_fen
        if refunded_by_sku[line.sku] > paid_by_sku[line.sku]:
            raise InvalidInput(
                field=f"payload.lines.{index}.amount_fen",
                problem=f"refunds of {line.sku!r} would come to {refunded_by_sku[line.sku]} "
                f"fen, more than the {paid_by_sku[line.sku]} it cost",
                problem_zh=f"{line.sku!r} 的累计退款将达 {refunded_by_sku[line.sku]} 分,"
                f"超过其实付的 {paid_by_sku[line.sku]} 分",
            )
    everything = refund.whole or earlier_whole
    if everything:
        refunded_by_sku = dict(paid_by_sku)
    amount = paid - earlier if refund.whole else sum(line.amount_fen for line in refund.lines)
    # A whole refund of an order paid wholly in points gives no money back, yet takes back
    # whatever the order earned.
    in_points = paid == 0 and refund.whole and not earlier_whole
    if not in_points and (amount <= 0 or earlier >= paid):
        raise InvalidInput(
            field="payload",
            problem=f"order {refund.order_id!r} has nothing left to refund",
            problem_zh=f"订单 {refund.order_id!r} 已无可退款的金额",
        )
    # The refund happens to the order it found: a refund sent for no merchant of a
    # merchant's order takes that order's subject, where the next refunds look.
    uow.conn.execute(
        events.update()
        .where(events.c.id == event_id)
        .values(amount_fen=amount, subject=order.subject)
    )
    originals = uow.conn.execute(
        select(event_awards).where(
            event_awards.c.event_id == order.id,
            event_awards.c.reverses_id.is_(None),
            event_awards.c.posting_id.is_not(None),
        )
    ).all()
    taken = (
        dict(
            uow.conn.execute(
                select(event_awards.c.reverses_id, func.sum(event_awards.c.points))
                .where(event_awards.c.reverses_id.in_([o.id for o in originals]))
                .group_by(event_awards.c.reverses_id)
            ).all()
        )
        if originals
        else {}
    )
    dues: list[tuple[Row[Any], int]] = []
    for original in originals:
        # An award weighs its lines as it was computed (points by sku for a spend rate and
        # what multiplies it), any other award by the money of each line.
        weights = (original.detail or {}).get("weights") or paid_by_sku
        share = (
            Fraction(1)
            if everything
            else core.refunded_share(weights, paid_by_sku, refunded_by_sku)
        )
        due = core.reversal_due(
            awarded=int(original.points),
            eligible_fen=share.denominator,
            refunded_fen=share.numerator,
            already_reversed=-int(taken.get(original.id) or 0),
        )
        if due > 0:
            dues.append((original, due))
    # One claw-back a posting (the order's points of one member), the awards it covers kept.
    reversals: dict[int, int] = {}
    reversed_: list[tuple[PostingRead, str | None, str | None]] = []
    for posting_id in sorted({int(o.posting_id) for o, _ in dues}):
        reversal = points_service.reverse(
            uow,
            earn_id=posting_id,
            key=f"event:{event_id}:reverse:{posting_id}",
            amount=sum(due for o, due in dues if o.posting_id == posting_id),
            reason=f"order {refund.order_id} refunded",
            actor=ACTOR,
        )
        reversals[posting_id] = reversal.id
        reversed_.append((reversal, *origin))
    notify_service.announce_postings(uow, program_id=program_id, postings=reversed_)
    # A reversal counts on the day of the award it takes back, so that a refund gives no
    # room under today's caps (nor the lifetime's) to earn again.
    stored: list[AwardRead] = []
    for original_day in sorted({o.local_day for o, _ in dues}):
        stored += _store_awards(
            uow,
            program_id,
            event_id,
            [
                (
                    core.Award(
                        rule=o.rule_code,
                        version=o.rule_version,
                        kind="reversal",
                        member_id=o.member_id,
                        points=-due,
                        wanted=-due,
                        detail={"order_id": refund.order_id, "refunded_fen": amount},
                    ),
                    -due,
                    None,
                    reversals[int(o.posting_id)],
                    o.id,
                )
                for o, due in dues
                if o.local_day == original_day
            ],
            original_day,
        )
    total = -sum(due for _, due in dues)
    _set_outcome(uow, event_id, total, [])
    return stored, total, _give_back(uow, program_id, dues, order.occurred_at)


def _counted_in(detail: Mapping[str, Any], budgets: Sequence[str]) -> dict[str, Any]:
    """An award's ``detail`` with the budgets its points counted in when they were posted
    (:data:`BUDGETS`), which a refund gives back to."""
    return {**detail, BUDGETS: list(budgets)}


BUDGETS = "budgets"
"""The key of an award's detail naming the budgets its points counted in: the rule's code,
``*`` for the programme's (none: it counted in none)."""


def _give_back(
    uow: UnitOfWork, program_id: int, dues: Sequence[tuple[Row[Any], int]], paid_at: datetime
) -> dict[str, int]:
    """Give back what a refund took back to the budgets the awards counted in, as each
    award records (:data:`BUDGETS`); never below nothing. An award stored before awards
    recorded them counted in its rule's budget where the rule's version live at the
    order's time (``paid_at``) had one, and in the programme's where the caps in force then
    had one. The rows are held already: a batch with a refund holds them all. Returns what
    each budget got back."""
    counted_then: set[str] | None = None
    taken: dict[str, int] = {}
    for original, due in dues:
        recorded = (original.detail or {}).get(BUDGETS)
        if recorded is None:
            if counted_then is None:
                counted_then = _budgeted_at(uow, program_id, paid_at)
            recorded = [
                code
                for code in (original.rule_code, rules_service.PROGRAM_BUDGET)
                if code in counted_then
            ]
        for code in recorded:
            taken[code] = taken.get(code, 0) + due
    if not taken:
        return {}
    spent = rules_service.budgets_spent(uow, program_id=program_id, codes=sorted(taken), lock=False)
    back = {code: min(taken[code], amount) for code, amount in spent.items() if amount > 0}
    rules_service.add_to_budgets(
        uow, program_id=program_id, spent={code: -amount for code, amount in back.items()}
    )
    return back


def _budgeted(rules: Iterable[core.Rule], caps: ProgramCaps) -> set[str]:
    """The budgets an award under ``rules`` and ``caps`` (those of its time) counts in: its
    rule's where the rule's version has one, ``*`` where the caps have one."""
    counted = {rule.spec.code for rule in rules if rule.spec.caps.budget is not None}
    if caps.budget is not None:
        counted.add(rules_service.PROGRAM_BUDGET)
    return counted


def _budgeted_at(uow: UnitOfWork, program_id: int, moment: datetime) -> set[str]:
    """The budgets an award made at ``moment`` counted in (:func:`_budgeted`)."""
    rules = rules_service.rules_at(uow, program_id=program_id, moment=moment).rules
    return _budgeted(rules, rules_service.caps_at(uow, program_id=program_id, at=moment).caps)


# --------------------------------------------------------------------------- reading


def get_event(
    uow: UnitOfWork,
    *,
    program_id: int,
    event_id: int,
    merchant: str | None = None,
    store: str | None = None,
) -> EventResult:
    """An event and its awards. ``merchant`` and ``store``: the scope of the credentials
    asking, which see only the events made for it (another's is unknown to them)."""
    row = uow.conn.execute(
        select(events).where(
            events.c.id == event_id, events.c.program_id == program_id,
            *_made_for(merchant, store),
        )
    ).one_or_none()  # fmt: skip
    if row is None:
        raise UnknownEvent(event_id=event_id)
    return _result(uow, row, replayed=False)


def _made_for(merchant: str | None, store: str | None) -> list[ColumnElement[bool]]:
    """Conditions keeping the events made for a merchant and store (None: any)."""
    where = []
    if merchant is not None:
        where.append(events.c.merchant == merchant)
    if store is not None:
        where.append(events.c.store == store)
    return where


def _result(uow: UnitOfWork, row: Row[Any], *, replayed: bool) -> EventResult:
    awards = uow.conn.execute(
        select(event_awards).where(event_awards.c.event_id == row.id).order_by(event_awards.c.id)
    ).all()
    return _result_of(row, [_award_read(a._mapping) for a in awards], replayed=replayed)


def _result_of(row: Row[Any], awards: list[AwardRead], *, replayed: bool) -> EventResult:
    """A stored event's result, with its awards."""
    return EventResult(
        id=row.id,
        source=row.source,
        external_id=row.external_id,
        type=row.type,
        member_id=row.member_id,
        occurred_at=row.occurred_at,
        points=int(row.points),
        awards=awards,
        skipped=list(row.skipped or []),
        replayed=replayed,
    )


# --------------------------------------------------------------------------- held awards


def held_awards(
    uow: UnitOfWork,
    *,
    program_id: int,
    after_id: int = 0,
    limit: int = 50,
    merchant: str | None = None,
    store: str | None = None,
) -> list[HeldAward]:
    """The programme's awards waiting for a reviewer (reviewed rules'), oldest first, after
    the award ``after_id``; those of the events made for ``merchant`` and ``store`` only,
    when given."""
    rows = uow.conn.execute(
        _HELD.where(
            event_awards.c.program_id == program_id,
            event_awards.c.held.is_(True),
            event_awards.c.decision.is_(None),
            event_awards.c.id > after_id,
            *_made_for(merchant, store),
        )
        .order_by(event_awards.c.id)
        .limit(limit)
    ).all()
    return [_held(row) for row in rows]


def approve_award(
    uow: UnitOfWork, *, program_id: int, award_id: int, decided_by: str,
    decider_member: int | None = None, points: int | None = None, note: str = "",
    merchant: str | None = None, store: str | None = None,
) -> HeldAward:  # fmt: skip
    """A reviewer's yes to a held award: it posts through the ledger, once, what it asks
    (or the smaller ``points``), never more than its rule's maximum, capped as any award of
    its day is (tier, rule and budgets, by the caps of its event's time). The one who sent
    its event, or its member, cannot approve it; a reviewer scoped to a merchant or store,
    one of another's event."""
    row = _pending(uow, program_id, award_id, decided_by, decider_member, merchant, store)
    spec = _spec_of(uow, program_id, row.rule_code, row.rule_version)
    params = spec.params
    assert isinstance(params, Reviewed)
    wanted = int(row.wanted) if points is None else points
    if wanted > int(row.wanted):
        raise InvalidInput(
            field="points",
            problem=f"award {award_id} asks for {int(row.wanted)} points; {wanted} is more",
            problem_zh=f"奖励 {award_id} 申请 {int(row.wanted)} 积分,{wanted} 超出",
        )
    if wanted > params.max_points:
        raise InvalidInput(
            field="points",
            problem=f"rule {row.rule_code} awards at most {params.max_points} points; "
            f"{wanted} is more",
            problem_zh=f"规则 {row.rule_code} 单次最多奖励 {params.max_points} 积分,{wanted} 超出",
        )
    member_id = int(row.member_id)
    members_service.lock_members(uow, member_ids=[member_id])
    profile = members_service.rule_facts(uow, program_id=program_id, member_ids=[member_id])
    members_service.require_active(profile[member_id])
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    facts = facts_of(
        uow, program_id=program_id, member_ids=[member_id], at=row.occurred_at,
        day=row.local_day,
        rule_codes=[row.rule_code] if spec.caps.per_member else [],
    )  # fmt: skip
    terms = _Terms(uow, program_id, zone).at(row.occurred_at)
    budgeted = [row.rule_code] if spec.caps.budget is not None else []
    if terms.caps.budget is not None:
        budgeted.append(rules_service.PROGRAM_BUDGET)
    spent = rules_service.budgets_spent(uow, program_id=program_id, codes=budgeted, lock=True)
    asked = core.Award(
        rule=row.rule_code, version=row.rule_version, kind=row.kind, member_id=member_id,
        points=wanted, wanted=wanted, detail=dict(row.detail or {}),
    )  # fmt: skip
    released = core.release(
        asked, spec, _stored_event(row), terms, facts,
        core.Budgets(by_rule=spent, program=spent.get(rules_service.PROGRAM_BUDGET, 0)),
    )  # fmt: skip
    now = uow.clock.now()
    detail = {**(row.detail or {}), **({"note": note} if note else {})}
    if released.points > 0:
        detail = _counted_in(detail, budgeted)
    _decide(uow, award_id, "approved", decided_by, now, points=released.points,
            wanted=wanted, cap=released.cap, detail=detail)  # fmt: skip
    if released.points > 0:
        tier = tiers_service.tiers_of(uow, member_ids=[member_id]).get(member_id)
        posting = points_service.earn(
            uow, member_id=member_id, amount=released.points, key=f"award:{award_id}",
            expires_at=expiry_service.lot_expiry(
                uow, program_id=program_id, start=now, tier=tier
            ),
            reason=f"{row.type} {row.source}:{row.external_id}: {row.rule_code} "
            f"{released.points}, approved",
            actor=decided_by,
        )  # fmt: skip
        points_service.record_origins(uow, [(posting.id, row.merchant, row.store)])
        notify_service.announce_postings(
            uow, program_id=program_id, postings=[(posting, row.merchant, row.store)]
        )
        uow.conn.execute(
            event_awards.update().where(event_awards.c.id == award_id).values(posting_id=posting.id)
        )
        uow.conn.execute(
            events.update()
            .where(events.c.id == row.event_id)
            .values(points=events.c.points + released.points)
        )
        # An earning like any other: its points may take the member over a threshold.
        tiers_service.after_earning(uow, program_id=program_id, member_ids=[member_id], now=now)
        rules_service.add_to_budgets(
            uow, program_id=program_id, spent=dict.fromkeys(budgeted, released.points)
        )
    return _held_award(uow, award_id)


def reject_award(
    uow: UnitOfWork, *, program_id: int, award_id: int, decided_by: str,
    decider_member: int | None = None, note: str = "",
    merchant: str | None = None, store: str | None = None,
) -> HeldAward:  # fmt: skip
    """A reviewer's no to a held award: nothing posts, the decision is kept."""
    row = _pending(uow, program_id, award_id, decided_by, decider_member, merchant, store)
    detail = {**(row.detail or {}), **({"note": note} if note else {})}
    _decide(uow, award_id, "rejected", decided_by, uow.clock.now(), points=0,
            wanted=int(row.wanted), cap=None, detail=detail)  # fmt: skip
    return _held_award(uow, award_id)


_HELD = select(
    event_awards,
    events.c.type,
    events.c.source,
    events.c.external_id,
    events.c.occurred_at,
    events.c.payload,
    events.c.merchant,
    events.c.store,
    events.c.sent_by,
).join(events, events.c.id == event_awards.c.event_id)


def _pending(
    uow: UnitOfWork,
    program_id: int,
    award_id: int,
    decided_by: str,
    decider_member: int | None,
    merchant: str | None = None,
    store: str | None = None,
) -> Row[Any]:
    """The held award to decide: UnknownAward when there is none of that id (or its event
    was made for another merchant or store than the decider's scope), StateConflict when it
    was decided, Forbidden when it is the decider's own."""
    row = uow.conn.execute(
        _HELD.where(
            event_awards.c.id == award_id,
            event_awards.c.program_id == program_id,
            (event_awards.c.held.is_(True)) | (event_awards.c.decision.is_not(None)),
            *_made_for(merchant, store),
        )
    ).one_or_none()
    if row is None:
        raise UnknownAward(award_id=award_id)
    if row.decision is not None:
        raise StateConflict(
            problem=f"Award {award_id} was {row.decision} by {row.decided_by} already.",
            problem_zh=f"奖励 {award_id} 已由 {row.decided_by} 审核({row.decision})。",
        )
    if decided_by == row.sent_by or decider_member == row.member_id:
        raise Forbidden(
            problem=f"Award {award_id} is your own (you sent its event, or it is yours); "
            "another person must decide it.",
            problem_zh=f"奖励 {award_id} 与您本人有关(由您发送的事件产生,或奖励给您),"
            "须由他人审核。",
        )
    return row


def _decide(
    uow: UnitOfWork, award_id: int, decision: str, decided_by: str, at: datetime, **values: Any
) -> None:
    """Record the decision, from held only: of two reviewers deciding at once, one matches
    nothing and is refused (the award posts once)."""
    moved = uow.conn.execute(
        event_awards.update()
        .where(
            event_awards.c.id == award_id,
            event_awards.c.held.is_(True),
            event_awards.c.decision.is_(None),
        )
        .values(held=False, decision=decision, decided_by=decided_by, decided_at=at, **values)
    ).rowcount
    if moved != 1:
        raise StateConflict(
            problem=f"Award {award_id} was decided meanwhile; read it again.",
            problem_zh=f"奖励 {award_id} 刚被他人审核,请重新读取。",
        )


def _spec_of(uow: UnitOfWork, program_id: int, code: str, version: int) -> RuleSpec:
    """The spec of a rule version, by its code and version number."""
    for rule, _, _ in rules_service.live_periods(uow, program_id=program_id):
        if rule.spec.code == code and rule.version == version:
            return rule.spec
    found = rules_service.list_versions(uow, program_id=program_id, code=code, limit=1000)
    for read in found:
        if read.version == version:
            return read.spec
    raise UnknownAward(award_id=f"{code} v{version}")


def _held_award(uow: UnitOfWork, award_id: int) -> HeldAward:
    return _held(uow.conn.execute(_HELD.where(event_awards.c.id == award_id)).one())


def _held(row: Row[Any]) -> HeldAward:
    return HeldAward(
        id=row.id, event_id=row.event_id, event_type=row.type, source=row.source,
        external_id=row.external_id, member_id=row.member_id, rule=row.rule_code,
        version=row.rule_version, wanted=int(row.wanted), points=int(row.points), cap=row.cap,
        local_day=row.local_day, detail=dict(row.detail or {}), decision=row.decision,
        decided_by=row.decided_by, decided_at=row.decided_at, posting_id=row.posting_id,
    )  # fmt: skip


# --------------------------------------------------------------------------- birthdays


def raise_birthdays(db: Database, *, program_id: int, day: date, chunk: int = 500) -> int:
    """Send ``member.birthday`` for every active member born on ``day`` (in the programme's
    calendar; those born on 29 February on the 28th in other years), at the start of that
    day, a chunk of members a transaction. Keyed by member and year: running it again for
    the same day raises nothing new. Returns the events raised this time."""
    zone = ZoneInfo(db.run(lambda uow: programs_service.time_zone(uow, program_id=program_id)))
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    days = {day.day}
    if day.month == 2 and day.day == 28 and not calendar.isleap(day.year):
        days.add(29)
    raised, after = 0, 0
    while True:

        def one_chunk(uow: UnitOfWork, after: int = after) -> tuple[int, int | None]:
            ids = members_service.born_on(
                uow, program_id=program_id, month=day.month, days=days, after_id=after,
                limit=chunk,
            )  # fmt: skip
            wishes = [
                EventIn(
                    source=OWN_SOURCE, external_id=f"birthday:{member_id}:{day.year}",
                    type="member.birthday", occurred_at=start, member_id=member_id,
                    payload={"year": day.year},
                )
                for member_id in ids
            ]  # fmt: skip
            made = 0
            for outcome in ingest_many(uow, program_id=program_id, events=wishes):
                if isinstance(outcome, JifenError):
                    continue  # refused alone (sent already by another source): the rest go on
                if isinstance(outcome, Exception):
                    raise outcome
                made += not outcome.replayed
            return made, (ids[-1] if len(ids) == chunk else None)

        made, after_next = db.run(one_chunk)
        raised += made
        if after_next is None:
            return raised
        after = after_next


# --------------------------------------------------------------------------- backtest

_BACKTEST_CHUNK = 1000


def backtest(uow: UnitOfWork, *, program_id: int, request: BacktestIn) -> BacktestReport:
    """What the stored events of a period would have earned under a proposed change of the
    rules, against what they did earn: per rule, per tier, per day and per member. Nothing
    is stored or posted; events are read a chunk at a time."""
    proposed_specs = request.rules
    replacing = {spec.code for spec in proposed_specs} | set(request.drop)
    proposed_rules = [rules_service.compile_rule(spec, version=0) for spec in proposed_specs]
    live = rules_service.activations(uow, program_id=program_id)
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    terms = _Terms(uow, program_id, zone)  # the caps of each event's time, as events meet
    sums: dict[str, dict[str, Compared]] = {"rule": {}, "tier": {}, "day": {}, "member": {}}
    replay = _Replay(uow, program_id, request.since, zone)
    total_actual = total_proposed = replayed = 0
    after: tuple[datetime, int] | None = None
    while True:
        query = select(events).where(
            events.c.program_id == program_id,
            events.c.occurred_at >= request.since,
            events.c.occurred_at < request.until,
            events.c.type != "order.refunded",
        )
        if after is not None:
            query = query.where(
                (events.c.occurred_at > after[0])
                | ((events.c.occurred_at == after[0]) & (events.c.id > after[1]))
            )
        chunk = uow.conn.execute(
            query.order_by(events.c.occurred_at, events.c.id).limit(_BACKTEST_CHUNK)
        ).all()
        if not chunk:
            break
        after = (chunk[-1].occurred_at, chunk[-1].id)
        actual_awards = _actual_awards(uow, [row.id for row in chunk])
        for row in chunk:
            replayed += 1
            moment = row.occurred_at
            live_now = [
                r for r, start, end in live if start <= moment and (not end or moment < end)
            ]
            rule_set = core.RuleSet(
                [r for r in live_now if r.spec.code not in replacing] + proposed_rules
            )
            event = _stored_event(row)
            facts = replay.facts(event, rule_set)
            program = terms.at(moment)
            result = core.evaluate(event, rule_set, program, facts, replay.budgets)
            replay.record(event, result, rule_set, program)
            day = core.local_day(moment, zone).isoformat()
            for award in result.awards:
                if award.held or not award.points:
                    continue
                tier = facts[award.member_id].tier or "-"
                for kind, key in (
                    ("rule", award.rule),
                    ("tier", tier),
                    ("day", day),
                    ("member", str(award.member_id)),
                ):
                    sums[kind].setdefault(key, Compared(key=key)).proposed += award.points
                total_proposed += award.points
            for member_id, rule, points in actual_awards.get(row.id, []):
                tier = replay.tier(member_id, moment)
                for kind, key in (
                    ("rule", rule),
                    ("tier", tier),
                    ("day", day),
                    ("member", str(member_id)),
                ):
                    sums[kind].setdefault(key, Compared(key=key)).actual += points
                total_actual += points
    members = sorted(sums["member"].values(), key=lambda c: (-abs(c.difference), c.key))
    return BacktestReport(
        events=replayed,
        actual=total_actual,
        proposed=total_proposed,
        by_rule=sorted(sums["rule"].values(), key=lambda c: c.key),
        by_tier=sorted(sums["tier"].values(), key=lambda c: c.key),
        by_day=sorted(sums["day"].values(), key=lambda c: c.key),
        members=[m for m in members[: request.top] if m.difference],
        notes=[
            "Members are taken at the tier they held when each event happened, and at their "
            "current profile.",
            "Caps, budgets and streaks count from the start of the period.",
            "Refunds are not replayed; actual points are those first awarded, before refunds.",
        ],
    )


def _stored_event(row: Row[Any]) -> core.Event:
    request = EventIn(
        source=row.source,
        external_id=row.external_id,
        type=row.type,
        occurred_at=row.occurred_at,
        member_id=row.member_id,
        payload=row.payload,
    )
    return to_core_event(request, row.member_id, row.payload)


def _actual_awards(uow: UnitOfWork, event_ids: list[int]) -> dict[int, list[tuple[int, str, int]]]:
    rows = uow.conn.execute(
        select(
            event_awards.c.event_id,
            event_awards.c.member_id,
            event_awards.c.rule_code,
            event_awards.c.points,
        ).where(
            event_awards.c.event_id.in_(event_ids),
            event_awards.c.held.is_(False),
            event_awards.c.reverses_id.is_(None),
        )
    ).all()
    found: dict[int, list[tuple[int, str, int]]] = {}
    for event_id, member_id, rule, points in rows:
        found.setdefault(event_id, []).append((member_id, rule, int(points)))
    return found


class _Replay:
    """The members' facts as the replay goes: profiles as they are now, tiers as they were
    at each event's time (as the earning read them), counts of earlier events, and streaks,
    usage and budgets counted within the replay."""

    def __init__(self, uow: UnitOfWork, program_id: int, since: datetime, zone: ZoneInfo) -> None:
        self.uow = uow
        self.zone = zone
        self.program_id = program_id
        self.since = since
        self.known: dict[int, core.Facts] = {}
        self.tiers: dict[int, TierTimeline] = {}
        self.usage: dict[tuple[int, str, str], int] = {}
        self.budgets = core.Budgets(by_rule={}, program=0)

    def tier(self, member_id: int, moment: datetime) -> str:
        """The member's tier at ``moment`` (no earlier than the replay's start), ``-`` for
        none."""
        if member_id not in self.tiers:
            self._load([member_id])
        return self.tiers[member_id].at(moment) or "-"

    def _load(self, member_ids: list[int]) -> None:
        missing = [m for m in member_ids if m not in self.known]
        if not missing:
            return
        timelines = tiers_service.tier_timelines(self.uow, since=dict.fromkeys(missing, self.since))
        profiles = members_service.rule_facts(
            self.uow, program_id=self.program_id, member_ids=missing
        )
        before = self.uow.conn.execute(
            select(events.c.member_id, events.c.type, func.count())
            .where(events.c.member_id.in_(missing), events.c.occurred_at < self.since)
            .group_by(events.c.member_id, events.c.type)
        ).all()
        counts: dict[int, dict[str, int]] = {}
        for member_id, kind, count in before:
            counts.setdefault(member_id, {})[kind] = int(count)
        for member_id in missing:
            profile = profiles.get(member_id)
            self.tiers[member_id] = timelines[member_id]
            self.known[member_id] = core.Facts(
                member_id=member_id,
                tier=timelines[member_id].at(self.since),
                state=profile.state if profile else "active",
                tags=frozenset(profile.tags) if profile else frozenset(),
                registered_at=profile.created_at if profile else None,
                region=profile.region if profile else None,
                birthday=profile.birthday if profile else None,
                counts={**NO_COUNTS, **counts.get(member_id, {})},
            )

    def _buckets(self, moment: datetime) -> dict[str, str]:
        """The period each cap counts over, for an event at ``moment`` (programme days)."""
        day = core.local_day(moment, self.zone)
        year, week, _ = day.isocalendar()
        return {
            "day": f"day:{day}",
            "week": f"week:{year}-{week}",
            "month": f"month:{day:%Y-%m}",
            "lifetime": "lifetime",
        }

    def facts(self, event: core.Event, rules: core.RuleSet) -> dict[int, core.Facts]:
        ids = [event.member_id]
        inviter = event.payload.get("inviter_member_id")
        if isinstance(inviter, int):
            ids.append(inviter)
        self._load(ids)
        buckets = self._buckets(event.occurred_at)
        codes = {rule.spec.code for rule in rules.by_type.get(event.type, [])}
        out = {}
        for member_id in ids:
            by_rule = {
                (code, period): self.usage.get((member_id, code, bucket), 0)
                for code in codes
                for period, bucket in buckets.items()
            }
            out[member_id] = replace(
                self.known[member_id],
                tier=self.tiers[member_id].at(event.occurred_at),
                usage=core.Usage(
                    day=self.usage.get((member_id, "*", buckets["day"]), 0),
                    month=self.usage.get((member_id, "*", buckets["month"]), 0),
                    by_rule=by_rule,
                ),
            )
        return out

    def record(
        self,
        event: core.Event,
        result: core.Evaluation,
        rules: core.RuleSet,
        program: core.Program,
    ) -> None:
        """Count ``result`` in the member's facts, usage and the budgets, as the live
        intake counts it: in a rule's budget where the rule's version (of ``rules``, those
        the event met) has one, in the programme's where the caps of the event's time
        (``program``) have one."""
        member = self.known[event.member_id]
        counts = dict(member.counts)
        counts[event.type] = counts.get(event.type, 0) + 1
        streaks = dict(member.streaks)
        for (member_id, kind), streak in result.streaks.items():
            if member_id == event.member_id:
                streaks[kind] = streak
        self.known[event.member_id] = replace(member, counts=counts, streaks=streaks)
        buckets = self._buckets(event.occurred_at)
        spent = dict(self.budgets.by_rule)
        total = self.budgets.program
        budgeted = _budgeted(rules.rules, program.caps)
        for award in result.awards:
            if award.held or not award.points:
                continue
            for slot in (
                (award.member_id, "*", buckets["day"]),
                (award.member_id, "*", buckets["month"]),
                *((award.member_id, award.rule, bucket) for bucket in buckets.values()),
            ):
                self.usage[slot] = self.usage.get(slot, 0) + award.points
            if award.rule in budgeted:
                spent[award.rule] = spent.get(award.rule, 0) + award.points
            if rules_service.PROGRAM_BUDGET in budgeted:
                total += award.points
        self.budgets = core.Budgets(by_rule=spent, program=total)


def last_own_events(uow: UnitOfWork, *, member_ids: Sequence[int]) -> dict[int, datetime]:
    """When each of ``member_ids`` last had an event of its own (one it sent or that
    happened to it, whatever it earned: a check-in, an order of excluded goods), not one
    jifen raised by itself (:data:`OWN_SOURCE`: a birthday). What dormancy counts as
    activity besides the member's postings. One statement: for each member its latest such
    event by the member index, which PostgreSQL reads backwards from the end, a row or two
    a member however long its history; members with none are left out."""
    if not member_ids:
        return {}
    latest = (
        select(func.max(events.c.occurred_at))
        .where(events.c.member_id == members.c.id, events.c.source != OWN_SOURCE)
        .scalar_subquery()
    )
    rows = uow.conn.execute(
        select(members.c.id, latest).where(among(uow.dialect, members.c.id, member_ids))
    ).all()
    return {int(member_id): when for member_id, when in rows if when is not None}


_REFUNDS_OF_ORDERS = "refunds-of-orders"
"""What :func:`spend_and_counts` calls its rows of refunds summed by their order's window
(never an event's type: a type has no '-')."""


def spend_and_counts(
    uow: UnitOfWork,
    *,
    member_ids: Iterable[int],
    since: datetime,
    until: datetime,
    counted_types: Iterable[str] = (),
) -> dict[int, tuple[int, int]]:
    """For each of ``member_ids``: the money its orders paid in (``since``, ``until``] less
    what refunds of those orders gave back up to ``until``, in fen, and how many events of
    ``counted_types`` it had then. A refund counts in the window of the order it refunds,
    not in its own: a refund in the window of an order paid before it is no spend of the
    window's to take back, and one after the window of an order in it is (until ``until``).
    One statement: the orders and counted events by their own time, and the refunds of the
    orders in the window joined to them by the order's subject (its index); members with
    nothing are left out."""
    ids = sorted(set(member_ids))
    if not ids:
        return {}
    counted = sorted(set(counted_types))
    own_time = (
        select(
            events.c.member_id, events.c.type, func.sum(events.c.amount_fen).label("fen"),
            func.count().label("seen"),
        )
        .where(
            among(uow.dialect, events.c.member_id, ids),
            events.c.occurred_at > since,
            events.c.occurred_at <= until,
            events.c.type.in_(sorted({"order.paid", *counted})),
        )
        .group_by(events.c.member_id, events.c.type)
    )  # fmt: skip
    order, refund = events.alias("paid_order"), events.alias("refund")
    refunded = (
        select(
            order.c.member_id, literal_column(f"'{_REFUNDS_OF_ORDERS}'"),
            func.sum(refund.c.amount_fen), func.count(),
        )
        .select_from(
            order.join(
                refund,
                (refund.c.program_id == order.c.program_id)
                & (refund.c.subject == order.c.subject)
                & (refund.c.type == "order.refunded"),
            )
        )
        .where(
            among(uow.dialect, order.c.member_id, ids),
            order.c.type == "order.paid",
            order.c.occurred_at > since,
            order.c.occurred_at <= until,
            refund.c.occurred_at <= until,
        )
        .group_by(order.c.member_id)
    )  # fmt: skip
    found: dict[int, tuple[int, int]] = {}
    for member_id, event_type, amount, count in uow.conn.execute(union_all(own_time, refunded)):
        spend, seen = found.get(int(member_id), (0, 0))
        if event_type == "order.paid":
            spend += int(amount or 0)
        elif event_type == _REFUNDS_OF_ORDERS:
            spend -= int(amount or 0)
        if event_type in counted:
            seen += int(count)
        found[int(member_id)] = (spend, seen)
    return found


# --------------------------------------------------------------------------- personal data


def erase_fingerprints(uow: UnitOfWork, *, program_id: int, member_id: int) -> int:
    """Seal (:func:`_sealed`) the fingerprints of the member's events not sealed yet: one
    stored before fingerprints were keyed digests its member reference (often a phone
    number) and payload unkeyed, so that a copy of the database could test guesses against
    it. The erasure does not wait for :func:`seal_fingerprints` to come by. The event sent
    again is still answered as before (a replay, or refused when its content differs).
    Those sealed already are left as they are, so that erasing again changes nothing. How
    many events changed."""
    rows = uow.conn.execute(
        select(events.c.id, events.c.request_hash).where(
            events.c.program_id == program_id,
            events.c.member_id == member_id,
            text(UNSEALED),  # as the partial index ix_events_unsealed spells it
        )
    ).all()
    _seal(uow, rows)
    return len(rows)


@dataclass(frozen=True, slots=True)
class Sealed:
    """What a chunk of :func:`seal_fingerprints` did."""

    sealed: int
    """The events whose fingerprint it sealed."""
    last_event_id: int | None
    """The id of the last of them (None: none was left after the cursor)."""


def seal_fingerprints(
    uow: UnitOfWork, *, program_id: int, after_event_id: int = 0, limit: int = 5000
) -> Sealed:
    """Seal (:func:`_sealed`) up to ``limit`` of the programme's events after
    ``after_event_id``, in id order, whose fingerprint is not sealed yet: a chunk of the job
    ``events.seal_fingerprints``, whose cursor is the last event id sealed.

    Those are the events stored before fingerprints were sealed: with the unkeyed SHA-256
    of their content, which digests nothing the row does not hold but the member reference
    (often a phone number), so that a copy of the database could find the reference by
    testing guesses of its digits; or with the bare keyed HMAC of the release in between.
    By value the two cannot be told apart, and need not be: sealed, either is still known
    when its event is sent again, and other content under its id refused
    (:func:`_same_event`).

    New events are stored sealed already, so that one run leaves no fingerprint unsealed,
    and the later (daily) runs have nothing to write but what a process of an earlier
    release stored meanwhile (during an upgrade) or a restored copy brought back: they read
    the programme's fingerprints and change nothing, instead of rewriting each day's new
    events, or keeping a mark of how far they went (which would pass over the events an
    earlier release commits late behind it). Running it again changes nothing; each chunk
    is one transaction."""
    rows = uow.conn.execute(
        select(events.c.id, events.c.request_hash)
        .where(
            events.c.program_id == program_id,
            events.c.id > after_event_id,
            text(UNSEALED),  # as the partial index ix_events_unsealed spells it
        )
        .order_by(events.c.id)
        .limit(limit)
    ).all()
    _seal(uow, rows)
    return Sealed(len(rows), rows[-1].id if rows else None)


def _seal(uow: UnitOfWork, rows: Sequence[Any]) -> None:
    """Store the events of ``rows`` (id, fingerprint) with their fingerprint sealed."""
    if rows:
        uow.conn.execute(
            events.update()
            .where(events.c.id == bindparam("event_id"))
            .values(request_hash=bindparam("sealed")),
            [{"event_id": row.id, "sealed": _sealed(row.request_hash)} for row in rows],
        )


def erase_personal_values(
    uow: UnitOfWork, *, program_id: int, member_id: int, values: Iterable[str]
) -> int:
    """Replace the member's personal ``values`` (its name, reference, email, birthday, phone
    and ID numbers, as they were before its erasure) in the payloads of its ``custom.*``
    events: the catalogue's own types carry no personal field, but a programme's own may
    (a name, a phone number). A text or number equal to one of them goes, and one
    holding one of at least 4 characters ("李雷 VIP", "tel:13800138000"); shorter ones are
    not looked for inside other texts, which they would match by chance. How many events
    changed."""
    scrub = PersonalValues(values)
    if not scrub:
        return 0
    rows = uow.conn.execute(
        select(events.c.id, events.c.payload).where(
            events.c.program_id == program_id,
            events.c.member_id == member_id,
            events.c.type.startswith("custom."),
        )
    ).all()
    changed = 0
    for row in rows:
        payload = scrub(row.payload)
        if payload != row.payload:
            uow.conn.execute(events.update().where(events.c.id == row.id).values(payload=payload))
            changed += 1
    return changed
