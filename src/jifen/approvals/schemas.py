"""What the approvals use cases take and answer with."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jifen.api.schemas import NO_NUL, RequestBody

ApprovalAction = Literal[
    "points.adjust", "points.clear", "programs.settings", "rules.approve", "rules.caps"
]
ApprovalStatus = Literal["pending", "expired", "approved", "rejected", "failed", "withdrawn"]
"""``expired`` is never stored: it is a ``pending`` request read after its programme's
``approval_ttl_hours`` have passed since it was filed."""


class ApprovalRead(BaseModel):
    """A maker–checker request: what would execute, who asked, who decided, what came of it."""

    model_config = ConfigDict(frozen=True)

    id: int
    program_id: int
    action: ApprovalAction
    params: dict[str, Any]
    """What executes on approval."""
    summary: str
    status: ApprovalStatus
    requested_by: int
    """The staff user who asked."""
    requested_at: datetime
    expires_at: datetime | None = None
    """When a request still undecided expires (``requested_at`` plus the programme's
    ``approval_ttl_hours``): from then on it reads ``expired`` and cannot be approved, only
    rejected by a checker or withdrawn by its maker. ``None`` once decided or withdrawn."""
    decided_by: int | None = None
    decided_at: datetime | None = None
    decision_note: str = ""
    result: dict[str, Any] | None = None
    """What the execution produced (the posting, the new settings, and as ``replaced`` the
    settings or caps they replaced), or, when it failed, the error: ``code``, ``message``
    and ``message_zh``."""


class ApprovalDecision(RequestBody):
    note: str = Field("", max_length=1000, pattern=NO_NUL)
    """Why, for the record."""
