"""What the audit log takes and answers with."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class AuditEntryCreate(BaseModel):
    """One write to record: who, from where, what, on what, and the change."""

    model_config = ConfigDict(frozen=True)

    program_id: int | None
    actor: str
    role: str = ""
    api_key_id: int | None = None
    ip: str = ""
    user_agent: str = ""
    action: str
    target: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


class AuditEntryRead(AuditEntryCreate):
    id: int
    stripe: int
    seq: int
    at: datetime
    hash: str
