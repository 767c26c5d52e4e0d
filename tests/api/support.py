"""Credentials and headers for API tests, made through the services (no HTTP sign-in)."""

from __future__ import annotations

import http.client
import io
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from jifen.auth import service as auth
from jifen.db.uow import Database
from tests.factories import new_program

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
    """Headers of a new staff user holding ``role`` (in ``program_id``, or everywhere),
    signed in as with its TOTP code (a session that may write)."""
    username = f"{role}-{uuid.uuid4().hex[:8]}"

    def make(uow: auth.UnitOfWork) -> str:
        created = auth.create_staff(uow, username=username, password="correct horse 1")
        auth.grant_role(
            uow, staff_id=created.id, role=role, program_id=program_id, merchant=merchant,
            store=store,
        )  # fmt: skip
        return auth.new_session(
            uow, subject="staff", subject_id=created.id, totp_verified=True
        ).token

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


def phone_search_access_log(db: Database, app: Any, log_config: dict[str, Any]) -> str:
    """What the access log wrote for a member search by phone (13912345678) served from
    ``app`` with ``log_config``, whose access handler is pointed at a buffer here: the line
    that must show ``?phone=***&limit=***``, never the number."""
    program = new_program(db)
    operator = staff(db, "operator", program_id=program.id)
    written = io.StringIO()
    log_config["handlers"]["access"]["stream"] = written
    search = f"/v1/programs/{program.code}/members?phone=13912345678&limit=5"
    with served(app, log_config=log_config, log_level="info") as base:
        url = urlsplit(base)
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
        conn.request("GET", search, headers=operator)
        assert conn.getresponse().status == 200
        conn.close()
    line = written.getvalue()
    assert "13912345678" not in line
    return line.replace(f"/v1/programs/{program.code}/", "/v1/programs/<code>/")
