"""The migrations build exactly the schema the code declares, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from jifen.db.migrate import head_revision, is_current, upgrade
from jifen.db.schema import metadata
from jifen.db.uow import Database


def test_migrated_schema_matches_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    assert differences == []


def test_database_is_at_head_and_upgrading_again_changes_nothing(db: Database) -> None:
    assert head_revision(db.engine) == "0012"
    assert is_current(db.engine)
    upgrade(db.engine)
    assert is_current(db.engine)
