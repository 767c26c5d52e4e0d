"""The points ledger: programmes, members, accounts, postings, lines, lots, allocations,
per-account hash chains and their checkpoints.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 11:14:44.596411
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import jifen.db.base

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "programs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "code", sa.String(length=64), nullable=False, comment="short stable name, e.g. 'demo'"
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "time_zone",
            sa.String(length=64),
            server_default="Asia/Shanghai",
            nullable=False,
            comment="IANA zone for calendar rules: days for caps, birthdays, year-end clearing",
        ),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_programs")),
        sa.UniqueConstraint("code", name=op.f("uq_programs_code")),
    )
    op.create_table(
        "ledger_checkpoints",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "program_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("accounts", sa.Integer(), nullable=False),
        sa.Column("previous_root", sa.String(length=64), nullable=False),
        sa.Column("root_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["program_id"], ["programs.id"], name=op.f("fk_ledger_checkpoints_program_id_programs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_checkpoints")),
    )
    op.create_table(
        "members",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "program_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "external_ref",
            sa.String(length=128),
            nullable=False,
            comment="the member's id in the merchant's own systems (card number, user id)",
        ),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["program_id"], ["programs.id"], name=op.f("fk_members_program_id_programs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_members")),
        sa.UniqueConstraint(
            "program_id", "external_ref", name=op.f("uq_members_program_id_external_ref")
        ),
    )
    op.create_table(
        "accounts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "program_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "system_code",
            sa.String(length=32),
            nullable=True,
            comment="for a programme's own accounts: issued, redeemed, expired, ...",
        ),
        sa.Column("currency", sa.String(length=32), server_default="points", nullable=False),
        sa.Column(
            "balance",
            sa.BigInteger(),
            server_default="0",
            nullable=False,
            comment="member accounts: sum of lines = sum of lots' remaining; system accounts: 0, their balance is derived from lines so they never become hot rows",
        ),
        sa.Column("frozen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("debt", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("head_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "head_hash",
            sa.String(length=64),
            server_default="0000000000000000000000000000000000000000000000000000000000000000",
            nullable=False,
        ),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(member_id IS NULL) <> (system_code IS NULL)",
            name=op.f("ck_accounts_member_or_system"),
        ),
        sa.CheckConstraint("balance >= 0", name=op.f("ck_accounts_balance_not_negative")),
        sa.CheckConstraint("debt >= 0", name=op.f("ck_accounts_debt_not_negative")),
        sa.CheckConstraint("frozen >= 0", name=op.f("ck_accounts_frozen_not_negative")),
        sa.ForeignKeyConstraint(
            ["member_id"], ["members.id"], name=op.f("fk_accounts_member_id_members")
        ),
        sa.ForeignKeyConstraint(
            ["program_id"], ["programs.id"], name=op.f("fk_accounts_program_id_programs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("member_id", "currency", name=op.f("uq_accounts_member_id_currency")),
        sa.UniqueConstraint(
            "program_id",
            "system_code",
            "currency",
            name=op.f("uq_accounts_program_id_system_code_currency"),
        ),
    )
    op.create_table(
        "ledger_checkpoint_heads",
        sa.Column(
            "checkpoint_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("chain_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_ledger_checkpoint_heads_account_id_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["ledger_checkpoints.id"],
            name=op.f("fk_ledger_checkpoint_heads_checkpoint_id_ledger_checkpoints"),
        ),
        sa.PrimaryKeyConstraint(
            "checkpoint_id", "account_id", name=op.f("pk_ledger_checkpoint_heads")
        ),
    )
    op.create_table(
        "postings",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "program_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column(
            "request_hash",
            sa.String(length=64),
            nullable=False,
            comment="fingerprint of the request, to refuse a key reused for a different one",
        ),
        sa.Column(
            "account_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            comment="the member account the posting is about",
        ),
        sa.Column(
            "counterparty_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "ref_posting_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
            comment="the spend a refund gives back, the earn a reversal claws back, ...",
        ),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("actor", sa.String(length=200), server_default="", nullable=False),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "digest", sa.String(length=64), nullable=False, comment="sha256 of the posting's facts"
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_postings_amount_positive")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_postings_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["counterparty_id"], ["accounts.id"], name=op.f("fk_postings_counterparty_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["program_id"], ["programs.id"], name=op.f("fk_postings_program_id_programs")
        ),
        sa.ForeignKeyConstraint(
            ["ref_posting_id"], ["postings.id"], name=op.f("fk_postings_ref_posting_id_postings")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_postings")),
        sa.UniqueConstraint(
            "program_id", "idempotency_key", name=op.f("uq_postings_program_id_idempotency_key")
        ),
    )
    with op.batch_alter_table("postings", schema=None) as batch_op:
        batch_op.create_index("ix_postings_account_id_id", ["account_id", "id"], unique=False)
        batch_op.create_index("ix_postings_ref_posting_id", ["ref_posting_id"], unique=False)

    op.create_table(
        "chain_entries",
        sa.Column(
            "account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("seq", sa.BigInteger(), nullable=False, comment="1, 2, ... per member account"),
        sa.Column(
            "posting_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "chain_hash",
            sa.String(length=64),
            nullable=False,
            comment="sha256(previous entry's hash | seq | posting digest)",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_chain_entries_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["posting_id"], ["postings.id"], name=op.f("fk_chain_entries_posting_id_postings")
        ),
        sa.PrimaryKeyConstraint("account_id", "seq", name=op.f("pk_chain_entries")),
    )
    with op.batch_alter_table("chain_entries", schema=None) as batch_op:
        batch_op.create_index("ix_chain_entries_posting_id", ["posting_id"], unique=False)

    op.create_table(
        "lines",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "posting_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "amount", sa.BigInteger(), nullable=False, comment="into the account when positive"
        ),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_lines_amount_not_zero")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_lines_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["posting_id"], ["postings.id"], name=op.f("fk_lines_posting_id_postings")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lines")),
    )
    with op.batch_alter_table("lines", schema=None) as batch_op:
        batch_op.create_index("ix_lines_account_id", ["account_id"], unique=False)
        batch_op.create_index("ix_lines_posting_id", ["posting_id"], unique=False)

    op.create_table(
        "lots",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "posting_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column(
            "available_at",
            jifen.db.base.UTCDateTime(timezone=True),
            nullable=False,
            comment="pending until then",
        ),
        sa.Column(
            "expires_at",
            jifen.db.base.UTCDateTime(timezone=True),
            nullable=True,
            comment="null: never expires",
        ),
        sa.Column(
            "source_lot_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
            comment="for a transfer's lots: the sender's lot they came from",
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_lots_amount_positive")),
        sa.CheckConstraint(
            "remaining >= 0 AND remaining <= amount", name=op.f("ck_lots_remaining_in_range")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_lots_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["posting_id"], ["postings.id"], name=op.f("fk_lots_posting_id_postings")
        ),
        sa.ForeignKeyConstraint(
            ["source_lot_id"], ["lots.id"], name=op.f("fk_lots_source_lot_id_lots")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lots")),
    )
    with op.batch_alter_table("lots", schema=None) as batch_op:
        batch_op.create_index(
            "ix_lots_open",
            ["account_id", "expires_at", "id"],
            unique=False,
            postgresql_where=sa.text("remaining > 0"),
            sqlite_where=sa.text("remaining > 0"),
        )
        batch_op.create_index("ix_lots_posting_id", ["posting_id"], unique=False)

    op.create_table(
        "allocations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "posting_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("lot_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "amount",
            sa.BigInteger(),
            nullable=False,
            comment="change to the lot's remaining: negative consumes, positive restores",
        ),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_allocations_amount_not_zero")),
        sa.ForeignKeyConstraint(["lot_id"], ["lots.id"], name=op.f("fk_allocations_lot_id_lots")),
        sa.ForeignKeyConstraint(
            ["posting_id"], ["postings.id"], name=op.f("fk_allocations_posting_id_postings")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_allocations")),
    )
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.create_index("ix_allocations_lot_id", ["lot_id"], unique=False)
        batch_op.create_index("ix_allocations_posting_id", ["posting_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_index("ix_allocations_posting_id")
        batch_op.drop_index("ix_allocations_lot_id")

    op.drop_table("allocations")
    with op.batch_alter_table("lots", schema=None) as batch_op:
        batch_op.drop_index("ix_lots_posting_id")
        batch_op.drop_index(
            "ix_lots_open",
            postgresql_where=sa.text("remaining > 0"),
            sqlite_where=sa.text("remaining > 0"),
        )

    op.drop_table("lots")
    with op.batch_alter_table("lines", schema=None) as batch_op:
        batch_op.drop_index("ix_lines_posting_id")
        batch_op.drop_index("ix_lines_account_id")

    op.drop_table("lines")
    with op.batch_alter_table("chain_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_chain_entries_posting_id")

    op.drop_table("chain_entries")
    with op.batch_alter_table("postings", schema=None) as batch_op:
        batch_op.drop_index("ix_postings_ref_posting_id")
        batch_op.drop_index("ix_postings_account_id_id")

    op.drop_table("postings")
    op.drop_table("ledger_checkpoint_heads")
    op.drop_table("accounts")
    op.drop_table("members")
    op.drop_table("ledger_checkpoints")
    op.drop_table("programs")
