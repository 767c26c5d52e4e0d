"""HTTP routes of the members domain: registration, profiles, states, real-name binding and
family groups.

Personal numbers (phone, resident ID) appear masked everywhere except the identity route
and the personal-data export, which need ``members.pii`` (the export: or the member itself)
and leave an audit entry for every read by staff. A closed member's personal data is erased
on request (``members.erase``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from jifen.api import deps, problems
from jifen.api.deps import Context, Read, ReadOwn, Write, id_cursor, id_page
from jifen.api.schemas import LIMIT, NO_NUL, Instant
from jifen.auth import service as auth_service
from jifen.auth.core import Principal
from jifen.db.uow import UnitOfWork
from jifen.errors import Forbidden
from jifen.events import service as events_service
from jifen.members import core, service
from jifen.members.schemas import (
    Erasure,
    FamilyRead,
    IdentityBind,
    IdentityRead,
    MemberCreate,
    MemberPage,
    MemberProfile,
    MemberUpdate,
    PersonalData,
    PersonalPoints,
    State,
    StateChange,
)
from jifen.notify import service as notify_service
from jifen.points import service as points_service
from jifen.rewards import service as rewards_service

router = APIRouter(tags=["members"])

MEMBERS = "/programs/{program}/members"
MEMBER = f"{MEMBERS}/{{member_id}}"
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


PERSONAL = ("external_ref", "name", "email", "birthday", "gender", "region", "tags")
"""A member's personal fields (the phone and ID number are masked in every answer already)."""


def _audited(answer: dict[str, Any]) -> dict[str, Any]:
    """What an audit entry keeps of a member's answer (a profile, or one member of a family
    group): every personal field only as set or not. The log is hash-chained and cannot
    forget, and an erased member must leave nothing personal in it; which fields a write
    changed is recorded beside (``changed``)."""
    return {
        name: ("<set>" if value not in (None, "", []) else value) if name in PERSONAL else value
        for name, value in answer.items()
    }


def _audited_family(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "members": [_audited(member) for member in answer.get("members", [])]}


def _changed(before: MemberProfile, after: MemberProfile) -> list[str]:
    """The personal fields a write changed, by name."""
    return [name for name in PERSONAL if getattr(before, name) != getattr(after, name)]


NOT_STORED = "(not stored: another member's personal data)"
"""What a stored family answer (replayed for a repeated ``Idempotency-Key``) keeps of the
reference and name of a member other than the one the write names: a stored answer is found
and erased by the member it is about only."""


def _stored_family(member_id: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def stored(answer: dict[str, Any]) -> dict[str, Any]:
        kept = [
            member if member["member_id"] == member_id
            else {**member, "external_ref": NOT_STORED, "name": NOT_STORED}
            for member in answer.get("members", [])
        ]  # fmt: skip
        return {**answer, "members": kept}

    return stored


def _masked_ref(reference: str) -> str:
    """A member's reference as an audit entry's target names it: enough to tell entries
    apart, not to read a card or phone number back (``A1****89``)."""
    return reference[:2] + "****" + reference[-2:] if len(reference) > 6 else "****"


@router.post(MEMBERS, status_code=201, response_model=MemberProfile)
def register(
    program: str, body: MemberCreate, ctx: Annotated[Context, Depends(Write("members.write"))]
) -> JSONResponse:
    """Register a member and open its points account."""
    return ctx.execute(
        lambda uow: service.register(
            uow, program_id=ctx.program_id, body=body, by=ctx.principal.kind
        ),
        target=f"member-ref:{_masked_ref(body.external_ref)}",
        status=201,
        summary=_audited,
        member=lambda profile: profile.id,
    )


@router.get(MEMBERS, response_model=MemberPage)
def list_members(
    program: str,
    ctx: Annotated[Context, Depends(Read("members.read"))],
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, LIMIT] = 50,
    state: State | None = None,
    tag: Annotated[str | None, Query(max_length=32, pattern=r"^[\w.-]+$")] = None,
    region: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    external_ref: Annotated[str | None, Query(max_length=128, pattern=NO_NUL)] = None,
    phone: Annotated[str | None, Query(max_length=32, pattern=NO_NUL)] = None,
    since: Annotated[Instant | None, Query(description="Registered at or after.")] = None,
    until: Annotated[Instant | None, Query(description="Registered before.")] = None,
) -> MemberPage:
    """The programme's members in the order they registered; filter by state, tag, region,
    reference, phone number (found by its keyed hash) and registration time."""
    after = id_cursor(cursor)
    rows = ctx.db.run(
        lambda uow: service.list_members(
            uow, program_id=ctx.program_id, after_id=after, limit=limit + 1, state=state, tag=tag,
            region=region, external_ref=external_ref, phone=phone, since=since, until=until,
        ),
        read_only=True,
    )  # fmt: skip
    items, next_cursor = id_page(rows, limit)
    return MemberPage(items=items, next_cursor=next_cursor)


@router.get(MEMBER, response_model=MemberProfile)
def get_member(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Read("members.read"))]
) -> MemberProfile:
    """The member's profile, personal numbers masked."""
    return ctx.db.run(
        lambda uow: service.get_profile(uow, program_id=ctx.program_id, member_id=member_id),
        read_only=True,
    )


@router.patch(MEMBER, response_model=MemberProfile)
def update_member(
    program: str,
    member_id: Id,
    body: MemberUpdate,
    ctx: Annotated[Context, Depends(Write("members.write"))],
) -> JSONResponse:
    """Change profile fields. Any other field (state, phone, tier, balance) is refused. What
    the earning rules read is staff's to change: a member or an API key gives the birthday
    only while none is set; a member cannot change its tags, a key cannot set them. A
    closed member's profile is changed no more (409): its personal data may be erased."""

    def update(uow: UnitOfWork) -> MemberProfile:
        before, after = service.update_profile(
            uow, program_id=ctx.program_id, member_id=member_id, body=body,
            by=ctx.principal.kind,
        )  # fmt: skip
        ctx.audit_before = _audited(before.model_dump(mode="json"))
        changed[:] = _changed(before, after)
        return after

    changed: list[str] = []
    return ctx.execute(
        update,
        target=f"member:{member_id}",
        summary=lambda body: {**_audited(body), "changed": list(changed)},
    )


@router.post(f"{MEMBER}/state", response_model=MemberProfile)
def change_state(
    program: str,
    member_id: Id,
    body: StateChange,
    ctx: Annotated[Context, Depends(Write("members.state"))],
) -> JSONResponse:
    """Freeze, ban, close or reactivate a member (closed is final). Only an active member
    earns and spends; a banned or closed one is signed out at once.

    Closing settles the points by the programme's ``closing_policy``: ``forfeit`` (the
    default) clears them into the expired account by one expiry posting, ``refuse`` refuses
    to close an account still holding points. Closing is refused while points are frozen or
    a redemption is unfinished; a debt stays on the closed account. Points given back to a
    closed account later are forfeited at once, or the refund refused, by the same policy
    (see the programme settings). The audit entry's ``after`` carries the settlement.

    A freeze, ban or closing holds the member's points account: an earning, spend or
    transfer that reaches the account after it has committed is refused (409), however
    close behind it came. The audit entry's ``after`` carries the ``reason`` given."""
    settled: dict[str, Any] = {}

    def change(uow: UnitOfWork) -> MemberProfile:
        settled.clear()  # (a transaction run again starts afresh)
        move = service.change_state(
            uow, program_id=ctx.program_id, member_id=member_id, state=body.state,
            actor=ctx.actor,
        )  # fmt: skip
        if move.after.state in ("banned", "closed"):  # signed out everywhere, at once
            auth_service.end_member_sessions(uow, member_id=member_id)
        if move.settlement is not None:
            settled.update(asdict(move.settlement))
        ctx.audit_before = {"state": move.before.state}
        return move.after

    def summary(answer: dict[str, Any]) -> dict[str, Any]:
        # The reason given is the change's own record: the entry is where staff read why a
        # member was frozen, banned or closed.
        audited = {**_audited(answer), "reason": body.reason}
        return {**audited, "settlement": dict(settled)} if settled else audited

    return ctx.execute(change, target=f"member:{member_id}", summary=summary)


async def _own_binding_counted(
    request: Request, principal: Annotated[Principal, Depends(deps.authenticate)]
) -> None:
    """Count a member's own real-name binding against ``rate_limit_identity`` (429 beyond
    it): a binding refused because another member holds a number tells so, and the limit
    keeps a member from trying number after number. Staff are not counted."""
    if principal.kind == "member":
        await request.app.state.limiter.hit("identity", str(principal.id))


@router.put(
    f"{MEMBER}/identity",
    response_model=MemberProfile,
    dependencies=[Depends(_own_binding_counted)],
)
def bind_identity(
    program: str,
    member_id: Id,
    body: IdentityBind,
    ctx: Annotated[Context, Depends(Write("members.write", programme_wide=True))],
) -> JSONResponse:
    """Real-name binding: a resident ID number (its check character is verified) and a
    mobile number, each unique in the programme. The answer shows them masked.

    The member binds its own numbers, or staff with a grant over the whole programme do
    (the phone signs the member in to the points of every merchant: one merchant's operator
    may not); an API key may not (a till that could would bind its own phone to any member
    and sign in as it with a texted code). When the
    bound phone changes, every other session of the member ends, a code texted to the old
    number signs nobody in any more, and the number bound until then is texted that it was
    replaced (by which masked number, when, and what to do if the member did not ask for
    it), so that a member whose account was taken over learns of it.
    A closed member's numbers are bound no more (409)."""
    if ctx.principal.kind == "key":
        raise Forbidden(
            problem="An API key cannot bind or change a member's phone or ID number: the "
            "member does it in its app, or staff do.",
            problem_zh="API 密钥不能绑定或更改会员的手机号或证件号码:由会员本人在应用中操作,"
            "或由工作人员办理。",
        )
    own = ctx.principal.kind == "member"

    def bind(uow: UnitOfWork) -> MemberProfile:
        bound = service.bind_identity(
            uow, program_id=ctx.program_id, member_id=member_id, body=body
        )
        if bound.phone_changed:  # whoever signed in through the old number is signed out,
            auth_service.end_member_sessions(  # and a code texted to it signs nobody in
                uow, member_id=member_id, keep=ctx.principal.session_id if own else None
            )
            auth_service.forget_member_codes(uow, member_id=member_id)
        if bound.replaced_phone is not None:
            _tell_replaced_phone(uow, ctx, member_id, bound.replaced_phone, bound.after.phone)
        ctx.audit_before = {"phone": bound.before.phone, "id_number": bound.before.id_number}
        return bound.after

    return ctx.execute(bind, target=f"member:{member_id}", summary=_audited)


def _tell_replaced_phone(
    uow: UnitOfWork, ctx: Context, member_id: int, replaced: str, new_phone: str | None
) -> None:
    """Queue the text to the number a binding replaced, in the binding's transaction: the
    notification outbox sends it after commit (with retries), and a binding that rolls back
    texts nobody. The number goes in as the address only (the outbox keeps it encrypted and
    shows it masked); the text names the new number masked. No member is named as the
    recipient: the outbox would take the member's bound phone, which is the new one now."""
    program = ctx.program
    assert program is not None, "a member route has a programme"
    zone = program.time_zone
    changed_at = uow.clock.now().astimezone(ZoneInfo(zone))
    notify_service.notify(
        uow,
        notify_service.Notification(
            program_id=program.id,
            member_id=None,
            template="member.phone_changed",
            data={
                "phone": replaced,
                "new_phone": new_phone,
                "program": program.name,
                "changed_at": changed_at.strftime("%Y-%m-%d %H:%M"),
                "time_zone": zone,
                "language": _text_language(ctx.request),
            },
            key=f"{_phone_changed_key(member_id)}{uuid.uuid4().hex}",
            channels=("sms",),
        ),
    )


def _phone_changed_key(member_id: int) -> str:
    """How the keys of the texts to a member's replaced numbers start: those texts name no
    member (see :func:`_tell_replaced_phone`), and this finds them for its export and
    erasure."""
    return f"member.phone_changed:{member_id}:"


def _text_language(request: Request) -> str:
    """The language of a text to a member (members keep no preference): the request's
    ``Accept-Language`` when it names Chinese or English, else Chinese."""
    asked = request.headers.get("accept-language", "").lower()
    named = any(part.strip().startswith(("zh", "en")) for part in asked.split(","))
    return problems.language(request) if named else "zh"


@router.get(f"{MEMBER}/identity", response_model=IdentityRead)
def read_identity(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Read("members.pii"))]
) -> IdentityRead:
    """The bound numbers in full; each read is recorded in the audit log."""

    def read(uow: UnitOfWork) -> IdentityRead:
        found = service.identity(uow, program_id=ctx.program_id, member_id=member_id)
        masked = {
            "phone": core.mask_phone(found.phone) if found.phone else None,
            "id_number": core.mask_id_number(found.id_number) if found.id_number else None,
        }
        ctx.audit(uow, target=f"member:{member_id}", after=masked, action="members.pii")
        return found

    return ctx.db.run(read)


@router.get(f"{MEMBER}/personal-data", response_model=PersonalData)
def export_personal_data(
    program: str,
    member_id: Id,
    ctx: Annotated[Context, Depends(ReadOwn("members.pii", own="members.read"))],
) -> PersonalData:
    """Everything jifen holds about the member: its profile, its phone and ID numbers in
    full, its family link, how it signs in (never a secret), the messages sent to it
    (addresses masked) and its points (the balance, and where to read the history). The
    member reads its own; staff need ``members.pii``, and each staff read is recorded in the
    audit log (without the data). After an erasure it shows what is left."""

    def export(uow: UnitOfWork) -> PersonalData:
        held = service.personal_data(uow, program_id=ctx.program_id, member_id=member_id)
        data = PersonalData(
            **dict(held),
            program=program,
            sign_in=auth_service.member_sign_in_data(uow, member_id=member_id),
            stored_answers=deps.stored_answers(uow, member_id=member_id),
            notifications=notify_service.messages_to_member(
                uow, program_id=ctx.program_id, member_id=member_id,
                key_prefixes=[_phone_changed_key(member_id)],
            ),
            points=PersonalPoints(
                summary=points_service.balance(uow, member_id=member_id),
                history=f"/v1{MEMBER.format(program=program, member_id=member_id)}"
                "/points/history",
            ),
        )  # fmt: skip
        ctx.audit(
            uow, target=f"member:{member_id}", after={"exported": True}, action="members.export"
        )
        return data

    return ctx.db.run(export)


@router.post(f"{MEMBER}/personal-data/erase", response_model=Erasure)
def erase_personal_data(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Write("members.erase"))]
) -> JSONResponse:
    """Erase a closed member's personal data: its profile fields, tags, phone and ID
    numbers (hashes and ciphertexts), binding time and reference are overwritten, it leaves
    its family group, its sessions end and its password and codes are removed, its
    messages keep only their channel, template and times, its values in the payloads of its
    ``custom.*`` events, in its redemption orders and in the notes on their steps are
    replaced by ``(erased)`` (and so is the account at a partner an order names), its
    events' fingerprints not sealed yet are sealed under the installation's key (a resent
    event is still a replay, or refused when its content differs), and the stored answers
    of the writes about it (kept for ``Idempotency-Key`` replays) keep only its id and their
    status: such a write repeated is refused (410, ``answer_erased``), not run again. Its
    id, state and points stay: the ledger and the audit log, which name members by id, are
    not touched. Refused (409) unless the account is closed. Erasing an erased member
    answers the same."""

    def erase(uow: UnitOfWork) -> Erasure:
        values = service.personal_values(uow, program_id=ctx.program_id, member_id=member_id)
        erased = service.erase_personal_data(uow, program_id=ctx.program_id, member_id=member_id)
        events_service.erase_personal_values(
            uow, program_id=ctx.program_id, member_id=member_id, values=values
        )
        events_service.erase_fingerprints(uow, program_id=ctx.program_id, member_id=member_id)
        rewards_service.erase_personal_values(
            uow, program_id=ctx.program_id, member_id=member_id, values=values
        )
        auth_service.forget_member_credentials(uow, member_id=member_id)
        notify_service.erase_messages_to_member(
            uow, program_id=ctx.program_id, member_id=member_id,
            key_prefixes=[_phone_changed_key(member_id)],
        )  # fmt: skip
        deps.erase_stored_answers(uow, member_id=member_id)
        return erased

    # Its own answer holds nothing personal and is stored about no member, so that a later
    # erasure of the member leaves it to be replayed.
    return ctx.execute(erase, target=f"member:{member_id}", member=lambda _: None)


@router.get(f"{MEMBER}/family", response_model=FamilyRead)
def get_family(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Read("members.read"))]
) -> FamilyRead:
    """The member's family group; each member's points are shown to the group's main
    account and to callers that hold ``points.read``, the others see who is in it."""
    return ctx.db.run(
        lambda uow: service.family(
            uow, program_id=ctx.program_id, member_id=member_id, balances=_balances(ctx)
        ),
        read_only=True,
    )


def _balances(ctx: Context) -> bool | None:
    """Whether a family answer shows points: only to staff and keys holding ``points.read``
    (``members.read`` alone does not reach balances, as on the points routes). None for a
    member: then only the group's main account sees them."""
    if ctx.principal.kind == "member":
        return None
    return ctx.principal.allows("points.read", program_id=ctx.program_id) is not None


@router.put(f"{MEMBER}/family/members/{{other_id}}", response_model=FamilyRead)
def add_to_family(
    program: str,
    member_id: Id,
    other_id: Id,
    ctx: Annotated[Context, Depends(Write("members.family", programme_wide=True))],
) -> JSONResponse:
    """Add ``other_id`` to the group whose main account is ``member_id`` (a new group if
    it has none). Needs ``members.family``, which members do not hold: a member cannot gain
    sight of another's points by itself; staff link accounts with both members' consent.
    The main account sees the points its members earned at every merchant, so the grant
    must cover the whole programme (403 ``scope_too_narrow`` for one of a merchant or store).
    The answer is stored for a repeated ``Idempotency-Key`` with the other members'
    references and names left out (``(not stored: …)``): only ``member_id``'s erasure would
    find it."""
    return ctx.execute(
        lambda uow: service.link_family(
            uow,
            program_id=ctx.program_id,
            main_id=member_id,
            member_id=other_id,
            balances=bool(_balances(ctx)),
        ),
        target=f"member:{member_id}",
        summary=_audited_family,
        kept=_stored_family(member_id),
    )


@router.delete(f"{MEMBER}/family", response_model=FamilyRead)
def leave_family(
    program: str, member_id: Id, ctx: Annotated[Context, Depends(Write("members.write"))]
) -> JSONResponse:
    """The member leaves its family group; if it is the main account, the group dissolves."""
    return ctx.execute(
        lambda uow: service.leave_family(uow, program_id=ctx.program_id, member_id=member_id),
        target=f"member:{member_id}",
        summary=_audited_family,
    )
