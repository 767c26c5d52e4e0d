"""Credentials and headers for API tests, made through the services (no HTTP sign-in)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import uvicorn

from jifen.auth import service as auth
from jifen.db.uow import Database

Headers = dict[str, str]


def key() -> Headers:
    """A fresh Idempotency-Key header."""
    return {"Idempotency-Key": uuid.uuid4().hex}


def bearer(token: str) -> Headers:
    return {"Authorization": f"Bearer {token}"}


def staff(
    db: Database,
    role: str,
    *,
    program_id: int | None = None,
    merchant: str | None = None,
    store: str | None = None,
) -> Headers:
    """Headers of a new staff user holding ``role`` (in ``program_id``, or everywhere)."""
    username = f"{role}-{uuid.uuid4().hex[:8]}"

    def make(uow: auth.UnitOfWork) -> str:
        created = auth.create_staff(uow, username=username, password="correct horse 1")
        auth.grant_role(
            uow, staff_id=created.id, role=role, program_id=program_id, merchant=merchant,
            store=store,
        )  # fmt: skip
        return auth.new_session(uow, subject="staff", subject_id=created.id).token

    return bearer(db.run(make))


def member(db: Database, member_id: int) -> Headers:
    """Headers of a signed-in member."""
    return bearer(
        db.run(lambda uow: auth.new_session(uow, subject="member", subject_id=member_id).token)
    )


def api_key(
    db: Database,
    program_id: int,
    *,
    merchant: str | None = None,
    store: str | None = None,
    permissions: Sequence[str] | None = None,
) -> Headers:
    """Headers carrying a new API key of the programme."""
    created = db.run(
        lambda uow: auth.create_api_key(
            uow, program_id=program_id, name="test", created_by="test", merchant=merchant,
            store=store, permissions=permissions,
        )
    )  # fmt: skip
    return bearer(created.token)


@contextmanager
def served(app: Any, **options: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free local port, as ``jifen serve`` serves it (with
    uvicorn's ``options``, such as its logging): its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, **{"log_level": "error", **options})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    (sock,) = server.servers[0].sockets
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
