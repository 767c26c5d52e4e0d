"""A member's personal data over HTTP: its export (the member itself, or staff holding
``members.pii``) and its erasure once the account is closed (``members.erase``)."""

from __future__ import annotations

import json
import uuid
from datetime import date
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import JSON, Date, String, Text, func, select, update

from jifen import crypto
from jifen.audit import service as audit_service
from jifen.audit.models import audit_entries
from jifen.auth.models import member_credentials, one_time_codes, sessions
from jifen.db.base import metadata
from jifen.db.uow import Database
from jifen.events.models import events
from jifen.events.schemas import EventIn
from jifen.events.service import SEALED_FINGERPRINT
from jifen.members import core as members_core
from jifen.members import service as members_service
from jifen.members.api import NOT_STORED
from jifen.members.models import members
from jifen.notify import service as notify_service
from jifen.notify.models import inbox_messages, outbox
from jifen.points import service as points
from jifen.rewards import service as rewards_service
from jifen.rewards.schemas import RedemptionCreate, RewardCreate
from tests.api import support
from tests.api.test_members import Club
from tests.events.test_fingerprints import unkeyed
from tests.factories import assert_ledger_sound

ID_NUMBER = "11010519491231002X"
PHONE = "13800138000"
NEW_PHONE = "13700137000"


class Shop(Club):
    """A programme, its operator and risk officer, and a member with every kind of personal
    data jifen holds: profile, tags, bound numbers (one replaced, so a text went to the old
    one), a family link, a password, a sign-in code, messages and points."""

    def __init__(self, client: TestClient, db: Database) -> None:
        super().__init__(client, db)
        self.risk = support.staff(db, "risk_officer", program_id=self.program.id)
        self.member = int(self.register("P1", name="李雷", email="li.lei@example.cn",
                                        birthday="1988-02-29", gender="male", region="北京",
                                        tags=["vip"], phone="13900139000")["id"])  # fmt: skip
        self.other = int(self.register("P2", name="韩梅梅")["id"])
        for phone in (PHONE, NEW_PHONE):  # the second binding texts the first number
            bound = self.put(
                self.url(self.member, "/identity"), {"id_number": ID_NUMBER, "phone": phone}
            )
            self.ok(bound)
        self.ok(self.put(self.url(self.member, f"/family/members/{self.other}")))
        self.ok(
            self.put(self.url(self.member, "/password"), {"new_password": "a long pass phrase 1"})
        )
        sent = client.post(
            "/v1/auth/members/codes", json={"program": self.program.code, "phone": NEW_PHONE}
        )
        assert sent.status_code == 202, sent.text
        db.run(lambda uow: points.earn(uow, member_id=self.member, amount=300, key="pd-earn"))
        db.run(
            lambda uow: notify_service.notify(
                uow,
                notify_service.Notification(
                    program_id=self.program.id, member_id=self.member,
                    template="points.earned", data={"points": 300, "balance": 300},
                    key=f"pd-earned:{self.member}", channels=("inbox", "email"),
                ),
            )
        )  # fmt: skip

    @staticmethod
    def ok(answer: Any) -> dict[str, Any]:
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def export(self, headers: dict[str, str], member_id: int | None = None) -> Any:
        return self.client.get(
            self.url(member_id or self.member, "/personal-data"), headers=headers
        )

    def erase(self, headers: dict[str, str], **extra: str) -> Any:
        return self.client.post(
            self.url(self.member, "/personal-data/erase"), headers={**headers, **extra}
        )

    def close(self) -> None:
        self.ok(self.post(self.url(self.member, "/state"), {"state": "closed", "reason": "asked"}))

    def audited(self) -> list[Any]:
        return self.db.run(
            lambda uow: uow.conn.execute(
                select(audit_entries.c.action, audit_entries.c.actor, audit_entries.c.after)
                .where(audit_entries.c.target == f"member:{self.member}")
                .order_by(audit_entries.c.id)
            ).all()
        )  # fmt: skip


def test_the_member_and_pii_staff_export_it_in_full_and_no_one_else_may(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    # the member itself reads everything held about it
    own = shop.export(support.member(db, shop.member))
    data = shop.ok(own)
    assert data["member_id"] == shop.member and data["erased"] is False
    profile = data["profile"]
    assert (profile["external_ref"], profile["name"], profile["email"]) == (
        "P1", "李雷", "li.lei@example.cn",
    )  # fmt: skip
    assert (profile["birthday"], profile["gender"], profile["region"], profile["tags"]) == (
        "1988-02-29", "male", "北京", ["vip"],
    )  # fmt: skip
    assert data["identity"]["phone"] == NEW_PHONE and data["identity"]["id_number"] == ID_NUMBER
    assert data["identity"]["verified_at"]
    assert data["family"] == {"main_member_id": shop.member, "member_ids": sorted(
        [shop.member, shop.other])}  # fmt: skip
    assert data["sign_in"]["password_set"] is True and data["sign_in"]["active_sessions"] >= 1
    # the answers stored for replays of the writes about it: its registration, its two
    # bindings, the family link it is the main account of and its password
    assert data["stored_answers"] == 5
    # the messages: the email and inbox note, the sign-in code, and the text to the number
    # that the second binding replaced; addresses masked, never in full
    sent = {(m["channel"], m["template"], m["recipient"]) for m in data["notifications"]}
    assert ("email", "points.earned", "l****@example.cn") in sent
    assert ("inbox", "points.earned", f"member:{shop.member}") in sent
    assert ("sms", "sign_in_code", "137****7000") in sent
    assert ("sms", "member.phone_changed", "138****8000") in sent
    assert "li.lei@example.cn" not in json.dumps(data["notifications"])
    # the points: the balance, and the history behind a link that reads
    assert data["points"]["summary"]["balance"] == 300
    history = client.get(data["points"]["history"], headers=support.member(db, shop.member))
    assert history.status_code == 200 and history.json()["items"]
    # staff holding members.pii read the same; each read is audited without the data
    staff = shop.ok(shop.export(shop.risk))
    assert staff["identity"] == data["identity"] and staff["profile"] == data["profile"]
    exports = [entry for entry in shop.audited() if entry.action == "members.export"]
    assert len(exports) == 1 and exports[0].actor.startswith("staff:")
    assert exports[0].after == {"exported": True}
    # another member, staff without members.pii and an API key are refused
    assert shop.export(support.member(db, shop.other)).status_code == 403
    assert shop.export(shop.operator).status_code == 403
    assert shop.export(support.api_key(db, shop.program.id)).status_code == 403
    # the other member reads its own
    assert shop.export(support.member(db, shop.other), shop.other).status_code == 200


def test_an_active_member_is_not_erased(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    refused = shop.erase(shop.risk, **support.key())
    assert refused.status_code == 409 and refused.json()["code"] == "state_conflict"
    assert "closed" in refused.json()["detail"] and "sign-in" in refused.json()["detail"]
    zh = shop.erase(shop.risk, **support.key(), **{"Accept-Language": "zh-CN"})
    assert zh.status_code == 409 and "注销" in zh.json()["detail"]
    # staff without members.erase may not, closed or not
    assert shop.erase(shop.operator, **support.key()).status_code == 403
    assert shop.ok(shop.export(shop.risk))["profile"]["name"] == "李雷"


def test_no_registration_takes_the_reference_an_erasure_gives(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    taken = shop.post(shop.base, {"external_ref": f"erased:{shop.other + 1}"})
    assert taken.status_code == 422 and "erased" in taken.json()["errors"][0]["message"]


def test_erasing_a_closed_member_clears_its_personal_data_and_keeps_its_ledger(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    db.run(lambda uow: points.spend(uow, member_id=shop.member, amount=100, key="pd-spend"))
    shop.close()
    # when a risk officer erases it
    key = support.key()
    erased = shop.erase(shop.risk, **key)
    answer = shop.ok(erased)
    assert answer["member_id"] == shop.member and answer["erased"] is True
    assert answer["state"] == "closed" and answer["erased_at"]
    # then the row holds no personal field
    row = db.run(
        lambda uow: uow.conn.execute(select(members).where(members.c.id == shop.member)).one()
    )
    assert row.external_ref == f"erased:{shop.member}" and row.name == "" and row.tags == []
    for column in ("email", "birthday", "gender", "region", "phone_hash", "phone_enc",
                   "id_number_hash", "id_number_enc", "verified_at", "family_main_id"):  # fmt: skip
        assert row._mapping[column] is None, column
    assert row.state == "closed"
    # its phone finds it no more, so no sign-in code goes to it
    found = db.run(
        lambda uow: members_service.find_by_phone(uow, program_id=shop.program.id, phone=NEW_PHONE)
    )
    assert found is None
    asked = client.post(
        "/v1/auth/members/codes", json={"program": shop.program.code, "phone": NEW_PHONE}
    )
    assert asked.status_code == 202

    def count(uow: Any, table: Any, *where: Any) -> int:
        return int(uow.conn.execute(select(func.count()).select_from(table).where(*where)).scalar())

    left = db.run(
        lambda uow: (
            count(uow, member_credentials, member_credentials.c.member_id == shop.member),
            count(uow, one_time_codes, one_time_codes.c.member_id == shop.member),
            count(uow, sessions, sessions.c.subject == "member",
                  sessions.c.subject_id == shop.member, sessions.c.revoked_at.is_(None)),
            count(uow, inbox_messages, inbox_messages.c.member_id == shop.member),
        )
    )  # fmt: skip
    assert left == (0, 0, 0, 0)
    # the messages keep channel, template and times only
    messages = db.run(
        lambda uow: uow.conn.execute(
            select(outbox).where(
                outbox.c.program_id == shop.program.id, outbox.c.channel != "webhook"
            )
        ).all()
    )
    assert {m.template for m in messages} >= {"points.earned", "sign_in_code",
                                             "member.phone_changed"}  # fmt: skip
    for message in messages:
        if message.member_id == shop.member or message.template == "member.phone_changed":
            assert (message.recipient, message.address_enc, message.body, message.subject) == (
                "(erased)", None, "", None,
            )  # fmt: skip
            assert message.status in ("sent", "dead")
    # the family group is gone: its other member is in none
    family = client.get(shop.url(shop.other, "/family"), headers=shop.operator).json()
    assert family["main_member_id"] is None
    # the ledger and the audit log are untouched and verify clean; the points still read
    assert_ledger_sound(db, shop.program.id)
    assert db.run(audit_service.verify, read_only=True) == []
    # (closing forfeited them, under the programme's default closing policy)
    balance = client.get(shop.url(shop.member, "/points"), headers=shop.operator)
    assert balance.status_code == 200 and balance.json()["balance"] == 0
    history = client.get(shop.url(shop.member, "/points/history"), headers=shop.operator)
    assert history.status_code == 200
    assert [item["kind"] for item in history.json()["items"]].count("expire") == 1
    assert len(history.json()["items"]) == 3
    # the erasure is audited: who and when, no personal data
    (entry,) = [entry for entry in shop.audited() if entry.action == "members.erase"]
    assert entry.actor.startswith("staff:") and entry.after == answer
    # the same request again replays; a new one changes nothing and answers the same
    replay = shop.erase(shop.risk, **key)
    assert replay.json() == answer and replay.headers.get("Idempotent-Replayed") == "true"
    assert shop.ok(shop.erase(shop.risk, **support.key())) == answer
    # and the export shows what is left
    data = shop.ok(shop.export(shop.risk))
    assert data["erased"] is True
    assert data["profile"]["external_ref"] == f"erased:{shop.member}"
    assert data["profile"]["name"] == "" and data["profile"]["email"] is None
    assert data["identity"] == {"phone": None, "id_number": None, "verified_at": None}
    assert data["family"] == {"main_member_id": None, "member_ids": []}
    assert data["sign_in"] == {"password_set": False, "active_sessions": 0}
    assert data["stored_answers"] == 0  # erased with the rest
    assert {m["recipient"] for m in data["notifications"]} == {"(erased)"}
    assert data["points"]["summary"]["balance"] == 0  # forfeited at closing
    text = json.dumps(data, ensure_ascii=False)
    for personal in (
        "李雷",
        "li.lei",
        "1988-02-29",
        "北京",
        "vip",
        "P1",
        NEW_PHONE,
        PHONE,
        "137****7000",
        "138****8000",
        ID_NUMBER,
        "1101**********002X",
    ):
        assert personal not in text, personal
    # nor does the audit log, which erasure cannot touch, hold any of it in clear: member
    # writes are audited with their personal fields as set or not (the masked phone and ID
    # number aside)
    logged = db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.target, audit_entries.c.before, audit_entries.c.after).where(
                audit_entries.c.program_id == shop.program.id
            )
        ).all()
    )
    logged_text = json.dumps([list(entry) for entry in logged], ensure_ascii=False, default=str)
    for personal in ("李雷", "li.lei", "1988-02-29", "北京", "vip", NEW_PHONE, PHONE, ID_NUMBER):
        assert personal not in logged_text, personal


# --------------------------------------------------------------------------- every copy


def _values(token: str) -> dict[str, str]:
    """Personal values no other test uses (the database is shared by the whole run), so
    that finding one anywhere means it is this member's."""
    digits = str(int(token, 16) % 10**8).zfill(8)
    first17 = f"3101151953071{digits[:4]}"
    return {
        "ref": f"card-{token}",
        "name": f"韩{token}",
        "new_name": f"韩新{token}",
        "email": f"han.{token}@example.cn",
        "new_email": f"mei.{token}@example.org",
        "birthday": "1931-03-17",
        "region": f"区{token}",
        "tag": f"t{token}",
        "phone": f"139{digits}",
        "new_phone": f"136{digits}",
        "id_number": first17 + members_core.id_check_digit(first17),
        "partner": f"MU-{token}",
    }


def _redeemed_and_noted(db: Database, program_id: int, member: int, values: dict[str, str]) -> None:
    """The member exchanges 10 points for a mile on its airline account (``values``'s
    partner account), and redeems a mug that staff cancel with a note naming it."""

    def redeem(uow: Any, code: str, **fields: Any) -> Any:
        body = RedemptionCreate.model_validate({"reward": code, **fields})
        return rewards_service.redeem(uow, program_id=program_id, member_id=member, body=body,
                                      key=f"{code}-order", actor=f"member:{member}")  # fmt: skip

    def shop(uow: Any) -> None:
        for code, kind, extra in (
            (f"miles-{member}", "partner", {"partner": {"partner": "东航", "unit": "公里",
                                                       "units": 1}}),
            (f"mug-{member}", "physical", {}),
        ):  # fmt: skip
            body = RewardCreate.model_validate({
                "code": code, "kind": kind, "name": {"zh": code, "en": code}, "points": 10,
                **extra,
            })  # fmt: skip
            rewards_service.create_reward(uow, program_id=program_id, body=body)
        redeem(uow, f"miles-{member}", partner_account=values["partner"])
        mug = redeem(uow, f"mug-{member}")
        rewards_service.move(
            uow, program_id=program_id, order_id=mug.id, action="cancel", actor="staff:1",
            note=f"{values['new_name']} called from {values['new_phone']}: does not want it",
        )  # fmt: skip

    db.run(shop)


def _sweep(db: Database, values: dict[str, str]) -> list[str]:
    """Where any of ``values`` is found in the whole database: every text and JSON column
    of every table (JSON read back and written out again, so escaped text is found too),
    every ciphertext (``*_enc``) decrypted, and every date column compared with the
    birthday. Each finding as ``table.column: value``."""
    wanted = set(values.values())
    birthday = date.fromisoformat(values["birthday"])
    found: list[str] = []

    def read(uow: Any) -> None:
        for table in metadata.sorted_tables:
            columns = [c for c in table.columns
                       if isinstance(c.type, (String, Text, JSON, Date))]  # fmt: skip
            if not columns:
                continue
            for row in uow.conn.execute(select(*columns)):
                for column, value in zip(columns, row, strict=True):
                    if value is None:
                        continue
                    if isinstance(column.type, Date) and not isinstance(value, str):
                        hit = value == birthday
                        text = str(value)
                    else:
                        if column.name.endswith("_enc"):
                            value = crypto.decrypt(value)
                        if not isinstance(value, str):
                            value = json.dumps(value, ensure_ascii=False, default=str)
                        text = value
                        hit = any(personal in text for personal in wanted)
                    if hit:
                        found.append(f"{table.name}.{column.name}: {text[:300]}")

    db.run(read, read_only=True)
    return found


def test_erasure_leaves_no_copy_of_the_personal_data_in_any_table(
    client: TestClient, db: Database
) -> None:
    # a member registered, changed and bound through the API, each write under a key, so
    # that its answer is stored for replays; linked into another member's family, sent a
    # sign-in code and a points email, named by its reference in an event
    club = Club(client, db)
    risk = support.staff(db, "risk_officer", program_id=club.program.id)
    values = _values(uuid.uuid4().hex[:8])
    writes: dict[str, tuple[str, str, dict[str, Any]]] = {}

    def write(name: str, method: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {**club.operator, **support.key()}
        answer = client.request(method, url, json=body, headers=headers)
        assert answer.status_code in (200, 201), answer.text
        writes[name] = (method, url, {"body": body, "headers": headers})
        result: dict[str, Any] = answer.json()
        return result

    member = int(write("register", "POST", club.base, {
        "external_ref": values["ref"], "name": values["name"], "email": values["email"],
        "birthday": values["birthday"], "gender": "female", "region": values["region"],
        "tags": [values["tag"]], "phone": values["phone"],
    })["id"])  # fmt: skip
    write("update", "PATCH", club.url(member),
          {"name": values["new_name"], "email": values["new_email"]})  # fmt: skip
    write("bind", "PUT", club.url(member, "/identity"),
          {"id_number": values["id_number"], "phone": values["new_phone"]})  # fmt: skip
    main = int(club.register(f"main-{uuid.uuid4().hex[:8]}", name="主账户")["id"])
    write("family", "PUT", club.url(main, f"/family/members/{member}"), {})
    sent = client.post(
        "/v1/auth/members/codes", json={"program": club.program.code, "phone": values["new_phone"]}
    )
    assert sent.status_code == 202, sent.text
    write("event", "POST", f"/v1/programs/{club.program.code}/events", {
        "source": "pos", "external_id": f"e-{member}", "type": "member.checked_in",
        "occurred_at": "2026-01-01T00:30:00Z", "member_ref": values["ref"],
    })  # fmt: skip
    # a programme's own event type may carry personal data: the merchant's, not jifen's
    fields = {"contact": {"type": "string"}, "phone": {"type": "integer"},
              "note": {"type": "string"}, "visits": {"type": "integer"}}  # fmt: skip
    declared = client.put(
        f"/v1/programs/{club.program.code}/event-types/custom.visit",
        json={"fields": fields}, headers={**club.operator, **support.key()},
    )  # fmt: skip
    assert declared.status_code == 200, declared.text
    visit = {"contact": values["new_name"], "phone": int(values["new_phone"]),
             "note": f"met {values['new_email']} at the door", "visits": 3}  # fmt: skip
    write("custom", "POST", f"/v1/programs/{club.program.code}/events", {
        "source": "crm", "external_id": f"v-{member}", "type": "custom.visit",
        "occurred_at": "2026-01-01T00:40:00Z", "member_id": member, "payload": visit,
    })  # fmt: skip
    db.run(lambda uow: points.earn(uow, member_id=member, amount=50, key=f"sweep:{member}"))
    # its miles sent to its airline account, and a mug cancelled with a note naming it
    _redeemed_and_noted(db, club.program.id, member, values)
    db.run(
        lambda uow: notify_service.notify(
            uow,
            notify_service.Notification(
                program_id=club.program.id, member_id=member, template="points.earned",
                data={"points": 50, "balance": 50}, key=f"sweep-earned:{member}",
                channels=("inbox", "email", "sms"),
            ),
        )
    )  # fmt: skip
    write("close", "POST", club.url(member, "/state"), {"state": "closed", "reason": "asked"})
    # the sweep finds the values before the erasure (so it would find them after)
    before = _sweep(db, values)
    assert any(f.startswith("idempotency_records.body") for f in before), before
    assert any(f.startswith("members.") for f in before), before
    # when the member's data is erased
    erased = client.post(
        club.url(member, "/personal-data/erase"), headers={**risk, **support.key()}
    )
    assert erased.status_code == 200, erased.text
    # then no table holds any of it, in clear or encrypted
    left = _sweep(db, values)
    assert left == [], "\n".join(left)
    # the custom event keeps what is not personal
    payload = db.run(
        lambda uow: uow.conn.execute(
            select(events.c.payload).where(events.c.external_id == f"v-{member}")
        ).scalar_one()
    )
    assert payload == {"contact": "(erased)", "phone": "(erased)", "note": "(erased)",
                       "visits": 3}  # fmt: skip
    # the orders keep what is not personal
    orders = {o.reward: o for o in db.run(lambda uow: rewards_service.list_orders(
        uow, program_id=club.program.id, member_id=member, state=None, after_id=None,
        limit=10)[0])}  # fmt: skip
    miles, mug = orders[f"miles-{member}"], orders[f"mug-{member}"]
    assert miles.outcome["partner_account"] == "(erased)" and miles.outcome["units"] == 1
    assert [(step.state, step.note) for step in mug.steps][-1] == ("cancelled", "(erased)")
    assert mug.state == "cancelled" and mug.points == 10
    # and a replay of each earlier write answers without it, and does not run it again
    for name, (method, url, sent_before) in writes.items():
        replay = client.request(method, url, json=sent_before["body"],
                                headers=sent_before["headers"])  # fmt: skip
        text = replay.text
        for personal in values.values():
            assert personal not in text, (name, personal, text)
        if name == "family":  # the main account's write: stored without the member's data
            assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
            (entry,) = [m for m in replay.json()["members"] if m["member_id"] == member]
            assert entry["name"] == entry["external_ref"] == NOT_STORED
            continue
        # the others were about the member: carried out, their answers gone with its data
        assert replay.status_code == 410, (name, text)
        problem = replay.json()
        assert problem["code"] == "answer_erased" and str(member) in problem["detail"]
    zh = client.request(
        "PATCH", writes["update"][1], json=writes["update"][2]["body"],
        headers={**writes["update"][2]["headers"], "Accept-Language": "zh-CN"},
    )  # fmt: skip
    assert zh.status_code == 410 and "已随会员" in zh.json()["detail"]
    # the same key with another request is still refused as such
    other = client.request(
        "PATCH", writes["update"][1], json={"name": "x"}, headers=writes["update"][2]["headers"]
    )
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"
    # the registration was not run again: the reference is free, yet no member holds it
    in_program = select(func.count()).where(members.c.program_id == club.program.id)
    assert db.run(lambda uow: uow.conn.execute(in_program).scalar_one()) == 2
    assert _sweep(db, values) == []


def test_erasure_leaves_no_fingerprint_of_the_member_s_events_to_test_guesses_against(
    client: TestClient, db: Database
) -> None:
    # given a member known by its phone number, with two orders sent naming it so, one of
    # them stored before fingerprints were keyed (with the plain digest of its content)
    club = Club(client, db)
    risk = support.staff(db, "risk_officer", program_id=club.program.id)
    phone = "139" + str(uuid.uuid4().int % 10**8).zfill(8)
    member = int(club.register(phone)["id"])
    url = f"/v1/programs/{club.program.code}/events"
    sent = [
        {"source": "pos", "external_id": f"o{n}-{member}", "type": "order.paid",
         "occurred_at": "2026-01-01T00:30:00Z", "member_ref": phone,
         "payload": {"order_id": f"A{n}", "lines": [
             {"sku": "T1", "category": "日用品", "amount_fen": 100 * n}]}}
        for n in (1, 2)
    ]  # fmt: skip
    answers = [club.post(url, body) for body in sent]
    assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
    ids = [a.json()["id"] for a in answers]

    def rows() -> dict[int, Any]:
        return db.run(
            lambda uow: {
                r.id: r
                for r in uow.conn.execute(
                    select(events.c.id, events.c.request_hash, events.c.payload).where(
                        events.c.member_id == member
                    )
                )
            }
        )

    stored = rows()
    plain = {i: unkeyed(EventIn.model_validate(body), stored[i].payload)
             for i, body in zip(ids, sent, strict=True)}  # fmt: skip
    db.run(
        lambda uow: uow.conn.execute(
            update(events).where(events.c.id == ids[1]).values(request_hash=plain[ids[1]])
        )
    )
    before = {i: r.request_hash for i, r in rows().items()}
    closed = club.post(club.url(member, "/state"), {"state": "closed", "reason": "asked"})
    assert closed.status_code == 200, closed.text
    # when its personal data is erased
    erased = client.post(
        club.url(member, "/personal-data/erase"), headers={**risk, **support.key()}
    )
    assert erased.status_code == 200, erased.text
    # then no event of it keeps the plain digest of its content, which a copy of the
    # database could test the phone number's digits against: each is sealed, the one stored
    # sealed as it was
    after = {i: r.request_hash for i, r in rows().items()}
    assert after.keys() == set(ids)
    for event_id in ids:
        assert after[event_id] != plain[event_id], event_id
        assert after[event_id].startswith(SEALED_FINGERPRINT) and len(after[event_id]) == 64
    assert after[ids[1]] != before[ids[1]] and after[ids[0]] == before[ids[0]]
    # yet each order sent again is still known: answered as it was, nothing done again
    for event_id, body in zip(ids, sent, strict=True):
        again = club.post(url, body)
        assert again.status_code == 201, again.text
        assert again.json()["replayed"] is True and again.json()["id"] == event_id
        # and another content under its id is still refused
        other = {**body, "payload": {**body["payload"], "order_id": "B"}}
        refused = club.post(url, other)
        assert refused.status_code == 409 and refused.json()["code"] == "idempotency_conflict"
    # erasing again changes nothing, and the orders are still known
    assert (
        client.post(
            club.url(member, "/personal-data/erase"), headers={**risk, **support.key()}
        ).status_code
        == 200
    )
    assert {i: r.request_hash for i, r in rows().items()} == after
    assert club.post(url, sent[1]).json()["replayed"] is True


def test_a_closed_member_s_profile_and_identity_are_written_no_more(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.close()
    shop.ok(shop.erase(shop.risk, **support.key()))
    before = db.run(
        lambda uow: uow.conn.execute(select(members).where(members.c.id == shop.member)).one()
    )
    writes = [
        ("patch", "", {"name": "李雷", "email": "li.lei@example.cn", "region": "北京"}),
        ("patch", "", {"tags": ["vip"]}),
        ("put", "/identity", {"id_number": ID_NUMBER, "phone": PHONE}),
        ("put", "/password", {"new_password": "a new pass phrase 1"}),
    ]
    for method, tail, body in writes:
        for language, says in (("en", "is closed"), ("zh-CN", "已注销")):
            answer = client.request(
                method.upper(), shop.url(shop.member, tail), json=body,
                headers={**shop.operator, **support.key(), "Accept-Language": language},
            )  # fmt: skip
            assert answer.status_code == 409, (tail, answer.text)
            assert answer.json()["code"] == "state_conflict" and says in answer.json()["detail"]
    after = db.run(
        lambda uow: uow.conn.execute(select(members).where(members.c.id == shop.member)).one()
    )
    assert after == before  # still erased: nothing was written back
    assert after.name == "" and after.phone_hash is None and after.external_ref.startswith("erased")
    credentials = select(member_credentials).where(member_credentials.c.member_id == shop.member)
    assert db.run(lambda uow: uow.conn.execute(credentials).all()) == []
