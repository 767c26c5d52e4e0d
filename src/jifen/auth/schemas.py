"""What identity and access use cases take and answer with."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from jifen.api.schemas import NO_NUL, Instant, RequestBody


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


# --------------------------------------------------------------------------- requests

Username = Annotated[str, Field(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")]
Password = Annotated[str, Field(min_length=8, max_length=200, pattern=NO_NUL)]
AnyPassword = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)]
Code = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
ProgramCode = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")]
ScopeName = Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)]


class StaffSignIn(RequestBody):
    username: Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)]
    password: AnyPassword
    totp_code: Annotated[str | None, Field(pattern=r"^[0-9]{6}$")] = None
    """The authenticator's current six digits; required for roles that can write."""


class MemberSignIn(RequestBody):
    program: ProgramCode
    login: Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL)]
    """The member's bound phone number or its reference (card number); a phone number bound
    to a member names that member, even if it is another member's reference."""
    password: AnyPassword


class CodeRequest(RequestBody):
    program: ProgramCode
    phone: Annotated[str, Field(min_length=1, max_length=32, pattern=NO_NUL)]


class CodeSent(_Read):
    sent: bool = True
    """Always true: whether the number belongs to a member is not revealed."""
    expires_at: datetime


class CodeSignIn(RequestBody):
    program: ProgramCode
    phone: Annotated[str, Field(min_length=1, max_length=32, pattern=NO_NUL)]
    code: Annotated[str, Field(pattern=r"^[0-9]{6}$")]


class PasswordChange(RequestBody):
    current_password: Annotated[str | None, Field(max_length=200, pattern=NO_NUL)] = None
    """The present password; staff resetting a member's password leave it out."""
    new_password: Password


class GrantIn(RequestBody):
    role: Code
    program: ProgramCode | None = None
    """Programme code; leave out for every programme."""
    merchant: ScopeName | None = None
    store: ScopeName | None = None


class StaffCreate(RequestBody):
    username: Username
    display_name: Annotated[str, Field(max_length=100, pattern=NO_NUL)] = ""
    password: Password
    grants: Annotated[list[GrantIn], Field(default_factory=list, max_length=20)]


class StaffUpdate(RequestBody):
    display_name: Annotated[str | None, Field(max_length=100, pattern=NO_NUL)] = None
    active: bool | None = None
    unlock: bool = False
    """Clear failed sign-ins and any lock."""


class RoleCreate(RequestBody):
    code: Code
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=NO_NUL)]
    permissions: Annotated[list[str], Field(min_length=1, max_length=100)]


class RoleUpdate(RequestBody):
    name: Annotated[str | None, Field(min_length=1, max_length=100, pattern=NO_NUL)] = None
    permissions: Annotated[list[str] | None, Field(min_length=1, max_length=100)] = None


class ApiKeyCreate(RequestBody):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=NO_NUL)]
    permissions: Annotated[list[str] | None, Field(min_length=1, max_length=50)] = None
    """Leave out for the default integration set; an empty list (a key that could do
    nothing) is refused."""
    merchant: ScopeName | None = None
    store: ScopeName | None = None
    expires_at: Instant | None = None


# --------------------------------------------------------------------------- answers


class GrantRead(_Read):
    id: int
    role: str
    program_id: int | None
    merchant: str | None
    store: str | None


class StaffRead(_Read):
    id: int
    username: str
    display_name: str
    active: bool
    locked_until: datetime | None
    failed_sign_ins: int
    totp: bool
    """Whether an authenticator is set up."""
    grants: list[GrantRead]
    created_at: datetime
    home_program_id: int | None = None
    """The programme of the scope it was created in (None: every programme)."""
    home_merchant: str | None = None
    """The merchant of the scope it was created in (None: every merchant)."""
    home_store: str | None = None
    """The store of the scope it was created in (None: every store). While it holds no
    grant, only administrators whose scope contains this one manage it."""


class RoleRead(_Read):
    id: int
    code: str
    name: str
    program_id: int | None
    builtin: bool
    permissions: list[str]


class ApiKeyRead(_Read):
    id: int
    prefix: str
    name: str
    program_id: int
    merchant: str | None
    store: str | None
    permissions: list[str]
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_by: str
    created_at: datetime


class GrantSummary(_Read):
    role: str
    program_id: int | None
    merchant: str | None
    store: str | None
    permissions: list[str]


class Me(_Read):
    kind: str
    """staff, member or key."""
    id: int
    name: str
    program_id: int | None
    member_id: int | None
    grants: list[GrantSummary]


class PermissionRead(_Read):
    code: str
    description: str


class MemberSignInData(_Read):
    """What jifen holds about how a member signs in (never the password or a token)."""

    password_set: bool
    """A password is set (stored as an argon2id hash only)."""
    active_sessions: int
    """Sessions not ended and not expired."""
