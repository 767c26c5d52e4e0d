"""HTTP routes of the points domain."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["points"])
