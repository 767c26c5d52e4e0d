"""Tables of the points ledger.

Append-only: ``postings``, ``lines``, ``allocations``, ``chain_entries`` and the creation
facts of ``lots`` are never updated or deleted. A member account's history is its chain
entries: one per posting that concerns it (even one that moves none of its points, such as
an earning that only pays off debt), in order, hash-linked. Three things are caches, kept in
the same transaction as the rows they summarise and checked by ``jifen ledger reconcile``:
``accounts.balance / frozen / debt``, the account's chain head, and ``lots.remaining``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from jifen.db.base import BigId, UTCDateTime, metadata

accounts = Table(
    "accounts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=True),
    Column(
        "system_code",
        String(32),
        nullable=True,
        comment="for a programme's own accounts: issued, redeemed, expired, ...",
    ),
    Column("currency", String(32), nullable=False, server_default="points"),
    Column(
        "balance",
        BigInteger,
        nullable=False,
        server_default="0",
        comment="member accounts: sum of lines = sum of lots' remaining; system accounts: 0, "
        "their balance is derived from lines so they never become hot rows",
    ),
    Column("frozen", BigInteger, nullable=False, server_default="0"),
    Column("debt", BigInteger, nullable=False, server_default="0"),
    Column("head_seq", BigInteger, nullable=False, server_default="0"),
    Column("head_hash", String(64), nullable=False, server_default="0" * 64),
    Column(
        "member_state",
        String(16),
        nullable=False,
        server_default="active",
        comment="the member's state (members.state), set with it by every change of state: "
        "what posts to the account reads it under the account's row lock",
    ),
    Column("created_at", UTCDateTime(), nullable=False),
    CheckConstraint("balance >= 0", name="balance_not_negative"),
    CheckConstraint("frozen >= 0", name="frozen_not_negative"),
    CheckConstraint("debt >= 0", name="debt_not_negative"),
    CheckConstraint("(member_id IS NULL) <> (system_code IS NULL)", name="member_or_system"),
    CheckConstraint(
        "member_state IN ('active', 'frozen', 'banned', 'closed')", name="known_member_state"
    ),
    UniqueConstraint("member_id", "currency"),
    UniqueConstraint("program_id", "system_code", "currency"),
)

# The ledger's own tables (postings, lines, chain entries, lots, allocations) carry no
# foreign keys. Every posting writes rows to four or five of them at once, and on
# PostgreSQL each foreign key is a query run by a trigger for every row written that also
# locks the row it leads to: every earning would lock its programme and the programme's
# issuing account (system accounts must not become hot rows), and the eleven checks of an
# earning cost about a seventh of its throughput. Only the ledger's service writes these
# rows, each posting's rows in one statement or transaction; nothing deletes them or the
# accounts and programmes they lead to; and `jifen ledger reconcile` reports each
# reference below that leads nowhere (`verify` names rows edited out of band).
postings = Table(
    "postings",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("idempotency_key", String(200), nullable=False),
    Column(
        "request_hash",
        String(64),
        nullable=False,
        comment="fingerprint of the request, to refuse a key reused for a different one",
    ),
    Column(
        "account_id",
        BigId,
        nullable=False,
        comment="the member account the posting is about",
    ),
    Column("counterparty_id", BigId, nullable=True),
    Column(
        "ref_posting_id",
        BigId,
        nullable=True,
        comment="the spend a refund gives back, the earn a reversal claws back, ...",
    ),
    Column("amount", BigInteger, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("actor", String(200), nullable=False, server_default=""),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("digest", String(64), nullable=False, comment="sha256 of the posting's facts"),
    CheckConstraint("amount > 0", name="amount_positive"),
    UniqueConstraint("program_id", "idempotency_key"),
    # Read by the posting referred to: only postings that refer to one are indexed.
    Index(
        "ix_postings_ref_posting_id",
        "ref_posting_id",
        postgresql_where=text("ref_posting_id IS NOT NULL"),
        sqlite_where=text("ref_posting_id IS NOT NULL"),
    ),
    Index("ix_postings_account_id_id", "account_id", "id"),
    # An operator's direct adjustments of the last day, summed against the approval threshold.
    Index(
        "ix_postings_adjust_actor",
        "program_id",
        "actor",
        "created_at",
        postgresql_where=text("kind = 'adjust'"),
        sqlite_where=text("kind = 'adjust'"),
    ),
)

lines = Table(
    "lines",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("posting_id", BigId, nullable=False),
    Column("account_id", BigId, nullable=False),
    Column("amount", BigInteger, nullable=False, comment="into the account when positive"),
    CheckConstraint("amount <> 0", name="amount_not_zero"),
    # A posting's lines are read by their posting; nothing reads an account's lines by it
    # (reconcile sums them all), and every posting of a programme wrote its issuing account's
    # key to the same leaf of such an index.
    Index("ix_lines_posting_id", "posting_id"),
)

chain_entries = Table(
    "chain_entries",
    metadata,
    Column("account_id", BigId, primary_key=True),
    Column("seq", BigInteger, primary_key=True, comment="1, 2, ... per member account"),
    Column("posting_id", BigId, nullable=False),
    Column(
        "chain_hash",
        String(64),
        nullable=False,
        comment="sha256(previous entry's hash | seq | posting digest)",
    ),
    Index("ix_chain_entries_posting_id", "posting_id"),
)

lots = Table(
    "lots",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("account_id", BigId, nullable=False),
    Column("posting_id", BigId, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("remaining", BigInteger, nullable=False),
    Column("available_at", UTCDateTime(), nullable=False, comment="pending until then"),
    Column("expires_at", UTCDateTime(), nullable=True, comment="null: never expires"),
    Column(
        "source_lot_id",
        BigId,
        nullable=True,
        comment="for a transfer's lots: the sender's lot they came from",
    ),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("remaining >= 0 AND remaining <= amount", name="remaining_in_range"),
    # The FIFO scan reads only open lots, in expiry order.
    Index(
        "ix_lots_open",
        "account_id",
        "expires_at",
        "id",
        postgresql_where=text("remaining > 0"),
        sqlite_where=text("remaining > 0"),
    ),
    Index("ix_lots_posting_id", "posting_id"),
    # The expiry run reads due lots across all accounts, earliest first, and picks their
    # accounts from the index alone.
    Index(
        "ix_lots_due",
        "expires_at",
        "account_id",
        postgresql_where=text("remaining > 0"),
        sqlite_where=text("remaining > 0"),
    ),
)

allocations = Table(
    "allocations",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("posting_id", BigId, nullable=False),
    Column("lot_id", BigId, nullable=False),
    Column(
        "amount",
        BigInteger,
        nullable=False,
        comment="change to the lot's remaining: negative consumes, positive restores",
    ),
    CheckConstraint("amount <> 0", name="amount_not_zero"),
    Index("ix_allocations_posting_id", "posting_id"),
    Index("ix_allocations_lot_id", "lot_id"),
)

REFERENCES = (
    (postings.c.program_id, "programs"),
    (postings.c.account_id, "accounts"),
    (postings.c.counterparty_id, "accounts"),
    (postings.c.ref_posting_id, "postings"),
    (lines.c.posting_id, "postings"),
    (lines.c.account_id, "accounts"),
    (chain_entries.c.account_id, "accounts"),
    (chain_entries.c.posting_id, "postings"),
    (lots.c.account_id, "accounts"),
    (lots.c.posting_id, "postings"),
    (lots.c.source_lot_id, "lots"),
    (allocations.c.posting_id, "postings"),
    (allocations.c.lot_id, "lots"),
)
"""Each reference between the ledger's rows, as (column, the table whose ``id`` it names),
checked by :func:`jifen.points.integrity.reconcile` in place of a foreign key."""

checkpoints = Table(
    "ledger_checkpoints",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("accounts", Integer, nullable=False),
    Column("previous_root", String(64), nullable=False),
    Column("root_hash", String(64), nullable=False),
)

checkpoint_heads = Table(
    "ledger_checkpoint_heads",
    metadata,
    Column("checkpoint_id", BigId, ForeignKey("ledger_checkpoints.id"), primary_key=True),
    Column("account_id", BigId, ForeignKey("accounts.id"), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("chain_hash", String(64), nullable=False),
)

posting_origins = Table(
    "posting_origins",
    metadata,
    Column("posting_id", BigId, ForeignKey("postings.id"), primary_key=True, autoincrement=False),
    Column("merchant", String(64), nullable=True),
    Column("store", String(64), nullable=True),
    comment="where a posting was made, when a merchant or store made it (API keys, cashiers)",
)
