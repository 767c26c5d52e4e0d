"""Programme use cases."""

from __future__ import annotations

import functools
import json
import zoneinfo
from bisect import bisect_right
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Text, bindparam, cast, select

from jifen.db.prepared import Prepared, Read, read_one
from jifen.db.uow import UnitOfWork
from jifen.errors import DuplicateReference, InvalidInput, UnknownProgram
from jifen.programs.models import program_settings_history, programs
from jifen.programs.schemas import ProgramRead, ProgramSettings
from jifen.tiers import core as tiers_core
from jifen.tiers.models import tiers

T = TypeVar("T")


def create_program(
    uow: UnitOfWork, *, code: str, name: str, time_zone: str = "Asia/Shanghai"
) -> ProgramRead:
    """Create a programme with its own system accounts."""
    from jifen.points import service as points_service  # points imports programs for zones

    code = code.strip()
    if not code or len(code) > 64:
        raise InvalidInput(
            field="code",
            problem="give a programme code of 1 to 64 characters",
            problem_zh="请给出 1 到 64 个字符的计划代码",
        )
    try:
        ZoneInfo(time_zone)
        known = time_zone in iana_time_zones()
    except (ZoneInfoNotFoundError, ValueError):
        known = False
    if not known:
        raise InvalidInput(
            field="time_zone",
            problem=f"{time_zone!r} is not an IANA time zone such as Asia/Shanghai",
            problem_zh=f"{time_zone!r} 不是 IANA 时区(例如 Asia/Shanghai)",
        )
    if uow.conn.execute(select(programs.c.id).where(programs.c.code == code)).first():
        raise DuplicateReference(what="Programme code", what_zh="计划代码", value=code)
    now = uow.clock.now()
    program_id = uow.conn.execute(
        programs.insert().returning(programs.c.id),
        {"code": code, "name": name, "time_zone": time_zone, "created_at": now},
    ).scalar_one()
    points_service.open_system_accounts(uow, program_id=program_id)
    return ProgramRead(id=program_id, code=code, name=name, time_zone=time_zone, created_at=now)


@functools.cache
def iana_time_zones() -> frozenset[str]:
    """The IANA time zone names, without ``localtime`` (the serving machine's own zone,
    which the zone files hold too: a programme's calendar would move with the server) and
    ``posixrules`` (a file of the database's, no zone); read once a process."""
    return frozenset(zoneinfo.available_timezones() - {"localtime", "posixrules"})


def get_program(uow: UnitOfWork, *, code: str) -> ProgramRead:
    row = uow.conn.execute(select(programs).where(programs.c.code == code)).one_or_none()
    if row is None:
        raise UnknownProgram(program=code)
    return ProgramRead.model_validate(row._mapping)


def list_programs(
    uow: UnitOfWork,
    *,
    after_id: int = 0,
    limit: int | None = None,
    among: Collection[int] | None = None,
) -> list[ProgramRead]:
    """Programmes in id order after ``after_id``: at most ``limit`` (None: all), only those
    ``among`` the given ids (None: any)."""
    query = select(programs).where(programs.c.id > after_id).order_by(programs.c.id)
    if among is not None:
        query = query.where(programs.c.id.in_(sorted(among)))
    rows = uow.conn.execute(query.limit(limit))
    return [ProgramRead.model_validate(row._mapping) for row in rows]


def time_zone(uow: UnitOfWork, *, program_id: int) -> str:
    """The programme's IANA time zone (cached: it is read on every balance query)."""
    cache_key = f"time_zone:{program_id}"
    zone: str | None = uow.cache.get(cache_key)
    if zone is None:
        zone = uow.conn.execute(
            select(programs.c.time_zone).where(programs.c.id == program_id)
        ).scalar_one_or_none()
        if zone is None:
            raise UnknownProgram(program=program_id)
        uow.cache[cache_key] = zone
    return zone


def get_settings(uow: UnitOfWork, *, program_id: int) -> ProgramSettings:
    """The programme's policy; what was never set has its default (read once a transaction)."""
    cached: ProgramSettings | None = uow.local.get(f"settings:{program_id}")
    if cached is not None:  # (a batch of events asks for every event)
        return cached
    return read_one(uow.conn, settings_read(uow, program_id))


def settings_read(uow: UnitOfWork, program_id: int) -> Read[ProgramSettings]:
    """:func:`get_settings` as a read to run together with others (nothing to read when
    the transaction has read them already)."""
    key = f"settings:{program_id}"
    if key in uow.local:
        cached: ProgramSettings = uow.local[key]
        return Read(None, {}, lambda _: cached)

    def answer(row: Any) -> ProgramSettings:
        text = row[0] if row is not None else None
        if text is None:
            raise UnknownProgram(program=program_id)
        settings = _parsed(uow, text)
        uow.local[key] = settings
        return settings

    return Read(_SETTINGS_TEXT, {"program": program_id}, answer)


def settings_at(
    uow: UnitOfWork, *, program_id: int, at: datetime
) -> tuple[datetime | None, ProgramSettings]:
    """The programme's policy in force at ``at`` (an event's time), with when it was
    replaced (``None``: it is the current one, never replaced): the first policy replaced
    after ``at``, or the current one. The replaced policies are read once a transaction."""
    found: tuple[list[datetime], list[tuple[datetime, ProgramSettings]]] | None = uow.local.get(
        f"settings_history:{program_id}"
    )
    if found is None:
        rows = uow.conn.execute(
            select(
                program_settings_history.c.until, cast(program_settings_history.c.settings, Text)
            )
            .where(program_settings_history.c.program_id == program_id)
            .order_by(program_settings_history.c.until)
        ).all()
        history = [(until, _parsed(uow, text)) for until, text in rows]
        found = uow.local[f"settings_history:{program_id}"] = ([u for u, _ in rows], history)
    untils, history = found
    after = bisect_right(untils, at)  # replaced at or before ``at``
    if after < len(history):
        return history[after]
    return None, get_settings(uow, program_id=program_id)


def _parsed(uow: UnitOfWork, text: str) -> ProgramSettings:
    """Settings as stored, parsed once per distinct text and shared (read-only) by every
    transaction after."""
    settings: ProgramSettings | None = uow.cache.get(f"settings_text:{text}")
    if settings is None:
        known = set(ProgramSettings.model_fields)
        # A key an older release wrote and this one dropped must not make them unreadable.
        stored = json.loads(text)
        settings = ProgramSettings.model_validate({k: v for k, v in stored.items() if k in known})
        uow.cache[f"settings_text:{text}"] = settings
    return settings


def derived(
    uow: UnitOfWork, *, program_id: int, name: str, build: Callable[[ProgramSettings], T]
) -> T:
    """``build(settings)`` computed once a transaction (again after the settings change in
    it): a policy with the benefits matrix folded in, read for every event of a batch."""
    settings = get_settings(uow, program_id=program_id)
    key = f"{name}:{id(settings)}"
    if key not in uow.local:
        uow.local[key] = build(settings)
    value: T = uow.local[key]
    return value


_SETTINGS_TEXT = Prepared(
    select(cast(programs.c.settings, Text)).where(programs.c.id == bindparam("program"))
)


def lock_program(uow: UnitOfWork, *, program_id: int) -> None:
    """Hold the programme's row until the transaction ends, and read its settings afresh
    after, and its earning caps: one who replaces a whole value of the programme (its
    settings, its earning caps) then decides on what is there now, and a concurrent
    replacement waits for it and sees its change. ``FOR NO KEY UPDATE``, the lock the
    settings' own update takes: rows that refer to the programme (postings, members) are
    not held up. SQLite serialises writers already."""
    uow.local.pop(f"settings:{program_id}", None)
    uow.local.pop(f"caps:{program_id}", None)  # as rules.service.get_caps keeps them
    held = uow.conn.execute(
        select(programs.c.id).where(programs.c.id == program_id).with_for_update(key_share=True)
    ).first()
    if held is None:
        raise UnknownProgram(program=program_id)


def tiers_named(settings: ProgramSettings) -> dict[str, list[str]]:
    """The tier codes the policy names, by where: validity and redemption terms by tier (the
    tier scheme's benefits are checked against its levels, and those against the tiers)."""
    return {
        "expiry.by_tier": list(settings.expiry.by_tier),
        "redemption.tiers": list(settings.redemption.tiers),
    }


def tier_namings(uow: UnitOfWork, *, program_id: int) -> list[tiers_core.Naming]:
    """Where the programme's settings name tiers (:func:`tiers_named`), for refusing to
    remove one of them."""
    return tiers_core.namings(
        "the programme's policy", "计划设置", tiers_named(get_settings(uow, program_id=program_id)),
        "change the settings to leave it out, through an approval",
        "请修改计划设置(经审批)去掉该等级",
    )  # fmt: skip


def require_tiers_defined(uow: UnitOfWork, *, program_id: int, settings: ProgramSettings) -> None:
    """Refuse settings naming a tier the programme does not define (see
    :func:`jifen.tiers.core.require_defined`); a code the stored settings already name at the
    same place is not checked again."""
    known = uow.conn.execute(
        select(tiers.c.code).where(tiers.c.program_id == program_id).order_by(tiers.c.rank)
    ).scalars()
    tiers_core.require_defined(
        tiers_named(settings), list(known),
        kept=tiers_named(get_settings(uow, program_id=program_id)),
    )  # fmt: skip


def set_settings(uow: UnitOfWork, *, program_id: int, settings: ProgramSettings) -> ProgramSettings:
    """Replace the programme's policy (callers go through an approval); refused when it
    names a tier the programme does not define (:func:`require_tiers_defined`). The policy
    replaced is kept with the time (:func:`settings_at`); of two replaced at one instant,
    the first (the one in force until then)."""
    require_tiers_defined(uow, program_id=program_id, settings=settings)
    replaced = get_settings(uow, program_id=program_id)
    now = uow.clock.now()
    kept = select(program_settings_history.c.program_id).where(
        program_settings_history.c.program_id == program_id,
        program_settings_history.c.until == now,
    )
    if uow.conn.execute(kept).first() is None:
        uow.conn.execute(
            program_settings_history.insert().values(
                program_id=program_id, until=now, settings=replaced.model_dump(mode="json")
            )
        )
    uow.local.pop(f"settings:{program_id}", None)
    uow.local.pop(f"settings_history:{program_id}", None)
    result = uow.conn.execute(
        programs.update()
        .where(programs.c.id == program_id)
        .values(settings=settings.model_dump(mode="json"))
    )
    if result.rowcount != 1:
        raise UnknownProgram(program=program_id)
    return settings
