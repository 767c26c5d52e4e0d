"""Tiers by score: tier changes with their reasons, temporary upgrades.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import jifen.db.base

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("member_tiers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "base_tier_code",
                sa.String(length=64),
                nullable=True,
                comment="while a temporary upgrade lasts: the tier the member goes back to",
            )
        )
        batch_op.add_column(
            sa.Column(
                "temporary_until",
                jifen.db.base.UTCDateTime(timezone=True),
                nullable=True,
                comment="when the temporary upgrade ends by itself; null: the tier is the "
                "member's own",
            )
        )
        batch_op.create_index(
            "ix_member_tiers_temporary",
            ["program_id", "temporary_until"],
            unique=False,
            postgresql_where=sa.text("temporary_until IS NOT NULL"),
            sqlite_where=sa.text("temporary_until IS NOT NULL"),
        )

    op.create_table(
        "tier_changes",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("program_id", _ID, nullable=False),
        sa.Column("member_id", _ID, nullable=False),
        sa.Column(
            "from_tier", sa.String(length=64), nullable=True, comment="null: the member had no tier"
        ),
        sa.Column("to_tier", sa.String(length=64), nullable=False),
        sa.Column(
            "kind",
            sa.String(length=16),
            nullable=False,
            comment="evaluation, upgrade, temporary, temporary_end or manual",
        ),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "score", sa.BigInteger(), nullable=True, comment="the score that decided it, if any"
        ),
        sa.Column("at", jifen.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=120), server_default="", nullable=False),
        sa.CheckConstraint(
            "kind IN ('evaluation', 'upgrade', 'temporary', 'temporary_end', 'manual')",
            name=op.f("ck_tier_changes_tier_change_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["member_id"], ["members.id"], name=op.f("fk_tier_changes_member_id_members")
        ),
        sa.ForeignKeyConstraint(
            ["program_id"], ["programs.id"], name=op.f("fk_tier_changes_program_id_programs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tier_changes")),
    )
    with op.batch_alter_table("tier_changes", schema=None) as batch_op:
        batch_op.create_index("ix_tier_changes_member", ["member_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tier_changes", schema=None) as batch_op:
        batch_op.drop_index("ix_tier_changes_member")
    op.drop_table("tier_changes")
    with op.batch_alter_table("member_tiers", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_member_tiers_temporary",
            postgresql_where=sa.text("temporary_until IS NOT NULL"),
            sqlite_where=sa.text("temporary_until IS NOT NULL"),
        )
        batch_op.drop_column("temporary_until")
        batch_op.drop_column("base_tier_code")
