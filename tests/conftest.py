"""A database per backend for the whole run, a manual clock per test.

Every test that takes ``db`` runs on SQLite and on PostgreSQL. PostgreSQL is required:
when it cannot be reached the tests fail, they do not skip. Only an explicit
``JIFEN_TEST_BACKENDS=sqlite`` leaves it out (for a laptop without PostgreSQL).
Each run, and each of its pytest-xdist processes, gets its own PostgreSQL schema and SQLite
file, dropped afterwards, and each test its own programme, so runs and processes never see
each other and a run can repeat back to back.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection

# A fixed installation key for the whole run, set before anything reads the settings.
os.environ.setdefault("JIFEN_SECRET_KEY", "test-secret-key-" + "x" * 32)

from jifen.clock import ManualClock
from jifen.db.engine import READ_ONLY
from jifen.db.migrate import upgrade
from jifen.db.uow import Database
from jifen.settings import normalise_database_url

BACKENDS = [
    b.strip() for b in os.environ.get("JIFEN_TEST_BACKENDS", "sqlite,postgresql").split(",")
]
POSTGRES_URL = os.environ.get(
    "JIFEN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
START = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)


def postgres_schema_url(base_url: str, schema: str) -> str:
    separator = "&" if "?" in base_url else "?"
    return f"{normalise_database_url(base_url)}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    path: Path = tmp_path_factory.mktemp("sqlite") / "jifen.db"
    database = Database(f"sqlite:///{path}", clock=ManualClock(START))
    upgrade(database.engine)
    yield database
    database.dispose()


def empty_database_url(backend: str, folder: Path) -> Iterator[str]:
    """The URL of an empty database of ``backend`` that a test has to itself: a file in
    ``folder``, or a schema of its own in the test PostgreSQL, dropped when it is done.
    For tests of what migrations do to a database of an older revision."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / f'own-{uuid.uuid4().hex[:8]}.db'}"
        return
    schema = f"jifen_own_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalise_database_url(POSTGRES_URL))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield postgres_schema_url(POSTGRES_URL, schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def own_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database of its own on each backend, for a test that reads or changes
    every row (an audit log verified whole, every member moved to a new key)."""
    for url in empty_database_url(request.param, tmp_path):
        database = Database(url, clock=ManualClock(START), pool_size=4)
        upgrade(database.engine)
        yield database
        database.dispose()


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[str]:
    """A fresh schema in the test database with jifen migrated into it; dropped at the end."""
    schema = f"jifen_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalise_database_url(POSTGRES_URL))
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL at {POSTGRES_URL} is not reachable ({exc.__class__.__name__}: {exc}). "
            "Start it, point JIFEN_TEST_POSTGRES_URL at one, or run with "
            "JIFEN_TEST_BACKENDS=sqlite to leave PostgreSQL out.",
            pytrace=False,
        )
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(postgres_schema: str) -> str:
    return postgres_schema_url(POSTGRES_URL, postgres_schema)


_WRITE = re.compile(r"\b(INSERT\s+INTO|DELETE\s+FROM|UPDATE\s+\S+\s+SET)\b", re.IGNORECASE)


def refuse_writes_when_read_only(
    conn: Connection, _cursor: Any, statement: str, *_args: Any
) -> None:
    """A read-only unit of work on PostgreSQL runs each statement on its own (autocommit):
    a write there would not be atomic with the rest, so none may happen."""
    if conn.get_execution_options().get(READ_ONLY) and _WRITE.search(statement):
        raise AssertionError(f"a write in a read-only unit of work: {statement[:200]}")


@pytest.fixture(scope="session")
def postgresql_database(postgres_url: str) -> Iterator[Database]:
    database = Database(postgres_url, clock=ManualClock(START), pool_size=24)
    upgrade(database.engine)
    event.listen(database.engine, "before_cursor_execute", refuse_writes_when_read_only)
    yield database
    database.dispose()


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest) -> Database:
    """The database of one backend, with its clock set back to a fixed start."""
    database: Database = request.getfixturevalue(f"{request.param}_database")
    database.clock = ManualClock(START)
    return database


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Database:
    """PostgreSQL only: for row locks and true concurrency."""
    if "postgresql" not in BACKENDS:
        pytest.fail("this test needs PostgreSQL; JIFEN_TEST_BACKENDS leaves it out")
    database: Database = request.getfixturevalue("postgresql_database")
    database.clock = ManualClock(START)
    return database


@pytest.fixture
def clock(db: Database) -> ManualClock:
    assert isinstance(db.clock, ManualClock)
    return db.clock
