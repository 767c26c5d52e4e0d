"""What the programmes use cases take and answer with."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from jifen.api.schemas import RequestBody


class ProgramRead(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    code: str
    name: str
    time_zone: str
    created_at: datetime


class ProgramCreate(RequestBody):
    code: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    """Short stable name used in URLs, for example ``demo``."""
    name: str = Field(min_length=1, max_length=200)
    time_zone: str = Field("Asia/Shanghai", max_length=64)
    """IANA time zone for calendar rules."""
