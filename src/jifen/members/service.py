"""Member use cases: registration, profiles, states, real-name binding, family groups."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Select, String, Text, bindparam, cast, extract, func, select

from jifen.crypto import decrypt, encrypt, keyed_hash, keyed_hashes
from jifen.db.bulk import among, among_bound
from jifen.db.prepared import Prepared, Read, read_one
from jifen.db.uow import UnitOfWork
from jifen.errors import (
    DuplicateReference,
    Forbidden,
    InvalidInput,
    StateConflict,
    UnknownMember,
    not_active,
)
from jifen.members import core
from jifen.members.models import members
from jifen.members.schemas import (
    Erasure,
    FamilyMember,
    FamilyRead,
    IdentityBind,
    IdentityRead,
    MemberCreate,
    MemberFacts,
    MemberPersonalData,
    MemberProfile,
    MemberRead,
    MemberUpdate,
    PersonalFamily,
    PersonalIdentity,
)
from jifen.points import service as points_service
from jifen.programs import service as programs_service


def register_member(uow: UnitOfWork, *, program_id: int, external_ref: str) -> MemberRead:
    """Register a member of a programme and open its points account."""
    external_ref = external_ref.strip()
    if not external_ref or len(external_ref) > 128:
        raise InvalidInput(
            field="external_ref",
            problem="give a reference of 1 to 128 characters",
            problem_zh="请填写 1 至 128 个字符的会员编号",
        )
    if external_ref.startswith(ERASED_PREFIX):
        raise InvalidInput(
            field="external_ref",
            problem=f"references starting with {ERASED_PREFIX!r} are kept for erased members",
            problem_zh=f"以 {ERASED_PREFIX!r} 开头的会员编号留给已删除个人信息的会员,请换一个",
        )
    exists = uow.conn.execute(
        select(members.c.id).where(
            members.c.program_id == program_id, members.c.external_ref == external_ref
        )
    ).first()
    if exists:
        raise DuplicateReference(what="Member reference", what_zh="会员编号", value=external_ref)
    now = uow.clock.now()
    member_id = uow.conn.execute(
        members.insert().returning(members.c.id),
        {"program_id": program_id, "external_ref": external_ref, "created_at": now},
    ).scalar_one()
    points_service.open_member_account(uow, program_id=program_id, member_id=member_id)
    return MemberRead(
        id=member_id, program_id=program_id, external_ref=external_ref, created_at=now
    )


def find_member(uow: UnitOfWork, *, program_id: int, external_ref: str) -> MemberRead:
    """The member with this reference."""
    row = uow.conn.execute(
        select(members).where(
            members.c.program_id == program_id, members.c.external_ref == external_ref
        )
    ).one_or_none()
    if row is None:
        raise UnknownMember(member_id=external_ref)
    return MemberRead.model_validate(row._mapping)


_MEMBER_FIELDS = ("id", "program_id", "external_ref", "state", "created_at")
_MEMBER_BY_ID = Prepared(
    select(*(members.c[name] for name in _MEMBER_FIELDS)).where(members.c.id == bindparam("member"))
)


def get_member_by_id(uow: UnitOfWork, *, member_id: int) -> MemberRead:
    row = _MEMBER_BY_ID.one_or_none(uow.conn, {"member": member_id})
    if row is None:
        raise UnknownMember(member_id=member_id)
    return _member_read(row)


def _member_read(row: tuple[Any, ...]) -> MemberRead:
    return MemberRead.model_validate(dict(zip(_MEMBER_FIELDS, row, strict=True)))


def require_member(
    uow: UnitOfWork, *, program_id: int, member_id: int, transacting: bool = False
) -> MemberRead:
    """The member, if it belongs to the programme; with ``transacting``, only if its state
    lets it earn and spend (active)."""
    read = require_member_read(program_id=program_id, member_id=member_id, transacting=transacting)
    return read_one(uow.conn, read)


def require_member_read(
    *, program_id: int, member_id: int, transacting: bool = False
) -> Read[MemberRead]:
    """:func:`require_member` as a read to run together with others."""

    def answer(row: Any) -> MemberRead:
        if row is None:
            raise UnknownMember(member_id=member_id)
        member = _member_read(row)
        if member.program_id != program_id:
            raise UnknownMember(member_id=member_id)
        if transacting:
            require_active(member)
        return member

    return Read(_MEMBER_BY_ID, {"member": member_id}, answer)


def active_birthday(uow: UnitOfWork, *, program_id: int, member_id: int) -> date | None:
    """The member's birthday, after the checks of :func:`require_member` with
    ``transacting`` (the member is the programme's and active), in one read."""
    return read_one(uow.conn, active_birthday_read(program_id, member_id))


def active_birthday_read(program_id: int, member_id: int) -> Read[date | None]:
    """:func:`active_birthday` as a read to run together with others."""

    def answer(row: Any) -> date | None:
        if row is None or row.program_id != program_id:
            raise UnknownMember(member_id=member_id)
        require_active(row)
        birthday: date | None = row.birthday
        return birthday

    return Read(_ACTIVE_BIRTHDAY, {"member": member_id}, answer)


_ACTIVE_BIRTHDAY = Prepared(
    select(members.c.id, members.c.program_id, members.c.state, members.c.birthday).where(
        members.c.id == bindparam("member")
    ),
    named=True,
)


def require_active(member: MemberRead | MemberFacts | Any) -> None:
    """StateConflict unless the member's state lets it earn and spend (active)."""
    if member.state != "active":
        raise not_active(member.id, member.state)


def external_refs(uow: UnitOfWork, *, member_ids: Iterable[int]) -> dict[int, str]:
    ids = list(member_ids)
    if not ids:
        return {}
    rows = uow.conn.execute(
        select(members.c.id, members.c.external_ref).where(among(uow.dialect, members.c.id, ids))
    )
    return {int(member_id): ref for member_id, ref in rows}


def rule_facts(
    uow: UnitOfWork, *, program_id: int, member_ids: Iterable[int]
) -> dict[int, MemberFacts]:
    """What earning rules read about each member (no personal numbers are decrypted)."""
    rows = uow.conn.execute(
        _rule_facts_query(uow.dialect), {"program": program_id, "ids": sorted(set(member_ids))}
    ).all()
    return _facts(rows)


def lock_for_rules(
    uow: UnitOfWork, *, program_id: int, member_ids: Iterable[int]
) -> dict[int, MemberFacts]:
    """:func:`lock_members`, then :func:`rule_facts`: on PostgreSQL in one statement, which
    holds every one of ``member_ids`` (in id order) and answers the facts of the
    programme's."""
    if uow.dialect != "postgresql":
        return rule_facts(uow, program_id=program_id, member_ids=member_ids)
    rows = uow.conn.execute(_LOCK_FOR_RULES, {"ids": sorted(set(member_ids))}).all()
    return _facts([row[1:] for row in rows if row[0] == program_id])


def _facts(rows: Iterable[Any]) -> dict[int, MemberFacts]:
    return {
        member_id: MemberFacts(
            id=member_id, state=state, tags=list(tags or []), region=region,
            birthday=birthday, created_at=created_at,
        )
        for member_id, state, tags, region, birthday, created_at in rows
    }  # fmt: skip


_RULE_FACTS = (
    members.c.id, members.c.state, members.c.tags, members.c.region, members.c.birthday,
    members.c.created_at,
)  # fmt: skip


@cache
def _rule_facts_query(dialect: str) -> Select[Any]:
    """:func:`rule_facts`' query, built once (every event reads it)."""
    return (
        select(*_RULE_FACTS)
        .where(
            members.c.program_id == bindparam("program"),
            among_bound(dialect, members.c.id, "ids"),
        )
        .order_by(members.c.id)
    )


def ids_by_refs(uow: UnitOfWork, *, program_id: int, refs: Iterable[str]) -> dict[str, int]:
    """The ids of the members with these references (those that exist)."""
    wanted = sorted(set(refs))
    if not wanted:
        return {}
    rows = uow.conn.execute(
        _ids_by_refs_query(uow.dialect), {"program": program_id, "refs": wanted}
    ).all()
    return {ref: int(member_id) for ref, member_id in rows}


@cache
def _ids_by_refs_query(dialect: str) -> Select[Any]:
    return select(members.c.external_ref, members.c.id).where(
        members.c.program_id == bindparam("program"),
        among_bound(dialect, members.c.external_ref, "refs", String()),
    )


def lock_members(uow: UnitOfWork, *, member_ids: Iterable[int]) -> None:
    """Hold the members' rows (in id order, so that two transactions cannot wait on each
    other) until the transaction ends: one change of a member's facts at a time. SQLite's
    writers are serial already."""
    if uow.dialect != "postgresql":
        return
    uow.conn.execute(_LOCK_MEMBERS, {"ids": sorted(set(member_ids))})


_LOCK_MEMBERS = (
    select(members.c.id)
    .where(among_bound("postgresql", members.c.id, "ids"))
    .order_by(members.c.id)
    .with_for_update(key_share=True)
)
_LOCK_FOR_RULES = (
    select(members.c.program_id, *_RULE_FACTS)
    .where(among_bound("postgresql", members.c.id, "ids"))
    .order_by(members.c.id)
    .with_for_update(key_share=True)
)


def closed_ids(uow: UnitOfWork, *, member_ids: Iterable[int]) -> set[int]:
    """Those of ``member_ids`` whose account is closed (a job leaves them alone)."""
    ids = sorted(set(member_ids))
    if not ids:
        return set()
    rows = uow.conn.execute(
        select(members.c.id).where(
            among(uow.dialect, members.c.id, ids), members.c.state == "closed"
        )
    ).scalars()
    return {int(member_id) for member_id in rows}


def born_on(
    uow: UnitOfWork,
    *,
    program_id: int,
    month: int,
    days: Iterable[int],
    after_id: int = 0,
    limit: int = 500,
) -> list[int]:
    """Active members whose birthday is on ``month`` and one of ``days``, in id order after
    ``after_id`` (a chunk at a time)."""
    rows = uow.conn.execute(
        select(members.c.id)
        .where(
            members.c.program_id == program_id,
            members.c.state == "active",
            extract("month", members.c.birthday) == month,
            extract("day", members.c.birthday).in_(sorted(set(days))),
            members.c.id > after_id,
        )
        .order_by(members.c.id)
        .limit(limit)
    ).scalars()
    return [int(member_id) for member_id in rows]


def count_members(uow: UnitOfWork, *, program_id: int) -> int:
    return int(
        uow.conn.execute(
            select(func.count()).where(members.c.program_id == program_id)
        ).scalar_one()
    )


# --------------------------------------------------------------------------- profiles


def _profile(row: Any) -> MemberProfile:
    """A member as staff and the member see it: personal numbers masked."""
    phone = core.mask_phone(decrypt(row.phone_enc)) if row.phone_enc else None
    id_number = core.mask_id_number(decrypt(row.id_number_enc)) if row.id_number_enc else None
    return MemberProfile.model_validate(
        {**row._mapping, "tags": list(row.tags or []), "phone": phone, "id_number": id_number}
    )


def _row(uow: UnitOfWork, program_id: int, member_id: int) -> Any:
    row = uow.conn.execute(
        select(members).where(members.c.id == member_id, members.c.program_id == program_id)
    ).first()
    if row is None:
        raise UnknownMember(member_id=member_id)
    return row


def languages(uow: UnitOfWork, *, program_id: int, member_ids: Iterable[int]) -> dict[int, str]:
    """The language each member chose for its messages (none chosen: not in the answer);
    refuses the first that is not a member of the programme. One query."""
    wanted = set(member_ids)
    if not wanted:
        return {}
    rows = uow.conn.execute(
        select(members.c.id, members.c.language).where(
            among(uow.dialect, members.c.id, sorted(wanted)), members.c.program_id == program_id
        )
    ).all()
    missing = sorted(wanted - {row.id for row in rows})
    if missing:
        raise UnknownMember(member_id=missing[0])
    return {row.id: row.language for row in rows if row.language is not None}


def contacts(
    uow: UnitOfWork, *, program_id: int, member_ids: Iterable[int], phones: bool = False
) -> dict[int, tuple[str | None, str | None]]:
    """Each member's email address and (with ``phones``) bound phone number, decrypted, for
    the notification outbox; one query. The rows are held (PostgreSQL ``FOR KEY SHARE``:
    no change of a member's facts waits for it) until the transaction ends, so that an
    erasure of one of them waits, and then finds the messages queued to these addresses."""
    ids = sorted(set(member_ids))
    if not ids:
        return {}
    rows = uow.conn.execute(
        select(members.c.id, members.c.email, members.c.phone_enc)
        .where(among(uow.dialect, members.c.id, ids), members.c.program_id == program_id)
        .order_by(members.c.id)
        .with_for_update(read=True, key_share=True)
    ).all()
    return {
        row.id: (row.email, decrypt(row.phone_enc) if phones and row.phone_enc else None)
        for row in rows
    }


def find_by_phone(uow: UnitOfWork, *, program_id: int, phone: str) -> int | None:
    """The member whose bound phone is ``phone`` (normalised): who a texted code is for. A
    member's reference never counts, whatever it looks like: a reference equal to someone's
    number would sign its holder in as another member."""
    found = uow.conn.execute(
        select(members.c.id).where(
            members.c.program_id == program_id, members.c.phone_hash.in_(keyed_hashes(phone))
        )
    ).scalar()
    return int(found) if found is not None else None


def find_by_login(uow: UnitOfWork, *, program_id: int, login: str) -> int | None:
    """The member a password sign-in names: the one whose bound phone is ``login``, else the
    one whose external reference it is. The bound phone comes first, so a reference that
    happens to be a member's number (a recycled number, a till that registered a member
    under it) cannot capture that member's sign-in."""
    phone = core.normalise_phone_or_none(login)
    if phone is not None:
        found = find_by_phone(uow, program_id=program_id, phone=phone)
        if found is not None:
            return found
    ref = uow.conn.execute(
        select(members.c.id).where(
            members.c.program_id == program_id, members.c.external_ref == login
        )
    ).scalar()
    return int(ref) if ref is not None else None


def get_profile(uow: UnitOfWork, *, program_id: int, member_id: int) -> MemberProfile:
    return _profile(_row(uow, program_id, member_id))


def _today(uow: UnitOfWork, program_id: int) -> date:
    """Today's date in the programme's time zone."""
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    return uow.clock.now().astimezone(zone).date()


def _phone_taken(uow: UnitOfWork, program_id: int, phone: str, member_id: int | None) -> None:
    query = select(members.c.id).where(
        members.c.program_id == program_id, members.c.phone_hash.in_(keyed_hashes(phone))
    )
    if member_id is not None:
        query = query.where(members.c.id != member_id)
    if uow.conn.execute(query).first():
        raise DuplicateReference(
            what="Phone number", what_zh="手机号", value=core.mask_phone(phone)
        )


def register(
    uow: UnitOfWork, *, program_id: int, body: MemberCreate, by: str = "staff"
) -> MemberProfile:
    """Register a member with its profile (and phone, if given) and open its account. An
    API key (``by="key"``) gives no tags: staff set them (see :func:`_check_rule_facts`).."""
    if by == "key" and body.tags:
        raise _key_tags()
    core.check_birthday(body.birthday, today=_today(uow, program_id))
    phone = core.normalise_phone(body.phone) if body.phone is not None else None
    if phone is not None:
        _phone_taken(uow, program_id, phone, None)
    member = register_member(uow, program_id=program_id, external_ref=body.external_ref)
    values: dict[str, Any] = body.model_dump(exclude={"external_ref", "phone"})
    if phone is not None:
        values.update(phone_hash=keyed_hash(phone), phone_enc=encrypt(phone))
    uow.conn.execute(members.update().where(members.c.id == member.id).values(**values))
    return get_profile(uow, program_id=program_id, member_id=member.id)


def update_profile(
    uow: UnitOfWork, *, program_id: int, member_id: int, body: MemberUpdate, by: str = "staff"
) -> tuple[MemberProfile, MemberProfile]:
    """Change the fields given; answers (before, after). ``by`` is who asks: ``"staff"``,
    the member itself (``"member"``) or an API key (``"key"``); see :func:`_check_rule_facts`
    for what the last two may not change. Refused for a closed member, even one closing
    while this runs (:func:`_closed_profile`)."""
    before = get_profile(uow, program_id=program_id, member_id=member_id)
    if before.state == "closed":
        raise _closed_profile(member_id)
    values = body.model_dump(exclude_unset=True)
    core.check_birthday(values.get("birthday"), today=_today(uow, program_id))
    _check_rule_facts(before, values, by)
    if values:
        values["updated_at"] = uow.clock.now()
        written = uow.conn.execute(
            members.update()
            .where(members.c.id == member_id, members.c.state != "closed")
            .values(**values)
        ).rowcount
        if written != 1:  # closed (and maybe erased) by a request that committed meanwhile
            raise _closed_profile(member_id)
    return before, get_profile(uow, program_id=program_id, member_id=member_id)


def _closed_profile(member_id: int) -> StateConflict:
    """What refuses a write of a closed member's personal data (profile, phone, ID number):
    a closed account is done with, and an erased one must stay erased."""
    return StateConflict(
        problem=f"Member {member_id} is closed: its profile and identity are not changed any "
        "more (its personal data may have been erased, and a write would put some back).",
        problem_zh=f"会员 {member_id} 已注销:其资料和身份信息不能再修改(其个人信息可能已被"
        "删除,修改会重新写入个人信息)。",
    )


def _key_tags() -> Forbidden:
    return Forbidden(
        problem="An API key cannot set a member's tags: staff set them, as the earning rules "
        "read them. Leave tags out.",
        problem_zh="API 密钥不能设置会员标签:标签由工作人员设置,积分规则会读取标签。"
        "请不要提交 tags。",
    )


def _check_rule_facts(before: MemberProfile, values: dict[str, Any], by: str) -> None:
    """Refuse a change of what the earning rules read (a tag such as vip, a birthday-month
    multiplier) by anyone but staff. The member and a till may give the birthday once;
    the member may send its tags unchanged; a key may not name tags at all (any merchant's
    till could otherwise make any member of the programme vip)."""
    if by == "staff":
        return
    if by == "key" and "tags" in values:
        raise _key_tags()
    if "tags" in values and sorted(values["tags"]) != sorted(before.tags):
        raise Forbidden(
            problem="A member's tags are set by staff: the earning rules read them.",
            problem_zh="会员标签由工作人员设置:积分规则会读取标签。",
        )
    if before.birthday is None or values.get("birthday", before.birthday) == before.birthday:
        return
    if by == "key":
        raise Forbidden(
            problem="An API key may give a member's birthday only while none is set; the "
            "member's birthday is set already, and staff correct it.",
            problem_zh="API 密钥只能在会员尚未填写生日时设置生日;该会员已有生日,"
            "如需更正请由工作人员修改。",
        )
    raise Forbidden(
        problem="A member gives its birthday once; ask staff to correct it.",
        problem_zh="生日只能由会员填写一次;如需更正请联系工作人员。",
    )


def list_members(
    uow: UnitOfWork,
    *,
    program_id: int,
    after_id: int,
    limit: int,
    state: str | None = None,
    tag: str | None = None,
    region: str | None = None,
    external_ref: str | None = None,
    phone: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[MemberProfile]:
    """The programme's members in the order they registered, filtered."""
    query = select(members).where(members.c.program_id == program_id, members.c.id > after_id)
    if state is not None:
        query = query.where(members.c.state == state)
    if region is not None:
        query = query.where(members.c.region == region)
    if external_ref is not None:
        query = query.where(members.c.external_ref == external_ref)
    if phone is not None:
        query = query.where(members.c.phone_hash.in_(keyed_hashes(core.normalise_phone(phone))))
    if since is not None:
        query = query.where(members.c.created_at >= since)
    if until is not None:
        query = query.where(members.c.created_at < until)
    if tag is not None:
        # Tags are a JSON list, stored as the same text on both backends: match the quoted tag.
        quoted = json.dumps(tag).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(cast(members.c.tags, Text).like(f"%{quoted}%", escape="\\"))
    rows = uow.conn.execute(query.order_by(members.c.id).limit(limit))
    return [_profile(row) for row in rows]


# --------------------------------------------------------------------------- states


@dataclass(frozen=True)
class StateMove:
    """What :func:`change_state` did."""

    before: MemberProfile
    after: MemberProfile
    settlement: points_service.ClosingSettlement | None = None
    """On closing: what became of the account's points."""


def change_state(
    uow: UnitOfWork, *, program_id: int, member_id: int, state: str, actor: str = "system"
) -> StateMove:
    """Move a member to ``state`` if the move is allowed. Closing settles the account's
    points in the same transaction, by the programme's ``closing_policy`` (``actor`` is
    who the settlement posting names), and is refused while a redemption is unfinished.

    The member's points account takes the new state in the same transaction (see
    :func:`points.service.set_member_state`): a posting reads it under the account's lock,
    so no earning, spend or transfer posts after a freeze, ban or closing has committed,
    however close behind it came. The member's row is held first, as every batch of events
    holds members before their accounts."""
    lock_members(uow, member_ids=[member_id])
    before = get_profile(uow, program_id=program_id, member_id=member_id)
    if (before.state, state) not in core.TRANSITIONS:
        final = " A closed account stays closed." if before.state == "closed" else ""
        raise StateConflict(
            problem=f"Member {member_id} is {before.state}; it cannot become {state}.{final}",
            problem_zh=f"会员 {member_id} 当前状态为 {before.state},不能变更为 {state}。"
            + ("已注销的账户不能恢复。" if final else ""),
        )
    settlement = _settle_closing(uow, program_id, member_id, actor) if state == "closed" else None
    points_service.set_member_state(uow, member_id=member_id, state=state)
    moved = uow.conn.execute(
        members.update()
        .where(members.c.id == member_id, members.c.state == before.state)
        .values(state=state, updated_at=uow.clock.now())
    ).rowcount
    if moved != 1:  # changed by a concurrent request a moment ago
        raise StateConflict(
            problem=f"Member {member_id}'s state changed meanwhile; read it and try again.",
            problem_zh=f"会员 {member_id} 的状态刚被修改,请重新读取后再试。",
        )
    if state == "closed" and before.family_main_id == member_id:
        # A closed account heads no family group: its group dissolves, as when the main
        # leaves, and its members are free to join another. (A member of a group that
        # closes stays in it until it leaves.)
        uow.conn.execute(
            members.update()
            .where(members.c.family_main_id == member_id)
            .values(family_main_id=None)
        )
    after = get_profile(uow, program_id=program_id, member_id=member_id)
    return StateMove(before, after, settlement)


def _settle_closing(
    uow: UnitOfWork, program_id: int, member_id: int, actor: str
) -> points_service.ClosingSettlement:
    """Refuse to close while a redemption is unfinished (its points could still come back),
    else settle the account's points by the programme's policy."""
    from jifen.rewards import service as rewards_service  # here: it imports this module

    unfinished = rewards_service.unfinished_orders(uow, program_id=program_id, member_id=member_id)
    if unfinished:
        listed = ", ".join(str(order_id) for order_id in unfinished)
        raise StateConflict(
            problem=f"Member {member_id} has redemption orders not finished ({listed}): "
            "waiting for payment, for cooling-off confirmation or not yet delivered. Cancel or "
            "deliver them before closing the account.",
            problem_zh=f"会员 {member_id} 尚有未完成的兑换订单({listed}):待支付、冷静期待确认"
            "或尚未交付。请先取消或完成交付,再注销账户。",
        )
    policy = programs_service.get_settings(uow, program_id=program_id).closing_policy
    return points_service.settle_closing(uow, member_id=member_id, policy=policy, actor=actor)


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class Binding:
    """What :func:`bind_identity` did."""

    before: MemberProfile
    """The member as it was, numbers masked (for the audit entry)."""
    after: MemberProfile
    phone_changed: bool
    """The bound phone is another than before (or the first one): the phone signs the
    member in, so the caller ends the member's other sessions."""
    replaced_phone: str | None
    """The number bound until now, in full, when another replaces it (None at a first
    binding or the same number again): the caller texts it that the phone moved. Kept out
    of logs and audit entries."""


def bind_identity(
    uow: UnitOfWork, *, program_id: int, member_id: int, body: IdentityBind
) -> Binding:
    """Bind a resident ID number and a mobile number to the member (real-name verification),
    each stored as a keyed hash to find it and encrypted to show it."""
    number = core.check_id_number(body.id_number, today=_today(uow, program_id))
    phone = core.normalise_phone(body.phone)
    # One binding of a member at a time (SQLite's writers are serial already): a binding
    # sees the number the one before it bound, and that is the number it texts.
    if uow.dialect == "postgresql":
        uow.conn.execute(select(members.c.id).where(members.c.id == member_id).with_for_update())
    before = _row(uow, program_id, member_id)
    if before.state == "closed":
        raise _closed_profile(member_id)
    _phone_taken(uow, program_id, phone, member_id)
    other = uow.conn.execute(
        select(members.c.id).where(
            members.c.program_id == program_id,
            members.c.id_number_hash.in_(keyed_hashes(number)),
            members.c.id != member_id,
        )
    ).first()
    if other:
        raise DuplicateReference(
            what="ID number", what_zh="证件号码", value=core.mask_id_number(number)
        )
    now = uow.clock.now()
    uow.conn.execute(
        members.update()
        .where(members.c.id == member_id)
        .values(
            id_number_hash=keyed_hash(number), id_number_enc=encrypt(number),
            phone_hash=keyed_hash(phone), phone_enc=encrypt(phone),
            verified_at=now, updated_at=now,
        )
    )  # fmt: skip
    changed = before.phone_hash not in keyed_hashes(phone)
    return Binding(
        before=_profile(before),
        after=get_profile(uow, program_id=program_id, member_id=member_id),
        phone_changed=changed,
        replaced_phone=decrypt(before.phone_enc) if changed and before.phone_enc else None,
    )


def identity(uow: UnitOfWork, *, program_id: int, member_id: int) -> IdentityRead:
    """The bound numbers in full (for staff holding ``members.pii``)."""
    row = _row(uow, program_id, member_id)
    return IdentityRead(
        member_id=member_id,
        phone=decrypt(row.phone_enc) if row.phone_enc else None,
        id_number=decrypt(row.id_number_enc) if row.id_number_enc else None,
        verified_at=row.verified_at,
    )


# --------------------------------------------------------------------------- family groups


def family(
    uow: UnitOfWork, *, program_id: int, member_id: int, balances: bool | None
) -> FamilyRead:
    """The family group the member belongs to. Balances are shown when ``balances`` is
    true, or — when it is None (a member asking) — only if the member is the main account."""
    row = _row(uow, program_id, member_id)
    main_id = row.family_main_id
    if main_id is None:
        return FamilyRead(main_member_id=None, members=[])
    show = balances if balances is not None else member_id == main_id
    rows = uow.conn.execute(
        select(members.c.id, members.c.external_ref, members.c.name)
        .where(members.c.family_main_id == main_id)
        .order_by((members.c.id != main_id), members.c.id)
    ).all()
    return FamilyRead(
        main_member_id=main_id,
        members=[
            FamilyMember(
                member_id=r.id,
                external_ref=r.external_ref,
                name=r.name,
                main=r.id == main_id,
                points=points_service.balance(uow, member_id=r.id) if show else None,
            )
            for r in rows
        ],
    )


def link_family(
    uow: UnitOfWork, *, program_id: int, main_id: int, member_id: int, balances: bool = True
) -> FamilyRead:
    """Add ``member_id`` to the family group whose main account is ``main_id`` (made the
    main of a new group if it is in none); answers the group, with its members' points if
    ``balances``. A member of the group already stays as it is (the group answered)."""
    if main_id == member_id:
        raise InvalidInput(
            field="member_id",
            problem="a member cannot join its own group",
            problem_zh="会员不能加入自己的家庭组",
        )
    main = _row(uow, program_id, main_id)
    other = _row(uow, program_id, member_id)
    for row in (main, other):
        if row.state == "closed":
            raise _closed_family(row.id)
    if main.family_main_id not in (None, main_id):
        raise _in_another_family(main_id)
    if other.family_main_id == main_id:  # in this group already: adding it again is a no-op
        return family(uow, program_id=program_id, member_id=main_id, balances=balances)
    if other.family_main_id is not None:
        raise StateConflict(
            problem=f"Member {member_id} is in a family group already; it leaves that first.",
            problem_zh=f"会员 {member_id} 已在一个家庭组中,需先退出。",
        )
    if uow.dialect == "postgresql":  # one addition to a group at a time: the size holds
        uow.conn.execute(select(members.c.id).where(members.c.id == main_id).with_for_update())
    size = uow.conn.execute(
        select(func.count()).where(members.c.family_main_id == main_id)
    ).scalar_one()
    if max(size, 1) >= core.FAMILY_SIZE:
        raise StateConflict(
            problem=f"A family group has at most {core.FAMILY_SIZE} members.",
            problem_zh=f"家庭组最多 {core.FAMILY_SIZE} 名成员。",
        )
    # Neither may have closed since it was read (a closing that committed meanwhile), nor
    # the main have joined another's group.
    heads = uow.conn.execute(
        members.update()
        .where(
            members.c.id == main_id,
            members.c.state != "closed",
            members.c.family_main_id.is_(None) | (members.c.family_main_id == main_id),
        )
        .values(family_main_id=main_id)
    ).rowcount
    if heads != 1 and _row(uow, program_id, main_id).state == "closed":
        raise _closed_family(main_id)
    if heads != 1:
        raise _in_another_family(main_id)
    joined = uow.conn.execute(
        members.update()
        .where(
            members.c.id == member_id,
            members.c.family_main_id.is_(None),
            members.c.state != "closed",
        )
        .values(family_main_id=main_id)
    ).rowcount
    if joined != 1 and _row(uow, program_id, member_id).state == "closed":
        raise _closed_family(member_id)
    if joined != 1:
        raise StateConflict(
            problem=f"Member {member_id} joined another group meanwhile.",
            problem_zh=f"会员 {member_id} 刚加入了其他家庭组。",
        )
    return family(uow, program_id=program_id, member_id=main_id, balances=balances)


def _in_another_family(main_id: int) -> StateConflict:
    return StateConflict(
        problem=f"Member {main_id} belongs to another member's family group; only a "
        "group's main account adds members.",
        problem_zh=f"会员 {main_id} 已属于其他会员的家庭组,只有主账户可以添加成员。",
    )


def _closed_family(member_id: int) -> StateConflict:
    """What refuses a closed member a place in a family group (leaving one stays open)."""
    return StateConflict(
        problem=f"Member {member_id} is closed: a closed account joins no family group and "
        "heads none.",
        problem_zh=f"会员 {member_id} 已注销:已注销的账户不能加入或组建家庭组。",
    )


def leave_family(uow: UnitOfWork, *, program_id: int, member_id: int) -> FamilyRead:
    """The member leaves its group; when the main account leaves, the group dissolves."""
    row = _row(uow, program_id, member_id)
    if uow.dialect == "postgresql" and row.family_main_id is not None:
        # The group's main is held, as an addition to the group holds it: the count of who
        # is left below sees a member added meanwhile, and the group stays.
        uow.conn.execute(
            select(members.c.id).where(members.c.id == row.family_main_id).with_for_update()
        )
        row = _row(uow, program_id, member_id)
    if row.family_main_id is None:
        raise StateConflict(
            problem=f"Member {member_id} is in no family group.",
            problem_zh=f"会员 {member_id} 不在任何家庭组中。",
        )
    if row.family_main_id == member_id:
        uow.conn.execute(
            members.update()
            .where(members.c.family_main_id == member_id)
            .values(family_main_id=None)
        )
    else:
        uow.conn.execute(
            members.update().where(members.c.id == member_id).values(family_main_id=None)
        )
        rest = uow.conn.execute(
            select(func.count()).where(members.c.family_main_id == row.family_main_id)
        ).scalar_one()
        if rest <= 1:  # only the main is left: no group any more
            uow.conn.execute(
                members.update()
                .where(members.c.id == row.family_main_id)
                .values(family_main_id=None)
            )
    return FamilyRead(main_member_id=None, members=[])


def ids_page(
    uow: UnitOfWork,
    *,
    program_id: int,
    after_id: int = 0,
    limit: int | None = 1000,
    up_to_id: int | None = None,
) -> list[int]:
    """The ids of the programme's members after ``after_id`` (and up to ``up_to_id``), in id
    order, at most ``limit`` of them (for chunked jobs)."""
    query = select(members.c.id).where(members.c.program_id == program_id, members.c.id > after_id)
    if up_to_id is not None:
        query = query.where(members.c.id <= up_to_id)
    rows = uow.conn.execute(query.order_by(members.c.id).limit(limit)).scalars()
    return [int(member_id) for member_id in rows]


def every_nth_id(uow: UnitOfWork, *, program_id: int, n: int) -> list[int]:
    """The id of every ``n``-th member of the programme in id order (the ends of parts of
    ``n`` members, for jobs that share their members out among workers); one query."""
    numbered = (
        select(members.c.id, func.row_number().over(order_by=members.c.id).label("place"))
        .where(members.c.program_id == program_id)
        .subquery()
    )
    rows = uow.conn.execute(
        select(numbered.c.id).where(numbered.c.place % n == 0).order_by(numbered.c.id)
    ).scalars()
    return [int(member_id) for member_id in rows]


# --------------------------------------------------------------------------- personal data


ERASED_PREFIX = "erased:"
"""How the reference of an erased member starts; no registration may use it."""


def erased_ref(member_id: int) -> str:
    """The reference an erased member is left with in place of the merchant's own (which
    may be a card number, a user id or even a phone number): unique, as no registration
    takes the prefix, and naming no one."""
    return f"{ERASED_PREFIX}{member_id}"


_CLEARED: dict[str, Any] = {
    "name": "", "email": None, "birthday": None, "gender": None, "region": None, "tags": [],
    "phone_hash": None, "phone_enc": None, "id_number_hash": None, "id_number_enc": None,
    "verified_at": None, "language": None,
}  # fmt: skip
"""Each personal column of ``members`` as erasure leaves it."""


def _holds_personal_data(row: Any) -> bool:
    if row.external_ref != erased_ref(row.id):
        return True
    return any(
        (list(row.tags or []) if name == "tags" else row._mapping[name]) != cleared
        for name, cleared in _CLEARED.items()
    )


def personal_data(uow: UnitOfWork, *, program_id: int, member_id: int) -> MemberPersonalData:
    """What the members domain holds about the member, numbers decrypted."""
    row = _row(uow, program_id, member_id)
    group: list[int] = []
    if row.family_main_id is not None:
        group = [
            int(other)
            for other in uow.conn.execute(
                select(members.c.id)
                .where(members.c.family_main_id == row.family_main_id)
                .order_by(members.c.id)
            ).scalars()
        ]
    return MemberPersonalData(
        member_id=member_id,
        erased=not _holds_personal_data(row),
        profile=_profile(row),
        identity=PersonalIdentity(
            phone=decrypt(row.phone_enc) if row.phone_enc else None,
            id_number=decrypt(row.id_number_enc) if row.id_number_enc else None,
            verified_at=row.verified_at,
        ),
        family=PersonalFamily(main_member_id=row.family_main_id, member_ids=group),
    )


def personal_values(uow: UnitOfWork, *, program_id: int, member_id: int) -> list[str]:
    """The member's identifying values as texts (its reference, name, email, birthday, phone
    and ID numbers), for erasing the copies other domains may keep; none once erased."""
    row = _row(uow, program_id, member_id)
    values = [
        row.external_ref if row.external_ref != erased_ref(row.id) else "",
        row.name, row.email or "",
        row.birthday.isoformat() if row.birthday else "",
        decrypt(row.phone_enc) if row.phone_enc else "",
        decrypt(row.id_number_enc) if row.id_number_enc else "",
    ]  # fmt: skip
    return [value for value in values if value]


def erase_personal_data(uow: UnitOfWork, *, program_id: int, member_id: int) -> Erasure:
    """Overwrite every personal field of a closed member: profile, tags, the phone and ID
    numbers' hashes and ciphertexts, the binding time, and the merchant's reference
    (:func:`erased_ref`); take it out of its family group. The id stays, so the ledger's
    postings and the audit entries that name it stay whole. Refused unless the account is
    closed: an account in use signs in and is found by its phone. Erasing an erased member
    changes nothing (its ``updated_at`` included), so every erasure answers the same."""
    if uow.dialect == "postgresql":  # one change of the member at a time
        uow.conn.execute(select(members.c.id).where(members.c.id == member_id).with_for_update())
    row = _row(uow, program_id, member_id)
    if row.state != "closed":
        raise StateConflict(
            problem=f"Member {member_id} is {row.state}: only a closed account's personal data "
            "is erased, as erasing the phone and ID number of an account in use would break "
            "its sign-in and the lookups that find it. Close the account first.",
            problem_zh=f"会员 {member_id} 当前状态为 {row.state}:只有已注销的账户才能删除个人"
            "信息,删除仍在使用的账户的手机号和证件号码会使其无法登录、也无法被查找。请先注销该账户。",
        )
    if row.family_main_id is not None:
        leave_family(uow, program_id=program_id, member_id=member_id)
    if _holds_personal_data(row):
        uow.conn.execute(
            members.update()
            .where(members.c.id == member_id)
            .values(**_CLEARED, external_ref=erased_ref(member_id), updated_at=uow.clock.now())
        )
        row = _row(uow, program_id, member_id)
    return Erasure(member_id=member_id, state=row.state, erased=True, erased_at=row.updated_at)
