"""What identity and access use cases take and answer with."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class _Read(BaseModel):
    model_config = ConfigDict(frozen=True)


class SessionCreated(_Read):
    token: str
    """Send as ``Authorization: Bearer <token>``; shown only now."""
    expires_at: datetime
    subject: str
    subject_id: int


class StaffCreated(_Read):
    id: int
    username: str
    totp_secret: str
    """The TOTP seed for an authenticator app; shown only now."""
    totp_uri: str


class ApiKeyCreated(_Read):
    id: int
    prefix: str
    token: str
    """``jf_<prefix>_<secret>``: send as ``Authorization: Bearer`` or ``X-API-Key``; shown
    only now, stored only as a hash."""
    name: str
    program_id: int
    merchant: str | None
    store: str | None
    permissions: list[str]
    expires_at: datetime | None
    created_at: datetime
