"""Alembic, driven from code: the CLI, the tests and the demo all upgrade the same way."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", "jifen.db:migrations")
    config.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema up to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision(engine)


def unknown_revision(engine: Engine) -> str | None:
    """The database's revision if this jifen has no migration of that name (a newer jifen
    wrote the schema), else ``None``."""
    current = current_revision(engine)
    if current is None:
        return None
    known = {script.revision for script in ScriptDirectory.from_config(
        alembic_config(engine)).walk_revisions()}  # fmt: skip
    return None if current in known else current
