"""Alembic environment: runs migrations on the engine jifen hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from jifen.db.schema import metadata

engine = context.config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise RuntimeError("run migrations through `jifen db upgrade`, which supplies the engine")

with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    driver = connection.connection.driver_connection
    assert driver is not None, "a connection that was just opened is live"
    if sqlite:
        # SQLite alters a table by copying it and dropping the original, which fails while
        # foreign keys are enforced and other rows name the original. As SQLite's own
        # procedure for altering a table says, they are off while the migrations run (the
        # pragma does nothing inside a transaction: it goes to the driver before the first
        # statement begins one) and every reference is checked before the commit.
        driver.execute("PRAGMA foreign_keys=OFF")
    try:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=sqlite,  # SQLite alters by copying
            compare_type=True,
            # SQLite's DDL is transactional too: a migration run that fails changes nothing.
            transactional_ddl=True,
        )
        with context.begin_transaction():
            context.run_migrations()
            check = "PRAGMA foreign_key_check"
            if sqlite and (broken := connection.exec_driver_sql(check).all()):
                raise RuntimeError(f"rows name rows that do not exist (table, row, name): {broken}")
    finally:
        if sqlite:
            driver.execute("PRAGMA foreign_keys=ON")
