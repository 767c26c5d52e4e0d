"""A partial index on the events whose fingerprint is not sealed yet (those stored before
new events were stored sealed): the job ``events.seal_fingerprints`` reads them by it, so
that once it has sealed them, its daily runs find nothing without reading every event.
Built on both backends with the predicate ``jifen.events.models.UNSEALED`` spells, which
the job's query repeats word for word (a partial index serves only a query that implies
its predicate).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-13 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported, as every migration keeps what it did: the model may move on.
_UNSEALED = "substr(request_hash, 1, 7) <> 'sealed:'"


def upgrade() -> None:
    op.execute(f"CREATE INDEX ix_events_unsealed ON events (program_id, id) WHERE {_UNSEALED}")


def downgrade() -> None:
    op.execute("DROP INDEX ix_events_unsealed")
