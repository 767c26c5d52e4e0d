"""A staff user records the scope it was created in (``home_program_id``, ``home_merchant``,
``home_store``): the narrowest scope of its creator that holds ``staff.write``, all NULL when
its creator held it installation-wide. A user holding no grant is then managed only by administrators
whose scope contains that one; before, such a user counted as inside every scope. Users
created before keep NULL: installation-wide administrators manage them.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-09 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from jifen.db.base import BigId

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FK = "fk_staff_users_home_program_id_programs"


def upgrade() -> None:
    with op.batch_alter_table("staff_users") as batch:
        batch.add_column(
            sa.Column(
                "home_program_id", BigId, nullable=True,
                comment="the programme of the scope it was created in (NULL: every programme)",
            )
        )  # fmt: skip
        batch.add_column(
            sa.Column(
                "home_merchant", sa.String(64), nullable=True,
                comment="the merchant of the scope it was created in (NULL: every merchant)",
            )
        )  # fmt: skip
        batch.add_column(
            sa.Column(
                "home_store", sa.String(64), nullable=True,
                comment="the store of the scope it was created in (NULL: every store)",
            )
        )  # fmt: skip
        batch.create_foreign_key(op.f(_FK), "programs", ["home_program_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("staff_users") as batch:
        batch.drop_constraint(op.f(_FK), type_="foreignkey")
        batch.drop_column("home_store")
        batch.drop_column("home_merchant")
        batch.drop_column("home_program_id")
