"""The engines: how each backend's connections are set up."""

from __future__ import annotations

from pathlib import Path

from jifen.db.uow import Database


def test_an_sqlite_commit_is_on_the_disk_before_it_is_acknowledged(tmp_path: Path) -> None:
    """WAL with synchronous=FULL: the log is synced at every commit, so an acknowledged
    earning survives a power cut (NORMAL syncs only at checkpoints)."""
    database = Database(f"sqlite:///{tmp_path / 'jifen.db'}")
    try:
        with database.engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys")
            }
    finally:
        database.dispose()
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}
