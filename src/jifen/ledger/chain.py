"""Tamper evidence: a digest per posting, a hash chain per member account, checkpoints.

A posting's digest covers everything that defines it: its kind, key, time, amount, the
posting it refers to, its lines, its lot allocations and the lots it created. Each member
account the posting touches appends a link ``sha256(previous link | seq | digest)`` to its
own chain; the account row holds the head. Chains are per account, not global, because the
account's row lock is already held when a posting is written, so chaining costs no extra
contention. A checkpoint hashes every account head together (and the previous checkpoint),
so that a chain whose tail was cut off and whose head was rewritten is still caught.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class PostingFacts:
    """The defining facts of one stored posting, in a form both writer and verifier build."""

    program_id: int
    kind: str
    idempotency_key: str
    created_at: datetime
    amount: int
    ref_posting_id: int | None
    reason: str
    actor: str
    lines: tuple[tuple[int, int], ...]  # (account id, amount)
    allocations: tuple[tuple[int, int], ...]  # (lot id, amount)
    new_lots: tuple[tuple[int, int, datetime, datetime | None, int | None], ...]
    # (owner account id, amount, available_at, expires_at, source lot id)


def stamp(moment: datetime | None) -> str:
    """A time as digests spell it: microseconds since the epoch (identical for a value read
    back from SQLite or PostgreSQL), ``-`` for none."""
    if moment is None:
        return "-"
    return str(round(moment.timestamp() * 1_000_000))


SEPARATOR = "\x1f"
"""What joins a digest's pieces."""


def middle_pieces(
    kind: str,
    idempotency_key: str,
    created_at: datetime,
    amount: int,
    ref_posting_id: int | None,
    reason: str,
    actor: str,
) -> str:
    """The pieces of a posting's digest that name no account (after the version and the
    programme, before the lines), joined: what a statement that learns the account ids as
    it writes completes (``points.store``'s credit at once)."""
    return SEPARATOR.join(
        (
            kind,
            idempotency_key,
            stamp(created_at),
            str(amount),
            str(ref_posting_id or "-"),
            reason,
            actor,
        )
    )


def posting_digest(facts: PostingFacts) -> str:
    parts = [
        "v1",
        str(facts.program_id),
        middle_pieces(
            facts.kind,
            facts.idempotency_key,
            facts.created_at,
            facts.amount,
            facts.ref_posting_id,
            facts.reason,
            facts.actor,
        ),
        ";".join(f"{a}:{n}" for a, n in sorted(facts.lines)),
        ";".join(f"{a}:{n}" for a, n in sorted(facts.allocations)),
        ";".join(
            sorted(
                f"{owner}:{n}:{stamp(avail)}:{stamp(exp)}:{src or '-'}"
                for owner, n, avail, exp, src in facts.new_lots
            )
        ),
    ]
    return hashlib.sha256(SEPARATOR.join(parts).encode()).hexdigest()


def chain_link(previous: str, seq: int, digest: str) -> str:
    return hashlib.sha256(f"{previous}|{seq}|{digest}".encode()).hexdigest()


def checkpoint_root(previous_root: str, heads: Iterable[tuple[int, int, str]]) -> str:
    """Hash of the previous checkpoint and every (account id, seq, head) in account order."""
    digest = hashlib.sha256(previous_root.encode())
    for account_id, seq, head in sorted(heads):
        digest.update(f"|{account_id}:{seq}:{head}".encode())
    return digest.hexdigest()
