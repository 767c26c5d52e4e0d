"""Audit use cases: record a write in the caller's transaction; search; verify the chains."""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import select

from jifen.audit.core import entry_digest, stripe_of
from jifen.audit.models import STRIPES, audit_entries, audit_heads
from jifen.audit.schemas import AuditEntryCreate
from jifen.db.uow import UnitOfWork

CHAINED_FIELDS = (
    "program_id", "actor", "role", "api_key_id", "ip", "user_agent", "action", "target",
    "before", "after",
)  # fmt: skip


def record(uow: UnitOfWork, entry: AuditEntryCreate) -> int:
    """Append ``entry`` to its stripe's chain, in the caller's transaction; returns its id."""
    stripe = stripe_of(entry.target, STRIPES)
    head = select(audit_heads.c.seq, audit_heads.c.hash).where(audit_heads.c.stripe == stripe)
    if uow.dialect == "postgresql":
        head = head.with_for_update()
    seq, prev_hash = uow.conn.execute(head).one()
    seq += 1
    # Microseconds are kept by both backends; the digest covers the stored value exactly.
    at = uow.clock.now().astimezone(UTC)
    fields = entry.model_dump(include=set(CHAINED_FIELDS))
    digest = entry_digest(prev_hash, seq, at, fields)
    entry_id = uow.conn.execute(
        audit_entries.insert().returning(audit_entries.c.id),
        {**fields, "stripe": stripe, "seq": seq, "at": at, "prev_hash": prev_hash, "hash": digest},
    ).scalar_one()
    uow.conn.execute(
        audit_heads.update().where(audit_heads.c.stripe == stripe).values(seq=seq, hash=digest)
    )
    return int(entry_id)
