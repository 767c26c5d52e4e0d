"""Rate limits per member, per API key and per address: in process, and shared through the
machine's Redis by several API processes; and the largest body a real server reads."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from jifen.api.app import create_app
from jifen.db.uow import Database
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import new_members, new_program

REDIS_URL = "redis://127.0.0.1:6379/0"


def _namespace() -> str:
    """Counters of this test only (ids repeat across runs; Redis remembers a minute)."""
    return f"test-{uuid.uuid4().hex}"


def _clear_of_a_minute_edge() -> None:
    """Wait out the last ten seconds of a clock minute (a test's requests take a second or
    two). The limiter's sliding window counts the hits of the minute before weighed by the
    share of it still inside the window: three hits made just before a minute ends weigh
    less than three just after, and a fourth would pass a limit of three a minute."""
    into = time.time() % 60
    if into > 50:
        time.sleep(60.05 - into)


@pytest.fixture
def clients(db: Database, request: pytest.FixtureRequest) -> Iterator[list[TestClient]]:
    """Two API processes' worth of apps over one database, with the limits the test names."""
    _clear_of_a_minute_edge()
    overrides: dict[str, str] = request.param
    settings = api_settings(rate_limit_namespace=_namespace(), **overrides)
    with ExitStack() as stack:
        yield [stack.enter_context(TestClient(create_app(db, settings))) for _ in range(2)]


def _balance(client: TestClient, code: str, member_id: int, headers: dict[str, str]) -> int:
    url = f"/v1/programs/{code}/members/{member_id}/points"
    return client.get(url, headers=headers).status_code


@pytest.mark.parametrize("clients", [{"rate_limit_member": "3/minute"}], indirect=True)
def test_a_member_over_its_limit_gets_429_with_retry_after(
    clients: list[TestClient], db: Database
) -> None:
    client = clients[0]
    program = new_program(db)
    member_a, member_b = new_members(db, program.id, 2)
    a, b = support.member(db, member_a), support.member(db, member_b)
    assert [_balance(client, program.code, member_a, a) for _ in range(3)] == [200] * 3
    refused = client.get(f"/v1/programs/{program.code}/members/{member_a}/points", headers=a)
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # another member is counted on its own
    assert _balance(client, program.code, member_b, b) == 200


@pytest.mark.parametrize("clients", [{"rate_limit_key": "4/minute"}], indirect=True)
def test_an_api_key_over_its_limit_gets_429(clients: list[TestClient], db: Database) -> None:
    client = clients[0]
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    key, other = support.api_key(db, program.id), support.api_key(db, program.id)
    statuses = [_balance(client, program.code, member_id, key) for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    assert _balance(client, program.code, member_id, other) == 200


@pytest.mark.parametrize("clients", [{"rate_limit_ip": "5/minute"}], indirect=True)
def test_an_address_over_its_limit_gets_429_even_signing_in(
    clients: list[TestClient], db: Database
) -> None:
    client = clients[0]
    answers = [
        client.post(
            "/v1/auth/staff/sign-in",
            json={"username": f"nobody-{uuid.uuid4().hex}", "password": "wrong password"},
        )  # a new name each time: no one name is failed often enough to be slowed
        for _ in range(6)
    ]
    assert [answer.status_code for answer in answers] == [401] * 5 + [429]
    assert answers[-1].json()["code"] == "rate_limited"


@pytest.mark.parametrize(
    "clients", [{"rate_limit_key": "4/minute", "redis_url": REDIS_URL}], indirect=True
)
def test_processes_share_one_count_through_redis(clients: list[TestClient], db: Database) -> None:
    first, second = clients
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    key = support.api_key(db, program.id)
    # two requests through each process use up the key's four
    for client in (first, second, first, second):
        assert _balance(client, program.code, member_id, key) == 200
    # the fifth is refused by either
    assert _balance(first, program.code, member_id, key) == 429
    assert _balance(second, program.code, member_id, key) == 429


@pytest.mark.parametrize("clients", [{"rate_limit_key": "4/minute"}], indirect=True)
def test_without_redis_each_process_counts_alone(clients: list[TestClient], db: Database) -> None:
    first, second = clients
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    key = support.api_key(db, program.id)
    for client in (first, second, first, second):
        assert _balance(client, program.code, member_id, key) == 200
    assert _balance(second, program.code, member_id, key) == 200


def test_readyz_reports_an_unreachable_redis(db: Database) -> None:
    good = api_settings(redis_url=REDIS_URL)
    bad = api_settings(redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(db, good)) as client:
        assert client.get("/readyz").status_code == 200
    with TestClient(create_app(db, bad)) as client:
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert "Redis" in answer.json()["detail"]


@pytest.fixture
def small_bodies(db: Database) -> Iterator[str]:
    """The API served by uvicorn, reading bodies of up to 2,048 bytes: its base URL."""
    with support.served(create_app(db, api_settings(max_body_bytes="2048"))) as base:
        yield base


def _send(
    base: str, body: bytes, headers: dict[str, str], *, chunked: bool
) -> tuple[int, str, Any]:
    """POST ``body`` to /v1/programs: (status, content type, the JSON answer)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        if chunked:  # no Content-Length: the size is known only once it has all arrived
            pieces = (body[i : i + 500] for i in range(0, len(body), 500))
            conn.request("POST", "/v1/programs", body=pieces, headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/v1/programs", body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.getheader("Content-Type", ""), json.loads(answer.read())
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_body_over_the_limit_is_refused_before_it_is_read(
    db: Database, small_bodies: str, chunked: bool
) -> None:
    admin = support.staff(db, "super_admin")
    headers = {**admin, **support.key(), "Content-Type": "application/json"}
    code = f"big-{uuid.uuid4().hex[:8]}"
    large = json.dumps({"code": code, "name": "x" * 5000}).encode()
    status, media, problem = _send(
        small_bodies, large, {**headers, "Accept-Language": "zh"}, chunked=chunked
    )
    assert (status, media) == (413, "application/problem+json")
    assert problem["code"] == "payload_too_large" and "2,048 字节" in problem["detail"]
    # nothing was made, and a body within the limit is read as usual
    small = json.dumps({"code": code, "name": "Shop"}).encode()
    status, _, made = _send(small_bodies, small, {**headers, **support.key()}, chunked=chunked)
    assert (status, made["code"]) == (201, code), made
