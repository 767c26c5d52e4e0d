"""Tier use cases: a programme's tiers, and each member's current tier (set by staff, by
import or by the API; scoring by rules comes later). Rules and caps read the tier as a fact.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select

from jifen.db.uow import UnitOfWork
from jifen.db.upsert import upsert
from jifen.errors import InvalidInput, StateConflict, UnknownTier
from jifen.members import service as members_service
from jifen.tiers.models import member_tiers, tiers
from jifen.tiers.schemas import MemberTierRead, TierDef, TierRead


def list_tiers(uow: UnitOfWork, *, program_id: int) -> list[TierRead]:
    rows = uow.conn.execute(
        select(tiers.c.code, tiers.c.name, tiers.c.rank)
        .where(tiers.c.program_id == program_id)
        .order_by(tiers.c.rank)
    ).all()
    return [TierRead(code=r.code, name=r.name, rank=r.rank) for r in rows]


def set_tiers(uow: UnitOfWork, *, program_id: int, definitions: list[TierDef]) -> list[TierRead]:
    """Replace the programme's tiers. A tier that members hold cannot be removed."""
    codes = [d.code for d in definitions]
    ranks = [d.rank for d in definitions]
    if len(set(codes)) != len(codes) or len(set(ranks)) != len(ranks):
        raise InvalidInput(field="tiers", problem="each tier needs its own code and its own rank")
    held = uow.conn.execute(
        select(member_tiers.c.tier_code)
        .where(member_tiers.c.program_id == program_id, member_tiers.c.tier_code.not_in(codes))
        .limit(1)
    ).scalar_one_or_none()
    if held is not None:
        raise StateConflict(
            problem=f"Members hold tier {held!r}; move them to another tier before removing it.",
            problem_zh=f"仍有会员处于等级 {held!r};请先调整这些会员的等级再删除。",
        )
    uow.conn.execute(delete(tiers).where(tiers.c.program_id == program_id))
    uow.conn.execute(
        tiers.insert(),
        [
            {"program_id": program_id, "code": d.code, "name": d.name, "rank": d.rank}
            for d in definitions
        ],
    )
    return list_tiers(uow, program_id=program_id)


def set_member_tier(
    uow: UnitOfWork, *, program_id: int, member_id: int, tier: str, reason: str, set_by: str
) -> MemberTierRead:
    """Put the member in ``tier`` from now on."""
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    require_tiers(uow, program_id=program_id, codes=[tier])
    now = uow.clock.now()
    upsert(
        uow,
        member_tiers,
        {
            "member_id": member_id,
            "program_id": program_id,
            "tier_code": tier,
            "since": now,
            "reason": reason,
            "set_by": set_by,
        },
    )
    return MemberTierRead(member_id=member_id, tier=tier, since=now, reason=reason, set_by=set_by)


def require_tiers(uow: UnitOfWork, *, program_id: int, codes: Iterable[str]) -> None:
    """Refuse any of ``codes`` that is not a tier of the programme."""
    known = [t.code for t in list_tiers(uow, program_id=program_id)]
    for code in sorted(set(codes)):
        if code not in known:
            raise UnknownTier(tier=code, known=", ".join(known) or "(none defined)")


def member_tier(uow: UnitOfWork, *, program_id: int, member_id: int) -> MemberTierRead:
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    row = uow.conn.execute(
        select(member_tiers).where(member_tiers.c.member_id == member_id)
    ).one_or_none()
    if row is None:
        return MemberTierRead(member_id=member_id, tier=None)
    return MemberTierRead(
        member_id=member_id,
        tier=row.tier_code,
        since=row.since,
        reason=row.reason,
        set_by=row.set_by,
    )


def tiers_of(uow: UnitOfWork, *, member_ids: Iterable[int]) -> dict[int, str]:
    """The current tier of each of ``member_ids`` that has one."""
    ids = sorted(set(member_ids))
    if not ids:
        return {}
    rows = uow.conn.execute(
        select(member_tiers.c.member_id, member_tiers.c.tier_code).where(
            member_tiers.c.member_id.in_(ids)
        )
    ).all()
    return {r.member_id: r.tier_code for r in rows}
