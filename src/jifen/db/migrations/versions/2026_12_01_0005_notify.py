"""Notifications: the outbox with retries, the in-app inbox, webhook subscriptions and their delivery log.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import jifen.db.base

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "webhook_subscriptions",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("program_id", BIG_ID, nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column(
            "event_types", sa.JSON(), nullable=False, comment='event types it receives; "*": all'
        ),
        sa.Column("description", sa.String(length=200), server_default="", nullable=False),
        sa.Column("secret_enc", sa.Text(), nullable=False, comment="the signing secret, encrypted"),
        sa.Column(
            "previous_secret_enc",
            sa.Text(),
            nullable=True,
            comment="the secret before the last rotation, encrypted; signs too until the time below",
        ),
        sa.Column("previous_valid_until", jifen.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("active", sa.Boolean(), server_default="1", nullable=False),
        sa.Column(
            "allow_private",
            sa.Boolean(),
            server_default="0",
            nullable=False,
            comment="may target private, loopback or link-local addresses (set by an operator)",
        ),
        sa.Column("created_by", sa.String(length=120), nullable=False),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", jifen.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["program_id"],
            ["programs.id"],
            name=op.f("fk_webhook_subscriptions_program_id_programs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_subscriptions")),
    )
    with op.batch_alter_table("webhook_subscriptions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_webhook_subscriptions_program", ["program_id", "id"], unique=False
        )

    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("member_id", BIG_ID, nullable=True))
        batch_op.add_column(
            sa.Column(
                "subject",
                sa.String(length=200),
                nullable=True,
                comment="an email's subject, an inbox title",
            )
        )
        batch_op.add_column(
            sa.Column(
                "address_enc",
                sa.Text(),
                nullable=True,
                comment="the full email address or phone number, encrypted; NULL for inbox and webhook",
            )
        )
        batch_op.add_column(
            sa.Column(
                "status",
                sa.String(length=16),
                server_default="pending",
                nullable=False,
                comment="pending (due at next_attempt_at); sending (claimed until next_attempt_at); sent; dead (given up)",
            )
        )
        batch_op.add_column(
            sa.Column(
                "next_attempt_at",
                jifen.db.base.UTCDateTime(timezone=True),
                nullable=True,
                comment="when pending: due time; when sending: end of the sender's lease; else NULL",
            )
        )
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "dedupe_key",
                sa.String(length=200),
                nullable=True,
                comment="the key it was queued under",
            )
        )
        batch_op.add_column(sa.Column("subscription_id", BIG_ID, nullable=True))
        batch_op.add_column(
            sa.Column(
                "delivery_id",
                sa.String(length=40),
                nullable=True,
                comment="stable across retries (Jifen-Delivery, Message-ID): receivers drop duplicates",
            )
        )
        batch_op.add_column(
            sa.Column(
                "redelivery_of", BIG_ID, nullable=True, comment="the delivery this one repeats"
            )
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_outbox_subscription_id_webhook_subscriptions"),
            "webhook_subscriptions",
            ["subscription_id"],
            ["id"],
        )
        batch_op.create_check_constraint(
            batch_op.f("ck_outbox_known_status"),
            "status IN ('pending', 'sending', 'sent', 'dead')",
        )
        batch_op.drop_index("ix_outbox_unsent")
        batch_op.create_index("ix_outbox_due", ["next_attempt_at", "id"], unique=False)
        batch_op.create_index("ix_outbox_program", ["program_id", "id"], unique=False)
        batch_op.create_index("ix_outbox_subscription", ["subscription_id", "id"], unique=False)
    # Rows from before this revision are SMS texts the built-in provider already wrote to the
    # log: they count as sent, and the sender must not pick them up.
    op.execute("UPDATE outbox SET status = 'sent', sent_at = COALESCE(sent_at, created_at)")

    op.create_table(
        "inbox_messages",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("program_id", BIG_ID, nullable=False),
        sa.Column("member_id", BIG_ID, nullable=False),
        sa.Column("outbox_id", BIG_ID, nullable=False),
        sa.Column("template", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("read_at", jifen.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["member_id"], ["members.id"], name=op.f("fk_inbox_messages_member_id_members")
        ),
        sa.ForeignKeyConstraint(
            ["outbox_id"], ["outbox.id"], name=op.f("fk_inbox_messages_outbox_id_outbox")
        ),
        sa.ForeignKeyConstraint(
            ["program_id"], ["programs.id"], name=op.f("fk_inbox_messages_program_id_programs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox_messages")),
    )
    with op.batch_alter_table("inbox_messages", schema=None) as batch_op:
        batch_op.create_index("ix_inbox_messages_member", ["member_id", "id"], unique=False)

    op.create_table(
        "notification_keys",
        sa.Column("program_id", BIG_ID, nullable=False),
        sa.Column(
            "kind", sa.String(length=16), nullable=False, comment="notify or event: two key spaces"
        ),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["program_id"], ["programs.id"], name=op.f("fk_notification_keys_program_id_programs")
        ),
        sa.PrimaryKeyConstraint("program_id", "kind", "key", name=op.f("pk_notification_keys")),
    )

    op.create_table(
        "webhook_attempts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("program_id", BIG_ID, nullable=False),
        sa.Column("subscription_id", BIG_ID, nullable=False),
        sa.Column("outbox_id", BIG_ID, nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column(
            "attempt", sa.Integer(), nullable=False, comment="1 for the first try of the delivery"
        ),
        sa.Column(
            "status_code",
            sa.Integer(),
            nullable=True,
            comment="NULL: no answer (refused, timeout)",
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("created_at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["outbox_id"], ["outbox.id"], name=op.f("fk_webhook_attempts_outbox_id_outbox")
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["webhook_subscriptions.id"],
            name=op.f("fk_webhook_attempts_subscription_id_webhook_subscriptions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    with op.batch_alter_table("webhook_attempts", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_attempts_outbox", ["outbox_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("webhook_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_attempts_outbox")
    op.drop_table("webhook_attempts")
    op.drop_table("notification_keys")
    with op.batch_alter_table("inbox_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_inbox_messages_member")
    op.drop_table("inbox_messages")
    # Only the rows the built-in SMS provider writes existed before: keep those.
    op.execute("DELETE FROM outbox WHERE channel <> 'sms'")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_subscription")
        batch_op.drop_index("ix_outbox_program")
        batch_op.drop_index("ix_outbox_due")
        batch_op.create_index("ix_outbox_unsent", ["sent_at", "id"], unique=False)
        batch_op.drop_constraint(batch_op.f("ck_outbox_known_status"), type_="check")
        batch_op.drop_constraint(
            batch_op.f("fk_outbox_subscription_id_webhook_subscriptions"), type_="foreignkey"
        )
        for column in (
            "redelivery_of", "delivery_id", "subscription_id", "dedupe_key", "last_error",
            "next_attempt_at", "status", "address_enc", "subject", "member_id",
        ):  # fmt: skip
            batch_op.drop_column(column)
    with op.batch_alter_table("webhook_subscriptions", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_subscriptions_program")
    op.drop_table("webhook_subscriptions")
