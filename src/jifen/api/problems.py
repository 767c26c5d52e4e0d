"""One error format for the whole API: RFC 9457 ``application/problem+json``.

Every answer that is not a success carries ``type``, ``title``, ``status``, a stable ``code``
(the same as the CLI's), a ``detail`` in Chinese or English by ``Accept-Language``, and, for
validation errors, ``errors``: one entry per field, with where it is and what is wrong.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from jifen.errors import (
    InvalidInput,
    JifenError,
    RateLimited,
    Refusal,
    SignInLocked,
    field_problem,
    http_status,
)

log = logging.getLogger("jifen.api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://jifen.dev/problems/"


class FieldError(BaseModel):
    field: str
    """Where: ``body.amount``, ``query.limit``, ``header.idempotency-key``."""
    message: str
    type: str


class Problem(BaseModel):
    """An error answer (RFC 9457)."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    errors: list[FieldError] | None = None


def language(request: Request) -> str:
    """``zh`` when the client prefers Chinese, else ``en``."""
    header = request.headers.get("accept-language", "")
    best, best_q = "en", -1.0
    for part in header.split(","):
        tag, *params = part.strip().split(";")
        q = 1.0
        for param in params:  # the weight, named "q" in either case, among any parameters
            name, _, value = param.strip().partition("=")
            if name.lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        tag = tag.strip().lower()
        # q=0 means "not acceptable": such a tag is never chosen.
        if tag.startswith(("zh", "en")) and q > max(best_q, 0):
            best, best_q = tag[:2], q
    return best


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        type=TYPE_BASE + code,
        title=code.replace("_", " "),
        status=status,
        code=code,
        detail=detail,
        errors=errors,
    )
    if status == 401:  # RFC 9110: a 401 names the scheme that would be accepted
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


_VALIDATION_ZH = "请求有误,请按 errors 中每个字段的说明修改后重试。"
_VALIDATION_EN = "The request is not valid; fix each field listed in errors and send it again."

_HTTP_CODES = {
    400: (
        "invalid_body",
        "The body could not be read as JSON (UTF-8 text, numbers of at most 4,300 digits, "
        "nesting within reason): send a valid JSON document.",
        "请求体无法按 JSON 读取(须为 UTF-8 文本,数字不超过 4300 位,嵌套层级合理):"
        "请发送有效的 JSON 文档。",
    ),
    401: (
        "unauthenticated",
        "Sign in, or send a valid API key.",
        "请先登录,或提供有效的 API 密钥。",
    ),
    403: ("forbidden", "Not allowed.", "无权执行此操作。"),
    404: ("not_found", "There is nothing at this address.", "此地址不存在。"),
    405: ("method_not_allowed", "This method is not allowed here.", "此地址不支持该请求方法。"),
    406: ("not_acceptable", "Cannot answer in the requested format.", "无法以所请求的格式应答。"),
    415: (
        "unsupported_media_type",
        "Send the body as application/json.",
        "请以 application/json 格式发送请求体。",
    ),
}


def _field(loc: tuple[Any, ...], error: Any = None) -> str:
    """Where an error is: its location, and within it the part one of jifen's checks of the
    whole value refused (``body`` and ``events.1.payload``: ``body.events.1.payload``)."""
    cause = (error.get("ctx") or {}).get("error") if error is not None else None
    within = (cause.at,) if isinstance(cause, Refusal) and cause.at else ()
    return ".".join(str(part) for part in (*loc, *within))


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem answer."""

    @app.exception_handler(JifenError)
    async def jifen_error(request: Request, exc: JifenError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimited | SignInLocked):
            headers = {"Retry-After": str(exc.params.get("retry_after", 1))}
        message = exc.message(language(request))
        errors = None
        if isinstance(exc, InvalidInput) and "field" in exc.params:  # the field it is about
            errors = [FieldError(field=str(exc.params["field"]), message=message, type=exc.code)]
        return problem(http_status(exc), exc.code, message, errors=errors, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        zh = language(request) == "zh"
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            # JSON cut short or mistyped is a body that cannot be read, as one that is not
            # UTF-8 is (400), not a field (its "location" is where the reading stopped)
            code, en, zh_detail = _HTTP_CODES[400]
            return problem(400, code, zh_detail if zh else en)
        errors = [
            FieldError(
                field=_field(error["loc"], error),
                message=field_problem(error)[1 if zh else 0],
                type=error["type"],
            )
            for error in exc.errors()
        ]
        return problem(
            422, "invalid_request", _VALIDATION_ZH if zh else _VALIDATION_EN, errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, en, zh = _HTTP_CODES.get(
            exc.status_code, ("http_error", str(exc.detail), str(exc.detail))
        )
        return problem(
            exc.status_code,
            code,
            zh if language(request) == "zh" else en,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        zh = language(request) == "zh"
        return problem(
            500,
            "internal_error",
            "服务器内部错误,已记录;请稍后重试。"
            if zh
            else "Something went wrong on the server; it has been logged. Try again later.",
        )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "model": Problem,  # puts the Problem schema among the document's components
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        "description": description,
    }
    for status, description in [
        (400, "A body that cannot be read as JSON"),
        (401, "Not signed in"),
        (403, "Not allowed"),
        (404, "Not found"),
        (409, "Refused by the rules, or an idempotency key reused for another request"),
        (410, "A write repeated whose answer was erased with a member's personal data"),
        (415, "A body that is not JSON"),
        (422, "Invalid request"),
        (413, "A body larger than the server accepts"),
        (429, "Too many requests"),
    ]
}
"""The error answers every route can give, for the OpenAPI document."""
