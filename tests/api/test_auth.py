"""Signing in and out, secrets at rest, staff, roles and API keys over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pyotp
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from jifen.audit.models import audit_entries
from jifen.auth import service as auth
from jifen.auth.models import api_keys, one_time_codes, staff_users
from jifen.clock import ManualClock
from jifen.crypto import keyed_hash
from jifen.db.uow import Database, UnitOfWork
from jifen.members import service as members_service
from jifen.members.models import members
from jifen.notify.models import outbox
from jifen.notify.sms import OutboxSmsProvider, SmsMessage
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import new_members, new_program

PASSWORD = "correct horse 1"


class RecordingSms(OutboxSmsProvider):
    """The built-in provider, also keeping each message for the test to read (the member's
    phone, which a real gateway would reach)."""

    def __init__(self) -> None:
        self.sent: list[SmsMessage] = []

    def send(self, uow: UnitOfWork, message: SmsMessage) -> None:
        super().send(uow, message)
        self.sent.append(message)


@pytest.fixture
def sms() -> RecordingSms:
    return RecordingSms()


@pytest.fixture
def app_client(db: Database, sms: RecordingSms) -> Iterator[TestClient]:
    from jifen.api.app import create_app

    with TestClient(create_app(db, api_settings(), sms=sms)) as client:
        yield client


def _staff(db: Database, role: str, **grant: Any) -> tuple[str, str]:
    """A staff user with ``role``: its username and TOTP seed."""
    username = f"{role}-{uuid.uuid4().hex[:8]}"

    def make(uow: UnitOfWork) -> str:
        created = auth.create_staff(uow, username=username, password=PASSWORD)
        auth.grant_role(uow, staff_id=created.id, role=role, **grant)
        return created.totp_secret

    return username, db.run(make)


def _code(db: Database, seed: str) -> str:
    return pyotp.TOTP(seed).at(db.clock.now())


def _reference(db: Database, member_id: int) -> str:
    """The member's external reference, with which it signs in."""
    return str(
        db.run(
            lambda uow: uow.conn.execute(
                select(members.c.external_ref).where(members.c.id == member_id)
            ).scalar_one()
        )
    )


def _sign_in(
    client: TestClient, username: str, password: str = PASSWORD, code: str | None = None
) -> Any:
    body: dict[str, Any] = {"username": username, "password": password}
    if code is not None:
        body["totp_code"] = code
    return client.post("/v1/auth/staff/sign-in", json=body)


# --------------------------------------------------------------------------- staff


def test_staff_who_can_write_need_a_fresh_totp_code_each_time(
    app_client: TestClient, db: Database, clock: ManualClock
) -> None:
    username, seed = _staff(db, "operator")
    # without a code: refused, and the reason says so
    refused = _sign_in(app_client, username)
    assert refused.status_code == 401
    assert "TOTP" in refused.json()["detail"]
    # with the current code: a session that works
    code = _code(db, seed)
    signed_in = _sign_in(app_client, username, code=code)
    assert signed_in.status_code == 200, signed_in.text
    token = signed_in.json()["token"]
    me = app_client.get("/v1/auth/me", headers=support.bearer(token))
    assert me.status_code == 200
    assert me.json()["kind"] == "staff" and me.json()["grants"][0]["role"] == "operator"
    # the same code again (even with the right password): refused — a code is used once
    assert _sign_in(app_client, username, code=code).status_code == 401
    # the next step's code works
    clock.advance(timedelta(seconds=30))
    assert _sign_in(app_client, username, code=_code(db, seed)).status_code == 200
    # a code from another seed does not
    clock.advance(timedelta(seconds=30))
    other = pyotp.TOTP(pyotp.random_base32()).at(db.clock.now())
    assert _sign_in(app_client, username, code=other).status_code == 401


def test_read_only_staff_sign_in_without_totp(app_client: TestClient, db: Database) -> None:
    username, _ = _staff(db, "auditor")
    answer = _sign_in(app_client, username)
    assert answer.status_code == 200, answer.text


def test_a_session_writes_only_if_opened_with_a_totp_code(
    app_client: TestClient, db: Database, clock: ManualClock
) -> None:
    # given an auditor (read-only) signed in without a code, and once with one
    program = new_program(db)
    username, seed = _staff(db, "auditor", program_id=program.id)
    without = support.bearer(body_of(_sign_in(app_client, username))["token"])
    signed = _sign_in(app_client, username, code=_code(db, seed))
    with_code = support.bearer(body_of(signed)["token"])
    staff_id = app_client.get("/v1/auth/me", headers=without).json()["id"]
    # when it is given a role that writes
    db.run(lambda uow: auth.grant_role(uow, staff_id=staff_id, role="operator",
                                       program_id=program.id))  # fmt: skip
    (member,) = new_members(db, program.id, 1)
    url = f"/v1/programs/{program.code}/members/{member}/points/earn"

    def earn(headers: dict[str, str], language: str = "en") -> Any:
        return app_client.post(
            url, json={"amount": 5},
            headers={**headers, **support.key(), "Accept-Language": language},
        )  # fmt: skip

    # then the session opened without a code still reads, but writes nothing, and says why
    assert app_client.get(f"/v1/programs/{program.code}", headers=without).status_code == 200
    refused, refused_zh = earn(without), earn(without, "zh")
    assert refused.status_code == 403 and refused.json()["code"] == "totp_required"
    assert "sign in again with your TOTP code" in refused.json()["detail"]
    assert "请使用动态验证码重新登录" in refused_zh.json()["detail"]
    # while the one opened with a code writes
    assert earn(with_code).status_code == 201
    # and signing in again (now with a code, which the role asks) gives a session that writes
    clock.advance(timedelta(seconds=30))
    again = support.bearer(body_of(_sign_in(app_client, username, code=_code(db, seed)))["token"])
    assert earn(again).status_code == 201


def body_of(answer: Any) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_failed_sign_ins_are_slowed_then_locked_until_unlocked(
    app_client: TestClient, db: Database, clock: ManualClock
) -> None:
    username, _ = _staff(db, "auditor")
    for _ in range(3):
        assert _sign_in(app_client, username, password="wrong password").status_code == 401
    # after three failures, even the right password must wait
    slowed = _sign_in(app_client, username)
    assert slowed.status_code == 429
    assert slowed.headers["Retry-After"] == "1"
    assert slowed.json()["code"] == "sign_in_locked"
    # each further failure doubles the wait; ten in a row lock the account for 15 minutes
    for _ in range(7):
        clock.advance(timedelta(minutes=2))
        assert _sign_in(app_client, username, password="wrong password").status_code == 401
    clock.advance(timedelta(minutes=2))
    locked = _sign_in(app_client, username)
    assert locked.status_code == 429
    assert 700 < int(locked.headers["Retry-After"]) <= 900
    # an administrator unlocks it
    admin = support.staff(db, "super_admin")
    staff_id = db.run(
        lambda uow: uow.conn.execute(
            select(staff_users.c.id).where(staff_users.c.username == username)
        ).scalar_one()
    )
    unlocked = app_client.patch(
        f"/v1/staff/{staff_id}", json={"unlock": True}, headers={**admin, **support.key()}
    )
    assert unlocked.status_code == 200, unlocked.text
    assert unlocked.json()["failed_sign_ins"] == 0
    assert _sign_in(app_client, username).status_code == 200


def test_wrong_present_passwords_given_to_change_it_are_slowed_as_sign_ins_are(
    app_client: TestClient, db: Database
) -> None:
    """Changing a password checks the present one: a session in other hands could otherwise
    try password after password there, at no cost. Each wrong one counts as a failed
    sign-in, and after three each further try must wait, the right password too."""
    username, _ = _staff(db, "auditor")
    headers = support.bearer(_sign_in(app_client, username).json()["token"])

    def change(current: str) -> Any:
        return app_client.put(
            "/v1/auth/staff/password",
            json={"current_password": current, "new_password": "a new password 2"},
            headers=headers,
        )

    for _ in range(3):
        assert change("not it at all").status_code == 422
    slowed = change(PASSWORD)
    assert slowed.status_code == 429, slowed.text
    assert slowed.json()["code"] == "sign_in_locked" and "Retry-After" in slowed.headers
    assert _sign_in(app_client, username).status_code == 429


def test_unknown_user_and_wrong_password_get_the_same_answer(
    app_client: TestClient, db: Database
) -> None:
    username, _ = _staff(db, "auditor")
    unknown = _sign_in(app_client, "nobody-" + username)
    wrong = _sign_in(app_client, username, password="wrong password")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json()["detail"] == wrong.json()["detail"]


def _answers(sign_in: Callable[[], Any], clock: ManualClock) -> list[tuple[int, str | None]]:
    """Four failed sign-ins at once, eight more two minutes apart, then one a day later:
    each answer's status and Retry-After."""
    answers = []
    for attempt in range(12):
        answer = sign_in()
        answers.append((answer.status_code, answer.headers.get("Retry-After")))
        if attempt >= 3:
            clock.advance(timedelta(minutes=2))
    clock.advance(timedelta(days=1))
    answer = sign_in()
    answers.append((answer.status_code, answer.headers.get("Retry-After")))
    return answers


def test_failures_under_a_login_that_does_not_exist_are_slowed_and_locked_the_same(
    app_client: TestClient, db: Database, clock: ManualClock
) -> None:
    """Were only real accounts slowed and locked, a 429 would tell which logins exist."""
    username, _ = _staff(db, "auditor")
    real = _answers(lambda: _sign_in(app_client, username, password="wrong"), clock)
    ghost = _answers(lambda: _sign_in(app_client, f"nobody-{username}", password="x"), clock)
    assert ghost == real
    assert real[:4] == [(401, None), (401, None), (401, None), (429, "1")]  # slowed
    assert [status for status, _ in real[4:11]] == [401] * 7  # each after its wait
    assert real[11][0] == 429 and 700 < int(real[11][1] or 0) <= 900  # ten: locked 15 min
    assert real[12] == (401, None)  # a quiet day later the count starts again
    # the same for members, by reference, under a login no member has
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    db.run(lambda uow: auth.set_member_password(uow, member_id=member_id, password="member pass 1"))
    ref = _reference(db, member_id)

    def member(login: str) -> Any:
        body = {"program": program.code, "login": login, "password": "wrong"}
        return app_client.post("/v1/auth/members/sign-in", json=body)

    assert _answers(lambda: member(f"nobody-{ref}"), clock) == _answers(lambda: member(ref), clock)


def test_passwords_are_stored_as_argon2id_at_owasp_strength(db: Database) -> None:
    username, _ = _staff(db, "auditor")
    stored = db.run(
        lambda uow: uow.conn.execute(
            select(staff_users.c.password_hash).where(staff_users.c.username == username)
        ).scalar_one()
    )
    assert stored.startswith("$argon2id$v=19$")
    params = dict(item.split("=") for item in stored.split("$")[3].split(","))
    assert int(params["m"]) >= 19 * 1024 and int(params["t"]) >= 2 and int(params["p"]) >= 1
    assert PASSWORD not in stored


def test_sign_out_ends_the_session(app_client: TestClient, db: Database) -> None:
    headers = support.staff(db, "auditor")
    assert app_client.get("/v1/auth/me", headers=headers).status_code == 200
    assert app_client.post("/v1/auth/sign-out", headers=headers).status_code == 204
    assert app_client.get("/v1/auth/me", headers=headers).status_code == 401


def test_staff_change_their_own_password(app_client: TestClient, db: Database) -> None:
    username, _ = _staff(db, "auditor")
    token = _sign_in(app_client, username).json()["token"]
    headers = support.bearer(token)
    wrong = app_client.put(
        "/v1/auth/staff/password",
        json={"current_password": "not it at all", "new_password": "a new password 2"},
        headers=headers,
    )
    assert wrong.status_code == 422
    changed = app_client.put(
        "/v1/auth/staff/password",
        json={"current_password": PASSWORD, "new_password": "a new password 2"},
        headers=headers,
    )
    assert changed.status_code == 204
    assert _sign_in(app_client, username).status_code == 401
    assert _sign_in(app_client, username, password="a new password 2").status_code == 200
    staff_id = app_client.get("/v1/auth/me", headers=headers).json()["id"]
    logged = db.run(
        lambda uow: (
            uow.conn.execute(
                select(audit_entries.c.action).where(audit_entries.c.target == f"staff:{staff_id}")
            )
            .scalars()
            .all()
        )
    )
    assert logged == ["staff.password"]


def test_a_staff_password_change_signs_out_every_other_session(
    app_client: TestClient, db: Database
) -> None:
    """Whoever held the old password is signed out; the session that changed it stays."""
    username, _ = _staff(db, "auditor")
    elsewhere = support.bearer(_sign_in(app_client, username).json()["token"])
    here = support.bearer(_sign_in(app_client, username).json()["token"])
    changed = app_client.put(
        "/v1/auth/staff/password",
        json={"current_password": PASSWORD, "new_password": "a new password 2"},
        headers=here,
    )
    assert changed.status_code == 204, changed.text
    assert app_client.get("/v1/auth/me", headers=elsewhere).status_code == 401
    assert app_client.get("/v1/auth/me", headers=here).status_code == 200


def test_new_secrets_given_by_an_installer_sign_the_user_out_everywhere(
    app_client: TestClient, db: Database
) -> None:
    """The old password and TOTP seed stop working, and so do the sessions opened with them."""
    username, _ = _staff(db, "auditor")
    headers = support.bearer(_sign_in(app_client, username).json()["token"])
    seed = db.run(
        lambda uow: auth.reset_staff_secrets(uow, username=username, password="fresh secret 1")
    )
    assert seed is not None
    assert app_client.get("/v1/auth/me", headers=headers).status_code == 401
    assert _sign_in(app_client, username, password="fresh secret 1").status_code == 200


def test_a_refusal_that_no_role_lifts_does_not_send_the_caller_for_one(
    app_client: TestClient, db: Database
) -> None:
    """Only staff change a staff password, and no API key sets a member's: whatever roles
    it holds. Such a refusal says so (``wrong_caller``), not "ask for a role"."""
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    member = support.member(db, member_id)
    own = app_client.put(
        "/v1/auth/staff/password",
        json={"current_password": "whatever 1", "new_password": "a new password 2"},
        headers=member,
    )
    till = support.api_key(db, program.id)
    key = app_client.put(
        f"/v1/programs/{program.code}/members/{member_id}/password",
        json={"new_password": "taken over 1"}, headers={**till, **support.key()},
    )  # fmt: skip
    for refused in (own, key):
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "wrong_caller"
        assert "role" not in refused.json()["detail"]


def test_a_new_staff_users_totp_seed_is_shown_once(app_client: TestClient, db: Database) -> None:
    admin = support.staff(db, "super_admin")
    program = new_program(db)
    headers = {**admin, **support.key()}
    body = {
        "username": f"cashier-{uuid.uuid4().hex[:8]}",
        "password": "a long password",
        "grants": [{"role": "cashier", "program": program.code, "merchant": "m1", "store": "s1"}],
    }
    created = app_client.post("/v1/staff", json=body, headers=headers)
    assert created.status_code == 201, created.text
    seed = created.json()["totp_secret"]
    assert len(seed) >= 16
    replayed = app_client.post("/v1/staff", json=body, headers=headers)
    assert replayed.status_code == 201
    assert replayed.json()["totp_secret"] != seed
    assert replayed.json()["id"] == created.json()["id"]
    staff = app_client.get(f"/v1/staff/{created.json()['id']}", headers=admin).json()
    assert staff["grants"][0]["role"] == "cashier" and staff["grants"][0]["store"] == "s1"
    assert staff["totp"] is True
    entries = db.run(
        lambda uow: (
            uow.conn.execute(
                select(audit_entries.c.after).where(
                    audit_entries.c.target == f"staff:{body['username']}"
                )
            )
            .scalars()
            .all()
        )
    )
    assert entries and all(seed not in str(entry) for entry in entries)


def test_nobody_hands_out_what_it_does_not_hold(app_client: TestClient, db: Database) -> None:
    program = new_program(db)
    operator = support.staff(db, "operator", program_id=program.id)
    # a custom role with what the operator holds: made
    role = app_client.post(
        f"/v1/programs/{program.code}/roles",
        json={"code": "store_manager", "name": "Store manager",
              "permissions": ["members.read", "points.read", "points.earn"]},
        headers={**operator, **support.key()},
    )  # fmt: skip
    assert role.status_code == 201, role.text
    # with audit.read, which an operator does not hold: refused
    beyond = app_client.post(
        f"/v1/programs/{program.code}/roles",
        json={"code": "snoop", "name": "Snoop", "permissions": ["audit.read"]},
        headers={**operator, **support.key()},
    )
    assert beyond.status_code == 403
    unknown = app_client.post(
        f"/v1/programs/{program.code}/roles",
        json={"code": "odd", "name": "Odd", "permissions": ["points.print_money"]},
        headers={**operator, **support.key()},
    )
    assert unknown.status_code == 422
    # an API key cannot carry staff administration
    key = app_client.post(
        f"/v1/programs/{program.code}/api-keys",
        json={"name": "pos", "permissions": ["staff.write"]},
        headers={**operator, **support.key()},
    )
    assert key.status_code == 422
    # the custom role, granted, gives exactly its permissions
    admin = support.staff(db, "super_admin")
    created = app_client.post(
        "/v1/staff",
        json={"username": f"manager-{uuid.uuid4().hex[:6]}", "password": "a long password",
              "grants": [{"role": "store_manager", "program": program.code}]},
        headers={**admin, **support.key()},
    ).json()  # fmt: skip
    token = db.run(
        lambda uow: auth.new_session(
            uow, subject="staff", subject_id=created["id"], totp_verified=True
        )
    )
    me = app_client.get("/v1/auth/me", headers=support.bearer(token.token)).json()
    assert me["grants"][0]["permissions"] == ["members.read", "points.earn", "points.read"]
    # a granted role cannot be deleted; a custom role can be changed, a built-in one cannot
    assert (
        app_client.delete(
            f"/v1/programs/{program.code}/roles/store_manager",
            headers={**operator, **support.key()},
        ).status_code
        == 409
    )
    assert (
        app_client.patch(
            f"/v1/programs/{program.code}/roles/cashier",
            json={"name": "Till"},
            headers={**operator, **support.key()},
        ).status_code
        == 409
    )


def _staff_with(db: Database, role: str, program_id: int | None = None) -> int:
    """A staff user holding ``role`` (in ``program_id``, or everywhere): its id."""

    def make(uow: UnitOfWork) -> int:
        created = auth.create_staff(uow, username=f"s-{uuid.uuid4().hex[:8]}", password=PASSWORD)
        auth.grant_role(uow, staff_id=created.id, role=role, program_id=program_id)
        return created.id

    return db.run(make)


def test_a_programme_administrator_manages_only_staff_within_its_programme(
    app_client: TestClient, db: Database
) -> None:
    # given an administrator of programme A, the installation's own and programme B's staff
    program_a, program_b = new_program(db), new_program(db)
    admin_a = support.staff(db, "super_admin", program_id=program_a.id)
    root = _staff_with(db, "super_admin")
    operator_b = _staff_with(db, "operator", program_b.id)
    operator_a = _staff_with(db, "operator", program_a.id)
    # when it lists staff: it sees programme A's only
    listed = app_client.get("/v1/staff", params={"limit": 200}, headers=admin_a).json()["items"]
    ids = {item["id"] for item in listed}
    assert operator_a in ids and root not in ids and operator_b not in ids
    assert all(g["program_id"] == program_a.id for item in listed for g in item["grants"])
    # and it can neither read nor disable nor grant to the others
    for other in (root, operator_b):
        assert app_client.get(f"/v1/staff/{other}", headers=admin_a).status_code == 403
        disabled = app_client.patch(
            f"/v1/staff/{other}", json={"active": False}, headers={**admin_a, **support.key()}
        )
        assert disabled.status_code == 403, disabled.text
        granted = app_client.post(
            f"/v1/staff/{other}/grants",
            json={"role": "cashier", "program": program_a.code},
            headers={**admin_a, **support.key()},
        )
        assert granted.status_code == 403
    root_row = app_client.get(f"/v1/staff/{root}", headers=support.staff(db, "super_admin"))
    assert root_row.json()["active"] is True
    # while its own programme's operator it manages
    own = app_client.patch(
        f"/v1/staff/{operator_a}", json={"active": False}, headers={**admin_a, **support.key()}
    )
    assert own.status_code == 200 and own.json()["active"] is False
    # nor does it hand out super_admin, even in its own programme, or create programmes
    super_grant = app_client.post(
        f"/v1/staff/{operator_a}/grants",
        json={"role": "super_admin", "program": program_a.code},
        headers={**admin_a, **support.key(), "Accept-Language": "zh"},
    )
    assert super_grant.status_code == 403 and "super_admin" in super_grant.json()["detail"]
    created = app_client.post(
        "/v1/programs",
        json={"code": f"p-{uuid.uuid4().hex[:8]}", "name": "Mine"},
        headers={**admin_a, **support.key()},
    )
    assert created.status_code == 403, created.text


def test_a_programme_administrator_learns_no_other_programmes_code_from_a_grant(
    app_client: TestClient, db: Database
) -> None:
    # given an administrator of programme A, one of its operators, and programme B
    program_a, program_b = new_program(db), new_program(db)
    admin_a = support.staff(db, "super_admin", program_id=program_a.id)
    operator_a = _staff_with(db, "operator", program_a.id)

    def grant(code: str, headers: dict[str, str]) -> Any:
        return app_client.post(
            f"/v1/staff/{operator_a}/grants", json={"role": "cashier", "program": code},
            headers={**headers, **support.key()},
        )  # fmt: skip

    # when it grants a role in B, and in a programme that does not exist
    existing, missing = grant(program_b.code, admin_a), grant("no-such-programme", admin_a)
    # then both are refused alike, naming the code it gave
    assert (existing.status_code, missing.status_code) == (403, 403), missing.text
    assert existing.json()["detail"].replace(program_b.code, "X") == missing.json()[
        "detail"
    ].replace("no-such-programme", "X")
    # while to an administrator of every programme an unknown code is unknown
    root = support.staff(db, "super_admin")
    assert grant("no-such-programme", root).status_code == 404


def test_a_staff_user_without_grants_is_managed_only_from_the_scope_it_was_created_in(
    app_client: TestClient, db: Database
) -> None:
    program_p, program_q = new_program(db), new_program(db)
    root = support.staff(db, "super_admin")
    shop = support.staff(db, "super_admin", program_id=program_p.id, merchant="shopA")
    admin_p = support.staff(db, "super_admin", program_id=program_p.id)
    admin_q = support.staff(db, "super_admin", program_id=program_q.id)

    def create(headers: dict[str, str], grants: list[dict[str, Any]]) -> int:
        made = app_client.post(
            "/v1/staff",
            json={"username": f"s-{uuid.uuid4().hex[:8]}", "password": "correct horse battery 1",
                  "grants": grants},
            headers={**headers, **support.key()},
        )  # fmt: skip
        assert made.status_code == 201, made.text
        return int(made.json()["id"])

    def listed(headers: dict[str, str]) -> set[int]:
        items = app_client.get("/v1/staff", params={"limit": 200}, headers=headers).json()
        return {item["id"] for item in items["items"]}

    def manages(headers: dict[str, str], staff_id: int) -> bool:
        answers = [
            app_client.get(f"/v1/staff/{staff_id}", headers=headers),
            app_client.patch(
                f"/v1/staff/{staff_id}", json={"display_name": "renamed", "active": True,
                                               "unlock": True},
                headers={**headers, **support.key()},
            ),
        ]  # fmt: skip
        codes = {answer.status_code for answer in answers}
        assert codes in ({200}, {403}), [answer.text for answer in answers]
        return codes == {200} and staff_id in listed(headers)

    # given a new account root made without grants (to be granted later)
    hq = create(root, [])
    # then a scoped administrator neither lists nor manages it, nor grants it a role
    assert not manages(shop, hq) and not manages(admin_p, hq)
    granted = app_client.post(
        f"/v1/staff/{hq}/grants",
        json={"role": "cashier", "program": program_p.code, "merchant": "shopA"},
        headers={**shop, **support.key(), "Accept-Language": "zh"},
    )
    assert granted.status_code == 403 and "创建" in granted.json()["detail"]
    assert manages(root, hq)
    # given a programme-q user root suspended: its grants revoked, its account disabled
    suspended = create(root, [{"role": "operator", "program": program_q.code}])
    (grant,) = app_client.get(f"/v1/staff/{suspended}", headers=root).json()["grants"]
    revoked = app_client.delete(
        f"/v1/staff/{suspended}/grants/{grant['id']}", headers={**root, **support.key()}
    )
    assert revoked.status_code == 200, revoked.text
    disabled = app_client.patch(
        f"/v1/staff/{suspended}", json={"active": False}, headers={**root, **support.key()}
    )
    assert disabled.status_code == 200, disabled.text
    # then programme p's administrators cannot enable it again, nor can programme q's
    for admin in (shop, admin_p, admin_q):
        enabled = app_client.patch(
            f"/v1/staff/{suspended}", json={"active": True, "unlock": True},
            headers={**admin, **support.key()},
        )  # fmt: skip
        assert enabled.status_code == 403, enabled.text
    assert app_client.get(f"/v1/staff/{suspended}", headers=root).json()["active"] is False
    # while one the merchant's administrator made without grants belongs to that merchant:
    # it and the programme's administrator manage it, another programme's does not
    own = create(shop, [])
    home = app_client.get(f"/v1/staff/{own}", headers=root).json()
    assert (home["home_program_id"], home["home_merchant"]) == (program_p.id, "shopA")
    assert manages(shop, own) and manages(admin_p, own) and manages(root, own)
    assert not manages(admin_q, own)
    # and one a store's administrator made belongs to that store: it manages the user it
    # made (and grants it a role of its store), another store's administrator does not
    till = support.staff(db, "super_admin", program_id=program_p.id, merchant="shopA", store="s1")
    other = support.staff(db, "super_admin", program_id=program_p.id, merchant="shopA", store="s2")
    clerk = create(till, [])
    assert app_client.get(f"/v1/staff/{clerk}", headers=root).json()["home_store"] == "s1"
    assert clerk in listed(till) and clerk not in listed(other)
    assert manages(till, clerk) and manages(shop, clerk) and not manages(other, clerk)
    granted = app_client.post(
        f"/v1/staff/{clerk}/grants",
        json={"role": "cashier", "program": program_p.code, "merchant": "shopA", "store": "s1"},
        headers={**till, **support.key()},
    )  # fmt: skip
    assert granted.status_code == 201, granted.text


def test_a_merchant_administrator_hands_out_its_merchant_scope_only(
    app_client: TestClient, db: Database
) -> None:
    program = new_program(db)
    shop_admin = support.staff(db, "super_admin", program_id=program.id, merchant="shop-A")
    me = app_client.get("/v1/auth/me", headers=shop_admin).json()

    def grant(body: dict[str, Any]) -> Any:
        return app_client.post(
            f"/v1/staff/{me['id']}/grants", json=body, headers={**shop_admin, **support.key()}
        )

    # a grant of the whole programme, or of another merchant: refused
    assert grant({"role": "operator", "program": program.code}).status_code == 403
    assert (
        grant({"role": "cashier", "program": program.code, "merchant": "shop-B"}).status_code == 403
    )
    # one of its own merchant: made
    own = grant({"role": "cashier", "program": program.code, "merchant": "shop-A", "store": "s1"})
    assert own.status_code == 201, own.text
    grants = app_client.get("/v1/auth/me", headers=shop_admin).json()["grants"]
    assert {g["merchant"] for g in grants} == {"shop-A"}


def test_an_api_key_with_no_permissions_is_refused(app_client: TestClient, db: Database) -> None:
    program = new_program(db)
    keys = f"/v1/programs/{program.code}/api-keys"
    admin = support.staff(db, "operator", program_id=program.id)
    refused = app_client.post(
        keys, json={"name": "till", "permissions": []}, headers={**admin, **support.key()}
    )
    assert refused.status_code == 422, refused.text
    assert [e["field"] for e in refused.json()["errors"]] == ["body.permissions"]
    assert app_client.get(keys, headers=admin).json()["items"] == []


def test_a_merchants_credentials_list_and_revoke_its_own_api_keys_only(
    app_client: TestClient, db: Database
) -> None:
    program = new_program(db)
    keys = f"/v1/programs/{program.code}/api-keys"
    admin = support.staff(db, "operator", program_id=program.id)
    shop_a = support.staff(db, "operator", program_id=program.id, merchant="shop-A")
    made = {
        merchant: app_client.post(
            keys, json={"name": merchant, "merchant": merchant}, headers={**admin, **support.key()}
        ).json()["id"]
        for merchant in ("shop-A", "shop-B")
    }
    listed = app_client.get(keys, headers=shop_a).json()["items"]
    assert [item["id"] for item in listed] == [made["shop-A"]]
    assert app_client.get(keys, params={"merchant": "shop-B"}, headers=shop_a).status_code == 403
    other = app_client.post(f"{keys}/{made['shop-B']}/revoke", headers={**shop_a, **support.key()})
    assert other.status_code == 404
    still = app_client.get(keys, params={"merchant": "shop-B"}, headers=admin).json()["items"]
    assert still[0]["revoked_at"] is None
    own = app_client.post(f"{keys}/{made['shop-A']}/revoke", headers={**shop_a, **support.key()})
    assert own.status_code == 200 and own.json()["revoked_at"] is not None


def test_a_stores_credentials_list_and_revoke_that_stores_api_keys_only(
    app_client: TestClient, db: Database
) -> None:
    """A store's operator cannot revoke its merchant's key for every till, nor another
    store's, nor see them."""
    program = new_program(db)
    keys = f"/v1/programs/{program.code}/api-keys"
    admin = support.staff(db, "operator", program_id=program.id)
    store_1 = support.staff(db, "operator", program_id=program.id, merchant="shop-A", store="s1")
    made = {
        store: app_client.post(
            keys, json={"name": str(store), "merchant": "shop-A", "store": store},
            headers={**admin, **support.key()},
        ).json()["id"]
        for store in ("s1", "s2", None)
    }  # fmt: skip
    listed = app_client.get(keys, headers=store_1).json()["items"]
    assert [item["id"] for item in listed] == [made["s1"]]
    for other in (made["s2"], made[None]):
        refused = app_client.post(f"{keys}/{other}/revoke", headers={**store_1, **support.key()})
        assert refused.status_code == 404, refused.text
    still = app_client.get(keys, params={"revoked": "true"}, headers=admin).json()["items"]
    assert still == []
    own = app_client.post(f"{keys}/{made['s1']}/revoke", headers={**store_1, **support.key()})
    assert own.status_code == 200 and own.json()["revoked_at"] is not None


# --------------------------------------------------------------------------- API keys


def test_api_keys_are_stored_hashed_shown_once_and_revocable(
    app_client: TestClient, db: Database
) -> None:
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    operator = {**support.staff(db, "operator", program_id=program.id), **support.key()}
    body = {"name": "till 3", "merchant": "m1", "store": "s3"}
    created = app_client.post(f"/v1/programs/{program.code}/api-keys", json=body, headers=operator)
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    prefix, secret = token.removeprefix("jf_").split("_", 1)
    row = db.run(
        lambda uow: uow.conn.execute(select(api_keys).where(api_keys.c.prefix == prefix)).one()
    )
    assert secret not in str(tuple(row)) and row.secret_hash == keyed_hash(secret)
    # replaying the creation does not show the token again
    again = app_client.post(f"/v1/programs/{program.code}/api-keys", json=body, headers=operator)
    assert again.json()["id"] == created.json()["id"] and token not in again.text
    # the key works, and its use is recorded
    balance = app_client.get(
        f"/v1/programs/{program.code}/members/{member_id}/points", headers=support.bearer(token)
    )
    assert balance.status_code == 200
    listed = app_client.get(f"/v1/programs/{program.code}/api-keys", headers=operator).json()
    (item,) = [k for k in listed["items"] if k["id"] == created.json()["id"]]
    assert item["last_used_at"] is not None and "token" not in item
    # revoked: refused (once the 5-second cache of the key has passed)
    revoked = app_client.post(
        f"/v1/programs/{program.code}/api-keys/{item['id']}/revoke",
        headers={**operator, **support.key()},
    )
    assert revoked.json()["revoked_at"] is not None
    app_client.app.state.principal_cache.clear()  # type: ignore[attr-defined]
    after = app_client.get(
        f"/v1/programs/{program.code}/members/{member_id}/points", headers=support.bearer(token)
    )
    assert after.status_code == 401 and "revoked" in after.json()["detail"]


def test_a_key_revoked_through_a_server_is_refused_by_that_server_at_once(
    app_client: TestClient, db: Database
) -> None:
    """The server that revokes a key forgets it at once; only other servers that had just
    accepted it may take it for a few seconds more."""
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    operator = support.staff(db, "operator", program_id=program.id)
    created = db.run(
        lambda uow: auth.create_api_key(uow, program_id=program.id, name="till", created_by="test")
    )
    url = f"/v1/programs/{program.code}/members/{member_id}/points"
    assert app_client.get(url, headers=support.bearer(created.token)).status_code == 200
    revoked = app_client.post(
        f"/v1/programs/{program.code}/api-keys/{created.id}/revoke",
        headers={**operator, **support.key()},
    )
    assert revoked.status_code == 200, revoked.text
    after = app_client.get(url, headers=support.bearer(created.token))
    assert after.status_code == 401 and "revoked" in after.json()["detail"]


def test_a_store_is_scoped_within_a_merchant(app_client: TestClient, db: Database) -> None:
    program = new_program(db)
    admin = support.staff(db, "super_admin", program_id=program.id)
    zh = {"Accept-Language": "zh-CN"}
    # when a key or a grant names a store and no merchant
    key = app_client.post(
        f"/v1/programs/{program.code}/api-keys",
        json={"name": "till S1", "store": "S1"},
        headers={**admin, **support.key(), **zh},
    )
    me = app_client.get("/v1/auth/me", headers=admin).json()
    grant = app_client.post(
        f"/v1/staff/{me['id']}/grants",
        json={"role": "cashier", "program": program.code, "store": "S1"},
        headers={**admin, **support.key()},
    )
    # then both are refused, naming the field, in the caller's language
    for answer in (key, grant):
        assert answer.status_code == 422, answer.text
        assert [e["field"] for e in answer.json()["errors"]] == ["store"]
    assert "商户" in key.json()["errors"][0]["message"]
    assert "merchant" in grant.json()["errors"][0]["message"]


def test_a_key_stored_with_a_store_and_no_merchant_acts_for_its_store_only(
    app_client: TestClient, db: Database
) -> None:
    # given a key of store S1 with no merchant (stored before such keys were refused)
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    token = db.run(
        lambda uow: auth.create_api_key(
            uow, program_id=program.id, name="till", created_by="test", merchant="M1",
            store="S1",
        )
    ).token  # fmt: skip
    prefix = token.removeprefix("jf_").split("_", 1)[0]
    db.run(
        lambda uow: uow.conn.execute(
            update(api_keys).where(api_keys.c.prefix == prefix).values(merchant=None)
        )
    )
    url = f"/v1/programs/{program.code}/members/{member_id}/points/earn"
    till = support.bearer(token)
    # when it earns for another store: refused
    other = app_client.post(
        url, json={"amount": 10, "merchant": "M9", "store": "S2"}, headers={**till, **support.key()}
    )
    assert other.status_code == 403, other.text
    # and for its own store: allowed
    own = app_client.post(url, json={"amount": 10}, headers={**till, **support.key()})
    assert own.status_code == 201, own.text


def test_an_expired_api_key_is_refused(
    app_client: TestClient, db: Database, clock: ManualClock
) -> None:
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    operator = {**support.staff(db, "operator", program_id=program.id), **support.key()}
    created = app_client.post(
        f"/v1/programs/{program.code}/api-keys",
        json={"name": "short", "expires_at": (clock.now() + timedelta(hours=1)).isoformat()},
        headers=operator,
    ).json()
    clock.advance(timedelta(hours=2))
    answer = app_client.get(
        f"/v1/programs/{program.code}/members/{member_id}/points",
        headers=support.bearer(created["token"]),
    )
    assert answer.status_code == 401 and "expired" in answer.json()["detail"]


def test_an_api_key_used_just_before_it_expires_is_refused_just_after(
    app_client: TestClient, db: Database, clock: ManualClock
) -> None:
    """A key this server has just accepted (and holds for a few seconds) is refused from
    the moment it expires, not when the server next reads it."""
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    created = db.run(
        lambda uow: auth.create_api_key(
            uow, program_id=program.id, name="short", created_by="test",
            expires_at=clock.now() + timedelta(seconds=2),
        )
    )  # fmt: skip
    url = f"/v1/programs/{program.code}/members/{member_id}/points"
    key = support.bearer(created.token)
    assert app_client.get(url, headers=key).status_code == 200
    clock.advance(timedelta(seconds=3))
    answer = app_client.get(url, headers=key)
    assert answer.status_code == 401 and "expired" in answer.json()["detail"]


# --------------------------------------------------------------------------- members


def _bind_phone(db: Database, member_id: int, phone: str) -> None:
    db.run(
        lambda uow: uow.conn.execute(
            update(members).where(members.c.id == member_id).values(phone_hash=keyed_hash(phone))
        )
    )


def test_members_sign_in_with_their_password(app_client: TestClient, db: Database) -> None:
    program = new_program(db)
    member_id, other_id = new_members(db, program.id, 2)
    ref = _reference(db, member_id)
    staff = {**support.staff(db, "operator", program_id=program.id), **support.key()}
    # staff set a first password; the member signs in with its reference
    reset = app_client.put(
        f"/v1/programs/{program.code}/members/{member_id}/password",
        json={"new_password": "member pass 1"},
        headers=staff,
    )
    assert reset.status_code == 200, reset.text
    signed_in = app_client.post(
        "/v1/auth/members/sign-in",
        json={"program": program.code, "login": ref, "password": "member pass 1"},
    )
    assert signed_in.status_code == 200, signed_in.text
    headers = support.bearer(signed_in.json()["token"])
    assert app_client.get("/v1/auth/me", headers=headers).json()["member_id"] == member_id
    # the member changes its own password only by giving the present one
    own = f"/v1/programs/{program.code}/members/{member_id}/password"
    refused = app_client.put(
        own, json={"new_password": "member pass 2"}, headers={**headers, **support.key()}
    )
    assert refused.status_code == 422
    changed = app_client.put(
        own,
        json={"current_password": "member pass 1", "new_password": "member pass 2"},
        headers={**headers, **support.key()},
    )
    assert changed.status_code == 200
    assert app_client.get("/v1/auth/me", headers=headers).status_code == 200  # still in
    # and never another member's
    theirs = app_client.put(
        f"/v1/programs/{program.code}/members/{other_id}/password",
        json={"new_password": "member pass 3"},
        headers={**headers, **support.key()},
    )
    assert theirs.status_code == 403
    wrong = app_client.post(
        "/v1/auth/members/sign-in",
        json={"program": program.code, "login": ref, "password": "member pass 1"},
    )
    assert wrong.status_code == 401
    # a till's API key, though it may write members, sets no password (it could then sign
    # in as any member)
    till = {**support.api_key(db, program.id, merchant="shop"), **support.key()}
    taken = app_client.put(own, json={"new_password": "taken over 1"}, headers=till)
    assert taken.status_code == 403, taken.text
    # a reset by staff signs the member out of every session it had
    other_device = support.member(db, member_id)
    assert app_client.get("/v1/auth/me", headers=other_device).status_code == 200
    again = app_client.put(
        own, json={"new_password": "member pass 4"}, headers={**staff, **support.key()}
    )
    assert again.status_code == 200, again.text
    for old in (headers, other_device):
        assert app_client.get("/v1/auth/me", headers=old).status_code == 401


def test_a_members_wrong_present_passwords_are_slowed_as_its_sign_ins_are(
    app_client: TestClient, db: Database
) -> None:
    """A member changing its password gives the present one: each wrong one counts as a
    failed sign-in, and after three each further try must wait, the right password too;
    a change already made is still replayed for its key."""
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    db.run(lambda uow: auth.set_member_password(uow, member_id=member_id, password="member 1"))
    headers = support.member(db, member_id)
    url = f"/v1/programs/{program.code}/members/{member_id}/password"
    first = {"current_password": "member 1", "new_password": "member 2"}
    made = {**headers, **support.key()}
    assert app_client.put(url, json=first, headers=made).status_code == 200
    for _ in range(3):
        wrong = app_client.put(
            url, json={"current_password": "not it 1", "new_password": "member 3"},
            headers={**headers, **support.key()},
        )  # fmt: skip
        assert wrong.status_code == 422, wrong.text
    slowed = app_client.put(
        url, json={"current_password": "member 2", "new_password": "member 3"},
        headers={**headers, **support.key()},
    )  # fmt: skip
    assert slowed.status_code == 429, slowed.text
    assert slowed.json()["code"] == "sign_in_locked" and "Retry-After" in slowed.headers
    replayed = app_client.put(url, json=first, headers=made)
    assert replayed.status_code == 200 and replayed.headers["Idempotent-Replayed"] == "true"
    signed_in = app_client.post(
        "/v1/auth/members/sign-in",
        json={"program": program.code, "login": _reference(db, member_id), "password": "member 2"},
    )
    assert signed_in.status_code == 429


def test_members_sign_in_with_a_one_time_code_sent_by_sms(
    app_client: TestClient, db: Database, sms: RecordingSms, clock: ManualClock
) -> None:
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    _bind_phone(db, member_id, "13800138000")
    ask = {"program": program.code, "phone": "+86 138 0013 8000"}
    sent = app_client.post("/v1/auth/members/codes", json=ask)
    assert sent.status_code == 202, sent.text
    (message,) = sms.sent
    code = message.secret
    assert code in message.text and len(code) == 6
    # the outbox keeps the message with the number and the code masked; the code is stored
    # only as a hash
    row = db.run(
        lambda uow: uow.conn.execute(select(outbox).where(outbox.c.program_id == program.id)).one()
    )
    assert row.recipient == "138****8000" and code not in row.body and "******" in row.body
    stored = db.run(
        lambda uow: uow.conn.execute(
            select(one_time_codes.c.code_hash).where(one_time_codes.c.member_id == member_id)
        ).scalar_one()
    )
    assert code not in stored
    # another code within the minute: answered as for any number (a refusal would tell that
    # the number is a member's), and nothing is sent: the code sent stays good
    again = app_client.post("/v1/auth/members/codes", json=ask)
    unknown_twice = [
        app_client.post(
            "/v1/auth/members/codes", json={"program": program.code, "phone": "13900000001"}
        )
        for _ in range(2)
    ]
    assert [a.status_code for a in (again, *unknown_twice)] == [202, 202, 202]
    assert again.json().keys() == unknown_twice[1].json().keys()
    assert len(sms.sent) == 1
    # the code signs the member in, once
    body = {"program": program.code, "phone": "13800138000", "code": code}
    first = app_client.post("/v1/auth/members/sign-in-with-code", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["subject_id"] == member_id
    assert app_client.post("/v1/auth/members/sign-in-with-code", json=body).status_code == 401
    # an unknown number gets the same answer and no message
    unknown = app_client.post(
        "/v1/auth/members/codes", json={"program": program.code, "phone": "13900000000"}
    )
    assert unknown.status_code == 202 and len(sms.sent) == 1


def test_a_phone_number_signs_in_its_bound_member_never_one_whose_reference_it_is(
    app_client: TestClient, db: Database, sms: RecordingSms
) -> None:
    """A till registers a member under another member's phone number as its reference (or
    a number is recycled): the number still signs in the member it is bound to. Codes go
    by the bound phone only; a password sign-in takes the bound phone first."""
    program = new_program(db)
    owner, lookalike = (
        db.run(
            lambda uow, ref=ref: (
                members_service.register_member(uow, program_id=program.id, external_ref=ref).id
            )
        )
        for ref in ("A-1", "13800000001")
    )
    _bind_phone(db, owner, "13800000001")
    for member_id, password in ((owner, "owner pass 1"), (lookalike, "lookalike 1")):
        db.run(
            lambda uow, m=member_id, p=password: auth.set_member_password(
                uow, member_id=m, password=p
            )
        )
    ask = {"program": program.code, "phone": "13800000001"}
    assert app_client.post("/v1/auth/members/codes", json=ask).status_code == 202
    signed_in = app_client.post(
        "/v1/auth/members/sign-in-with-code", json={**ask, "code": sms.sent[-1].secret}
    )
    assert signed_in.status_code == 200 and signed_in.json()["subject_id"] == owner

    def sign_in(login: str, password: str) -> Any:
        return app_client.post(
            "/v1/auth/members/sign-in",
            json={"program": program.code, "login": login, "password": password},
        )

    assert sign_in("13800000001", "owner pass 1").json()["subject_id"] == owner
    assert sign_in("13800000001", "lookalike 1").status_code == 401
    # a reference that looks like a phone but is no one's bound phone: no code is sent...
    other = db.run(
        lambda uow: (
            members_service.register_member(
                uow, program_id=program.id, external_ref="13900000009"
            ).id
        )
    )
    db.run(lambda uow: auth.set_member_password(uow, member_id=other, password="other pass 1"))
    sent = len(sms.sent)
    ask = {"program": program.code, "phone": "13900000009"}
    assert app_client.post("/v1/auth/members/codes", json=ask).status_code == 202
    assert len(sms.sent) == sent
    # ...but it still names its member in a password sign-in
    assert sign_in("13900000009", "other pass 1").json()["subject_id"] == other


def test_a_one_time_code_is_spent_by_five_wrong_guesses_or_by_time(
    app_client: TestClient, db: Database, sms: RecordingSms, clock: ManualClock
) -> None:
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    _bind_phone(db, member_id, "13700137000")
    ask = {"program": program.code, "phone": "13700137000"}
    assert app_client.post("/v1/auth/members/codes", json=ask).status_code == 202
    code = sms.sent[-1].secret
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(5):
        guess = {**ask, "code": wrong}
        assert app_client.post("/v1/auth/members/sign-in-with-code", json=guess).status_code == 401
    right = {**ask, "code": code}
    assert app_client.post("/v1/auth/members/sign-in-with-code", json=right).status_code == 401
    # a new code, but too late
    clock.advance(timedelta(minutes=1))
    assert app_client.post("/v1/auth/members/codes", json=ask).status_code == 202
    late = {**ask, "code": sms.sent[-1].secret}
    clock.advance(timedelta(minutes=6))
    assert app_client.post("/v1/auth/members/sign-in-with-code", json=late).status_code == 401


def test_a_code_sent_to_a_replaced_phone_signs_nobody_in(
    app_client: TestClient, db: Database, sms: RecordingSms
) -> None:
    """Whoever holds the number a binding replaced is signed out, and a code it asked for
    just before does not sign it back in under the new number; the new number gets a code
    at once."""
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    operator = support.staff(db, "operator", program_id=program.id)
    identity = f"/v1/programs/{program.code}/members/{member_id}/identity"

    def bind(phone: str) -> None:
        body = {"id_number": "11010519491231002X", "phone": phone}
        answer = app_client.put(identity, json=body, headers={**operator, **support.key()})
        assert answer.status_code == 200, answer.text

    bind("13600136001")
    old = {"program": program.code, "phone": "13600136001"}
    assert app_client.post("/v1/auth/members/codes", json=old).status_code == 202
    old_code = sms.sent[-1].secret
    # staff bind a new number: the code texted to the old one is void, under either number
    bind("13600136002")
    new = {"program": program.code, "phone": "13600136002"}
    for ask in (old, new):
        guess = {**ask, "code": old_code}
        answer = app_client.post("/v1/auth/members/sign-in-with-code", json=guess)
        assert answer.status_code == 401, answer.text
    # and the new number is texted a code of its own without waiting, which signs in
    assert app_client.post("/v1/auth/members/codes", json=new).status_code == 202
    assert sms.sent[-1].phone == "13600136002"
    signed_in = app_client.post(
        "/v1/auth/members/sign-in-with-code", json={**new, "code": sms.sent[-1].secret}
    )
    assert signed_in.status_code == 200 and signed_in.json()["subject_id"] == member_id


@pytest.mark.parametrize("state", ["banned", "closed"])
def test_a_banned_or_closed_member_is_texted_no_code(
    app_client: TestClient, db: Database, sms: RecordingSms, state: str
) -> None:
    """A code would sign in no one (a banned or closed account is refused at sign-in): it is
    not texted, and the answer is the one any number gets."""
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    _bind_phone(db, member_id, "13400134000")
    db.run(
        lambda uow: members_service.change_state(
            uow, program_id=program.id, member_id=member_id, state=state
        )
    )
    ask = {"program": program.code, "phone": "13400134000"}
    answer = app_client.post("/v1/auth/members/codes", json=ask)
    unknown = app_client.post("/v1/auth/members/codes", json={**ask, "phone": "13400134009"})
    assert answer.status_code == unknown.status_code == 202
    assert answer.json().keys() == unknown.json().keys()
    assert sms.sent == []


def test_a_banned_member_cannot_sign_in(app_client: TestClient, db: Database) -> None:
    program = new_program(db)
    (member_id,) = new_members(db, program.id, 1)
    db.run(lambda uow: auth.set_member_password(uow, member_id=member_id, password="member pass 1"))
    ref = _reference(db, member_id)
    db.run(
        lambda uow: uow.conn.execute(
            update(members).where(members.c.id == member_id).values(state="banned")
        )
    )
    answer = app_client.post(
        "/v1/auth/members/sign-in",
        json={"program": program.code, "login": ref, "password": "member pass 1"},
    )
    assert answer.status_code == 401 and "banned" in answer.json()["detail"]


def test_staff_and_key_lists_page_and_filter(app_client: TestClient, db: Database) -> None:
    admin = support.staff(db, "super_admin")
    tag = uuid.uuid4().hex[:6]
    for n in range(3):
        db.run(
            lambda uow, n=n: auth.create_staff(
                uow, username=f"t_{tag}-{n}", password=PASSWORD, roles_in=[("finance", None)]
            )
        )
    # a username prefix (its underscore taken literally), in pages of two
    first = app_client.get("/v1/staff", params={"username": f"t_{tag}", "limit": 2}, headers=admin)
    assert [s["username"] for s in first.json()["items"]] == [f"t_{tag}-0", f"t_{tag}-1"]
    second = app_client.get(
        "/v1/staff",
        params={"username": f"t_{tag}", "limit": 2, "cursor": first.json()["next_cursor"]},
        headers=admin,
    ).json()
    assert [s["username"] for s in second["items"]] == [f"t_{tag}-2"]
    assert second["next_cursor"] is None
    assert (
        app_client.get("/v1/staff", params={"username": f"t%{tag}"}, headers=admin).json()["items"]
        == []
    )
    by_role = app_client.get("/v1/staff", params={"role": "finance", "limit": 200}, headers=admin)
    assert {f"t_{tag}-0", f"t_{tag}-1"} <= {s["username"] for s in by_role.json()["items"]}
    assert app_client.get("/v1/staff", params={"cursor": "x1"}, headers=admin).status_code == 422
    # keys by merchant and revocation
    program = new_program(db)
    support.api_key(db, program.id, merchant="m1")
    support.api_key(db, program.id, merchant="m2")
    keys = f"/v1/programs/{program.code}/api-keys"
    assert [
        k["merchant"]
        for k in app_client.get(keys, params={"merchant": "m2"}, headers=admin).json()["items"]
    ] == ["m2"]
    key_id = app_client.get(keys, params={"merchant": "m1"}, headers=admin).json()["items"][0]["id"]
    app_client.post(f"{keys}/{key_id}/revoke", headers={**admin, **support.key()})
    revoked = app_client.get(keys, params={"revoked": True}, headers=admin).json()["items"]
    live = app_client.get(keys, params={"revoked": False}, headers=admin).json()["items"]
    assert [k["id"] for k in revoked] == [key_id]
    assert [k["merchant"] for k in live] == ["m2"]
