"""The audit chain's hashing, pure: the digest of an entry and the stripe it belongs to."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

GENESIS = "0" * 64


def stripe_of(target: str, stripes: int) -> int:
    """The chain an entry about ``target`` joins: stable, so one target's entries share it."""
    return int.from_bytes(hashlib.sha256(target.encode()).digest()[:4], "big") % stripes


def entry_digest(prev_hash: str, seq: int, at: datetime, fields: dict[str, Any]) -> str:
    """SHA-256 over the previous hash, the position, the time and every recorded field."""
    payload = json.dumps(
        {"prev": prev_hash, "seq": seq, "at": at.isoformat(), **fields},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()
