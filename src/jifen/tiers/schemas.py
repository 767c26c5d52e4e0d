"""What the tiers use cases take and answer with."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from jifen.api.schemas import RequestBody

TierCode = Annotated[str, Field(min_length=1, max_length=64)]


class TierDef(RequestBody):
    code: TierCode
    """What rules and caps name (普通, 银卡, 金卡, 钻石)."""
    name: Annotated[str, Field(min_length=1, max_length=100)]
    rank: Annotated[int, Field(ge=0, le=100)]
    """0 for the entry tier; a higher rank is a better tier."""


class TiersSet(RequestBody):
    tiers: Annotated[list[TierDef], Field(min_length=1, max_length=50)]


class TierRead(BaseModel):
    code: str
    name: str
    rank: int


class MemberTierSet(RequestBody):
    tier: TierCode
    reason: Annotated[str, Field(max_length=500)] = ""


class MemberTierRead(BaseModel):
    member_id: int
    tier: str | None
    """None: the member has no tier yet (rules treat it as no tier)."""
    since: datetime | None = None
    reason: str = ""
    set_by: str = ""
