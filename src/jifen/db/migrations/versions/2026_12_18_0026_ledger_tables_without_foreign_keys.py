"""The ledger's own tables (postings, lines, chain entries, lots, allocations) lose their
foreign keys. On PostgreSQL each one ran a query for every row written and locked the row
it led to, so that every earning locked its programme and the programme's issuing account;
``jifen ledger reconcile`` now reports each reference that leads nowhere (see
``jifen.points.models.REFERENCES``).

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-18 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table: (column, the table it names), as revision 0001 made them. Tables that others
# name come last, after the references to them from the ledger's other tables are gone.
_REFERENCES = {
    "allocations": (("posting_id", "postings"), ("lot_id", "lots")),
    "chain_entries": (("account_id", "accounts"), ("posting_id", "postings")),
    "lines": (("posting_id", "postings"), ("account_id", "accounts")),
    "lots": (("account_id", "accounts"), ("posting_id", "postings"), ("source_lot_id", "lots")),
    "postings": (
        ("program_id", "programs"),
        ("account_id", "accounts"),
        ("counterparty_id", "accounts"),
        ("ref_posting_id", "postings"),
    ),
}


def _name(table: str, column: str, target: str) -> str:
    return f"fk_{table}_{column}_{target}"


def upgrade() -> None:
    for table, references in _REFERENCES.items():
        with op.batch_alter_table(table) as batch:
            for column, target in references:
                batch.drop_constraint(op.f(_name(table, column, target)), type_="foreignkey")


def downgrade() -> None:
    for table, references in reversed(_REFERENCES.items()):
        with op.batch_alter_table(table) as batch:
            for column, target in references:
                batch.create_foreign_key(
                    op.f(_name(table, column, target)), target, [column], ["id"]
                )
