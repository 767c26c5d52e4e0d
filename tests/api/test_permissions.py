"""Who may call what, generated from the OpenAPI document.

Every operation that names an ``x-permission`` is called without credentials (401), as each
built-in role, as an API key and as a member; the answer must be 403 exactly when the
permission table in :mod:`jifen.auth.core` does not give that permission. Whether a call
was allowed is read from the answer: anything but 401/403 (a 404 for an id that does not
exist, a 422 for the empty body sent) means it got past the permission check. A member may
act only on itself; an API key scoped to one merchant cannot act for another.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jifen.api.app import create_app
from jifen.auth.core import BUILTIN_ROLES, DEFAULT_API_KEY_PERMISSIONS, MEMBER_PERMISSIONS
from jifen.db.uow import Database
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import new_members, new_program

PUBLIC = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("post", "/v1/auth/staff/sign-in"),
    ("post", "/v1/auth/members/sign-in"),
    ("post", "/v1/auth/members/codes"),
    ("post", "/v1/auth/members/sign-in-with-code"),
}
"""Routes anyone may call: health, and signing in. Every other route names a permission
or is listed in SIGNED_IN."""

SIGNED_IN = {
    ("get", "/v1/auth/me"),
    ("post", "/v1/auth/sign-out"),
    ("put", "/v1/auth/staff/password"),
}
"""Routes for any signed-in principal, whatever its roles."""


def _granted(permission: str, held: frozenset[str], operation: dict[str, Any]) -> bool:
    """Whether a staff user or key holding ``held`` in one programme gets through: it holds
    the permission, the route is not one only the member itself may call (``x-member-only``:
    a member confirms its own cooling-off hold), nor one that reads the whole installation
    (``x-scope: installation``: verifying the audit log's chains)."""
    return (
        permission in held
        and not operation.get("x-member-only")
        and operation.get("x-scope") != "installation"
    )


class World:
    """A programme, two members and a client over one backend's database."""

    def __init__(self, client: TestClient, db: Database) -> None:
        self.client = client
        self.db = db
        self.program = new_program(db)
        self.member_a, self.member_b = new_members(db, self.program.id, 2)
        self.spec: dict[str, Any] = client.get("/openapi.json").json()

    def operations(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for path, methods in self.spec["paths"].items():
            for method, operation in methods.items():
                yield method, path, operation

    def url(self, path: str, *, member_id: int) -> str:
        values = {
            "program": self.program.code,
            "member_id": member_id,
            "sub_member_id": self.member_b,
        }
        for name in _path_params(path):
            path = path.replace("{" + name + "}", str(values.get(name, 999_999_999)))
        return path

    def call(
        self, method: str, path: str, headers: dict[str, str], *, member_id: int, body: Any = None
    ) -> int:
        url = self.url(path, member_id=member_id)
        if method == "get":
            return self.client.get(url, headers=headers).status_code
        return self.client.request(
            method.upper(), url, json={} if body is None else body,
            headers={**headers, **support.key()},
        ).status_code  # fmt: skip


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


@pytest.fixture
def world(db: Database) -> Iterator[World]:
    with TestClient(create_app(db, api_settings()), raise_server_exceptions=False) as client:
        yield World(client, db)


def test_every_route_is_public_signed_in_or_names_its_permission(world: World) -> None:
    unmarked = [
        (method, path)
        for method, path, operation in world.operations()
        if "x-permission" not in operation and (method, path) not in PUBLIC | SIGNED_IN
    ]
    assert unmarked == []


def test_without_credentials_every_protected_route_answers_401(world: World) -> None:
    answers = {
        (method, path): world.call(method, path, {}, member_id=world.member_a)
        for method, path, operation in world.operations()
        if "x-permission" in operation or (method, path) in SIGNED_IN
    }
    assert answers, "the document lists protected routes"
    assert {route: status for route, status in answers.items() if status != 401} == {}


@pytest.mark.parametrize("role", sorted(BUILTIN_ROLES))
def test_each_built_in_role_is_allowed_exactly_what_the_table_gives(
    world: World, role: str
) -> None:
    # given a staff user holding only this role, in the programme of the paths
    headers = support.staff(world.db, role, program_id=world.program.id)
    granted = BUILTIN_ROLES[role][2]
    # when every route with a permission is called
    wrong = {}
    for method, path, operation in world.operations():
        permission = operation.get("x-permission")
        if permission is None:
            continue
        status = world.call(method, path, headers, member_id=world.member_a)
        allowed = status not in (401, 403)
        # then it gets through exactly when the role holds the permission
        if allowed != _granted(permission, granted, operation):
            wrong[f"{method.upper()} {path} ({permission})"] = status
    assert wrong == {}


def test_a_role_granted_in_one_programme_is_refused_in_another(world: World) -> None:
    elsewhere = new_program(world.db)
    headers = support.staff(world.db, "super_admin", program_id=elsewhere.id)
    wrong = {}
    for method, path, operation in world.operations():
        if "x-permission" in operation and "{program}" in path:
            status = world.call(method, path, headers, member_id=world.member_a)
            if status != 403:
                wrong[f"{method.upper()} {path}"] = status
    assert wrong == {}


def test_a_merchant_scoped_grant_does_not_reach_the_programmes_own_routes(world: World) -> None:
    # given a staff user holding every permission, but for one merchant of the programme
    headers = support.staff(
        world.db, "super_admin", program_id=world.program.id, merchant=f"m-{uuid.uuid4().hex[:6]}"
    )
    wrong, wide = {}, 0
    for method, path, operation in world.operations():
        permission = operation.get("x-permission")
        if permission is None or "{program}" not in path or operation.get("x-member-only"):
            continue
        status = world.call(method, path, headers, member_id=world.member_a)
        # then the programme's configuration and integrations (x-scope: programme) are
        # refused as needing a programme-wide grant, and nothing else is refused
        programme_wide = operation.get("x-scope") == "programme"
        wide += programme_wide
        if (status == 403) != programme_wide:
            wrong[f"{method.upper()} {path} ({permission})"] = status
    assert wide > 0, "the programme's settings, rules, tiers, rewards and roles are marked"
    assert wrong == {}


def test_an_api_key_is_allowed_exactly_its_permissions(world: World) -> None:
    headers = support.api_key(world.db, world.program.id)
    wrong = {}
    for method, path, operation in world.operations():
        permission = operation.get("x-permission")
        if permission is None:
            continue
        status = world.call(method, path, headers, member_id=world.member_a)
        # A key belongs to one programme: routes outside any programme are not its own
        # unless the permission is one a key can hold.
        expected = _granted(permission, DEFAULT_API_KEY_PERMISSIONS, operation)
        if (status not in (401, 403)) != expected:
            wrong[f"{method.upper()} {path} ({permission})"] = status
    assert wrong == {}


def test_a_member_acts_on_itself_and_never_on_another_member(world: World) -> None:
    headers = support.member(world.db, world.member_a)
    wrong = {}
    scoped = 0
    for method, path, operation in world.operations():
        permission = operation.get("x-permission")
        if permission is None:
            continue
        own = world.call(method, path, headers, member_id=world.member_a)
        # x-member-self: the member itself may call it whatever x-permission names (its own
        # personal data, which staff read with members.pii)
        held = permission in MEMBER_PERMISSIONS or operation.get("x-member-self")
        expected = held and operation.get("x-member-scoped")
        if (own not in (401, 403)) != bool(expected):
            wrong[f"own {method.upper()} {path} ({permission})"] = own
        if operation.get("x-member-scoped"):
            scoped += 1
            other = world.call(method, path, headers, member_id=world.member_b)
            if other != 403:
                wrong[f"other {method.upper()} {path} ({permission})"] = other
    assert scoped > 0
    assert wrong == {}


def _example(schema: dict[str, Any], spec: dict[str, Any]) -> Any:
    """A small valid value of a JSON schema (enough for required fields)."""
    if "$ref" in schema:
        return _example(spec["components"]["schemas"][schema["$ref"].split("/")[-1]], spec)
    if "anyOf" in schema:
        return _example(next(s for s in schema["anyOf"] if s.get("type") != "null"), spec)
    if schema.get("examples"):
        return schema["examples"][0]
    kind = schema.get("type")
    if kind == "object":
        return {
            name: _example(schema["properties"][name], spec) for name in schema.get("required", [])
        }
    if "enum" in schema:
        return schema["enum"][0]
    return {"integer": 10, "number": 10, "boolean": True, "array": []}.get(
        str(kind), "example reason"
    )


def test_a_key_scoped_to_one_merchant_cannot_act_for_another(world: World) -> None:
    # given a key of merchant X
    headers = support.api_key(world.db, world.program.id, merchant=f"x-{uuid.uuid4().hex[:6]}")
    checked, wrong = 0, {}
    for method, path, operation in world.operations():
        body_schema = (
            operation.get("requestBody", {}).get("content", {}).get("application/json", {})
        ).get("schema")
        if body_schema is None:
            continue
        resolved = body_schema
        if "$ref" in resolved:
            resolved = world.spec["components"]["schemas"][resolved["$ref"].split("/")[-1]]
        if "merchant" not in resolved.get("properties", {}):
            continue
        if operation.get("x-permission") not in DEFAULT_API_KEY_PERMISSIONS:
            continue
        # when it writes for merchant Y with an otherwise valid body
        body = {**_example(resolved, world.spec), "merchant": "merchant-y"}
        status = world.call(method, path, headers, member_id=world.member_a, body=body)
        checked += 1
        # then it is refused
        if status != 403:
            wrong[f"{method.upper()} {path}"] = status
    assert checked > 0, "earn and spend name a merchant"
    assert wrong == {}
