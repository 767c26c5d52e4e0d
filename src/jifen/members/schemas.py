"""What the members use cases answer with."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class MemberRead(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    program_id: int
    external_ref: str
    state: str = "active"
    created_at: datetime
