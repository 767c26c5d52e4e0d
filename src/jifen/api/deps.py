"""What every route depends on: who is asking, whether it may, and how a write is run.

A route declares its permission with :class:`Read` or :class:`Write`; both authenticate,
apply the rate limits, resolve the ``{program}`` in the path, and refuse with 403 what the
principal's grants do not cover, and any permission that can change data to a staff session
opened without a TOTP code. A member may act only on itself: a route with a ``{member_id}``
in its path refuses any other member. :class:`Write` also requires an
``Idempotency-Key`` header, and :meth:`Context.execute` runs the change, its audit entry
and the stored answer in one transaction, replaying the stored answer for a repeated key.
A stored answer names the member its write was about, and goes with that member's personal
data when it is erased (:func:`erase_stored_answers`).

The permission each route needs is written into the OpenAPI document as ``x-permission``
(and ``x-member-scoped``; ``x-scope: programme`` when a grant of one merchant or store does
not reach it, ``installation`` when only an unscoped grant does), so tests and integrators
read it from there. A route that the member itself may call whatever ``x-permission`` names
(:class:`ReadOwn`: its own personal data) is marked ``x-member-self``.
"""

from __future__ import annotations

import json
import re
import time
import types
import typing
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import bindparam, func, select, update
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jifen import crypto
from jifen.api.limits import Limiter
from jifen.api.models import ERASED_STATUS, idempotency_records
from jifen.api.problems import language
from jifen.audit import service as audit_service
from jifen.audit.schemas import AuditEntryCreate
from jifen.auth import service as auth_service
from jifen.auth.core import Grant, Principal, is_write
from jifen.db import prepared
from jifen.db.prepared import Prepared, read_rows
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import (
    AnswerErased,
    Forbidden,
    IdempotencyConflict,
    InvalidInput,
    Refused,
    ScopeTooNarrow,
    TotpRequired,
    Unauthenticated,
    UnknownProgram,
    WrongCaller,
)
from jifen.programs import service as programs_service
from jifen.programs.schemas import ProgramRead

SHOWN_ONCE = "(shown once, when it was created)"
API_KEY_CACHE_SECONDS = 5.0
"""An API key's principal is reused this long: a revocation takes effect within it (its
expiry at once)."""


def database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


async def limit_ip(request: Request) -> None:
    """Dependency of routes open to anyone (signing in): the per-address limit."""
    limiter: Limiter = request.app.state.limiter
    await limiter.hit("ip", client_ip(request))


def id_cursor(cursor: str | None) -> int:
    """The last id of the previous page, from an opaque ``cursor`` (0 for the first page)."""
    if cursor is None:
        return 0
    # ASCII digits only (str.isdigit also takes "²"), and an id the database can hold.
    if not _ID.fullmatch(cursor) or int(cursor) >= 2**63:
        raise InvalidInput(
            field="cursor",
            problem="pass back a next_cursor from a previous page",
            problem_zh="请原样传回上一页给出的 next_cursor",
        )
    return int(cursor)


_ID = re.compile(r"[0-9]{1,19}")


class _HasId(Protocol):
    @property
    def id(self) -> int: ...


_Item = TypeVar("_Item", bound=_HasId)


def id_page(rows: Sequence[_Item], limit: int) -> tuple[list[_Item], str | None]:
    """One page of ``rows``, read in id order with one more than ``limit`` asked for (pass
    ``limit + 1`` to the query): its first ``limit``, and the cursor of the page after them,
    the last one's id when a row follows, None when this is the last page, full or not (a
    client is never sent on to an empty page)."""
    items = list(rows[:limit])
    return items, str(items[-1].id) if items and len(rows) > limit else None


async def refuse_unusable_request(request: Request) -> None:
    """Run before every route: refuse a body that is not JSON by its content type (415,
    rather than read as a value of the wrong type), a query or path parameter holding
    NUL (``%00``, which PostgreSQL stores in no text), a query parameter the operation does
    not read (a misspelt ``limt`` would otherwise be ignored), a single-valued one given
    twice (which of them would count?) and a body sent to an operation that reads none,
    before anything is looked up."""
    has_body = request.headers.get("content-length", "0") != "0" or (
        "content-length" not in request.headers and "transfer-encoding" in request.headers
    )
    if request.method in _WITH_BODY and has_body:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise StarletteHTTPException(415)
    route = request.scope.get("route")
    if isinstance(route, APIRoute) and request.scope["path"].startswith("/v1/"):
        await _refuse_what_the_operation_does_not_read(request, _reads(request, route), has_body)
    for name, value in (*request.query_params.multi_items(), *request.path_params.items()):
        if "\x00" in str(value):
            raise InvalidInput(
                field=name,
                problem="holds a NUL character (%00), which no text can store: remove it",
                problem_zh="含有 NUL 字符(%00),无法存储:请删除",
            )


_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class _Reads:
    """What one operation reads of a request besides its path."""

    query: tuple[str, ...]
    repeatable: frozenset[str]
    body: bool


def _reads(request: Request, route: APIRoute) -> _Reads:
    """The query parameters ``route`` and its dependencies declare (those typed as a list
    may repeat), and whether it reads a body; worked out once per route of an app."""
    known: dict[int, _Reads] = request.app.state.route_reads
    reads = known.get(id(route))
    if reads is None:
        names: dict[str, bool] = {}
        pending, seen = [route.dependant], set()
        while pending:
            dependant = pending.pop()
            if id(dependant) in seen:
                continue
            seen.add(id(dependant))
            for param in dependant.query_params:
                names[param.alias] = _is_list(param.field_info.annotation)
            pending.extend(dependant.dependencies)
        reads = _Reads(
            query=tuple(sorted(names)),
            repeatable=frozenset(name for name, many in names.items() if many),
            body=route.body_field is not None,
        )
        known[id(route)] = reads
    return reads


def _is_list(annotation: Any) -> bool:
    """Whether a parameter's type takes several values (``list[X]``, ``list[X] | None``)."""
    origin = typing.get_origin(annotation)
    if origin in (list, set, frozenset, tuple):
        return True
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(_is_list(arg) for arg in typing.get_args(annotation))
    return False


async def _refuse_what_the_operation_does_not_read(
    request: Request, reads: _Reads, has_body: bool
) -> None:
    counts: dict[str, int] = {}
    for name, _ in request.query_params.multi_items():
        counts[name] = counts.get(name, 0) + 1
    for name, count in counts.items():
        if name not in reads.query:
            takes_en = ", ".join(reads.query) if reads.query else "none"
            takes_zh = "、".join(reads.query) if reads.query else "无"
            raise InvalidInput(
                field=name,
                problem=f"this operation has no query parameter {name!r} (it takes: "
                f"{takes_en}); check the spelling or leave it out",
                problem_zh=f"该操作没有查询参数 {name!r}(可用参数:{takes_zh});请检查拼写或删去",
            )
        if count > 1 and name not in reads.repeatable:
            raise InvalidInput(
                field=name,
                problem=f"given {count} times; this parameter takes one value, give it once",
                problem_zh=f"出现了 {count} 次;该参数只取一个值,请只给一次",
            )
    if (
        not reads.body
        and has_body
        and request.method in _WITH_BODY
        and (await request.body()).strip() not in (b"", b"{}")
    ):
        raise InvalidInput(
            field="body",
            problem="this operation reads no body; send none (or {})",
            problem_zh="该操作不读取请求体;请不要发送(或发送 {})",
        )


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> Principal:
    """The principal behind the request's bearer token or ``X-API-Key``; 401 without one.

    Runs on the event loop: only a token not in the cache costs a worker thread."""
    limiter: Limiter = request.app.state.limiter
    await limiter.hit("ip", client_ip(request))
    token = _token(request)
    if token is None:
        raise Unauthenticated(
            problem="No credentials were sent (Authorization: Bearer <token>, or X-API-Key).",
            problem_zh="请求未携带凭据(Authorization: Bearer <令牌> 或 X-API-Key)。",
        )
    cache: dict[str, tuple[float, Principal]] = request.app.state.principal_cache
    cached = cache.get(token)
    if (
        cached is not None
        and cached[0] > time.monotonic()
        and (cached[1].expires_at is None or cached[1].expires_at > database(request).clock.now())
    ):  # a key that has expired since is read again, and refused
        principal = cached[1]
    else:
        principal = await run_in_threadpool(
            database(request).run, lambda uow: auth_service.authenticate(uow, token)
        )
        if principal.kind == "key":
            cache[token] = (time.monotonic() + API_KEY_CACHE_SECONDS, principal)
    if principal.kind == "key":
        await limiter.hit("key", str(principal.id))
    elif principal.kind == "member":
        await limiter.hit("member", str(principal.id))
    return principal


def forget_api_key(request: Request, key_id: int) -> None:
    """Drop an API key from this server's principals (it was just revoked here): this
    server refuses it at once; others that hold it, within :data:`API_KEY_CACHE_SECONDS`."""
    cache: dict[str, tuple[float, Principal]] = request.app.state.principal_cache
    for token, (_, principal) in list(cache.items()):
        if principal.api_key_id == key_id:
            cache.pop(token, None)


@dataclass
class Context:
    """One authorised request: who, in which programme, under which grant, from where."""

    request: Request
    db: Database
    principal: Principal
    permission: str
    program: ProgramRead | None = None
    grant: Grant | None = None
    idempotency_key: str | None = None
    request_hash: str = ""
    earlier_hashes: tuple[str, ...] = ()
    """The request's fingerprints under the previous secret keys (none but while a key is
    being replaced): a request stored before the key changed is known when sent again."""
    language: str = "en"
    audit_before: dict[str, Any] | None = field(default=None)

    @property
    def program_id(self) -> int:
        assert self.program is not None, "a programme route has a programme"
        return self.program.id

    @property
    def actor(self) -> str:
        return self.principal.name

    def ledger_key(self) -> str:
        """The ledger's idempotency key for this request: unique per principal and key."""
        assert self.idempotency_key is not None, "only writes post to the ledger"
        return f"{self.principal.scope}:{self.idempotency_key}"

    @property
    def merchant_scope(self) -> str | None:
        """The one merchant these credentials act for (``None``: any)."""
        return self.grant.merchant if self.grant is not None else None

    @property
    def store_scope(self) -> str | None:
        """The one store these credentials act at (``None``: any store of their merchant)."""
        return self.grant.store if self.grant is not None else None

    def merchant(
        self, requested: str | None, store: str | None = None
    ) -> tuple[str | None, str | None]:
        """The merchant and store a write is made for: the grant's own, or one it covers. A
        member names none (its app is no till: the till's credentials say where)."""
        if self.principal.kind == "member" and (requested is not None or store is not None):
            raise WrongCaller(
                problem="A member cannot name the merchant or store of a write; the "
                "merchant's or store's own credentials do.",
                problem_zh="会员不能指定商户或门店;由商户或门店自己的凭据指定。",
            )
        grant = self.grant
        if grant is None or (grant.merchant is None and grant.store is None):
            return requested, store
        # A store without a merchant is refused when a grant or key is made; one stored
        # before that is still held to its store.
        if grant.merchant is not None and requested is not None and requested != grant.merchant:
            raise Forbidden(
                problem=f"These credentials act for merchant {grant.merchant!r} only, not "
                f"{requested!r}.",
                problem_zh=f"该凭据只能代表商户 {grant.merchant!r},不能代表 {requested!r}。",
            )
        if grant.store is not None and store is not None and store != grant.store:
            raise Forbidden(
                problem=f"These credentials act for store {grant.store!r} only, not {store!r}.",
                problem_zh=f"该凭据只能代表门店 {grant.store!r},不能代表 {store!r}。",
            )
        return grant.merchant or requested, grant.store or store

    def audit(
        self,
        uow: UnitOfWork,
        *,
        target: str,
        after: dict[str, Any] | None,
        before: dict[str, Any] | None = None,
        action: str | None = None,
        encoded: bool = False,
    ) -> None:
        """Record this request's change in the audit log (writes by staff and API keys).
        ``encoded``: ``after`` holds JSON values already (an answer about to be sent)."""
        entry = self._audit_entry(
            target=target, after=after, before=before, action=action, encoded=encoded
        )
        if entry is not None:
            audit_service.record(uow, entry)

    def _audit_entry(
        self,
        *,
        target: str,
        after: dict[str, Any] | None,
        before: dict[str, Any] | None,
        action: str | None,
        encoded: bool,
    ) -> AuditEntryCreate | None:
        """This request's audit entry; none for a member's own writes."""
        if self.principal.kind == "member":
            return None
        return AuditEntryCreate(
            program_id=self.program.id if self.program else None,
            actor=self.principal.name,
            role=audit_service.roles_text(self.principal.roles),
            api_key_id=self.principal.api_key_id,
            ip=client_ip(self.request),
            user_agent=self.request.headers.get("user-agent", "")[:300],
            action=action or self.permission,
            target=target,
            before=jsonable_encoder(before) if before is not None else None,
            after=after if encoded or after is None else jsonable_encoder(after),
        )

    def execute(
        self,
        fn: Callable[[UnitOfWork], BaseModel],
        *,
        target: str,
        status: int | Callable[[BaseModel], int] = 200,
        audit: bool = True,
        shown_once: frozenset[str] = frozenset(),
        action: str | None = None,
        summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        first: Callable[[UnitOfWork], Sequence[prepared.Read[Any]]] | None = None,
        member: Callable[[Any], int | None] | None = None,
        kept: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        combine: Hashable | None = None,
    ) -> JSONResponse:
        """Run a write once: the change, its audit entry and its stored answer commit
        together; a repeated ``Idempotency-Key`` with the same request replays the answer,
        with a different one is refused (409).

        Fields named in ``shown_once`` (a new key's token, a TOTP seed) are answered this
        time only: the stored answer, the replay and the audit entry carry a placeholder.
        ``summary`` makes what the audit entry keeps of a large answer (all of it by
        default). ``first``: the reads ``fn`` starts with (the member's checks, the
        programme's policy), run in the round trip that looks for a stored answer, and
        answered (a check refusing, a policy kept for the transaction) only when there is
        none. ``status`` may be a function of ``fn``'s result: a write that decides in its
        transaction whether it posts (201) or files a request (202).

        The stored answer names the member the write was about: ``member`` of ``fn``'s
        result, else the ``{member_id}`` of the path, else the answer's own ``member_id``.
        ``kept`` makes what is stored (and replayed) of the answer when it holds another
        member's personal data, which that member's erasure would not find. A replay of an
        answer erased with its member's personal data is refused (410, ``answer_erased``):
        the write was carried out and is not run again.

        ``combine``: the one member account the write locks (``points.account_key``), for
        writes of one account that arrive together to share a commit (see
        :meth:`Database.run`); none for a write that locks another member's too."""
        key = self.idempotency_key
        assert key is not None, "Write routes carry an Idempotency-Key"
        scope = self.principal.scope

        def work(uow: UnitOfWork) -> tuple[int, Any, bool]:
            reads = [prepared.Read(_STORED_ANSWER, {"scope": scope, "key": key}, _row)]
            reads += first(uow) if first is not None else ()
            stored, *rows = read_rows(uow.conn, *reads)
            if stored is not None:
                return self._replay(stored, key)
            for read, row in zip(reads[1:], rows, strict=True):
                read.answer(row)
            result = fn(uow)
            code = status(result) if callable(status) else status
            answer = result.model_dump(mode="json")  # what jsonable_encoder gives, at once
            body = {k: SHOWN_ONCE if k in shown_once else v for k, v in answer.items()}
            about = member(result) if member is not None else self._member_of(answer)
            entry = None
            if audit:
                entry = self._audit_entry(
                    target=target, after=summary(body) if summary is not None else body,
                    before=self.audit_before, action=action, encoded=True,
                )  # fmt: skip
            stored = {
                "scope": scope,
                "key": key,
                "request_hash": self.request_hash,
                "status_code": code,
                "body": kept(body) if kept is not None else body,
                "created_at": uow.clock.now(),
                "member_id": about,
            }
            if entry is not None and uow.dialect == "postgresql":
                # The audit entry and the stored answer, in one round trip.
                _STORE_AUDITED_ANSWER.rows(
                    uow.conn, {**audit_service.entry_values(uow, entry), **stored}
                )
            else:
                if entry is not None:
                    audit_service.record(uow, entry)
                _STORE_ANSWER.rows(uow.conn, stored)
            return code, answer, False

        try:
            status_code, body, replayed = self.db.run(work, combine=combine)
        except Refused:
            # A twin sent under the same key may have committed after this request looked
            # for a stored answer and before its checks ran (registering one reference twice
            # at once): the checks then refuse what the twin did. The twin's answer is this
            # request's answer too; only a refusal with no such answer is this request's own.
            twin = self.db.run(
                lambda uow: _STORED_ANSWER.one_or_none(uow.conn, {"scope": scope, "key": key}),
                read_only=True,
            )
            if twin is None:
                raise
            status_code, body, replayed = self._replay(twin, key)
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        return JSONResponse(body, status_code=status_code, headers=headers)

    def _replay(self, stored: Any, key: str) -> tuple[int, Any, bool]:
        """The stored answer to this request's key, refused if the key was used for another
        request or its answer was erased with its member's personal data."""
        request_hash, status_code, body = stored
        if request_hash != self.request_hash and request_hash not in self.earlier_hashes:
            raise IdempotencyConflict(key=key)
        if status_code == ERASED_STATUS:
            raise AnswerErased(
                key=key, status=body.get("status_code"),
                member_id=body.get("erased_member_id"),
            )  # fmt: skip
        if isinstance(body, dict) and body.get("replayed") is False:
            body = {**body, "replayed": True}  # as its header says
        return status_code, body, True

    def _member_of(self, answer: dict[str, Any]) -> int | None:
        """The member a write was about, by default: the one its path names, or else the one
        its answer names."""
        named = self.request.path_params.get("member_id", answer.get("member_id"))
        if isinstance(named, str) and named.isdecimal():
            return int(named)
        return named if isinstance(named, int) and not isinstance(named, bool) else None


_STORED_ANSWER = Prepared(
    select(
        idempotency_records.c.request_hash, idempotency_records.c.status_code,
        idempotency_records.c.body,
    ).where(
        idempotency_records.c.scope == bindparam("scope"),
        idempotency_records.c.key == bindparam("key"),
    )
)  # fmt: skip


def _row(row: Any) -> Any:
    return row


_STORE_ANSWER_STATEMENT = idempotency_records.insert().values(
    {name: bindparam(name) for name in
     ("scope", "key", "request_hash", "status_code", "body", "created_at", "member_id")}
)  # fmt: skip
_STORE_ANSWER = Prepared(_STORE_ANSWER_STATEMENT)
_STORE_AUDITED_ANSWER = Prepared(audit_service.with_entry(_STORE_ANSWER_STATEMENT))


def stored_answers(uow: UnitOfWork, *, member_id: int) -> int:
    """How many answers to writes about the member are stored for replays (not erased)."""
    return int(
        uow.conn.execute(
            select(func.count()).where(
                idempotency_records.c.member_id == member_id,
                idempotency_records.c.status_code != ERASED_STATUS,
            )
        ).scalar_one()
    )


def erase_stored_answers(uow: UnitOfWork, *, member_id: int) -> int:
    """Erase the stored answers of the writes about the member (with its personal data):
    each keeps its key and request fingerprint, so that a replay is still known and not run
    again, and in place of the answer only the member's id and the status the write
    answered; it is replayed as 410 (``answer_erased``). How many were erased."""
    held = (
        idempotency_records.c.member_id == member_id,
        idempotency_records.c.status_code != ERASED_STATUS,
    )
    statuses = uow.conn.execute(
        select(idempotency_records.c.status_code).where(*held).distinct()
    ).scalars()
    erased = 0
    for status in list(statuses):  # one statement per status the writes answered (2xx)
        erased += uow.conn.execute(
            update(idempotency_records)
            .where(*held, idempotency_records.c.status_code == status)
            .values(
                status_code=ERASED_STATUS,
                body={"erased_member_id": member_id, "status_code": status},
            )
        ).rowcount
    return erased


async def _program(
    request: Request, db: Database, principal: Principal, permission: str
) -> ProgramRead | None:
    """The programme the path names. One that does not exist is unknown (404) only to a
    principal holding ``permission`` in every programme; to any other it is refused as a
    programme it holds no grant in is (403, the same words), so that no answer tells which
    programme codes exist."""
    code = request.path_params.get("program")
    if code is None:
        return None
    cache: dict[str, ProgramRead] = request.app.state.program_cache
    program = cache.get(code)
    if program is None:
        try:
            program = await run_in_threadpool(
                db.run, lambda uow: programs_service.get_program(uow, code=code), read_only=True
            )
        except UnknownProgram:
            if principal.programs(permission) is None:
                raise
            raise not_allowed(principal, permission, code) from None
        cache[code] = program
    return program


def not_allowed(principal: Principal, permission: str, program: str | None) -> Forbidden:
    """The refusal of ``permission`` (in the programme of code ``program``): worded the same
    whether or not that programme exists."""
    return Forbidden(
        problem=f"{principal.name} may not {permission}"
        + (f" in programme {program!r}." if program else "."),
        problem_zh=f"{principal.name} 无权执行 {permission}"
        + (f"(计划 {program!r})。" if program else "。"),
    )


async def _authorise(
    request: Request,
    principal: Principal,
    permission: str,
    *,
    programme_wide: bool = False,
    installation_wide: bool = False,
) -> Context:
    db = database(request)
    program = await _program(request, db, principal, permission)
    program_id = program.id if program else None
    grant = principal.allows(permission, program_id=program_id)
    if grant is not None and principal.kind == "member":
        member_id = request.path_params.get("member_id")
        if member_id is None or str(member_id) != str(principal.member_id):
            grant = None  # a member acts only on itself, through routes that name it
    if grant is None:
        raise not_allowed(principal, permission, program.code if program else None)
    if programme_wide:
        grant = _programme_wide_grant(principal, permission, program)
    if installation_wide:
        grant = _installation_wide_grant(principal, permission)
    if principal.kind == "staff" and is_write(permission) and not principal.totp_verified:
        # TOTP is asked at sign-in of roles that can write; a role granted since does not
        # make a session opened without a code one that writes.
        raise TotpRequired(permission=permission)
    return Context(
        request=request,
        db=db,
        principal=principal,
        permission=permission,
        program=program,
        grant=grant,
        language=language(request),
    )


def _programme_wide_grant(
    principal: Principal, permission: str, program: ProgramRead | None
) -> Grant:
    """The grant of ``permission`` that covers the whole programme (no merchant, no store):
    what the programme's configuration and integrations need, as they bind (or reach) every
    merchant. A grant of one merchant or store is refused with :class:`ScopeTooNarrow`."""
    for grant in principal.grants:
        if (
            permission in grant.permissions
            and grant.merchant is None
            and grant.store is None
            and (program is None or grant.program_id in (None, program.id))
        ):
            return grant
    where = f"programme {program.code!r}" if program else "a programme"
    where_zh = f"计划 {program.code!r}" if program else "某个计划"
    raise ScopeTooNarrow(
        problem=f"{principal.name} holds {permission} for a merchant or store only; this is "
        f"the whole of {where} (its configuration or integrations reach every merchant): it "
        "needs a grant covering the whole programme (no merchant, no store). Ask an "
        "administrator of the programme.",
        problem_zh=f"{principal.name} 仅在某个商户或门店范围内拥有 {permission};此操作涉及"
        f"{where_zh}的整体(其配置或对接影响所有商户),需要覆盖整个计划的授权(不限商户、门店)。"
        "请联系该计划的管理员。",
    )


def _installation_wide_grant(principal: Principal, permission: str) -> Grant:
    """The unscoped grant of ``permission`` (every programme, merchant and store): what a
    route reading the whole installation needs (403, ``scope_too_narrow``, without one)."""
    for grant in principal.grants:
        if permission in grant.permissions and grant.unscoped:
            return grant
    raise ScopeTooNarrow(
        problem=f"{principal.name} holds {permission} in some programmes only; this reads the "
        f"whole installation (every programme): it needs {permission} granted in every "
        "programme. Ask an installation-wide administrator.",
        problem_zh=f"{principal.name} 仅在部分计划中拥有 {permission};此操作读取整个系统"
        f"(所有计划),需要在所有计划范围内授予 {permission}。请联系全系统管理员。",
    )


class Read:
    """Dependency of a route that reads: authenticate and check ``permission``.

    ``programme_wide``: the route is about the whole programme (its configuration, or an
    integration that reaches every merchant's data): a grant of ``permission`` scoped to a
    merchant or store does not reach it (403, ``scope_too_narrow``). ``installation_wide``:
    the route reads every programme: only an unscoped grant reaches it."""

    def __init__(
        self, permission: str, *, programme_wide: bool = False, installation_wide: bool = False
    ) -> None:
        self.permission = permission
        self.programme_wide = programme_wide
        self.installation_wide = installation_wide

    async def __call__(
        self, request: Request, principal: Annotated[Principal, Depends(authenticate)]
    ) -> Context:
        return await _authorise(
            request, principal, self.permission, programme_wide=self.programme_wide,
            installation_wide=self.installation_wide,
        )  # fmt: skip


class ReadOwn(Read):
    """Dependency of a route about one member that the member itself may call, though
    staff and API keys need ``permission`` (one no member holds, such as ``members.pii``):
    a signed-in member is checked for ``own`` (a permission members hold) and, as on every
    route naming a ``{member_id}``, only for itself."""

    def __init__(self, permission: str, *, own: str) -> None:
        super().__init__(permission)
        self.own = own

    async def __call__(
        self, request: Request, principal: Annotated[Principal, Depends(authenticate)]
    ) -> Context:
        permission = self.own if principal.kind == "member" else self.permission
        return await _authorise(
            request, principal, permission, programme_wide=self.programme_wide,
            installation_wide=self.installation_wide,
        )  # fmt: skip


IdempotencyKeyHeader = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=100,
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string per intended change (a UUID is best). Sending the "
        "same key and body again returns the first answer; another body with it is refused.",
    ),
]


class Write(Read):
    """Dependency of a route that changes something: :class:`Read` plus an
    ``Idempotency-Key`` header and the request's fingerprint."""

    async def __call__(  # type: ignore[override]  # one more parameter than Read's
        self,
        request: Request,
        principal: Annotated[Principal, Depends(authenticate)],
        idempotency_key: IdempotencyKeyHeader,
    ) -> Context:
        context = await _authorise(
            request, principal, self.permission, programme_wide=self.programme_wide,
            installation_wide=self.installation_wide,
        )  # fmt: skip
        context.idempotency_key = idempotency_key
        text = await request_text(request)
        context.request_hash = crypto.request_fingerprint(text)
        context.earlier_hashes = tuple(crypto.request_fingerprints(text))
        return context


async def request_text(request: Request) -> str:
    """What a request's fingerprint digests: method, path, query and body (JSON compared by
    meaning, not spacing).

    The fingerprint is keyed (:func:`jifen.crypto.request_fingerprint`, not a plain
    SHA-256): the body may hold a phone or ID number or a password, and its fingerprint is
    stored next to an answer that shows part of it."""
    raw = await request.body()
    try:
        body = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")) if raw else ""
    except ValueError:
        body = raw.decode(errors="replace")
    return f"{request.method} {request.url.path}?{request.url.query}\n{body}"


def annotate_permissions(router: APIRouter) -> None:
    """Write each route's permission into its OpenAPI operation (``x-permission``)."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        for dependency in route.dependant.dependencies:
            call = dependency.call
            if isinstance(call, Read):
                extra = dict(route.openapi_extra or {})
                extra["x-permission"] = call.permission
                extra["x-member-scoped"] = "{member_id}" in route.path
                if call.programme_wide:
                    extra["x-scope"] = "programme"
                if call.installation_wide:
                    extra["x-scope"] = "installation"
                if isinstance(call, ReadOwn):
                    extra["x-member-self"] = True
                route.openapi_extra = extra
