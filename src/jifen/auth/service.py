"""Identity and access use cases: who a token belongs to, and what it may do."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

import pyotp
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from sqlalchemy import select

from jifen.auth.core import (
    API_KEY_PERMISSIONS,
    BUILTIN_ROLES,
    DEFAULT_API_KEY_PERMISSIONS,
    MEMBER_PERMISSIONS,
    Grant,
    Principal,
    is_write,
)
from jifen.auth.models import api_keys, role_grants, roles, sessions, staff_users
from jifen.auth.schemas import ApiKeyCreated, SessionCreated, StaffCreated
from jifen.crypto import encrypt, keyed_hash, same_hash
from jifen.db.uow import UnitOfWork
from jifen.errors import DuplicateReference, InvalidInput, Unauthenticated
from jifen.members import service as members_service

API_KEY_MARK = "jf_"
LAST_USED_EVERY = timedelta(minutes=1)
"""``last_used_at`` is written at most this often per key: not a write per request."""


def _refused(problem: str, problem_zh: str) -> Unauthenticated:
    return Unauthenticated(problem=problem, problem_zh=problem_zh)


def sync_builtin_roles(uow: UnitOfWork) -> None:
    """Create the built-in roles, or bring their permissions in line with the code."""
    now = uow.clock.now()
    existing = {
        row.code: row
        for row in uow.conn.execute(
            select(roles.c.id, roles.c.code, roles.c.permissions).where(roles.c.builtin)
        )
    }
    for code, (name, _name_zh, permissions) in BUILTIN_ROLES.items():
        wanted = sorted(permissions)
        row = existing.get(code)
        if row is None:
            uow.conn.execute(
                roles.insert(),
                {"code": code, "name": name, "program_id": None, "builtin": True,
                 "permissions": wanted, "created_at": now},
            )  # fmt: skip
        elif sorted(row.permissions) != wanted:
            uow.conn.execute(roles.update().where(roles.c.id == row.id).values(permissions=wanted))


def staff_grants(uow: UnitOfWork, staff_id: int) -> tuple[Grant, ...]:
    rows = uow.conn.execute(
        select(
            roles.c.code, roles.c.permissions, role_grants.c.program_id,
            role_grants.c.merchant, role_grants.c.store,
        )
        .join(roles, roles.c.id == role_grants.c.role_id)
        .where(role_grants.c.staff_id == staff_id)
        .order_by(role_grants.c.id)
    )  # fmt: skip
    return tuple(
        Grant(
            permissions=frozenset(row.permissions),
            program_id=row.program_id,
            merchant=row.merchant,
            store=row.store,
            role=row.code,
        )
        for row in rows
    )


def staff_principal(uow: UnitOfWork, staff_id: int, *, session_id: int | None) -> Principal:
    row = uow.conn.execute(
        select(staff_users.c.username, staff_users.c.active).where(staff_users.c.id == staff_id)
    ).one_or_none()
    if row is None or not row.active:
        raise _refused("This staff account is disabled.", "该员工账户已停用。")
    grants = staff_grants(uow, staff_id)
    return Principal(
        kind="staff",
        id=staff_id,
        name=f"staff:{row.username}",
        grants=grants,
        session_id=session_id,
        roles=tuple(dict.fromkeys(grant.role for grant in grants)),
    )


def member_principal(uow: UnitOfWork, member_id: int, *, session_id: int | None) -> Principal:
    member = members_service.get_member_by_id(uow, member_id=member_id)
    if member.state in ("banned", "closed"):
        raise _refused(
            f"This member account is {member.state}.", f"该会员账户状态为 {member.state}。"
        )
    return Principal(
        kind="member",
        id=member_id,
        name=f"member:{member_id}",
        grants=(
            Grant(permissions=MEMBER_PERMISSIONS, program_id=member.program_id, role="member"),
        ),
        program_id=member.program_id,
        member_id=member_id,
        session_id=session_id,
        roles=("member",),
    )


def _api_key_principal(uow: UnitOfWork, token: str) -> Principal:
    _, _, rest = token.partition(API_KEY_MARK)
    prefix, _, secret = rest.partition("_")
    row = uow.conn.execute(select(api_keys).where(api_keys.c.prefix == prefix)).one_or_none()
    if row is None or not secret or not same_hash(secret, row.secret_hash):
        raise _refused("The API key is not valid.", "API 密钥无效。")
    now = uow.clock.now()
    if row.revoked_at is not None:
        raise _refused("The API key has been revoked.", "API 密钥已被吊销。")
    if row.expires_at is not None and row.expires_at <= now:
        raise _refused("The API key has expired.", "API 密钥已过期。")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        uow.conn.execute(api_keys.update().where(api_keys.c.id == row.id).values(last_used_at=now))
    return Principal(
        kind="key",
        id=row.id,
        name=f"key:{API_KEY_MARK}{prefix}",
        grants=(
            Grant(
                permissions=frozenset(row.permissions),
                program_id=row.program_id,
                merchant=row.merchant,
                store=row.store,
                role="api_key",
            ),
        ),
        program_id=row.program_id,
        api_key_id=row.id,
        roles=("api_key",),
    )


def authenticate(uow: UnitOfWork, token: str) -> Principal:
    """The principal a bearer token (session token or API key) stands for."""
    if token.startswith(API_KEY_MARK):
        return _api_key_principal(uow, token)
    row = uow.conn.execute(
        select(sessions).where(sessions.c.token_hash == keyed_hash(token))
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        raise _refused("The session is not valid.", "会话无效。")
    if row.expires_at <= uow.clock.now():
        raise _refused("The session has expired.", "会话已过期。")
    if row.subject == "staff":
        return staff_principal(uow, row.subject_id, session_id=row.id)
    return member_principal(uow, row.subject_id, session_id=row.id)


# --------------------------------------------------------------------------- secrets

# OWASP's baseline for argon2id (m=19 MiB, t=2, p=1), a little above it on memory.
PASSWORDS = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, type=Type.ID)
STAFF_SESSION = timedelta(hours=12)
MEMBER_SESSION = timedelta(days=30)


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise InvalidInput(field="password", problem="give at least 8 characters")
    return PASSWORDS.hash(password)


def password_matches(stored: str, password: str) -> bool:
    try:
        return PASSWORDS.verify(stored, password)
    except (VerifyMismatchError, InvalidHashError):
        return False


def new_session(uow: UnitOfWork, *, subject: str, subject_id: int) -> SessionCreated:
    """Open a session; its token is returned once and stored only as a keyed hash."""
    token = secrets.token_urlsafe(32)
    now = uow.clock.now()
    expires_at = now + (STAFF_SESSION if subject == "staff" else MEMBER_SESSION)
    uow.conn.execute(
        sessions.insert(),
        {"token_hash": keyed_hash(token), "subject": subject, "subject_id": subject_id,
         "expires_at": expires_at, "created_at": now},
    )  # fmt: skip
    return SessionCreated(
        token=token, expires_at=expires_at, subject=subject, subject_id=subject_id
    )


# --------------------------------------------------------------------------- staff


def create_staff(
    uow: UnitOfWork,
    *,
    username: str,
    password: str,
    display_name: str = "",
    roles_in: Sequence[tuple[str, int | None]] = (),
    totp_secret: str | None = None,
) -> StaffCreated:
    """Create a staff user with a TOTP seed and grants of built-in or custom roles.

    ``roles_in`` lists (role code, programme id or None for every programme). The TOTP seed
    (random unless given) is returned once, with its provisioning URI, and stored encrypted.
    """
    if uow.conn.execute(select(staff_users.c.id).where(staff_users.c.username == username)).first():
        raise DuplicateReference(what="Staff username", what_zh="员工用户名", value=username)
    seed = totp_secret or pyotp.random_base32()
    now = uow.clock.now()
    staff_id = uow.conn.execute(
        staff_users.insert().returning(staff_users.c.id),
        {"username": username, "display_name": display_name or username,
         "password_hash": hash_password(password), "totp_secret_enc": encrypt(seed),
         "created_at": now},
    ).scalar_one()  # fmt: skip
    for role_code, program_id in roles_in:
        grant_role(uow, staff_id=staff_id, role=role_code, program_id=program_id)
    return StaffCreated(
        id=staff_id,
        username=username,
        totp_secret=seed,
        totp_uri=pyotp.TOTP(seed).provisioning_uri(name=username, issuer_name="jifen"),
    )


def grant_role(
    uow: UnitOfWork,
    *,
    staff_id: int,
    role: str,
    program_id: int | None = None,
    merchant: str | None = None,
    store: str | None = None,
) -> int:
    """Give a staff user a role (built-in, or custom in ``program_id``) in a scope."""
    sync_builtin_roles(uow)
    row = uow.conn.execute(
        select(roles.c.id, roles.c.program_id)
        .where(roles.c.code == role)
        .where((roles.c.program_id.is_(None)) | (roles.c.program_id == program_id))
    ).first()
    if row is None:
        raise InvalidInput(field="role", problem=f"there is no role {role!r}")
    if row.program_id is not None and row.program_id != program_id:
        raise InvalidInput(field="role", problem=f"role {role!r} belongs to another programme")
    grant_id = uow.conn.execute(
        role_grants.insert().returning(role_grants.c.id),
        {"staff_id": staff_id, "role_id": row.id, "program_id": program_id,
         "merchant": merchant, "store": store, "created_at": uow.clock.now()},
    ).scalar_one()  # fmt: skip
    return int(grant_id)


def needs_totp(grants: Sequence[Grant]) -> bool:
    """TOTP is required of anyone whose roles can change something."""
    return any(is_write(permission) for grant in grants for permission in grant.permissions)


# --------------------------------------------------------------------------- API keys


def create_api_key(
    uow: UnitOfWork,
    *,
    program_id: int,
    name: str,
    created_by: str,
    permissions: Sequence[str] | None = None,
    merchant: str | None = None,
    store: str | None = None,
    expires_at: datetime | None = None,
    secret: str | None = None,
) -> ApiKeyCreated:
    """Issue an API key; its token (prefix and secret) is returned once, the secret kept
    only as a keyed hash."""
    wanted = sorted(set(permissions) if permissions is not None else DEFAULT_API_KEY_PERMISSIONS)
    beyond = [p for p in wanted if p not in API_KEY_PERMISSIONS]
    if beyond:
        raise InvalidInput(
            field="permissions",
            problem=f"an API key cannot hold {', '.join(beyond)}; choose from "
            f"{', '.join(sorted(API_KEY_PERMISSIONS))}",
        )
    prefix = secrets.token_hex(4)
    secret = secret or secrets.token_urlsafe(24)
    now = uow.clock.now()
    key_id = uow.conn.execute(
        api_keys.insert().returning(api_keys.c.id),
        {"prefix": prefix, "secret_hash": keyed_hash(secret), "name": name,
         "program_id": program_id, "merchant": merchant, "store": store,
         "permissions": wanted, "expires_at": expires_at, "created_by": created_by,
         "created_at": now},
    ).scalar_one()  # fmt: skip
    return ApiKeyCreated(
        id=key_id,
        prefix=prefix,
        token=f"{API_KEY_MARK}{prefix}_{secret}",
        name=name,
        program_id=program_id,
        merchant=merchant,
        store=store,
        permissions=wanted,
        expires_at=expires_at,
        created_at=now,
    )
