"""The API's conventions: problem answers, authentication, idempotent writes, health."""

from __future__ import annotations

import copy
import gc
import hashlib
import http.client
import json
import logging
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import select

from jifen.api.app import app_from_settings, create_app
from jifen.api.models import idempotency_records
from jifen.db.uow import Database
from jifen.settings import get_settings
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import new_members, new_program


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_no_credentials_is_a_401_problem_in_the_callers_language(client: TestClient) -> None:
    # when a route is called without credentials
    answer = client.get("/v1/programs", headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    # then it is a problem+json 401 with a stable code and a Chinese detail
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["code"] == "unauthenticated"
    assert "凭据" in problem["detail"]
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    # q=0 means "not acceptable": Chinese is not chosen then
    refused = client.get("/v1/programs", headers={"Accept-Language": "zh;q=0, fr"})
    assert "凭据" not in refused.json()["detail"] and "Sign in" in refused.json()["detail"]


def test_a_language_weight_is_read_in_any_case_and_after_other_parameters(
    client: TestClient,
) -> None:
    """``Q=0.1`` is ``q=0.1`` (RFC 9110 names the weight case-insensitively), and a weight
    after another parameter still weighs its language: English is preferred to Chinese here."""
    for header in ("zh;Q=0.1, en;q=0.5", "zh;level=1;q=0.1, en;q=0.9", "zh; q=0.1 ,en"):
        detail = client.get("/v1/programs", headers={"Accept-Language": header}).json()["detail"]
        assert "Sign in" in detail, header


def test_an_idempotent_write_replays_and_refuses_a_different_body(
    client: TestClient, db: Database
) -> None:
    admin = support.staff(db, "super_admin")
    code = f"p-{uuid.uuid4().hex[:8]}"
    headers = {**admin, **support.key()}
    body = {"code": code, "name": "Shop"}
    # when the same creation is sent twice with one key
    first = client.post("/v1/programs", json=body, headers=headers)
    again = client.post("/v1/programs", json=body, headers=headers)
    # then the second is the first's answer, replayed
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    # and another body with that key is refused
    other = client.post("/v1/programs", json={**body, "name": "Other"}, headers=headers)
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_conflict"


def test_the_stored_fingerprint_of_a_request_is_keyed(client: TestClient, db: Database) -> None:
    """A body may hold a phone number: its stored fingerprint is no plain SHA-256 that a
    copy of the database could test guesses against, and a replay is still recognised."""
    program = new_program(db)
    operator = support.staff(db, "operator", program_id=program.id)
    headers = {**operator, **support.key()}
    url = f"/v1/programs/{program.code}/members"
    body = {"external_ref": "C1001", "phone": "13812345678"}
    # when a member is registered with its phone number
    first = client.post(url, json=body, headers=headers)
    assert first.status_code == 201, first.text
    # then what is stored with the key is not the unkeyed digest of the request
    with db.engine.connect() as conn:
        stored = conn.execute(
            select(idempotency_records.c.request_hash).where(
                idempotency_records.c.key == headers["Idempotency-Key"]
            )
        ).scalar_one()
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    plain = hashlib.sha256(f"POST /v1/programs/{program.code}/members?\n{canonical}".encode())
    assert stored != plain.hexdigest()
    # and the same request sent again is still recognised as a replay
    again = client.post(url, json=body, headers=headers)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"


def test_unknown_fields_are_refused_per_field(client: TestClient, db: Database) -> None:
    admin = support.staff(db, "super_admin")
    answer = client.post(
        "/v1/programs",
        json={"code": "x1", "name": "X", "balance": 5},
        headers={**admin, **support.key()},
    )
    assert answer.status_code == 422
    assert [e["field"] for e in answer.json()["errors"]] == ["body.balance"]


def test_the_docs_page_loads_everything_from_jifen_itself(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    links = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert links, "the page links its script, style and document"
    for link in links:
        assert link.startswith(("http://testserver/", "/")), link
        asset = client.get(link)
        assert asset.status_code == 200, link


def test_the_served_app_is_built_whole_and_kept_out_of_the_collectors_sight(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What ``jifen serve`` builds in a worker is frozen out of the garbage collector, so a
    full collection does not stop the worker for the time it takes to walk all of it."""
    monkeypatch.setenv("JIFEN_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("JIFEN_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        app = app_from_settings()
        assert app.openapi_schema is not None  # built before the first request
        assert gc.get_freeze_count() > 50_000
    finally:
        gc.unfreeze()
        get_settings.cache_clear()


def test_a_nul_character_anywhere_in_a_request_is_refused_before_any_change(
    client: TestClient, db: Database
) -> None:
    # PostgreSQL can store NUL in no text and no JSON: every field, nested ones and JSON
    # payloads included, and every query or path parameter refuses it with a 422.
    admin = {**support.staff(db, "super_admin")}
    code = f"p-{uuid.uuid4().hex[:8]}"
    bodies = [
        {"code": code, "name": "Nul\u0000name"},
        {"code": code, "name": "Shop", "settings": {"time_zone": "Asia/\u0000Shanghai"}},
    ]
    for body in bodies:
        answer = client.post("/v1/programs", json=body, headers={**admin, **support.key()})
        assert answer.status_code == 422, answer.text
        assert "NUL" in answer.text
    # the error names the field that holds it, as every field's error does
    answer = client.post("/v1/programs", json=bodies[0], headers={**admin, **support.key()})
    assert answer.json()["errors"][0]["field"] == "body.name"
    made = client.post(
        "/v1/programs", json={"code": code, "name": "Shop"}, headers={**admin, **support.key()}
    )
    assert made.status_code == 201, made.text
    for url in (
        f"/v1/programs/{code}/members?region=a%00b",
        f"/v1/programs/{code}%00/members",
    ):
        answer = client.get(url, headers=admin)
        assert answer.status_code == 422, (url, answer.text)
        assert "NUL" in answer.text
    event = {
        "source": "pos", "external_id": "e1", "type": "member.checked_in",
        "occurred_at": "2026-01-01T10:00:00+08:00", "member_ref": "nobody",
        "payload": {"note": ["fine", {"deep": "x\u0000y"}]},
    }  # fmt: skip
    answer = client.post(
        f"/v1/programs/{code}/events", json=event, headers={**admin, **support.key()}
    )
    assert answer.status_code == 422, answer.text
    assert "payload.note.1.deep" in answer.text
    # walked once from the outermost body, and named from there
    batch = {"events": [{**event, "payload": {}}, event]}
    answer = client.post(
        f"/v1/programs/{code}/events/batch", json=batch, headers={**admin, **support.key()}
    )
    assert answer.status_code == 422, answer.text
    assert "events.1.payload.note.1.deep" in answer.text
    assert answer.json()["errors"][0]["field"] == "body.events.1.payload.note.1.deep"


def test_a_refused_value_is_said_as_jifen_words_it_in_either_language(
    client: TestClient, db: Database
) -> None:
    """What a field's check says is the whole message, in English as in Chinese (not
    prefixed with the validation library's "Value error, ")."""
    program = new_program(db)
    admin = support.staff(db, "super_admin")
    body = {"name": "far", "expires_at": "9999-01-01T00:00:00Z"}
    said = {
        language: client.post(
            f"/v1/programs/{program.code}/api-keys", json=body,
            headers={**admin, **support.key(), "Accept-Language": language},
        ).json()["errors"][0]
        for language in ("en", "zh")
    }  # fmt: skip
    assert said["en"]["field"] == "body.expires_at"
    assert said["en"]["message"] == "give a time between 1970 and 9000, with its UTC offset"
    assert said["zh"]["message"] == "请给出 1970 年至 9000 年之间、带 UTC 偏移的时间"


def test_a_body_that_is_not_json_is_a_stable_problem(client: TestClient, db: Database) -> None:
    admin = support.staff(db, "super_admin")
    body = b'{"code": "x2", "name": "X"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        answer = client.post(
            "/v1/programs", content=body,
            headers={**admin, **support.key(), "Content-Type": content_type},
        )  # fmt: skip
        assert answer.status_code == 415, (content_type, answer.text)
        assert answer.json()["code"] == "unsupported_media_type"
    broken = client.post(
        "/v1/programs", content=b'{"code": "x2", "name": "\xff\xfe"}',
        headers={**admin, **support.key(), "Content-Type": "application/json",
                 "Accept-Language": "zh-CN"},
    )  # fmt: skip
    assert broken.status_code == 400, broken.text
    assert broken.json()["code"] == "invalid_body" and "JSON" in broken.json()["detail"]
    assert "请求体" in broken.json()["detail"]
    # JSON cut short or mistyped cannot be read either: the same answer, not a field "13"
    for text in (b'{"code": "x2",', b'{"code": x2}', b"{'code': 'x2'}"):
        cut = client.post(
            "/v1/programs", content=text,
            headers={**admin, **support.key(), "Content-Type": "application/json"},
        )  # fmt: skip
        assert cut.status_code == 400, (text, cut.text)
        assert cut.json()["code"] == "invalid_body" and "JSON" in cut.json()["detail"]


def test_what_an_operation_does_not_read_is_refused_not_ignored(
    client: TestClient, db: Database
) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    admin = support.staff(db, "super_admin")
    members = f"/v1/programs/{program.code}/members"
    # a misspelt parameter would otherwise be dropped and the default used
    answer = client.get(members, params={"limt": 5}, headers={**admin, "Accept-Language": "zh"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "limt"
    assert "limit" in answer.json()["detail"] and "查询参数" in answer.json()["detail"]
    # a single value given twice: which one would count?
    answer = client.get(members, params=[("limit", "5"), ("limit", "6")], headers=admin)
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "limit"
    assert "2 times" in answer.json()["detail"]
    # a parameter typed as a list repeats, and a declared one passes
    history = client.get(
        f"{members}/{member}/points/history", params=[("kind", "earn"), ("kind", "spend")],
        headers=admin,
    )  # fmt: skip
    assert history.status_code == 200, history.text
    assert client.get(members, params={"limit": 5}, headers=admin).status_code == 200
    # a body sent where none is read is refused, before the session ends; {} is no body
    answer = client.post("/v1/auth/sign-out", json={"everywhere": True}, headers=admin)
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "body"
    assert client.get(members, headers=admin).status_code == 200
    assert client.post("/v1/auth/sign-out", json={}, headers=admin).status_code == 204
    assert client.get(members, headers=admin).status_code == 401
    # outside /v1, a health check with a cache-busting parameter is still answered
    assert client.get("/healthz", params={"_": "1"}).status_code == 200


def test_the_document_describes_errors_as_the_problems_sent(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    answers = document["paths"]["/v1/programs"]["post"]["responses"]
    for status in ("400", "401", "403", "409", "415", "422", "429"):
        content = answers[status]["content"]["application/problem+json"]
        assert content["schema"] == {"$ref": "#/components/schemas/Problem"}, status
    assert "Problem" in document["components"]["schemas"]


def test_the_documents_integer_bounds_are_exact_integers(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    bounds: list[object] = []

    def collect(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                bounds.extend(node[k] for k in ("minimum", "maximum") if k in node)
            for child in node.values():
                collect(child)
        elif isinstance(node, list):
            for child in node:
                collect(child)

    collect(document)
    assert bounds and all(type(b) is int for b in bounds), {b for b in bounds if type(b) is not int}
    assert 2**63 - 1 in bounds  # the largest id, exactly (not 9.223372036854776e+18)
    assert max(bounds) == 2**63 - 1  # type: ignore[type-var]


def test_each_field_error_is_said_in_the_callers_language(client: TestClient, db: Database) -> None:
    admin = support.staff(db, "super_admin")
    bad = {"code": "Not A Code!", "name": "x" * 201, "colour": "red"}

    def errors(language: str, body: dict[str, object]) -> dict[str, str]:
        answer = client.post(
            "/v1/programs", json=body,
            headers={**admin, **support.key(), "Accept-Language": language},
        )  # fmt: skip
        assert answer.status_code == 422, answer.text
        return {e["field"]: e["message"] for e in answer.json()["errors"]}

    english = errors("en", bad)
    assert english == {
        "body.code": "String should match pattern '^[a-z0-9][a-z0-9_-]*$'",
        "body.name": "String should have at most 200 characters",
        "body.colour": "Extra inputs are not permitted",
    }
    chinese = errors("zh-CN", bad)
    assert chinese == {
        "body.code": "格式不符,应匹配 ^[a-z0-9][a-z0-9_-]*$。",
        "body.name": "最多 200 个字符。",
        "body.colour": "不接受此字段,请删除它。",
    }
    # a validator's own refusal has its Chinese too
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    earn = f"/v1/programs/{program.code}/members/{member}/points/earn"
    refused = {
        language: client.post(
            earn, json={"amount": 10, "expires_at": 1767225600},
            headers={**admin, **support.key(), "Accept-Language": language},
        ).json()["errors"]
        for language in ("en", "zh")
    }  # fmt: skip
    assert [e["field"] for e in refused["en"]] == ["body.expires_at"]
    assert "a number is not read as a time" in refused["en"][0]["message"]
    assert refused["zh"][0]["message"].startswith("请按 RFC 3339 给出带 UTC 偏移的时间")


def test_head_is_answered_as_get_without_the_body(db: Database) -> None:
    admin = support.staff(db, "super_admin")
    with support.served(create_app(db, api_settings())) as base:
        url = urlsplit(base)

        def ask(method: str, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
            try:
                conn.request(method, path, headers=headers)
                answer = conn.getresponse()
                return answer.status, answer.getheader("Content-Length", ""), answer.read()
            finally:
                conn.close()

        for path, headers, status in (
            ("/healthz", {}, 200),
            ("/v1/programs", admin, 200),
            ("/v1/programs", {}, 401),
            ("/v1/nowhere", {}, 404),
        ):
            got, length, body = ask("GET", path, headers)
            assert got == status and int(length) == len(body) > 0
            assert ask("HEAD", path, headers) == (status, length, b"")


def test_the_app_hides_query_values_in_the_access_log_however_it_is_served(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served by uvicorn with its own logging (``uvicorn --factory
    jifen.api.app:app_from_settings``, or any deployment that does not go through ``jifen
    serve``), a member search by phone must not write the number in the access log."""
    # A fresh process: no filter left on the access logger by another test's logging.
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "filters", [])
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # uvicorn's default
    line = support.phone_search_access_log(db, create_app(db, api_settings()), config)
    assert "GET /v1/programs/<code>/members?phone=***&limit=*** HTTP/1.1" in line
