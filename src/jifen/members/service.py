"""Member use cases (minimal: registration and lookup, what the ledger needs)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select

from jifen.db.uow import UnitOfWork
from jifen.errors import DuplicateReference, InvalidInput, StateConflict, UnknownMember
from jifen.members.models import members
from jifen.members.schemas import MemberRead
from jifen.points import service as points_service


def register_member(uow: UnitOfWork, *, program_id: int, external_ref: str) -> MemberRead:
    """Register a member of a programme and open its points account."""
    external_ref = external_ref.strip()
    if not external_ref or len(external_ref) > 128:
        raise InvalidInput(field="external_ref", problem="give a reference of 1 to 128 characters")
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
    row = uow.conn.execute(
        select(members).where(
            members.c.program_id == program_id, members.c.external_ref == external_ref
        )
    ).one_or_none()
    if row is None:
        raise UnknownMember(member_id=external_ref)
    return MemberRead.model_validate(row._mapping)


def get_member_by_id(uow: UnitOfWork, *, member_id: int) -> MemberRead:
    row = uow.conn.execute(
        select(
            members.c.id, members.c.program_id, members.c.external_ref, members.c.state,
            members.c.created_at,
        ).where(members.c.id == member_id)
    ).one_or_none()  # fmt: skip
    if row is None:
        raise UnknownMember(member_id=member_id)
    return MemberRead.model_validate(row._mapping)


def require_member(
    uow: UnitOfWork, *, program_id: int, member_id: int, transacting: bool = False
) -> MemberRead:
    """The member, if it belongs to the programme; with ``transacting``, only if its state
    lets it earn and spend (active)."""
    member = get_member_by_id(uow, member_id=member_id)
    if member.program_id != program_id:
        raise UnknownMember(member_id=member_id)
    if transacting and member.state != "active":
        raise StateConflict(
            problem=f"Member {member_id} is {member.state}: it cannot earn or spend until "
            "staff make it active again.",
            problem_zh=f"会员 {member_id} 当前状态为 {member.state},"
            "恢复正常状态前不能获取或使用积分。",
        )
    return member


def external_refs(uow: UnitOfWork, *, member_ids: Iterable[int]) -> dict[int, str]:
    ids = list(member_ids)
    if not ids:
        return {}
    rows = uow.conn.execute(
        select(members.c.id, members.c.external_ref).where(members.c.id.in_(ids))
    )
    return {int(member_id): ref for member_id, ref in rows}


def count_members(uow: UnitOfWork, *, program_id: int) -> int:
    return int(
        uow.conn.execute(
            select(func.count()).where(members.c.program_id == program_id)
        ).scalar_one()
    )
