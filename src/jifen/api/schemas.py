"""Shapes every domain's HTTP schemas share."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    model_validator,
)

from jifen.clock import EARLIEST, LATEST
from jifen.errors import Refusal

T = TypeVar("T")


class RequestBody(BaseModel):
    """Base of every request body: an unknown field is refused, never ignored, so that no
    body can set what its route does not offer (a balance, a tier, a state)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="wrap")
    @classmethod
    def _no_nul(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        # The outermost model walks its whole input once; the models within it (a batch's
        # events, an order's lines) validate parts of what it walked, and do not again.
        if _WALKED.get():
            return handler(data)
        where = nul_at(data)
        if where is not None:
            raise Refusal(
                f"{where or 'the body'} holds a NUL character (\\u0000), which no text can "
                "store: remove it",
                f"{where or '请求体'} 含有 NUL 字符(\\u0000),任何文本都无法保存它:请删除",
                at=where,
            )
        walked = _WALKED.set(True)
        try:
            return handler(data)
        finally:
            _WALKED.reset(walked)


_WALKED: ContextVar[bool] = ContextVar("jifen.nul_walked", default=False)
"""Set while an outer :class:`RequestBody` validates what it has checked for NUL."""


@contextmanager
def nul_checked() -> Iterator[None]:
    """Within it, a :class:`RequestBody` validates data without walking it for NUL: for a
    part of a body validated before (an event's payload, validated again as its type's
    model), which its body's walk has checked already."""
    walked = _WALKED.set(True)
    try:
        yield
    finally:
        _WALKED.reset(walked)


def nul_at(value: Any, path: str = "") -> str | None:
    """Where in ``value`` (parsed JSON) a text or a key holds NUL (``None``: nowhere), as a
    dotted path: PostgreSQL stores NUL in no text and no JSON, so it is refused up front."""
    if not _holds_nul(value):  # the common case, walked without building any path
        return None
    if isinstance(value, str):
        return path
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return inner
            found = nul_at(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = nul_at(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


def _holds_nul(value: Any) -> bool:
    """Whether a text or a key anywhere in ``value`` holds NUL."""
    kind = type(value)
    if kind is str:
        return "\x00" in value
    if kind is dict:
        for key, item in value.items():
            if "\x00" in str(key) or (type(item) not in _SCALARS and _holds_nul(item)):
                return True
        return False
    if kind is list or kind is tuple:
        return any(type(item) not in _SCALARS and _holds_nul(item) for item in value)
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return _holds_nul(dict(value))
    if isinstance(value, list | tuple):
        return _holds_nul(list(value))
    return False


_SCALARS = frozenset((int, float, bool, type(None)))
"""Types that hold no text: skipped without a call."""


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` back as ``cursor`` for the next one."""

    items: list[T]
    next_cursor: str | None = None


LIMIT = Field(50, ge=1, le=200, description="Items per page.")
Limit = Annotated[int, LIMIT]
IdCursor = Annotated[
    str | None, Query(max_length=20, description="A next_cursor from the previous page.")
]
"""A list's cursor that is the last id of the previous page (read with ``id_cursor``)."""

__all__ = ["EARLIEST", "LATEST"]  # with the shapes below; defined beside the clock


def _in_range(value: datetime) -> datetime:
    # Far ends of the calendar cannot be shifted to UTC or stored; no real date is near them.
    try:
        in_utc = value.astimezone(UTC)
    except OverflowError:
        in_utc = None
    if in_utc is None or not EARLIEST <= in_utc < LATEST:
        raise Refusal(
            "give a time between 1970 and 9000, with its UTC offset",
            "请给出 1970 年至 9000 年之间、带 UTC 偏移的时间",
        )
    return value


_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _not_a_number(value: Any) -> Any:
    # pydantic reads a number (or a text of one) as seconds or milliseconds since 1970: an
    # order dated 20250601 would land in August 1970. Only RFC 3339 text is a time here.
    if isinstance(value, int | float | Decimal) or (
        isinstance(value, str) and _NUMBER.fullmatch(value)
    ):
        raise Refusal(
            "give a time in RFC 3339 with its UTC offset, such as 2026-06-01T10:00:00+08:00 "
            "(a number is not read as a time)",
            "请按 RFC 3339 给出带 UTC 偏移的时间,例如 2026-06-01T10:00:00+08:00"
            "(数字不会被当作时间)",
        )
    return value


Instant = Annotated[AwareDatetime, BeforeValidator(_not_a_number), AfterValidator(_in_range)]
"""A point in time with its offset (RFC 3339), within the years the ledger stores."""

NO_NUL = r"^[^\x00]*$"
"""Text fields refuse NUL, which PostgreSQL cannot store in text."""


def text(max_length: int, *, min_length: int = 0) -> Any:
    """A text field of at most ``max_length`` characters, without NUL."""
    return Field(min_length=min_length, max_length=max_length, pattern=NO_NUL)
