"""Members over HTTP: registration, profiles, states, real-name binding, family groups."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from jifen.api.app import create_app
from jifen.audit import service as audit_service
from jifen.audit.models import audit_entries
from jifen.crypto import decrypt
from jifen.db.uow import Database
from jifen.members.core import id_check_digit
from jifen.members.models import members
from jifen.notify import service as notify_service
from jifen.notify.models import outbox
from jifen.points import service as points_service
from jifen.programs import service as programs_service
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import assert_ledger_sound, new_members, new_program
from tests.points.test_concurrency import run_together

VALID_ID = "11010519491231002X"


def other_id_number(seed: int) -> str:
    first17 = f"3101151990010{seed:04d}"
    return first17 + id_check_digit(first17)


class Club:
    """A programme, an operator and an API key, and shortcuts to its member routes."""

    def __init__(self, client: TestClient, db: Database) -> None:
        self.client = client
        self.db = db
        self.program = new_program(db)
        self.base = f"/v1/programs/{self.program.code}/members"
        self.operator = support.staff(db, "operator", program_id=self.program.id)

    def post(self, url: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        return self.client.post(url, json=body, headers={**(headers or self.operator),
                                                          **support.key()})  # fmt: skip

    def put(self, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self.client.put(
            url, json=body, headers={**(headers or self.operator), **support.key()}
        )

    def register(self, ref: str, **fields: Any) -> dict[str, Any]:
        answer = self.post(self.base, {"external_ref": ref, **fields})
        assert answer.status_code == 201, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def url(self, member_id: int, tail: str = "") -> str:
        return f"{self.base}/{member_id}{tail}"


def test_registration_with_profile_and_phone(client: TestClient, db: Database) -> None:
    club = Club(client, db)
    member = club.register(
        "C1", name="王芳", email="wang@example.cn", birthday="1990-05-01", gender="female",
        region="上海", tags=["vip", "新客"], phone="+86 138 0013 8000",
    )  # fmt: skip
    assert member["name"] == "王芳" and member["tags"] == ["vip", "新客"]
    assert member["phone"] == "138****8000" and member["state"] == "active"
    # the account is open: the member has a balance of 0
    balance = client.get(f"{club.url(member['id'])}/points", headers=club.operator)
    assert balance.json()["balance"] == 0
    # the phone is stored as a keyed hash and ciphertext, never in plain
    row = db.run(
        lambda uow: uow.conn.execute(select(members).where(members.c.id == member["id"])).one()
    )
    assert "13800138000" not in json.dumps([str(v) for v in row])
    # the same reference or the same phone again: refused
    assert club.post(club.base, {"external_ref": "C1"}).status_code == 409
    again = club.post(club.base, {"external_ref": "C2", "phone": "13800138000"})
    assert again.status_code == 409 and "13800138000" not in again.text
    bad = club.post(club.base, {"external_ref": "C3", "phone": "12345"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "phone"


def test_a_number_no_mobile_phone_has_is_neither_registered_nor_bound(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    member = club.register("N1")
    # 10, 11 and 12 begin service numbers, never a mobile one: no text would reach them
    for number in ["12345678901", "+86 110 1234 5678", "10086100861"]:
        registered = club.post(club.base, {"external_ref": f"N-{number}", "phone": number},
                               {**club.operator, "Accept-Language": "zh"})  # fmt: skip
        assert registered.status_code == 422, number
        error = registered.json()["errors"][0]
        assert error["field"] == "phone" and "13 至 19" in error["message"]
        bound = club.put(club.url(member["id"], "/identity"),
                         {"id_number": VALID_ID, "phone": number})  # fmt: skip
        assert bound.status_code == 422 and bound.json()["errors"][0]["field"] == "phone"
    assert club.client.get(club.url(member["id"]), headers=club.operator).json()["phone"] is None
    # every prefix from 13 to 19 is a mobile one
    for n, prefix in enumerate(range(13, 20)):
        club.register(f"M{n}", phone=f"{prefix}900139000")


def test_a_tag_given_twice_is_stored_once_in_the_order_first_given(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    member = club.register("D1", tags=["vip", "新客", "vip", "新客", "b"])
    assert member["tags"] == ["vip", "新客", "b"]
    changed = club.client.patch(club.url(member["id"]), json={"tags": ["b", "a", "b", "a"]},
                                headers={**club.operator, **support.key()})  # fmt: skip
    assert changed.status_code == 200, changed.text
    assert changed.json()["tags"] == ["b", "a"]
    stored = db.run(
        lambda uow: uow.conn.execute(
            select(members.c.tags).where(members.c.id == member["id"])
        ).scalar_one()
    )
    assert stored == ["b", "a"]


def test_list_filters_and_pages(client: TestClient, db: Database) -> None:
    club = Club(client, db)
    ids = [
        club.register(f"L{n}", region="北京" if n % 2 else "上海", tags=["vip"] if n < 3 else [])[
            "id"
        ]
        for n in range(5)
    ]
    club.register("L-phone", phone="13900139000")
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get(club.base, params=params, headers=club.operator).json()
        seen += [m["id"] for m in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen[:5] == ids and len(seen) == 6

    def find(**params: Any) -> list[str]:
        answer = client.get(club.base, params=params, headers=club.operator)
        assert answer.status_code == 200, answer.text
        return [m["external_ref"] for m in answer.json()["items"]]

    assert find(tag="vip") == ["L0", "L1", "L2"]
    assert find(tag="vi") == []  # a whole tag, not a part of one
    assert find(region="北京") == ["L1", "L3"]
    assert find(external_ref="L4") == ["L4"]
    assert find(phone="+86 139 0013 9000") == ["L-phone"]
    assert find(state="frozen") == []
    # A cursor jifen did not give is refused, never an error of the server: Unicode digits
    # and an id past what the database holds among them.
    for cursor in ("abc", "²", "9223372036854775808", "9" * 19, "-1"):
        answer = client.get(club.base, params={"cursor": cursor}, headers=club.operator)
        assert answer.status_code == 422, (cursor, answer.text)
        assert answer.json()["code"] == "invalid_input", answer.text


def test_a_profile_update_cannot_set_state_balance_tier_or_phone(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    member = club.register("P1", name="Li")
    url = club.url(member["id"])
    forbidden = [
        ("state", "active"),
        ("balance", 10**6),
        ("tier", "gold"),
        ("phone", "13800138000"),
        ("verified_at", "2026-01-01T00:00:00Z"),
    ]
    for field, value in forbidden:
        refused = club.client.patch(
            url, json={field: value}, headers={**club.operator, **support.key()}
        )
        assert refused.status_code == 422, field
        assert refused.json()["errors"][0]["field"] == f"body.{field}"
    for field in ("name", "tags"):  # a member always has a name and a list of tags
        nulled = club.client.patch(
            url, json={field: None}, headers={**club.operator, **support.key()}
        )
        assert nulled.status_code == 422, field
        error = nulled.json()["errors"][0]
        assert error["field"] == f"body.{field}" and "leave it out" in error["message"]
    assert club.client.get(url, headers=club.operator).json()["name"] == "Li"
    changed = club.client.patch(
        url, json={"name": "李雷", "tags": ["a"]}, headers={**club.operator, **support.key()}
    )
    assert changed.status_code == 200
    assert changed.json()["name"] == "李雷" and changed.json()["region"] is None
    # the audit entry carries the profile before and after
    entry = db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.before, audit_entries.c.after)
            .where(audit_entries.c.target == f"member:{member['id']}",
                   audit_entries.c.action == "members.write")
            .order_by(audit_entries.c.id.desc())
        ).first()
    )  # fmt: skip
    assert entry is not None
    # the audit entry says which personal fields changed, not what they hold: the log is
    # hash-chained and cannot forget a member who asks to be erased
    assert entry.before["name"] == "<set>" and entry.after["name"] == "<set>"
    assert entry.after["region"] is None and entry.after["changed"] == ["name", "tags"]
    assert "Li" not in str(entry.before) and "李雷" not in str(entry.after)


def test_states_move_as_allowed_and_only_an_active_member_earns(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    member = club.register("S1")
    state = club.url(member["id"], "/state")
    earn = club.url(member["id"], "/points/earn")
    frozen = club.post(state, {"state": "frozen", "reason": "suspicious orders"})
    assert frozen.status_code == 200 and frozen.json()["state"] == "frozen"
    refused = club.post(earn, {"amount": 10})
    assert refused.status_code == 409 and refused.json()["code"] == "state_conflict"
    assert club.post(state, {"state": "active", "reason": "cleared"}).status_code == 200
    assert club.post(earn, {"amount": 10}).status_code == 201
    assert club.post(state, {"state": "closed", "reason": "asked to leave"}).status_code == 200
    final = club.post(state, {"state": "active", "reason": "changed mind"})
    assert final.status_code == 409 and "closed" in final.json()["detail"]
    assert club.post(state, {"state": "deleted", "reason": "x"}).status_code == 422
    assert club.post(state, {"state": "banned"}).status_code == 422  # a reason is required
    # each move's audit entry keeps the reason staff gave for it
    entries = db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.before, audit_entries.c.after)
            .where(audit_entries.c.target == f"member:{member['id']}",
                   audit_entries.c.action == "members.state")
            .order_by(audit_entries.c.id)
        ).all()
    )  # fmt: skip
    assert [(e.before["state"], e.after["state"], e.after["reason"]) for e in entries] == [
        ("active", "frozen", "suspicious orders"),
        ("frozen", "active", "cleared"),
        ("active", "closed", "asked to leave"),
    ]


def test_a_banned_member_is_signed_out(client: TestClient, db: Database) -> None:
    club = Club(client, db)
    member = club.register("B1")
    own = support.member(db, member["id"])
    assert client.get(club.url(member["id"]), headers=own).status_code == 200
    club.post(club.url(member["id"], "/state"), {"state": "banned", "reason": "fraud"})
    assert client.get(club.url(member["id"]), headers=own).status_code == 401


def test_real_name_binding_is_checked_masked_and_shown_in_full_only_with_pii(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    first, second = club.register("R1")["id"], club.register("R2")["id"]
    identity = club.url(first, "/identity")
    wrong = club.put(identity, {"id_number": VALID_ID[:-1] + "1", "phone": "13800138000"})
    assert wrong.status_code == 422 and "last character" in wrong.json()["errors"][0]["message"]
    bound = club.put(identity, {"id_number": VALID_ID.lower(), "phone": "13800138000"})
    assert bound.status_code == 200, bound.text
    assert bound.json()["id_number"] == "1101**********002X"
    assert bound.json()["phone"] == "138****8000" and bound.json()["verified_at"]
    # the same ID number for another member: refused, without echoing it
    taken = club.put(club.url(second, "/identity"), {"id_number": VALID_ID, "phone": "13700137000"})
    assert taken.status_code == 409 and VALID_ID not in taken.text
    # masked in the profile and in the audit log; in full only for members.pii
    profile = client.get(club.url(first), headers=club.operator).json()
    assert profile["id_number"] == "1101**********002X"
    reviewer = support.staff(db, "reviewer", program_id=club.program.id)
    assert client.get(identity, headers=reviewer).status_code == 403
    risk = support.staff(db, "risk_officer", program_id=club.program.id)
    full = client.get(identity, headers=risk)
    assert full.status_code == 200
    assert full.json()["id_number"] == VALID_ID and full.json()["phone"] == "13800138000"
    logged = db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.action, audit_entries.c.after)
            .where(audit_entries.c.target == f"member:{first}")
        ).all()
    )  # fmt: skip
    assert "members.pii" in [entry.action for entry in logged]
    assert all(VALID_ID not in json.dumps(entry.after) for entry in logged)
    assert all("13800138000" not in json.dumps(entry.after) for entry in logged)


def test_an_api_key_cannot_bind_a_members_phone_or_id_number(
    client: TestClient, db: Database
) -> None:
    """A till that could would bind its own phone to any member and sign in as it with a
    texted code."""
    club = Club(client, db)
    till = support.api_key(db, club.program.id, merchant="shop-B")
    registered = club.post(club.base, {"external_ref": "K1", "phone": "13900000001"}, till)
    assert registered.status_code == 201, registered.text  # registering with a phone: fine
    member_id = registered.json()["id"]
    # a till's key is refused for its scope; one over the whole programme for being a key
    everywhere = support.api_key(db, club.program.id)
    for phone in ("13612345678", "13900000001"):  # another number, or the same
        taken = club.put(
            club.url(member_id, "/identity"), {"id_number": VALID_ID, "phone": phone}, till
        )
        assert taken.status_code == 403 and taken.json()["code"] == "scope_too_narrow"
        taken = club.put(
            club.url(member_id, "/identity"), {"id_number": VALID_ID, "phone": phone}, everywhere
        )
        assert taken.status_code == 403 and taken.json()["code"] == "forbidden"
        assert "API key" in taken.json()["detail"]
    zh = club.put(
        club.url(member_id, "/identity"),
        {"id_number": VALID_ID, "phone": "13612345678"},
        {**everywhere, "Accept-Language": "zh-CN"},
    )
    assert "API 密钥" in zh.json()["detail"]
    profile = client.get(club.url(member_id), headers=club.operator).json()
    assert (profile["phone"], profile["id_number"]) == ("139****0001", None)


def test_a_new_phone_ends_the_members_other_sessions(client: TestClient, db: Database) -> None:
    club = Club(client, db)
    member_id = club.register("N1", phone="13900000001")["id"]
    identity = club.url(member_id, "/identity")
    phone, tablet = support.member(db, member_id), support.member(db, member_id)

    def signed_in(headers: dict[str, str]) -> bool:
        return client.get("/v1/auth/me", headers=headers).status_code == 200

    # bound again with the same phone: nobody is signed out
    assert club.put(identity, {"id_number": VALID_ID, "phone": "13900000001"}).status_code == 200
    assert signed_in(phone) and signed_in(tablet)
    # the member binds a new number from its phone: its tablet is signed out, not its phone
    own = club.put(identity, {"id_number": VALID_ID, "phone": "13900000002"}, phone)
    assert own.status_code == 200, own.text
    assert signed_in(phone) and not signed_in(tablet)
    # staff bind another: the member is signed out everywhere
    assert club.put(identity, {"id_number": VALID_ID, "phone": "13900000003"}).status_code == 200
    assert not signed_in(phone)


def texts_to_replaced_phones(db: Database, program_id: int) -> list[Any]:
    """The texts queued in the programme to numbers a binding replaced."""
    return db.run(
        lambda uow: uow.conn.execute(
            select(outbox).where(
                outbox.c.program_id == program_id, outbox.c.template == "member.phone_changed"
            )
        ).all(),
        read_only=True,
    )


def test_a_new_phone_is_texted_to_the_number_it_replaces(
    client: TestClient, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A member whose account was taken over learns that its sign-in phone moved."""
    caplog.set_level(logging.DEBUG)
    club = Club(client, db)
    member_id = club.register("T1", phone="13900000001")["id"]  # a first phone: no text
    identity = club.url(member_id, "/identity")
    assert club.put(identity, {"id_number": VALID_ID, "phone": "13900000001"}).status_code == 200
    assert texts_to_replaced_phones(db, club.program.id) == []  # the same number: no text
    moved = club.put(identity, {"id_number": VALID_ID, "phone": "+86 139 0000 0002"})
    assert moved.status_code == 200, moved.text
    (text,) = texts_to_replaced_phones(db, club.program.id)
    # to the old number, sent after commit by the outbox's sender, which reads the address
    assert (text.channel, text.status, text.recipient) == ("sms", "pending", "139****0001")
    assert decrypt(text.address_enc) == "13900000001"
    # the new number masked, the time in the programme's zone, what to do; in Chinese
    assert "139****0002" in text.body and "13900000002" not in text.body
    assert "13900000001" not in text.body
    assert "2026-01-01 09:00(Asia/Shanghai)" in text.body  # 01:00 UTC
    assert "如非本人操作,请立即联系客服冻结账户" in text.body
    # the audit entry shows both numbers masked, the logs neither in full
    (entry,) = db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.before, audit_entries.c.after).where(
                audit_entries.c.target == f"member:{member_id}",
                audit_entries.c.after["phone"].as_string() == "139****0002",
            )
        ).all()
    )
    assert entry.before["phone"] == "139****0001"
    assert "13900000001" not in json.dumps([entry.before, entry.after])
    assert "13900000001" not in caplog.text and "13900000002" not in caplog.text
    # the member changes it again from an English app: the text is in English
    own = support.member(db, member_id)
    again = club.put(
        identity, {"id_number": VALID_ID, "phone": "13900000003"}, {**own, "Accept-Language": "en"}
    )
    assert again.status_code == 200, again.text
    latest = texts_to_replaced_phones(db, club.program.id)[-1]
    assert latest.recipient == "139****0002" and decrypt(latest.address_enc) == "13900000002"
    assert "to 139****0003 at 2026-01-01 09:00 (Asia/Shanghai)" in latest.body
    assert "If this was not you" in latest.body


def test_a_first_binding_or_a_refused_change_texts_nobody(
    client: TestClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    club = Club(client, db)
    first, second = club.register("F1")["id"], club.register("F2")["id"]
    identity = club.url(first, "/identity")
    bound = club.put(identity, {"id_number": VALID_ID, "phone": "13900000001"})
    assert bound.status_code == 200, bound.text  # the member's first phone
    other = {"id_number": other_id_number(1001), "phone": "13900000002"}
    assert club.put(club.url(second, "/identity"), other).status_code == 200
    # the new number is another member's, or the ID number is: refused, nothing sent
    taken = club.put(identity, {"id_number": VALID_ID, "phone": "13900000002"})
    assert taken.status_code == 409, taken.text
    taken = club.put(identity, {"id_number": other_id_number(1001), "phone": "13900000009"})
    assert taken.status_code == 409, taken.text

    # a change that fails after the text was queued (here its audit entry) rolls it back too
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the audit log is unavailable")

    monkeypatch.setattr(audit_service, "record", broken)
    monkeypatch.setattr(audit_service, "entry_values", broken)  # sent with the stored answer
    with TestClient(create_app(db, api_settings()), raise_server_exceptions=False) as failing:
        lost = failing.put(
            identity,
            json={"id_number": VALID_ID, "phone": "13900000009"},
            headers={**club.operator, **support.key()},
        )
    assert lost.status_code == 500
    assert texts_to_replaced_phones(db, club.program.id) == []
    profile = client.get(club.url(first), headers=club.operator).json()
    assert profile["phone"] == "139****0001"


def test_concurrent_changes_of_a_phone_each_text_the_number_they_replace(pg: Database) -> None:
    """PostgreSQL: staff change one member's phone several times at once. Each change waits
    for the one before it, so the texts go down the chain of numbers, each number once,
    instead of every change texting the number it read before the others committed."""
    program = new_program(pg)
    operator = support.staff(pg, "operator", program_id=program.id)
    base = f"/v1/programs/{program.code}/members"
    with support.served(create_app(pg, api_settings())) as root, httpx.Client() as http:
        made = http.post(
            root + base,
            json={"external_ref": "C1", "phone": "13500000000"},
            headers={**operator, **support.key()},
        )
        assert made.status_code == 201, made.text
        identity = f"{root}{base}/{made.json()['id']}/identity"
        answers = run_together(
            4,
            lambda i: http.put(
                identity,
                json={"id_number": VALID_ID, "phone": f"1350000000{i + 1}"},
                headers={**operator, **support.key()},
            ),
        )
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    told = [decrypt(text.address_enc) for text in texts_to_replaced_phones(pg, program.id)]
    assert len(told) == 4 and len(set(told)) == 4 and "13500000000" in told


def test_an_api_key_sets_no_tags_and_a_birthday_only_while_none_is_set(
    client: TestClient, db: Database
) -> None:
    """Earning rules read both (vip, birthday month): any merchant's till could otherwise
    give any member of the programme a multiplier."""
    club = Club(client, db)
    member_id = club.register("T1")["id"]
    till = support.api_key(db, club.program.id, merchant="shop-B")

    def patch(body: dict[str, Any], headers: dict[str, str]) -> Any:
        return client.patch(club.url(member_id), json=body, headers={**headers, **support.key()})

    for tags in (["vip"], []):
        refused = patch({"tags": tags, "name": "Lu"}, till)
        assert refused.status_code == 403 and "tags" in refused.json()["detail"]
    # nor does a key register a member with tags (without any, it may)
    register = {**till, **support.key()}
    born_vip = client.post(
        club.base, json={"external_ref": "T2", "tags": ["vip"]}, headers=register
    )
    assert born_vip.status_code == 403 and "tags" in born_vip.json()["detail"]
    plain = client.post(club.base, json={"external_ref": "T2"}, headers={**till, **support.key()})
    assert plain.status_code == 201 and plain.json()["tags"] == []
    assert patch({"birthday": "1990-03-03", "name": "Lu"}, till).status_code == 200
    assert patch({"birthday": "1990-03-03", "region": "上海"}, till).status_code == 200
    moved = patch({"birthday": "1990-12-06"}, till)
    assert moved.status_code == 403 and "birthday" in moved.json()["detail"]
    assert patch({"birthday": "1990-12-06", "tags": ["vip"]}, club.operator).status_code == 200
    profile = client.get(club.url(member_id), headers=club.operator).json()
    assert (profile["name"], profile["region"], profile["birthday"], profile["tags"]) == (
        "Lu",
        "上海",
        "1990-12-06",
        ["vip"],
    )


def test_a_phone_or_id_number_in_other_digits_than_ascii_is_refused(
    client: TestClient, db: Database
) -> None:
    """Written in fullwidth digits, a number bound already would hash differently and be
    bound a second time."""
    club = Club(client, db)
    fullwidth = str.maketrans("0123456789", "０１２３４５６７８９")
    first = club.register("U1", phone="13800138000")["id"]
    assert (
        club.put(
            club.url(first, "/identity"), {"id_number": VALID_ID, "phone": "13800138000"}
        ).status_code
        == 200
    )
    again = club.post(
        club.base, {"external_ref": "U2", "phone": "13800138000".translate(fullwidth)}
    )
    assert again.status_code == 422 and again.json()["errors"][0]["field"] == "phone"
    second = club.register("U3")["id"]
    bound = club.put(
        club.url(second, "/identity"),
        {"id_number": VALID_ID[:17].translate(fullwidth) + "X", "phone": "13700137000"},
    )
    assert bound.status_code == 422 and bound.json()["errors"][0]["field"] == "id_number"
    assert "0-9" in bound.json()["errors"][0]["message"]


def test_a_birthday_or_an_id_numbers_birth_date_after_today_is_refused(
    client: TestClient, db: Database
) -> None:
    """Today is the programme's (Shanghai: 1 January 2026, 09:00); a member born today is
    welcome, one born tomorrow is a typing error, said on the field."""
    club = Club(client, db)
    tomorrow = club.post(club.base, {"external_ref": "B1", "birthday": "2026-01-02"})
    assert tomorrow.status_code == 422, tomorrow.text
    (error,) = tomorrow.json()["errors"]
    assert error["field"] == "birthday" and "after today" in error["message"]
    born_today = club.register("B2", birthday="2026-01-01")
    assert born_today["birthday"] == "2026-01-01"
    member_id = club.register("B3")["id"]
    later = club.client.patch(
        club.url(member_id), json={"birthday": "2099-05-01"},
        headers={**club.operator, **support.key()},
    )  # fmt: skip
    assert later.status_code == 422 and later.json()["errors"][0]["field"] == "birthday"
    first17 = "11010520260102001"  # born 2 January 2026
    future_id = club.put(
        club.url(member_id, "/identity"),
        {"id_number": first17 + id_check_digit(first17), "phone": "13500135000"},
    )
    assert future_id.status_code == 422, future_id.text
    assert future_id.json()["errors"][0]["field"] == "id_number"
    assert "after today" in future_id.json()["errors"][0]["message"]
    assert client.get(club.url(member_id), headers=club.operator).json()["birthday"] is None
    # in Los Angeles it is still 31 December 2025
    west = Club(client, db)
    west.program = new_program(db, time_zone="America/Los_Angeles")
    west.base = f"/v1/programs/{west.program.code}/members"
    west.operator = support.staff(db, "operator", program_id=west.program.id)
    early = west.post(west.base, {"external_ref": "W1", "birthday": "2026-01-01"})
    assert early.status_code == 422 and early.json()["errors"][0]["field"] == "birthday"


def test_control_characters_in_a_members_texts_are_refused_on_their_field(
    client: TestClient, db: Database
) -> None:
    """A terminal escape or a line break in a name, a region or a reference would reach
    every screen, receipt and export that shows it: refused, naming the character."""
    club = Club(client, db)
    for field, value in (
        ("external_ref", "C\x1b[2J1"),
        ("name", "Li\x07 Lei"),
        ("region", "北\r\n京"),
        ("name", "Li\x7fLei"),
        ("email", "li\x1b@example.cn"),
    ):
        body = {"external_ref": "C1", field: value}
        answer = club.post(club.base, body, {**club.operator, "Accept-Language": "en"})
        assert answer.status_code == 422, (field, answer.text)
        (error,) = answer.json()["errors"]
        assert error["field"] == f"body.{field}", error
    said = club.post(club.base, {"external_ref": "C1", "name": "Li\x07 Lei"}).json()
    assert "control character (U+0007)" in said["errors"][0]["message"]
    member_id = club.register("C1", name="李雷 Lei 😀")["id"]
    patched = client.patch(
        club.url(member_id), json={"name": "Lei\tLi"}, headers={**club.operator, **support.key()}
    )
    assert patched.status_code == 422 and patched.json()["errors"][0]["field"] == "body.name"
    assert client.get(club.url(member_id), headers=club.operator).json()["name"] == "李雷 Lei 😀"


def test_an_address_that_is_no_email_is_refused_saying_how_one_is_written(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    for value in ("wang.example.cn", "wang@example", "wang @example.cn"):
        for language, says in (("en", "name@example.com"), ("zh-CN", "电子邮箱")):
            answer = club.post(
                club.base, {"external_ref": "C1", "email": value},
                {**club.operator, "Accept-Language": language},
            )  # fmt: skip
            assert answer.status_code == 422, answer.text
            (error,) = answer.json()["errors"]
            assert error["field"] == "body.email" and says in error["message"], error
            assert "[^@" not in error["message"]
    assert club.register("C1", email="wang@example.cn")["email"] == "wang@example.cn"


def test_an_address_that_an_email_would_read_as_other_addresses_is_refused(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    member_id = club.register("E1", email="wang@example.cn")["id"]
    # an email's To field would read "li,boss@example.com" as li and boss@example.com
    for value in ("li,boss@example.com", "li;boss@example.com", "li@example.cn>",
                  '"li"@example.cn', "li@[10.0.0.1].cn"):  # fmt: skip
        for language, says in (("en", "none of , ;"), ("zh-CN", "也不含 , ;")):
            answer = club.post(
                club.base, {"external_ref": "E2", "email": value},
                {**club.operator, "Accept-Language": language},
            )  # fmt: skip
            assert answer.status_code == 422, value
            (error,) = answer.json()["errors"]
            assert error["field"] == "body.email" and says in error["message"], error
        changed = club.client.patch(
            club.url(member_id), json={"email": value},
            headers={**club.operator, **support.key()},
        )  # fmt: skip
        assert changed.status_code == 422, value
    shown = club.client.get(club.url(member_id), headers=club.operator).json()
    assert shown["email"] == "wang@example.cn"
    # an address in Chinese, or with a + tag, is still one
    for n, value in enumerate(("张三@例子.中国", "wang+jifen@mail.example.cn")):
        assert club.register(f"E{n + 3}", email=value)["email"] == value


def test_a_birthday_is_a_date_written_as_one_never_a_number(
    client: TestClient, db: Database
) -> None:
    """0 or "00000000" (how many systems write an unknown birthday) would be read as
    seconds since 1970 and make the member born on 1 January 1970, in line for January's
    birthday points; "19900102" is refused saying how to write it."""
    club = Club(client, db)
    for value in (0, "0", "00000000", "19900102", 631152000):
        answer = club.post(club.base, {"external_ref": "D1", "birthday": value})
        assert answer.status_code == 422, (value, answer.text)
        (error,) = answer.json()["errors"]
        assert error["field"] == "body.birthday" and "YYYY-MM-DD" in error["message"], error
    member_id = club.register("D1", birthday="1990-01-02")["id"]
    patched = client.patch(
        club.url(member_id), json={"birthday": 0}, headers={**club.operator, **support.key()}
    )
    assert patched.status_code == 422 and patched.json()["errors"][0]["field"] == "body.birthday"
    assert client.get(club.url(member_id), headers=club.operator).json()["birthday"] == "1990-01-02"


def test_a_member_sees_and_changes_only_itself(client: TestClient, db: Database) -> None:
    club = Club(client, db)
    mine, theirs = club.register("A1")["id"], club.register("A2")["id"]
    own = support.member(db, mine)
    assert client.get(club.url(mine), headers=own).status_code == 200
    assert client.get(club.url(theirs), headers=own).status_code == 403
    patched = client.patch(club.url(mine), json={"name": "me"}, headers={**own, **support.key()})
    assert patched.status_code == 200

    def patch(body: dict[str, Any], headers: dict[str, str]) -> int:
        return client.patch(
            club.url(mine), json=body, headers={**headers, **support.key()}
        ).status_code

    # What the earning rules read is not the member's to change at will: tags never, the
    # birthday once (staff correct it after).
    assert patch({"tags": ["vip"]}, own) == 403
    assert patch({"birthday": "1990-06-01"}, own) == 200
    assert patch({"birthday": "1990-12-01", "name": "me"}, own) == 403
    assert patch({"birthday": "1990-06-01", "tags": [], "name": "still me"}, own) == 200
    assert patch({"birthday": "1990-12-01", "tags": ["vip"]}, club.operator) == 200
    profile = client.get(club.url(mine), headers=own).json()
    assert (profile["name"], profile["birthday"], profile["tags"]) == (
        "still me",
        "1990-12-01",
        ["vip"],
    )
    other = client.patch(club.url(theirs), json={"name": "x"}, headers={**own, **support.key()})
    assert other.status_code == 403
    assert client.get(club.base, headers=own).status_code == 403  # no list of members
    state = club.post(club.url(mine, "/state"), {"state": "closed", "reason": "x"}, headers=own)
    assert state.status_code == 403


def test_family_groups_show_balances_to_the_main_account_only(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    main, kid, gran, stranger = (club.register(f"F{n}")["id"] for n in range(4))
    club.post(club.url(kid, "/points/earn"), {"amount": 70})
    # a member cannot link another member by itself
    own = support.member(db, main)
    assert club.put(club.url(main, f"/family/members/{stranger}"), headers=own).status_code == 403
    # staff link two members to the main account
    for member_id in (kid, gran):
        linked = club.put(club.url(main, f"/family/members/{member_id}"))
        assert linked.status_code == 200, linked.text
    group = client.get(club.url(main, "/family"), headers=own).json()
    assert group["main_member_id"] == main
    assert [m["member_id"] for m in group["members"]] == [main, kid, gran]
    assert {m["member_id"]: m["points"]["balance"] for m in group["members"]}[kid] == 70
    # another member of the group sees who is in it, not their points
    seen_by_kid = client.get(club.url(kid, "/family"), headers=support.member(db, kid)).json()
    assert [m["points"] for m in seen_by_kid["members"]] == [None, None, None]
    # a member of one group cannot join another, nor be a main elsewhere
    assert club.put(club.url(stranger, f"/family/members/{kid}")).status_code == 409
    assert club.put(club.url(kid, f"/family/members/{stranger}")).status_code == 409
    # the kid leaves by itself; when the main leaves, the group dissolves
    left = client.delete(
        club.url(kid, "/family"), headers={**support.member(db, kid), **support.key()}
    )
    assert left.status_code == 200
    assert client.get(club.url(kid, "/family"), headers=club.operator).json()["members"] == []
    assert (
        client.delete(club.url(main, "/family"), headers={**own, **support.key()}).status_code
        == 200
    )
    assert client.get(club.url(gran, "/family"), headers=club.operator).json()["members"] == []


def test_adding_a_member_to_the_group_it_is_in_again_answers_the_group_unchanged(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    main, *others = (club.register(f"G{n}")["id"] for n in range(8))
    for member_id in others:
        assert club.put(club.url(main, f"/family/members/{member_id}")).status_code == 200
    # given a full group of eight, when staff add one of its members again (a new request,
    # not a replay), then the group is answered as it is: no conflict, nobody twice
    again = club.put(club.url(main, f"/family/members/{others[0]}"))
    assert again.status_code == 200, again.text
    assert [m["member_id"] for m in again.json()["members"]] == [main, *others]
    # a ninth member is still refused, and so is a member of the group made a main
    ninth = club.register("G8")["id"]
    assert club.put(club.url(main, f"/family/members/{ninth}")).status_code == 409
    assert club.put(club.url(others[0], f"/family/members/{ninth}")).status_code == 409


def test_family_balances_are_shown_only_to_callers_that_may_read_points(
    client: TestClient, db: Database
) -> None:
    """``members.read`` shows who is in a group, not their points: a caller refused
    ``/points`` gets the group without them (as a member that is not the main account)."""
    club = Club(client, db)
    main, kid = club.register("G1")["id"], club.register("G2")["id"]
    club.post(club.url(kid, "/points/earn"), {"amount": 777})
    linker = support.api_key(db, club.program.id, permissions=["members.family"])
    linked = club.put(club.url(main, f"/family/members/{kid}"), headers=linker)
    assert linked.status_code == 200, linked.text
    assert [m["points"] for m in linked.json()["members"]] == [None, None]
    crm = support.api_key(db, club.program.id, permissions=["members.read"])
    assert client.get(club.url(kid, "/points"), headers=crm).status_code == 403
    seen = client.get(club.url(kid, "/family"), headers=crm)
    assert seen.status_code == 200
    assert [(m["member_id"], m["points"]) for m in seen.json()["members"]] == [
        (main, None),
        (kid, None),
    ]
    till = support.api_key(db, club.program.id, permissions=["members.read", "points.read"])
    shown = client.get(club.url(kid, "/family"), headers=till).json()
    assert [m["points"]["balance"] for m in shown["members"]] == [0, 777]


def test_concurrent_duplicates_get_the_answer_a_later_duplicate_gets(pg: Database) -> None:
    """PostgreSQL: tills registering one customer at once (its reference or its phone), or
    binding one ID number to two members at once. The losers used to hit the unique index
    and get 500; each gets 409, or the winner's answer replayed under its own key."""
    program = new_program(pg)
    operator = support.staff(pg, "operator", program_id=program.id)
    base = f"/v1/programs/{program.code}/members"
    with support.served(create_app(pg, api_settings())) as root, httpx.Client() as http:

        def send(method: str, url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
            keys = [support.key() for _ in bodies]
            keys[1] = keys[0]  # a client's retry of one request, sent twice at once
            return run_together(
                len(bodies),
                lambda i: http.request(
                    method, root + url, json=bodies[i], headers={**operator, **keys[i]}
                ),
            )

        def assert_one_won(answers: list[httpx.Response], status: int) -> None:
            assert {a.status_code for a in answers} <= {status, 409}, [a.text for a in answers]
            assert len({a.text for a in answers if a.status_code == status}) == 1
            assert {a.json()["code"] for a in answers if a.status_code == 409} <= {
                "duplicate_reference"
            }
            assert (answers[0].status_code, answers[0].text) == (
                answers[1].status_code,
                answers[1].text,
            )

        for round_ in range(12):  # the twins' timing varies: several rounds meet its windows
            assert_one_won(send("POST", base, [{"external_ref": f"DUP{round_}"}] * 6), 201)
        phones = [{"external_ref": f"P{i}", "phone": "13700001111"} for i in range(6)]
        phones[1] = phones[0]
        assert_one_won(send("POST", base, phones), 201)
        ids = new_members(pg, program.id, 6)
        binds = [{"id_number": VALID_ID, "phone": f"1360000000{i}"} for i in range(6)]
        answers = run_together(
            6,
            lambda i: http.put(
                f"{root}{base}/{ids[i]}/identity",
                json=binds[i],
                headers={**operator, **support.key()},
            ),
        )
        assert sorted(a.status_code for a in answers) == [200, 409, 409, 409, 409, 409]
    count = pg.run(
        lambda uow: uow.conn.execute(
            select(func.count()).where(members.c.program_id == program.id)
        ).scalar_one()
    )
    assert count == 12 + 1 + 6


def _close(club: Club, member_id: int, key: dict[str, str], **headers: str) -> Any:
    return club.client.post(
        club.url(member_id, "/state"), json={"state": "closed", "reason": "asked to leave"},
        headers={**club.operator, **key, **headers},
    )  # fmt: skip


def _postings(db: Database, program_id: int) -> int:
    counts = db.run(lambda uow: points_service.posting_counts(uow, program_id=program_id))
    return sum(counts.values())


def _holding_100(club: Club, ref: str) -> tuple[dict[str, Any], str]:
    """A new member who earned 100 points, and the URL of its points."""
    member = club.register(ref)
    points_url = club.url(member["id"], "/points")
    assert club.post(f"{points_url}/earn", {"amount": 100}).status_code == 201
    return member, points_url


def test_closing_forfeits_the_points_once_and_the_audit_entry_says_what(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)
    member, points_url = _holding_100(club, "X1")
    pending = {"amount": 40, "available_at": "2099-01-01T00:00:00Z"}
    assert club.post(f"{points_url}/earn", pending).status_code == 201
    posted = _postings(db, club.program.id)
    key = support.key()
    closed = _close(club, member["id"], key)
    assert closed.status_code == 200 and closed.json()["state"] == "closed"
    summary = client.get(points_url, headers=club.operator).json()
    assert (summary["balance"], summary["available"], summary["pending"]) == (0, 0, 0)
    history = client.get(f"{points_url}/history", headers=club.operator).json()["items"]
    settlement = history[0]
    assert (settlement["kind"], settlement["change"]) == ("expire", -140)
    assert settlement["reason"] == "account closed: its points are forfeited 账户已注销,积分作废"
    assert settlement["actor"].startswith("staff:operator")
    assert _postings(db, club.program.id) == posted + 1
    assert_ledger_sound(db, club.program.id)
    # the audit entry of the close carries what was settled
    entry = db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.before, audit_entries.c.after)
            .where(audit_entries.c.target == f"member:{member['id']}",
                   audit_entries.c.action == "members.state")
        ).one()
    )  # fmt: skip
    assert entry.before == {"state": "active"} and entry.after["state"] == "closed"
    assert entry.after["settlement"] == {
        "policy": "forfeit", "forfeited": 140, "available": 100, "pending": 40, "overdue": 0,
        "posting_id": settlement["posting_id"], "debt_left": 0,
    }  # fmt: skip
    # the same request again is answered as before, and changes nothing more
    again = _close(club, member["id"], key)
    assert again.status_code == 200 and again.json() == closed.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert _postings(db, club.program.id) == posted + 1
    # a closed member earns nothing
    refused = club.post(f"{points_url}/earn", {"amount": 10})
    assert refused.status_code == 409 and refused.json()["code"] == "state_conflict"
    assert client.get(points_url, headers=club.operator).json()["balance"] == 0
    assert_ledger_sound(db, club.program.id)


def test_closing_is_refused_while_the_member_holds_points_under_refuse(
    client: TestClient, db: Database
) -> None:
    club = Club(client, db)

    def refuse(uow: Any) -> None:
        settings = programs_service.get_settings(uow, program_id=club.program.id)
        programs_service.set_settings(
            uow, program_id=club.program.id,
            settings=settings.model_copy(update={"closing_policy": "refuse"}),
        )  # fmt: skip

    db.run(refuse)
    member, points_url = _holding_100(club, "X2")
    posted = _postings(db, club.program.id)
    refused = _close(club, member["id"], support.key())
    assert refused.status_code == 409 and refused.json()["code"] == "state_conflict"
    assert "still holds 100 points" in refused.json()["detail"]
    in_chinese = _close(club, member["id"], support.key(), **{"Accept-Language": "zh-CN"})
    assert in_chinese.status_code == 409 and "仍有 100 积分" in in_chinese.json()["detail"]
    assert client.get(club.url(member["id"]), headers=club.operator).json()["state"] == "active"
    assert client.get(points_url, headers=club.operator).json()["balance"] == 100
    assert _postings(db, club.program.id) == posted
    # a refusal leaves no audit entry
    assert not db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.id).where(audit_entries.c.action == "members.state",
                                             audit_entries.c.target == f"member:{member['id']}")
        ).first()
    )  # fmt: skip
    assert_ledger_sound(db, club.program.id)


def test_a_member_chooses_the_language_of_its_messages(client: TestClient, db: Database) -> None:
    club = Club(client, db)
    wang = club.register("L1")
    smith = club.register("L2", language="en")
    assert (wang["language"], smith["language"]) == (None, "en")
    # a language jifen does not write is refused, saying which it writes
    bad = club.post(club.base, {"external_ref": "L3", "language": "fr"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "body.language"
    assert "'zh' or 'en'" in bad.json()["errors"][0]["message"]
    # the member may change it itself; null goes back to jifen's default (Chinese)
    own = support.member(db, wang["id"])
    changed = client.patch(
        club.url(wang["id"]), json={"language": "en"}, headers={**own, **support.key()}
    )
    assert changed.status_code == 200 and changed.json()["language"] == "en"

    def note(member_id: int, key: str) -> None:
        db.run(
            lambda uow: notify_service.notify(
                uow,
                notify_service.Notification(
                    program_id=club.program.id, member_id=member_id, template="tier.changed",
                    data={"tier": "金卡", "previous_tier": "银卡"}, key=key,
                ),
            )
        )  # fmt: skip

    note(wang["id"], "w1")
    back = client.patch(
        club.url(wang["id"]), json={"language": None}, headers={**own, **support.key()}
    )
    assert back.json()["language"] is None
    note(wang["id"], "w2")
    note(smith["id"], "s1")
    titles = {
        row.dedupe_key: row.subject
        for row in db.run(
            lambda uow: uow.conn.execute(
                select(outbox.c.dedupe_key, outbox.c.subject).where(
                    outbox.c.program_id == club.program.id
                )
            ).all()
        )
    }
    assert titles == {
        "w1": "Your membership tier is now 金卡",
        "w2": "您的会员等级已变为 金卡",
        "s1": "Your membership tier is now 金卡",
    }
