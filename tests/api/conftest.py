"""The HTTP API over the test database of each backend, driven in process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from jifen.api.app import create_app
from jifen.db.uow import Database
from jifen.settings import Settings


def api_settings(**overrides: str) -> Settings:
    """Settings for a test app: limits high enough that only the limit tests meet them."""
    values = {
        "rate_limit_ip": "100000/minute",
        "rate_limit_key": "100000/minute",
        "rate_limit_member": "100000/minute",
        "rate_limit_identity": "100000/minute",
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    """A client of the API over ``db`` (SQLite, then PostgreSQL)."""
    app = create_app(db, api_settings())
    with TestClient(app) as test_client:
        yield test_client
