"""HTTP routes of the auth domain."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["auth"])
