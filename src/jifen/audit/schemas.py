"""What the audit log takes and answers with."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    """A recorded entry, with its place in its stripe's chain."""

    id: int
    stripe: int
    seq: int
    at: datetime
    prev_hash: str = Field(description="Hash of the entry before it in its chain.")
    hash: str = Field(description="SHA-256 over prev_hash, seq, at and every recorded field.")


class AuditProblemRead(BaseModel):
    """One thing ``verify`` found wrong, and where."""

    entry_id: int | None = Field(description="The entry it is about, when one is stored.")
    stripe: int | None
    seq: int | None
    problem: str = Field(description="What is wrong, in the request's language.")


class AuditVerification(BaseModel):
    """The outcome of checking every entry's hash, every chain's links and every head."""

    ok: bool
    entries: int = Field(description="Entries checked.")
    chains: int = Field(description="Chains (stripes) that hold entries.")
    problems: list[AuditProblemRead]
