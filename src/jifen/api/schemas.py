"""Shapes every domain's HTTP schemas share."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class RequestBody(BaseModel):
    """Base of every request body: an unknown field is refused, never ignored, so that no
    body can set what its route does not offer (a balance, a tier, a state)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` back as ``cursor`` for the next one."""

    items: list[T]
    next_cursor: str | None = None


LIMIT = Field(50, ge=1, le=200, description="Items per page.")
