"""Identity and access use cases: who a token belongs to, and what it may do."""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pyotp
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from sqlalchemy import ColumnElement, Table, and_, case, exists, false, func, or_, select, true
from sqlalchemy.exc import SQLAlchemyError

from jifen.auth.core import (
    API_KEY_PERMISSIONS,
    BUILTIN_ROLES,
    DEFAULT_API_KEY_PERMISSIONS,
    MEMBER_PERMISSIONS,
    PERMISSIONS,
    Grant,
    Principal,
    is_write,
)
from jifen.auth.models import (
    api_keys,
    member_credentials,
    one_time_codes,
    role_grants,
    roles,
    sessions,
    sign_in_misses,
    staff_users,
)
from jifen.auth.schemas import (
    ApiKeyCreated,
    ApiKeyRead,
    GrantRead,
    MemberSignInData,
    RoleRead,
    SessionCreated,
    StaffCreated,
    StaffRead,
)
from jifen.crypto import decrypt, encrypt, keyed_hash, keyed_hashes, same_hash
from jifen.db.uow import UnitOfWork
from jifen.db.upsert import insert_missing
from jifen.errors import (
    DuplicateReference,
    InvalidInput,
    JifenError,
    SignInLocked,
    SmsUnavailable,
    StateConflict,
    Unauthenticated,
    UnknownApiKey,
    UnknownRole,
    UnknownStaff,
)
from jifen.members import core as members_core
from jifen.members import service as members_service
from jifen.notify.sms import SmsMessage, SmsProvider

log = logging.getLogger("jifen.auth")

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


def staff_principal(
    uow: UnitOfWork, staff_id: int, *, session_id: int | None, totp_verified: bool = False
) -> Principal:
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
        totp_verified=totp_verified,
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
        expires_at=row.expires_at,
    )


def authenticate(uow: UnitOfWork, token: str) -> Principal:
    """The principal a bearer token (session token or API key) stands for."""
    if token.startswith(API_KEY_MARK):
        return _api_key_principal(uow, token)
    row = uow.conn.execute(
        select(sessions).where(sessions.c.token_hash.in_(keyed_hashes(token)))
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        raise _refused("The session is not valid.", "会话无效。")
    if row.expires_at <= uow.clock.now():
        raise _refused("The session has expired.", "会话已过期。")
    if row.subject == "staff":
        return staff_principal(
            uow, row.subject_id, session_id=row.id, totp_verified=bool(row.totp_verified)
        )
    return member_principal(uow, row.subject_id, session_id=row.id)


# --------------------------------------------------------------------------- secrets

# OWASP's baseline for argon2id (m=19 MiB, t=2, p=1), a little above it on memory.
PASSWORDS = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, type=Type.ID)
STAFF_SESSION = timedelta(hours=12)
MEMBER_SESSION = timedelta(days=30)


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise InvalidInput(
            field="password", problem="give at least 8 characters", problem_zh="请至少使用 8 个字符"
        )
    return PASSWORDS.hash(password)


def password_matches(stored: str, password: str) -> bool:
    try:
        return PASSWORDS.verify(stored, password)
    except (VerifyMismatchError, InvalidHashError):
        return False


def new_session(
    uow: UnitOfWork, *, subject: str, subject_id: int, totp_verified: bool = False
) -> SessionCreated:
    """Open a session; its token is returned once and stored only as a keyed hash.
    ``totp_verified``: a staff user gave a valid TOTP code (only such a session writes)."""
    token = secrets.token_urlsafe(32)
    now = uow.clock.now()
    expires_at = now + (STAFF_SESSION if subject == "staff" else MEMBER_SESSION)
    uow.conn.execute(
        sessions.insert(),
        {"token_hash": keyed_hash(token), "subject": subject, "subject_id": subject_id,
         "expires_at": expires_at, "created_at": now, "totp_verified": totp_verified},
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
    home_program_id: int | None = None,
    home_merchant: str | None = None,
    home_store: str | None = None,
) -> StaffCreated:
    """Create a staff user with a TOTP seed and grants of built-in or custom roles.

    ``roles_in`` lists (role code, programme id or None for every programme). The TOTP seed
    (random unless given) is returned once, with its provisioning URI, and stored encrypted.
    ``home_program_id``, ``home_merchant`` and ``home_store``: the scope it is created in
    (None: every programme, merchant, store), whose administrators manage it while it holds
    no grant.
    """
    if uow.conn.execute(select(staff_users.c.id).where(staff_users.c.username == username)).first():
        raise DuplicateReference(what="Staff username", what_zh="员工用户名", value=username)
    seed = totp_secret or pyotp.random_base32()
    now = uow.clock.now()
    staff_id = uow.conn.execute(
        staff_users.insert().returning(staff_users.c.id),
        {"username": username, "display_name": display_name or username,
         "password_hash": hash_password(password), "totp_secret_enc": encrypt(seed),
         "created_at": now, "home_program_id": home_program_id, "home_merchant": home_merchant,
         "home_store": home_store},
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
    _require_merchant_of_store(merchant, store)
    sync_builtin_roles(uow)
    row = uow.conn.execute(
        select(roles.c.id, roles.c.program_id)
        .where(roles.c.code == role)
        .where((roles.c.program_id.is_(None)) | (roles.c.program_id == program_id))
    ).first()
    if row is None:
        raise InvalidInput(
            field="role", problem=f"there is no role {role!r}", problem_zh=f"不存在角色 {role!r}"
        )
    if row.program_id is not None and row.program_id != program_id:
        raise InvalidInput(
            field="role",
            problem=f"role {role!r} belongs to another programme",
            problem_zh=f"角色 {role!r} 属于其他计划",
        )
    grant_id = uow.conn.execute(
        role_grants.insert().returning(role_grants.c.id),
        {"staff_id": staff_id, "role_id": row.id, "program_id": program_id,
         "merchant": merchant, "store": store, "created_at": uow.clock.now()},
    ).scalar_one()  # fmt: skip
    return int(grant_id)


def _require_merchant_of_store(merchant: str | None, store: str | None) -> None:
    """A store belongs to a merchant: a scope naming a store names its merchant too, so that
    no credential holds a store of whichever merchant it likes."""
    if store is not None and merchant is None:
        raise InvalidInput(
            field="store",
            problem="a store is scoped within a merchant: give the merchant as well",
            problem_zh="门店属于某个商户:请同时填写商户(merchant)",
        )


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
    _require_merchant_of_store(merchant, store)
    wanted = sorted(set(permissions) if permissions is not None else DEFAULT_API_KEY_PERMISSIONS)
    beyond = [p for p in wanted if p not in API_KEY_PERMISSIONS]
    if beyond:
        raise InvalidInput(
            field="permissions",
            problem=f"an API key cannot hold {', '.join(beyond)}; choose from "
            f"{', '.join(sorted(API_KEY_PERMISSIONS))}",
            problem_zh=f"API 密钥不能拥有 {', '.join(beyond)};请从以下权限中选择:"
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


# --------------------------------------------------------------------------- signing in

SLOW_AFTER = 3
"""Failed sign-ins in a row before each further attempt must wait (1 s, 2 s, 4 s, …)."""
LOCK_AFTER = 10
"""Failed sign-ins in a row that lock the account for :data:`LOCK_FOR`."""
LOCK_FOR = timedelta(minutes=15)
CODE_VALID_FOR = timedelta(minutes=5)
CODE_EVERY = timedelta(seconds=60)
"""At most one one-time code per member per this interval."""
CODE_ATTEMPTS = 5
"""Wrong guesses that spend a one-time code."""

_WRONG_STAFF = _refused(
    "The username, password or TOTP code is wrong.", "用户名、密码或动态验证码错误。"
)
_WRONG_MEMBER = _refused("The account or password is wrong.", "账号或密码错误。")
_WRONG_CODE = _refused(
    "The code is wrong or has expired; ask for a new one.", "验证码错误或已过期,请重新获取。"
)
# Checked against when the user does not exist, so that an unknown name takes as long.
_DUMMY_HASH = PASSWORDS.hash("jifen: no such user")


@dataclass(frozen=True)
class SignInOutcome:
    """A sign-in's result: a session, or the error to answer with once the failure (its
    count, its lock) has been committed."""

    session: SessionCreated | None = None
    error: JifenError | None = None

    def unwrap(self) -> SessionCreated:
        if self.error is not None:
            raise self.error
        assert self.session is not None
        return self.session


def wait_after(failures: int) -> timedelta | None:
    """How long an account must wait after ``failures`` failed sign-ins in a row."""
    if failures >= LOCK_AFTER:
        return LOCK_FOR
    if failures >= SLOW_AFTER:
        return timedelta(seconds=2 ** (failures - SLOW_AFTER))
    return None


def _locked(locked_until: datetime | None, now: datetime) -> SignInLocked | None:
    if locked_until is None or locked_until <= now:
        return None
    return SignInLocked(retry_after=max(1, math.ceil((locked_until - now).total_seconds())))


def _fail(uow: UnitOfWork, table: Table, where: ColumnElement[bool]) -> None:
    """Count one more failure and set the wait it brings (atomically, in SQL). Failures
    count in a row: after :data:`FAILURES_KEPT` without one, the count starts again."""
    now = uow.clock.now()
    quiet = table.c.last_failed_at.is_(None) | (table.c.last_failed_at < now - FAILURES_KEPT)
    failures = uow.conn.execute(
        table.update()
        .where(where)
        .values(
            failed_sign_ins=case((quiet, 1), else_=table.c.failed_sign_ins + 1),
            last_failed_at=now,
        )
        .returning(table.c.failed_sign_ins)
    ).scalar_one()
    wait = wait_after(int(failures))
    if wait is not None:
        uow.conn.execute(table.update().where(where).values(locked_until=now + wait))


FAILURES_KEPT = timedelta(days=1)
"""How long failed sign-ins are remembered without another one: an account's, and those
under a login that matches no account."""


def _missed(uow: UnitOfWork, login: str, password: str) -> SignInOutcome | None:
    """A sign-in under ``login`` (``"staff:<username>"``, ``"member:<programme>:<login>"``),
    which matches no account, fails as a wrong password would: it takes as long, it counts,
    and after as many failures it is slowed and locked the same, so that no answer tells
    whether the login exists. The lock it meets, or None after counting it."""
    now = uow.clock.now()
    digest = keyed_hash(f"sign-in miss:{login}")
    this = sign_in_misses.c.login_hash == digest
    locked_until = uow.conn.execute(select(sign_in_misses.c.locked_until).where(this)).scalar()
    locked = _locked(locked_until, now)
    if locked is not None:
        return SignInOutcome(error=locked)
    password_matches(_DUMMY_HASH, password)
    # Forgotten after a quiet day, as an account's count would start again then.
    quiet = sign_in_misses.c.last_failed_at < now - FAILURES_KEPT
    uow.conn.execute(sign_in_misses.delete().where(quiet))
    insert_missing(uow, sign_in_misses, [{"login_hash": digest, "failed_sign_ins": 0}])
    _fail(uow, sign_in_misses, this)
    return None


def _succeed(uow: UnitOfWork, table: Table, where: ColumnElement[bool]) -> None:
    uow.conn.execute(table.update().where(where).values(failed_sign_ins=0, locked_until=None))


def totp_step(seed: str, code: str, at: datetime) -> int | None:
    """The 30-second step ``code`` belongs to, within one step of ``at``; None if none."""
    totp = pyotp.TOTP(seed)
    now_step = totp.timecode(at)
    for step in (now_step, now_step - 1, now_step + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def staff_sign_in(
    uow: UnitOfWork, *, username: str, password: str, totp_code: str | None
) -> SignInOutcome:
    """Check a staff user's password and, for anyone who can write, a fresh TOTP code. The
    session records whether a code was given: one opened without writes nothing, whatever
    roles its user is given later."""
    now = uow.clock.now()
    row = uow.conn.execute(select(staff_users).where(staff_users.c.username == username)).first()
    if row is None:
        return _missed(uow, f"staff:{username}", password) or SignInOutcome(error=_WRONG_STAFF)
    locked = _locked(row.locked_until, now)
    if locked is not None:
        return SignInOutcome(error=locked)
    this = staff_users.c.id == row.id
    if not password_matches(row.password_hash, password):
        _fail(uow, staff_users, this)
        return SignInOutcome(error=_WRONG_STAFF)
    if not row.active:
        return SignInOutcome(
            error=_refused("This staff account is disabled.", "该员工账户已停用。")
        )
    totp_verified = False
    if needs_totp(staff_grants(uow, row.id)) or totp_code:
        if row.totp_secret_enc is None:
            return SignInOutcome(
                error=_refused(
                    "This account has no TOTP authenticator yet; ask an administrator to set "
                    "one up.",
                    "该账户尚未绑定动态验证码,请联系管理员设置。",
                )
            )
        if not totp_code:
            return SignInOutcome(
                error=_refused(
                    "A TOTP code is required: this account's roles can change data.",
                    "该账户的角色可以修改数据,登录需要动态验证码。",
                )
            )
        step = totp_step(decrypt(row.totp_secret_enc), totp_code, now)
        fresh = False
        if step is not None:
            fresh = (
                uow.conn.execute(
                    staff_users.update()
                    .where(this, staff_users.c.totp_last_step < step)
                    .values(totp_last_step=step)
                ).rowcount
                == 1
            )
        if not fresh:  # wrong, or already used once: a TOTP code is never accepted twice
            _fail(uow, staff_users, this)
            return SignInOutcome(error=_WRONG_STAFF)
        totp_verified = True
    _succeed(uow, staff_users, this)
    return SignInOutcome(
        session=new_session(uow, subject="staff", subject_id=row.id, totp_verified=totp_verified)
    )


def set_member_password(
    uow: UnitOfWork,
    *,
    member_id: int,
    password: str,
    current: str | None = None,
    check_current: bool = False,
) -> None:
    """Set a member's password; with ``check_current``, only if ``current`` is its present one
    (a member changing its own password; staff resetting one do not know it). A member whose
    sign-ins are slowed or locked waits here too (:class:`SignInLocked`); a wrong present
    password is refused with :class:`InvalidInput` on ``current_password``, which the caller
    counts as a failed sign-in once this transaction is undone
    (:func:`count_wrong_member_password`)."""
    now = uow.clock.now()
    row = uow.conn.execute(
        select(member_credentials.c.password_hash, member_credentials.c.locked_until).where(
            member_credentials.c.member_id == member_id
        )
    ).first()
    stored = row.password_hash if row is not None else None
    if check_current and row is not None and stored is not None:
        locked = _locked(row.locked_until, now)
        if locked is not None:
            raise locked
    if check_current and stored is not None and not password_matches(stored, current or ""):
        raise InvalidInput(
            field="current_password",
            problem="give the present password to change it",
            problem_zh="修改密码需提供当前密码",
        )
    values = {
        "password_hash": hash_password(password),
        "updated_at": now,
        "failed_sign_ins": 0,
        "locked_until": None,
    }
    if row is None:
        uow.conn.execute(member_credentials.insert(), {"member_id": member_id, **values})
    else:
        uow.conn.execute(
            member_credentials.update()
            .where(member_credentials.c.member_id == member_id)
            .values(**values)
        )


def count_wrong_member_password(uow: UnitOfWork, *, member_id: int) -> None:
    """Count a wrong present password given to change the member's password as a failed
    sign-in (slowed and locked the same): no password is tried there after password."""
    _fail(uow, member_credentials, member_credentials.c.member_id == member_id)


def member_sign_in(uow: UnitOfWork, *, program_id: int, login: str, password: str) -> SignInOutcome:
    """Check a member's password; the login is its bound phone number or, when it is no
    member's bound phone, its reference (see :func:`members_service.find_by_login`)."""
    now = uow.clock.now()
    member_id = members_service.find_by_login(uow, program_id=program_id, login=login)
    row = None
    if member_id is not None:
        row = uow.conn.execute(
            select(member_credentials).where(member_credentials.c.member_id == member_id)
        ).first()
    if member_id is None or row is None or row.password_hash is None:
        missed = _missed(uow, f"member:{program_id}:{login}", password)
        return missed or SignInOutcome(error=_WRONG_MEMBER)
    locked = _locked(row.locked_until, now)
    if locked is not None:
        return SignInOutcome(error=locked)
    this = member_credentials.c.member_id == member_id
    if not password_matches(row.password_hash, password):
        _fail(uow, member_credentials, this)
        return SignInOutcome(error=_WRONG_MEMBER)
    member_principal(uow, member_id, session_id=None)  # refuses banned and closed members
    _succeed(uow, member_credentials, this)
    return SignInOutcome(session=new_session(uow, subject="member", subject_id=member_id))


def _code_hash(member_id: int, code: str) -> str:
    return keyed_hash(f"one-time code:{member_id}:{code}")


def send_code(uow: UnitOfWork, *, program_id: int, phone: str, sms: SmsProvider) -> datetime:
    """Send a six-digit sign-in code to the member whose bound phone is ``phone``.

    Answers the same whether or not such a member exists (no one learns which numbers are
    members); a member gets at most one code a minute: a second request within the minute
    is answered the same and sends nothing (the code sent stays valid). Refusing it, as an
    unknown number never is, would tell which numbers are members. A banned or closed
    member, whom no code signs in, is answered the same and texted nothing. A provider that
    fails to take the text: :class:`SmsUnavailable`, and no code is kept."""
    number = members_core.normalise_phone(phone)
    now = uow.clock.now()
    expires_at = now + CODE_VALID_FOR
    member_id = members_service.find_by_phone(uow, program_id=program_id, phone=number)
    if member_id is None:
        return expires_at
    if members_service.get_member_by_id(uow, member_id=member_id).state in ("banned", "closed"):
        return expires_at
    last = uow.conn.execute(
        select(func.max(one_time_codes.c.created_at)).where(one_time_codes.c.member_id == member_id)
    ).scalar()
    if last is not None and now - last < CODE_EVERY:
        return expires_at
    code = f"{secrets.randbelow(10**6):06d}"
    uow.conn.execute(
        one_time_codes.insert(),
        {"member_id": member_id, "code_hash": _code_hash(member_id, code),
         "expires_at": expires_at, "created_at": now},
    )  # fmt: skip
    minutes = int(CODE_VALID_FOR.total_seconds() // 60)
    message = SmsMessage(
        program_id=program_id,
        phone=number,
        template="sign_in_code",
        text=f"【jifen】验证码 {code},{minutes} 分钟内有效。Your sign-in code is {code}.",
        secret=code,
        member_id=member_id,
    )
    try:
        sms.send(uow, message)
    except (JifenError, SQLAlchemyError):
        raise  # a refusal, or the database's own error (a lost race is run again)
    except Exception as exc:  # the provider's own failure (a gateway down, a timeout)
        # The code goes with this transaction: none is kept, and asking again is not held
        # back by the minute between codes.
        log.warning("the SMS provider failed to send a sign-in code: %r", exc)
        raise SmsUnavailable() from exc
    return expires_at


def code_sign_in(uow: UnitOfWork, *, program_id: int, phone: str, code: str) -> SignInOutcome:
    """Sign a member in with the latest code sent to its phone: once, before it expires,
    within :data:`CODE_ATTEMPTS` guesses."""
    now = uow.clock.now()
    number = members_core.normalise_phone_or_none(phone)
    member_id = (
        None
        if number is None
        else members_service.find_by_phone(uow, program_id=program_id, phone=number)
    )
    if member_id is None:
        return SignInOutcome(error=_WRONG_CODE)
    row = uow.conn.execute(
        select(one_time_codes)
        .where(one_time_codes.c.member_id == member_id)
        .order_by(one_time_codes.c.created_at.desc(), one_time_codes.c.id.desc())
        .limit(1)
    ).first()
    if row is None or row.used_at is not None or row.expires_at <= now:
        return SignInOutcome(error=_WRONG_CODE)
    this = one_time_codes.c.id == row.id
    spent_guesses = row.attempts >= CODE_ATTEMPTS
    if spent_guesses or not same_hash(f"one-time code:{member_id}:{code}", row.code_hash):
        uow.conn.execute(
            one_time_codes.update().where(this).values(attempts=one_time_codes.c.attempts + 1)
        )
        return SignInOutcome(error=_WRONG_CODE)
    spent = uow.conn.execute(
        one_time_codes.update()
        .where(this, one_time_codes.c.used_at.is_(None), one_time_codes.c.attempts < CODE_ATTEMPTS)
        .values(used_at=now)
    ).rowcount
    if spent != 1:  # used by a concurrent request a moment ago
        return SignInOutcome(error=_WRONG_CODE)
    member_principal(uow, member_id, session_id=None)
    return SignInOutcome(session=new_session(uow, subject="member", subject_id=member_id))


def sign_out(uow: UnitOfWork, *, session_id: int) -> None:
    uow.conn.execute(
        sessions.update()
        .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
        .values(revoked_at=uow.clock.now())
    )


def change_staff_password(
    uow: UnitOfWork, *, staff_id: int, current: str, new: str, keep: int | None = None
) -> JifenError | None:
    """Change a staff user's own password, giving the present one; every other session of
    the user ends (whoever held the old password is signed out), but for the session
    ``keep`` (the one that changed it).

    A wrong present password counts as a failed sign-in, slowed and locked the same (a
    session in other hands tries no password after password here): the error to answer
    with once that count is committed is returned, as is the wait of a slowed or locked
    account; None when the password was changed."""
    row = uow.conn.execute(
        select(staff_users.c.password_hash, staff_users.c.locked_until).where(
            staff_users.c.id == staff_id
        )
    ).one()
    locked = _locked(row.locked_until, uow.clock.now())
    if locked is not None:
        return locked
    this = staff_users.c.id == staff_id
    if not password_matches(row.password_hash, current):
        _fail(uow, staff_users, this)
        return InvalidInput(
            field="current_password",
            problem="the present password is wrong",
            problem_zh="当前密码错误",
        )
    _succeed(uow, staff_users, this)
    uow.conn.execute(
        staff_users.update()
        .where(staff_users.c.id == staff_id)
        .values(password_hash=hash_password(new))
    )
    _end_sessions(uow, "staff", staff_id, keep=keep)
    return None


# --------------------------------------------------------------------------- administration


def _grants_of(uow: UnitOfWork, staff_ids: Sequence[int]) -> dict[int, list[GrantRead]]:
    found: dict[int, list[GrantRead]] = {staff_id: [] for staff_id in staff_ids}
    if not staff_ids:
        return found
    rows = uow.conn.execute(
        select(role_grants, roles.c.code)
        .join(roles, roles.c.id == role_grants.c.role_id)
        .where(role_grants.c.staff_id.in_(staff_ids))
        .order_by(role_grants.c.id)
    )
    for row in rows:
        found[row.staff_id].append(
            GrantRead(
                id=row.id,
                role=row.code,
                program_id=row.program_id,
                merchant=row.merchant,
                store=row.store,
            )
        )
    return found


def _staff_reads(uow: UnitOfWork, rows: Sequence[Any]) -> list[StaffRead]:
    grants = _grants_of(uow, [row.id for row in rows])
    return [
        StaffRead(
            id=row.id,
            username=row.username,
            display_name=row.display_name,
            active=row.active,
            locked_until=row.locked_until,
            failed_sign_ins=row.failed_sign_ins,
            totp=row.totp_secret_enc is not None,
            grants=grants[row.id],
            created_at=row.created_at,
            home_program_id=row.home_program_id,
            home_merchant=row.home_merchant,
            home_store=row.home_store,
        )
        for row in rows
    ]


def list_staff(
    uow: UnitOfWork,
    *,
    after_id: int,
    limit: int,
    active: bool | None = None,
    username: str | None = None,
    role: str | None = None,
    within: Sequence[Grant] | None = None,
) -> list[StaffRead]:
    """Staff in the order they were created; filters: active, username prefix, holding a role,
    and (``within``) lying within those scopes (see :func:`_lies_within`)."""
    query = select(staff_users).where(staff_users.c.id > after_id)
    if within is not None:
        query = query.where(_lies_within(within))
    if active is not None:
        query = query.where(staff_users.c.active == active)
    if username:
        escaped = username.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(staff_users.c.username.like(f"{escaped}%", escape="\\"))
    if role is not None:
        holders = (
            select(role_grants.c.staff_id)
            .join(roles, roles.c.id == role_grants.c.role_id)
            .where(roles.c.code == role)
        )
        query = query.where(staff_users.c.id.in_(holders))
    rows = uow.conn.execute(query.order_by(staff_users.c.id).limit(limit)).all()
    return _staff_reads(uow, rows)


def _lies_within(scopes: Sequence[Grant]) -> ColumnElement[bool]:
    """A staff user lies within ``scopes`` when it holds no grant outside them, and, holding
    none at all, when the scope it was created in lies within one of them: a user without
    grants is its home scope's, never everyone's (one created installation-wide is managed
    installation-wide only)."""
    own = role_grants.c.staff_id == staff_users.c.id
    grants = role_grants.c
    outside = exists().where(
        own, ~_held_within(scopes, grants.program_id, grants.merchant, grants.store)
    )
    home = _held_within(
        scopes, staff_users.c.home_program_id, staff_users.c.home_merchant,
        staff_users.c.home_store,
    )  # fmt: skip
    return and_(~outside, or_(exists().where(own), home))


def _held_within(
    scopes: Sequence[Grant],
    program: ColumnElement[Any],
    merchant: ColumnElement[Any],
    store: ColumnElement[Any] | None = None,
) -> ColumnElement[bool]:
    """The scope in these columns (``store`` None: every store) lies within one of
    ``scopes`` (the SQL of :meth:`Grant.contains`; never NULL, so that its negation picks
    every scope outside them)."""
    inside: list[ColumnElement[bool]] = []
    for scope in scopes:
        pinned = [
            and_(column.is_not(None), column == value) if column is not None else false()
            for column, value in ((program, scope.program_id), (merchant, scope.merchant),
                                  (store, scope.store))
            if value is not None
        ]  # fmt: skip
        inside.append(and_(true(), *pinned))
    return or_(false(), *inside)


def get_staff(uow: UnitOfWork, *, staff_id: int) -> StaffRead:
    row = uow.conn.execute(select(staff_users).where(staff_users.c.id == staff_id)).first()
    if row is None:
        raise UnknownStaff(staff_id=staff_id)
    return _staff_reads(uow, [row])[0]


def update_staff(
    uow: UnitOfWork, *, staff_id: int, display_name: str | None, active: bool | None,
    unlock: bool,
) -> StaffRead:  # fmt: skip
    get_staff(uow, staff_id=staff_id)
    values: dict[str, Any] = {}
    if display_name is not None:
        values["display_name"] = display_name
    if active is not None:
        values["active"] = active
    if unlock:
        values.update(failed_sign_ins=0, locked_until=None)
    if values:
        uow.conn.execute(staff_users.update().where(staff_users.c.id == staff_id).values(**values))
    if active is False:  # a disabled account's open sessions end now
        _end_sessions(uow, "staff", staff_id)
    return get_staff(uow, staff_id=staff_id)


def revoke_grant(uow: UnitOfWork, *, staff_id: int, grant_id: int) -> GrantRead:
    grant = next((g for g in get_staff(uow, staff_id=staff_id).grants if g.id == grant_id), None)
    if grant is None:
        raise UnknownStaff(staff_id=f"{staff_id} (grant {grant_id})")
    uow.conn.execute(role_grants.delete().where(role_grants.c.id == grant_id))
    return grant


def grant_of(uow: UnitOfWork, *, grant_id: int) -> GrantRead:
    row = uow.conn.execute(
        select(role_grants, roles.c.code)
        .join(roles, roles.c.id == role_grants.c.role_id)
        .where(role_grants.c.id == grant_id)
    ).one()
    return GrantRead.model_validate({**row._mapping, "role": row.code})


def role_permissions(uow: UnitOfWork, *, role: str, program_id: int | None) -> frozenset[str]:
    """The permissions of a built-in role, or of a custom role of ``program_id``."""
    sync_builtin_roles(uow)
    row = uow.conn.execute(
        select(roles.c.permissions)
        .where(roles.c.code == role)
        .where((roles.c.program_id.is_(None)) | (roles.c.program_id == program_id))
    ).first()
    if row is None:
        raise InvalidInput(
            field="role",
            problem=f"there is no role {role!r} in this scope",
            problem_zh=f"该范围内不存在角色 {role!r}",
        )
    return frozenset(row.permissions)


def _role_read(row: Any) -> RoleRead:
    return RoleRead.model_validate({**row._mapping, "permissions": sorted(row.permissions)})


def list_roles(
    uow: UnitOfWork, *, program_id: int, after_id: int = 0, limit: int | None = None
) -> list[RoleRead]:
    """The built-in roles and the programme's own, in id order (the built-in ones first,
    made before any programme's) after ``after_id``; at most ``limit`` (None: all)."""
    sync_builtin_roles(uow)
    rows = uow.conn.execute(
        select(roles)
        .where((roles.c.program_id.is_(None)) | (roles.c.program_id == program_id))
        .where(roles.c.id > after_id)
        .order_by(roles.c.id)
        .limit(limit)
    )
    return [_role_read(row) for row in rows]


def check_permissions(wanted: Sequence[str], *, holder: frozenset[str] | None) -> list[str]:
    """``wanted`` as a sorted list, if each is a known permission that ``holder`` (the
    person defining the role; None: anyone) holds itself — nobody hands out more than it has."""
    unknown = sorted(p for p in set(wanted) if p not in PERMISSIONS)
    if unknown:
        raise InvalidInput(
            field="permissions",
            problem=f"unknown permission {', '.join(unknown)}; see GET /v1/permissions",
            problem_zh=f"未知权限 {', '.join(unknown)};请查看 GET /v1/permissions",
        )
    if holder is not None:
        beyond = sorted(p for p in set(wanted) if p not in holder)
        if beyond:
            raise InvalidInput(
                field="permissions",
                problem=f"you cannot give {', '.join(beyond)}, which you do not hold yourself",
                problem_zh=f"不能授予 {', '.join(beyond)}:你本人没有此权限",
            )
    return sorted(set(wanted))


def _custom_role(uow: UnitOfWork, *, program_id: int, code: str) -> Any:
    row = uow.conn.execute(
        select(roles).where(roles.c.program_id == program_id, roles.c.code == code)
    ).first()
    if row is None:
        builtin = code in BUILTIN_ROLES
        raise (
            StateConflict(
                problem=f"Role {code!r} is built in and cannot be changed.",
                problem_zh=f"角色 {code!r} 为内置角色,不能修改。",
            )
            if builtin
            else UnknownRole(role=code)
        )
    return row


def create_role(
    uow: UnitOfWork, *, program_id: int, code: str, name: str, permissions: list[str]
) -> RoleRead:
    sync_builtin_roles(uow)
    taken = (
        code in BUILTIN_ROLES
        or uow.conn.execute(
            select(roles.c.id).where(roles.c.program_id == program_id, roles.c.code == code)
        ).first()
    )
    if taken:
        raise DuplicateReference(what="Role code", what_zh="角色代码", value=code)
    uow.conn.execute(
        roles.insert(),
        {"code": code, "name": name, "program_id": program_id, "builtin": False,
         "permissions": permissions, "created_at": uow.clock.now()},
    )  # fmt: skip
    return _role_read(_custom_role(uow, program_id=program_id, code=code))


def update_role(
    uow: UnitOfWork, *, program_id: int, code: str, name: str | None,
    permissions: list[str] | None,
) -> tuple[RoleRead, RoleRead]:  # fmt: skip
    """Change a custom role; answers (before, after)."""
    row = _custom_role(uow, program_id=program_id, code=code)
    values: dict[str, Any] = {}
    if name is not None:
        values["name"] = name
    if permissions is not None:
        values["permissions"] = permissions
    if values:
        uow.conn.execute(roles.update().where(roles.c.id == row.id).values(**values))
    return _role_read(row), _role_read(_custom_role(uow, program_id=program_id, code=code))


def delete_role(uow: UnitOfWork, *, program_id: int, code: str) -> RoleRead:
    row = _custom_role(uow, program_id=program_id, code=code)
    held = uow.conn.execute(
        select(func.count()).where(role_grants.c.role_id == row.id)
    ).scalar_one()
    if held:
        raise StateConflict(
            problem=f"Role {code!r} is still granted {held} time(s); revoke those grants first.",
            problem_zh=f"角色 {code!r} 仍被授予 {held} 次,请先撤销这些授权。",
        )
    uow.conn.execute(roles.delete().where(roles.c.id == row.id))
    return _role_read(row)


def _key_read(row: Any) -> ApiKeyRead:
    return ApiKeyRead.model_validate({**row._mapping, "permissions": sorted(row.permissions)})


def list_api_keys(
    uow: UnitOfWork,
    *,
    program_id: int,
    after_id: int,
    limit: int,
    merchant: str | None = None,
    store: str | None = None,
    revoked: bool | None = None,
) -> list[ApiKeyRead]:
    query = select(api_keys).where(api_keys.c.program_id == program_id, api_keys.c.id > after_id)
    if merchant is not None:
        query = query.where(api_keys.c.merchant == merchant)
    if store is not None:
        query = query.where(api_keys.c.store == store)
    if revoked is not None:
        query = query.where(
            api_keys.c.revoked_at.is_not(None) if revoked else api_keys.c.revoked_at.is_(None)
        )
    rows = uow.conn.execute(query.order_by(api_keys.c.id).limit(limit))
    return [_key_read(row) for row in rows]


def revoke_api_key(
    uow: UnitOfWork,
    *,
    program_id: int,
    key_id: int,
    merchant: str | None = None,
    store: str | None = None,
) -> ApiKeyRead:
    """Revoke a key of the programme (of ``merchant``'s keys only, and of ``store``'s only,
    when given)."""
    where = (api_keys.c.id == key_id) & (api_keys.c.program_id == program_id)
    if merchant is not None:
        where &= api_keys.c.merchant == merchant
    if store is not None:
        where &= api_keys.c.store == store
    uow.conn.execute(
        api_keys.update()
        .where(where, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=uow.clock.now())
    )
    row = uow.conn.execute(select(api_keys).where(where)).first()
    if row is None:
        raise UnknownApiKey(key_id=key_id)
    return _key_read(row)


def password_of_staff_matches(uow: UnitOfWork, *, username: str, password: str) -> bool:
    stored = uow.conn.execute(
        select(staff_users.c.password_hash).where(staff_users.c.username == username)
    ).scalar()
    return stored is not None and password_matches(stored, password)


def reset_staff_secrets(uow: UnitOfWork, *, username: str, password: str) -> str | None:
    """Give an existing staff user a new password and TOTP seed (returned); None if there
    is no such user. For installers and the demo: the old secrets stop working, and so do
    the sessions opened with them."""
    seed = pyotp.random_base32()
    staff_id = uow.conn.execute(
        staff_users.update()
        .where(staff_users.c.username == username)
        .values(password_hash=hash_password(password), totp_secret_enc=encrypt(seed),
                totp_last_step=0, failed_sign_ins=0, locked_until=None)
        .returning(staff_users.c.id)
    ).scalar_one_or_none()  # fmt: skip
    if staff_id is None:
        return None
    _end_sessions(uow, "staff", staff_id)
    return seed


def end_member_sessions(uow: UnitOfWork, *, member_id: int, keep: int | None = None) -> None:
    """Sign a member out everywhere (banned or closed; its password changed), but for the
    session ``keep`` (the one that changed the password)."""
    _end_sessions(uow, "member", member_id, keep=keep)


def _end_sessions(
    uow: UnitOfWork, subject: str, subject_id: int, *, keep: int | None = None
) -> None:
    """End every open session of the staff user or member, but for the session ``keep``."""
    query = sessions.update().where(
        sessions.c.subject == subject,
        sessions.c.subject_id == subject_id,
        sessions.c.revoked_at.is_(None),
    )
    if keep is not None:
        query = query.where(sessions.c.id != keep)
    uow.conn.execute(query.values(revoked_at=uow.clock.now()))


def member_sign_in_data(uow: UnitOfWork, *, member_id: int) -> MemberSignInData:
    """What is held about how the member signs in: whether it has a password, and how many
    of its sessions are live (for its personal-data export)."""
    password = uow.conn.execute(
        select(member_credentials.c.password_hash).where(
            member_credentials.c.member_id == member_id
        )
    ).scalar()
    live = uow.conn.execute(
        select(func.count()).where(
            sessions.c.subject == "member",
            sessions.c.subject_id == member_id,
            sessions.c.revoked_at.is_(None),
            sessions.c.expires_at > uow.clock.now(),
        )
    ).scalar_one()
    return MemberSignInData(password_set=password is not None, active_sessions=int(live))


def forget_member_credentials(uow: UnitOfWork, *, member_id: int) -> None:
    """End every session of the member and remove its password and one-time codes (its
    personal data is being erased): nothing is left that signs it in."""
    end_member_sessions(uow, member_id=member_id)
    uow.conn.execute(member_credentials.delete().where(member_credentials.c.member_id == member_id))
    forget_member_codes(uow, member_id=member_id)


def forget_member_codes(uow: UnitOfWork, *, member_id: int) -> None:
    """Remove the member's one-time codes (its bound phone changed, or its personal data is
    being erased): a code texted to a number no longer bound signs nobody in, and the new
    number is texted one without waiting out the old one's minute."""
    uow.conn.execute(one_time_codes.delete().where(one_time_codes.c.member_id == member_id))
