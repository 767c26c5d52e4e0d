"""Alembic environment: runs migrations on the engine jifen hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from jifen.db.schema import metadata

engine = context.config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise RuntimeError("run migrations through `jifen db upgrade`, which supplies the engine")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters by copying
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
