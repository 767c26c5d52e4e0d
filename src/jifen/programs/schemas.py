"""What the programmes use cases take and answer with."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class ProgramRead(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    code: str
    name: str
    time_zone: str
    created_at: datetime
