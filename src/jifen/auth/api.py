"""HTTP routes of identity and access: signing in and out, staff users, roles, API keys.

Signing in is open to anyone (limited per address); everything else needs a permission.
Nobody hands out more than it holds: a grant, a custom role or an API key may carry only
permissions its maker holds in that programme.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from jifen.api.deps import (
    Context,
    Read,
    Write,
    authenticate,
    client_ip,
    database,
    forget_api_key,
    id_cursor,
    id_page,
    limit_ip,
    not_allowed,
)
from jifen.api.schemas import NO_NUL, IdCursor, Limit, Page
from jifen.audit import service as audit_service
from jifen.audit.schemas import AuditEntryCreate
from jifen.auth import service
from jifen.auth.core import (
    API_KEY_PERMISSIONS,
    DEFAULT_API_KEY_PERMISSIONS,
    PERMISSIONS,
    Principal,
)
from jifen.auth.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    CodeRequest,
    CodeSent,
    CodeSignIn,
    GrantIn,
    GrantRead,
    GrantSummary,
    Me,
    MemberSignIn,
    PasswordChange,
    PermissionRead,
    RoleCreate,
    RoleRead,
    RoleUpdate,
    SessionCreated,
    StaffCreate,
    StaffCreated,
    StaffRead,
    StaffSignIn,
    StaffUpdate,
)
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import (
    Forbidden,
    InvalidInput,
    JifenError,
    StateConflict,
    UnknownProgram,
    WrongCaller,
)
from jifen.members import service as members_service
from jifen.notify.sms import SmsProvider
from jifen.programs import service as programs_service

router = APIRouter(tags=["auth"])

Id = Annotated[int, Path(ge=1, le=2**63 - 1)]
RoleCode = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
Public = Depends(limit_ip)
SignedIn = Annotated[Principal, Depends(authenticate)]


def _program_id(db: Database, code: str) -> int:
    return db.run(lambda uow: programs_service.get_program(uow, code=code), read_only=True).id


# --------------------------------------------------------------------------- signing in


@router.post("/auth/staff/sign-in", response_model=SessionCreated, dependencies=[Public])
def staff_sign_in(body: StaffSignIn, db: Annotated[Database, Depends(database)]) -> SessionCreated:
    """Password and, for any role that can write, the authenticator's current code.

    After 3 failures in a row each attempt must wait (1 s, 2 s, 4 s, …); after 10 the
    account is locked for 15 minutes (429 with ``Retry-After``)."""
    return db.run(
        lambda uow: service.staff_sign_in(
            uow, username=body.username, password=body.password, totp_code=body.totp_code
        )
    ).unwrap()


@router.post("/auth/members/sign-in", response_model=SessionCreated, dependencies=[Public])
def member_sign_in(
    body: MemberSignIn, db: Annotated[Database, Depends(database)]
) -> SessionCreated:
    """A member's reference or bound phone number, and its password."""
    program_id = _program_id(db, body.program)
    return db.run(
        lambda uow: service.member_sign_in(
            uow, program_id=program_id, login=body.login, password=body.password
        )
    ).unwrap()


@router.post("/auth/members/codes", status_code=202, response_model=CodeSent, dependencies=[Public])
def send_code(
    body: CodeRequest, request: Request, db: Annotated[Database, Depends(database)]
) -> CodeSent:
    """Text a six-digit sign-in code to a member's bound phone (valid 5 minutes, one a
    minute). The answer is the same whether or not the number belongs to a member. 503
    ``sms_unavailable``: the SMS provider failed to take the text; ask again."""
    program_id = _program_id(db, body.program)
    sms: SmsProvider = request.app.state.sms
    expires_at = db.run(
        lambda uow: service.send_code(uow, program_id=program_id, phone=body.phone, sms=sms)
    )
    return CodeSent(expires_at=expires_at)


@router.post(
    "/auth/members/sign-in-with-code", response_model=SessionCreated, dependencies=[Public]
)
def code_sign_in(body: CodeSignIn, db: Annotated[Database, Depends(database)]) -> SessionCreated:
    """The phone number and the code texted to it; a code works once, for 5 guesses."""
    program_id = _program_id(db, body.program)
    return db.run(
        lambda uow: service.code_sign_in(
            uow, program_id=program_id, phone=body.phone, code=body.code
        )
    ).unwrap()


@router.get("/auth/me", response_model=Me)
def me(principal: SignedIn) -> Me:
    """Who the credentials belong to and what they may do, where."""
    return Me(
        kind=principal.kind,
        id=principal.id,
        name=principal.name,
        program_id=principal.program_id,
        member_id=principal.member_id,
        grants=[
            GrantSummary(
                role=grant.role,
                program_id=grant.program_id,
                merchant=grant.merchant,
                store=grant.store,
                permissions=sorted(grant.permissions),
            )
            for grant in principal.grants
        ],
    )


@router.post("/auth/sign-out", status_code=204)
def sign_out(principal: SignedIn, db: Annotated[Database, Depends(database)]) -> Response:
    """End this session (API keys are revoked through their own route instead)."""
    session_id = principal.session_id
    if session_id is not None:
        db.run(lambda uow: service.sign_out(uow, session_id=session_id))
    return Response(status_code=204)


@router.put("/auth/staff/password", status_code=204)
def change_staff_password(
    body: PasswordChange,
    principal: SignedIn,
    request: Request,
    db: Annotated[Database, Depends(database)],
) -> Response:
    """A signed-in staff user changes its own password (recorded in the audit log). Every
    other session of the user ends: whoever held the old password is signed out. A wrong
    present password counts as a failed sign-in: after three each try must wait, after ten
    the account is locked (429 with ``Retry-After``)."""
    if principal.kind != "staff":
        raise WrongCaller(
            problem="Only a signed-in staff user changes its password here.",
            problem_zh="只有已登录的员工可在此修改密码。",
        )
    if body.current_password is None:
        raise InvalidInput(
            field="current_password",
            problem="give the present password",
            problem_zh="请提供当前密码",
        )
    current = body.current_password

    def change(uow: UnitOfWork) -> JifenError | None:
        refused = service.change_staff_password(
            uow, staff_id=principal.id, current=current, new=body.new_password,
            keep=principal.session_id,
        )  # fmt: skip
        if refused is not None:
            return refused  # (a wrong password's count is committed with this transaction)
        audit_service.record(
            uow,
            AuditEntryCreate(
                program_id=None,
                actor=principal.name,
                role=audit_service.roles_text(principal.roles),
                ip=client_ip(request),
                user_agent=request.headers.get("user-agent", "")[:300],
                action="staff.password",
                target=f"staff:{principal.id}",
                after={"changed": True},
            ),
        )
        return None

    refused = db.run(change)
    if refused is not None:
        raise refused
    return Response(status_code=204)


@router.put("/programs/{program}/members/{member_id}/password", status_code=200, response_model=Me)
def set_member_password(
    program: str,
    member_id: Id,
    body: PasswordChange,
    ctx: Annotated[Context, Depends(Write("members.write", programme_wide=True))],
) -> JSONResponse:
    """A member sets its password (giving the present one if it has one); staff may reset
    a member's password without it, with a grant over the whole programme (the member signs
    in to the points of every merchant: one merchant's operator may not). An API key may
    not (a till that could would sign in as any member). Every other session of the member
    ends: whoever held the old password is signed out. A closed member is given no
    password (409): it signs in no more, and its personal data may have been erased."""
    own = ctx.principal.kind == "member"
    if ctx.principal.kind == "key":
        raise WrongCaller(
            problem="An API key cannot set a member's password: a member sets its own, and "
            "staff may reset it.",
            problem_zh="API 密钥不能设置会员密码:会员自行设置,或由工作人员重置。",
        )

    def change(uow: UnitOfWork) -> Me:
        # The member's row is held, as a closing or an erasure holds it: no password is
        # written beside one that is committing.
        members_service.lock_members(uow, member_ids=[member_id])
        member = members_service.require_member(uow, program_id=ctx.program_id, member_id=member_id)
        if member.state == "closed":
            raise StateConflict(
                problem=f"Member {member_id} is closed: a closed account signs in no more and "
                "is given no password (its personal data may have been erased).",
                problem_zh=f"会员 {member_id} 已注销:已注销的账户不能再登录,也不能设置密码"
                "(其个人信息可能已被删除)。",
            )
        service.set_member_password(
            uow, member_id=member_id, password=body.new_password,
            current=body.current_password, check_current=own,
        )  # fmt: skip
        service.end_member_sessions(
            uow, member_id=member_id, keep=ctx.principal.session_id if own else None
        )
        return Me(
            kind="member", id=member_id, name=f"member:{member_id}",
            program_id=ctx.program_id, member_id=member_id, grants=[],
        )  # fmt: skip

    try:
        return ctx.execute(change, target=f"member:{member_id}")
    except InvalidInput as wrong:
        if own and wrong.params.get("field") == "current_password":
            # counted once the change is undone: a member's session tries no password after
            # password here, as none is tried at signing in
            ctx.db.run(lambda uow: service.count_wrong_member_password(uow, member_id=member_id))
        raise


# --------------------------------------------------------------------------- staff


def _may_hand_out(
    ctx: Context,
    permissions: frozenset[str],
    program_id: int | None,
    merchant: str | None = None,
    store: str | None = None,
) -> None:
    """Refuse to hand out a permission the asker does not hold in a scope containing that
    programme, merchant and store: a merchant's administrator hands out that merchant's
    scope only, never the whole programme's."""
    beyond = sorted(
        p
        for p in permissions
        if not ctx.principal.covers(p, program_id=program_id, merchant=merchant, store=store)
    )
    if beyond:
        raise Forbidden(
            problem=f"You cannot hand out {', '.join(beyond)}: you do not hold it in a scope "
            "that contains that programme, merchant and store.",
            problem_zh=f"不能授予 {', '.join(beyond)}:你本人在包含该计划、商户和门店的范围内"
            "没有此权限。",
        )


def _within_scope(uow: UnitOfWork, ctx: Context, staff_id: int) -> StaffRead:
    """The staff user, if every grant it holds lies within the asker's scope for the
    route's permission (an administrator of one programme or merchant manages only its own
    people, never the installation's); refused otherwise. A user holding no grant lies
    within the scope it was created in, not within every scope: a new account made
    installation-wide, or one whose grants were all revoked, is not any administrator's to
    take over."""
    staff = service.get_staff(uow, staff_id=staff_id)
    if not staff.grants:
        return _home_within_scope(ctx, staff)
    outside = [
        grant
        for grant in staff.grants
        if not ctx.principal.covers(
            ctx.permission, program_id=grant.program_id, merchant=grant.merchant,
            store=grant.store,
        )
    ]  # fmt: skip
    if outside:
        raise Forbidden(
            problem=f"Staff user {staff_id} holds roles outside your scope; an administrator "
            "whose scope contains all of them manages it.",
            problem_zh=f"员工 {staff_id} 拥有你的管理范围之外的角色;须由范围涵盖其全部角色的"
            "管理员管理。",
        )
    return staff


def _home_within_scope(ctx: Context, staff: StaffRead) -> StaffRead:
    """A staff user without grants, if the scope it was created in lies within the asker's
    (one created installation-wide: only if the asker's is installation-wide)."""
    if not ctx.principal.covers(
        ctx.permission, program_id=staff.home_program_id, merchant=staff.home_merchant,
        store=staff.home_store,
    ):  # fmt: skip
        raise Forbidden(
            problem=f"Staff user {staff.id} holds no role and was created outside your scope; "
            "an administrator whose scope contains the one it was created in manages it.",
            problem_zh=f"员工 {staff.id} 没有角色,且创建于你的管理范围之外;须由范围涵盖其创建"
            "范围的管理员管理。",
        )
    return staff


def _home_of(principal: Principal) -> tuple[int | None, str | None, str | None]:
    """The programme, merchant and store a staff user made by ``principal`` belongs to:
    those of its narrowest scope holding ``staff.write`` (so that it and every administrator
    above it manage the user), or all None when it holds ``staff.write`` installation-wide."""
    scopes = principal.scopes("staff.write")
    if not scopes:
        return None, None, None
    narrowest = max(
        scopes,
        key=lambda g: sum(part is not None for part in (g.program_id, g.merchant, g.store)),
    )
    return narrowest.program_id, narrowest.merchant, narrowest.store


def _grant(uow: UnitOfWork, ctx: Context, staff_id: int, grant: GrantIn) -> int:
    program_id = None
    if grant.program is not None:
        program_id = _grant_program(uow, ctx, grant.program)
    if grant.role == "super_admin" and not ctx.principal.everywhere("staff.write"):
        raise Forbidden(
            problem="Only an installation-wide administrator grants super_admin.",
            problem_zh="只有全系统范围的管理员可以授予 super_admin。",
        )
    permissions = service.role_permissions(uow, role=grant.role, program_id=program_id)
    _may_hand_out(ctx, permissions | {"staff.write"}, program_id, grant.merchant, grant.store)
    return service.grant_role(
        uow, staff_id=staff_id, role=grant.role, program_id=program_id,
        merchant=grant.merchant, store=grant.store,
    )  # fmt: skip


def _grant_program(uow: UnitOfWork, ctx: Context, code: str) -> int:
    """The programme a grant is given in. An administrator of some programmes only is refused
    one outside them alike whether or not it exists (403), so that no answer tells which
    programme codes exist; to one of every programme an unknown code is unknown (404)."""
    within = ctx.principal.programs(ctx.permission)
    try:
        program_id = programs_service.get_program(uow, code=code).id
    except UnknownProgram:
        if within is None:
            raise
        program_id = None
    if within is not None and program_id not in within:
        raise not_allowed(ctx.principal, ctx.permission, code)
    assert program_id is not None
    return program_id


@router.get("/staff", response_model=Page[StaffRead])
def list_staff(
    ctx: Annotated[Context, Depends(Read("staff.read"))],
    cursor: IdCursor = None,
    limit: Limit = 50,
    active: bool | None = None,
    username: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    role: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
) -> Page[StaffRead]:
    """Staff users, in the order they were created; filter by ``active``, a ``username``
    prefix, or a ``role`` they hold. A scoped caller sees those whose every grant lies
    within its scope, and those holding none that were created within it."""
    after = id_cursor(cursor)
    within = ctx.principal.scopes(ctx.permission)
    rows = ctx.db.run(
        lambda uow: service.list_staff(
            uow,
            after_id=after,
            limit=limit + 1,
            active=active,
            username=username,
            role=role,
            within=within,
        ),
        read_only=True,
    )
    items, next_cursor = id_page(rows, limit)
    return Page(items=items, next_cursor=next_cursor)


@router.post("/staff", status_code=201, response_model=StaffCreated)
def create_staff(
    body: StaffCreate, ctx: Annotated[Context, Depends(Write("staff.write"))]
) -> JSONResponse:
    """A staff user with its grants; the TOTP seed for its authenticator is shown once."""

    home_program_id, home_merchant, home_store = _home_of(ctx.principal)

    def create(uow: UnitOfWork) -> StaffCreated:
        created = service.create_staff(
            uow, username=body.username, password=body.password, display_name=body.display_name,
            home_program_id=home_program_id, home_merchant=home_merchant, home_store=home_store,
        )  # fmt: skip
        for grant in body.grants:
            _grant(uow, ctx, created.id, grant)
        return created

    return ctx.execute(
        create,
        target=f"staff:{body.username}",
        status=201,
        shown_once=frozenset({"totp_secret", "totp_uri"}),
    )


@router.get("/staff/{staff_id}", response_model=StaffRead)
def get_staff(staff_id: Id, ctx: Annotated[Context, Depends(Read("staff.read"))]) -> StaffRead:
    return ctx.db.run(lambda uow: _within_scope(uow, ctx, staff_id), read_only=True)


@router.patch("/staff/{staff_id}", response_model=StaffRead)
def update_staff(
    staff_id: Id, body: StaffUpdate, ctx: Annotated[Context, Depends(Write("staff.write"))]
) -> JSONResponse:
    """Rename, disable (which ends its sessions), enable, or unlock after failed sign-ins."""
    ctx.audit_before = ctx.db.run(
        lambda uow: _within_scope(uow, ctx, staff_id), read_only=True
    ).model_dump(mode="json")
    return ctx.execute(
        lambda uow: service.update_staff(
            uow, staff_id=staff_id, display_name=body.display_name, active=body.active,
            unlock=body.unlock,
        ),
        target=f"staff:{staff_id}",
    )  # fmt: skip


@router.post("/staff/{staff_id}/grants", status_code=201, response_model=GrantRead)
def add_grant(
    staff_id: Id, body: GrantIn, ctx: Annotated[Context, Depends(Write("staff.write"))]
) -> JSONResponse:
    """Give a staff user a role in a programme (or every programme), merchant and store."""

    def add(uow: UnitOfWork) -> GrantRead:
        _within_scope(uow, ctx, staff_id)
        return service.grant_of(uow, grant_id=_grant(uow, ctx, staff_id, body))

    return ctx.execute(add, target=f"staff:{staff_id}", status=201)


@router.delete("/staff/{staff_id}/grants/{grant_id}", response_model=GrantRead)
def revoke_grant(
    staff_id: Id, grant_id: Id, ctx: Annotated[Context, Depends(Write("staff.write"))]
) -> JSONResponse:
    def revoke(uow: UnitOfWork) -> GrantRead:
        grant = next(
            (g for g in _within_scope(uow, ctx, staff_id).grants if g.id == grant_id), None
        )
        if grant is not None:
            permissions = service.role_permissions(
                uow, role=grant.role, program_id=grant.program_id
            )
            _may_hand_out(ctx, permissions, grant.program_id, grant.merchant, grant.store)
        return service.revoke_grant(uow, staff_id=staff_id, grant_id=grant_id)

    return ctx.execute(revoke, target=f"staff:{staff_id}")


@router.get("/permissions", response_model=list[PermissionRead])
def list_permissions(
    ctx: Annotated[Context, Depends(Read("roles.read"))],
) -> list[PermissionRead]:
    """Every permission a role can hold (``resource.action``)."""
    return [PermissionRead(code=code, description=text) for code, text in PERMISSIONS.items()]


# --------------------------------------------------------------------------- roles

ROLES = "/programs/{program}/roles"


@router.get(ROLES, response_model=Page[RoleRead])
def list_roles(
    program: str,
    ctx: Annotated[Context, Depends(Read("roles.read"))],
    cursor: IdCursor = None,
    limit: Limit = 50,
) -> Page[RoleRead]:
    """The built-in roles and this programme's custom ones."""
    after = id_cursor(cursor)
    rows = ctx.db.run(
        lambda uow: service.list_roles(
            uow, program_id=ctx.program_id, after_id=after, limit=limit + 1
        ),
        read_only=True,
    )
    items, next_cursor = id_page(rows, limit)
    return Page(items=items, next_cursor=next_cursor)


@router.post(ROLES, status_code=201, response_model=RoleRead)
def create_role(
    program: str,
    body: RoleCreate,
    ctx: Annotated[Context, Depends(Write("roles.write", programme_wide=True))],
) -> JSONResponse:
    """A custom role of this programme, with permissions its maker holds here."""
    permissions = service.check_permissions(body.permissions, holder=None)
    _may_hand_out(ctx, frozenset(permissions), ctx.program_id)
    return ctx.execute(
        lambda uow: service.create_role(
            uow, program_id=ctx.program_id, code=body.code, name=body.name,
            permissions=permissions,
        ),
        target=f"role:{ctx.program_id}:{body.code}",
        status=201,
    )  # fmt: skip


@router.patch(f"{ROLES}/{{code}}", response_model=RoleRead)
def update_role(
    program: str,
    code: RoleCode,
    body: RoleUpdate,
    ctx: Annotated[Context, Depends(Write("roles.write", programme_wide=True))],
) -> JSONResponse:
    permissions = None
    if body.permissions is not None:
        permissions = service.check_permissions(body.permissions, holder=None)
        _may_hand_out(ctx, frozenset(permissions), ctx.program_id)

    def update(uow: UnitOfWork) -> RoleRead:
        before, after = service.update_role(
            uow, program_id=ctx.program_id, code=code, name=body.name, permissions=permissions
        )
        ctx.audit_before = before.model_dump(mode="json")
        return after

    return ctx.execute(update, target=f"role:{ctx.program_id}:{code}")


@router.delete(f"{ROLES}/{{code}}", response_model=RoleRead)
def delete_role(
    program: str,
    code: RoleCode,
    ctx: Annotated[Context, Depends(Write("roles.write", programme_wide=True))],
) -> JSONResponse:
    """Remove a custom role that nobody holds any more."""
    return ctx.execute(
        lambda uow: service.delete_role(uow, program_id=ctx.program_id, code=code),
        target=f"role:{ctx.program_id}:{code}",
    )


# --------------------------------------------------------------------------- API keys

KEYS = "/programs/{program}/api-keys"


@router.get(KEYS, response_model=Page[ApiKeyRead])
def list_api_keys(
    program: str,
    ctx: Annotated[Context, Depends(Read("api_keys.read"))],
    cursor: IdCursor = None,
    limit: Limit = 50,
    merchant: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    revoked: bool | None = None,
) -> Page[ApiKeyRead]:
    """The programme's keys: prefix, scope, permissions, expiry, revocation, last use;
    filter by ``merchant`` and ``revoked``. A merchant's credentials see its own keys, a
    store's those of the store."""
    after = id_cursor(cursor)
    merchant, store = ctx.merchant(merchant)
    rows = ctx.db.run(
        lambda uow: service.list_api_keys(
            uow,
            program_id=ctx.program_id,
            after_id=after,
            limit=limit + 1,
            merchant=merchant,
            store=store,
            revoked=revoked,
        ),
        read_only=True,
    )
    items, next_cursor = id_page(rows, limit)
    return Page(items=items, next_cursor=next_cursor)


@router.post(KEYS, status_code=201, response_model=ApiKeyCreated)
def create_api_key(
    program: str, body: ApiKeyCreate, ctx: Annotated[Context, Depends(Write("api_keys.write"))]
) -> JSONResponse:
    """Issue a key for a merchant's or partner's system; its token is shown only now.

    A key may hold only integration permissions (``GET /v1/permissions``), and only ones
    its maker holds here."""
    merchant, store = ctx.merchant(body.merchant, body.store)
    wanted = DEFAULT_API_KEY_PERMISSIONS
    if body.permissions is not None:
        wanted = frozenset(service.check_permissions(body.permissions, holder=None))
        outside = sorted(wanted - API_KEY_PERMISSIONS)
        if outside:
            raise InvalidInput(
                field="permissions",
                problem=f"an API key cannot hold {', '.join(outside)}; choose from "
                f"{', '.join(sorted(API_KEY_PERMISSIONS))}",
                problem_zh=f"API 密钥不能拥有 {', '.join(outside)};请从以下权限中选择:"
                f"{', '.join(sorted(API_KEY_PERMISSIONS))}",
            )
    _may_hand_out(ctx, wanted, ctx.program_id, merchant, store)
    if body.expires_at is not None and body.expires_at <= ctx.db.clock.now():
        raise InvalidInput(
            field="expires_at",
            problem="give a time in the future",
            problem_zh="请给出一个将来的时间",
        )
    return ctx.execute(
        lambda uow: service.create_api_key(
            uow, program_id=ctx.program_id, name=body.name, created_by=ctx.actor,
            permissions=body.permissions, merchant=merchant, store=store,
            expires_at=body.expires_at,
        ),
        target=f"program:{ctx.program_id}:api-keys",
        status=201,
        shown_once=frozenset({"token"}),
    )  # fmt: skip


@router.post(f"{KEYS}/{{key_id}}/revoke", response_model=ApiKeyRead)
def revoke_api_key(
    program: str, key_id: Id, ctx: Annotated[Context, Depends(Write("api_keys.write"))]
) -> JSONResponse:
    """Revoke a key at once (this server refuses it from now on; other servers that had
    just accepted it stop within 5 seconds). A merchant's credentials revoke its own keys
    only, a store's those of the store (not the merchant's keys for all its stores)."""
    answer = ctx.execute(
        lambda uow: service.revoke_api_key(
            uow,
            program_id=ctx.program_id,
            key_id=key_id,
            merchant=ctx.merchant_scope,
            store=ctx.store_scope,
        ),
        target=f"api-key:{key_id}",
    )
    forget_api_key(ctx.request, key_id)
    return answer
