"""The audit log over HTTP: what a write records, who may read it, search, CSV export and
verification.

The database is shared with every other test, so each test looks only at its own
programme's and members' entries; the one that tampers puts the row back.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from jifen.audit.models import audit_entries
from jifen.auth import service as auth
from jifen.clock import ManualClock
from jifen.db.uow import Database
from tests.api import support
from tests.factories import new_members, new_program

AUDIT = "/v1/audit"


class Shop:
    """A programme with two members, an operator and an auditor of that programme."""

    def __init__(self, client: TestClient, db: Database) -> None:
        self.client = client
        self.db = db
        self.program = new_program(db)
        self.alice, self.bob = new_members(db, self.program.id, 2)
        self.operator = support.staff(db, "operator", program_id=self.program.id)
        self.auditor = support.staff(db, "auditor", program_id=self.program.id)

    def earn(
        self,
        member_id: int,
        amount: int,
        headers: dict[str, str] | None = None,
        **body: Any,
    ) -> dict[str, Any]:
        answer = self.client.post(
            f"/v1/programs/{self.program.code}/members/{member_id}/points/earn",
            json={"amount": amount, **body},
            headers={**(headers or self.operator), **support.key()},
        )
        assert answer.status_code == 201, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def search(self, headers: dict[str, str] | None = None, **params: Any) -> Any:
        return self.client.get(AUDIT, params=params, headers=headers or self.auditor)

    def entries(self, **params: Any) -> list[dict[str, Any]]:
        answer = self.search(program=self.program.code, limit=200, **params)
        assert answer.status_code == 200, answer.text
        items: list[dict[str, Any]] = answer.json()["items"]
        return items


@pytest.fixture
def shop(client: TestClient, db: Database) -> Shop:
    return Shop(client, db)


def staff_name(db: Database, headers: dict[str, str]) -> str:
    token = headers["Authorization"].removeprefix("Bearer ")
    return db.run(lambda uow: auth.authenticate(uow, token)).name


# --------------------------------------------------------------------------- what is recorded


def test_a_staff_earn_is_recorded_with_who_from_where_what_and_the_result(shop: Shop) -> None:
    # given an operator earning points for alice from a browser
    posting = shop.earn(
        shop.alice, 120, reason="订单 7", headers={**shop.operator, "User-Agent": "till/1.0"}
    )
    # when the auditor searches the log for alice
    (entry,) = shop.entries(target=f"member:{shop.alice}")
    # then the entry says who, in which role, from where, did what to whom, and the outcome
    assert entry["actor"] == staff_name(shop.db, shop.operator)
    assert entry["role"] == "operator"
    assert entry["api_key_id"] is None
    assert entry["ip"] == "testclient"
    assert entry["user_agent"] == "till/1.0"
    assert entry["action"] == "points.earn"
    assert entry["program_id"] == shop.program.id
    assert entry["before"] is None
    assert entry["after"]["id"] == posting["id"]
    assert entry["after"]["amount"] == 120 and entry["after"]["reason"] == "订单 7"
    assert len(entry["hash"]) == 64 and entry["seq"] >= 1
    # and the same request replayed records nothing more
    key = support.key()
    url = f"/v1/programs/{shop.program.code}/members/{shop.bob}/points/earn"
    for _ in range(2):
        answer = shop.client.post(url, json={"amount": 5}, headers={**shop.operator, **key})
        assert answer.status_code == 201, answer.text
    assert len(shop.entries(target=f"member:{shop.bob}")) == 1


def test_a_write_by_staff_holding_many_long_named_roles_is_recorded(shop: Shop) -> None:
    # given a staff user holding five custom roles with long codes, each allowing earning
    codes = [f"regional_loyalty_desk_{n}_" + "x" * 40 for n in range(5)]

    def make(uow: auth.UnitOfWork) -> str:
        created = auth.create_staff(uow, username=f"desk-{shop.alice}", password="correct horse 1")
        for code in codes:
            auth.create_role(
                uow, program_id=shop.program.id, code=code, name=code, permissions=["points.earn"]
            )
            auth.grant_role(uow, staff_id=created.id, role=code, program_id=shop.program.id)
        return auth.new_session(
            uow, subject="staff", subject_id=created.id, totp_verified=True
        ).token

    desk = {"Authorization": f"Bearer {shop.db.run(make)}"}
    # when the user earns points for alice, the write goes through and is recorded
    shop.earn(shop.alice, 10, headers=desk)
    (entry,) = shop.entries(target=f"member:{shop.alice}")
    assert entry["action"] == "points.earn"
    # with the roles it held, as many as the record keeps, and a mark that more were held
    assert entry["role"].startswith(",".join(codes[:2]))
    assert len(entry["role"]) <= 200 and entry["role"].endswith("…")


def test_an_api_key_write_records_the_key(shop: Shop) -> None:
    created = shop.db.run(
        lambda uow: auth.create_api_key(
            uow, program_id=shop.program.id, name="till", created_by="test"
        )
    )
    shop.earn(shop.alice, 10, headers=support.bearer(created.token))
    (entry,) = shop.entries(target=f"member:{shop.alice}")
    assert entry["api_key_id"] == created.id
    assert entry["actor"].startswith("key:")


def test_a_members_own_write_is_not_recorded(shop: Shop) -> None:
    shop.earn(shop.alice, 100)
    # a member moves points of its own: not staff nor a key, so not in the audit log
    moved = shop.client.post(
        f"/v1/programs/{shop.program.code}/members/{shop.alice}/points/transfer",
        json={"to_member_id": shop.bob, "amount": 30},
        headers={**support.member(shop.db, shop.alice), **support.key()},
    )
    assert moved.status_code == 201, moved.text
    entries = shop.entries()
    assert [e["action"] for e in entries] == ["points.earn"]
    assert all(not e["actor"].startswith("member:") for e in entries)


# --------------------------------------------------------------------------- who may read


def test_an_auditor_may_search_export_and_verify_an_operator_may_not(shop: Shop) -> None:
    shop.earn(shop.alice, 10)
    everywhere = support.staff(shop.db, "auditor")
    for path in (AUDIT, f"{AUDIT}/export.csv", f"{AUDIT}/verify"):
        assert shop.client.get(path, headers=everywhere).status_code == 200, path
        refused = shop.client.get(path, headers=shop.operator)
        assert refused.status_code == 403, path
        assert refused.json()["code"] == "forbidden"
    # the programme's auditor searches and exports its entries; the chains it would verify
    # run through every programme's, so only an auditor of every programme verifies them
    for path in (AUDIT, f"{AUDIT}/export.csv"):
        assert shop.client.get(path, headers=shop.auditor).status_code == 200, path
    refused = shop.client.get(f"{AUDIT}/verify", headers=shop.auditor)
    assert refused.status_code == 403
    assert refused.json()["code"] == "scope_too_narrow"


def test_an_auditor_of_one_programme_learns_no_other_programmes_code(
    client: TestClient, db: Database
) -> None:
    a, b = Shop(client, db), Shop(client, db)
    existing = a.search(program=b.program.code)
    missing = a.search(program="no-such-programme")
    assert (existing.status_code, missing.status_code) == (403, 403), missing.text
    assert existing.json()["detail"].replace(b.program.code, "X") == missing.json()[
        "detail"
    ].replace("no-such-programme", "X")
    everywhere = support.staff(db, "auditor")
    assert a.search(everywhere, program="no-such-programme").status_code == 404


def test_an_auditor_of_one_programme_sees_only_its_entries(
    client: TestClient, db: Database
) -> None:
    # given writes in programmes A and B, and one outside any programme
    a, b = Shop(client, db), Shop(client, db)
    a.earn(a.alice, 10)
    b.earn(b.alice, 20)
    admin = support.staff(db, "super_admin")
    made = client.post(
        "/v1/staff",
        json={"username": f"u-{b.program.code}", "password": "a long password", "grants": []},
        headers={**admin, **support.key()},
    )
    assert made.status_code == 201, made.text
    # when A's auditor lists the log, unfiltered, page after page
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = a.search(limit=200, **({"cursor": cursor} if cursor else {})).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # then only A's entries are there: neither B's nor those outside any programme
    assert {e["program_id"] for e in seen} == {a.program.id}
    assert f"member:{a.alice}" in {e["target"] for e in seen}
    # and asking for B by name is refused, as is an unknown programme (alike: no answer
    # tells A's auditor which programme codes exist)
    refused = a.search(program=b.program.code)
    assert refused.status_code == 403
    assert a.search(program="no-such-programme").status_code == 403
    # while an auditor of every programme sees B's and the staff user's entries
    everywhere = support.staff(db, "auditor")
    assert len(b.search(everywhere, program=b.program.code).json()["items"]) == 1
    staff = b.search(everywhere, target=f"staff:u-{b.program.code}").json()["items"]
    assert [(e["action"], e["program_id"]) for e in staff] == [("staff.write", None)]


# --------------------------------------------------------------------------- search


def test_search_filters_and_pages_newest_first(shop: Shop, clock: ManualClock) -> None:
    # given five earnings for alice an hour apart, and one for bob
    start = clock.now()
    ids = []
    for amount in (1, 2, 3, 4, 5):
        ids.append(shop.earn(shop.alice, amount)["id"])
        clock.advance(timedelta(hours=1))
    shop.earn(shop.bob, 99)
    target = f"member:{shop.alice}"
    # when alice's entries are read two at a time
    pages, cursor = [], None
    while True:
        params = {"target": target, "program": shop.program.code, "limit": 2}
        answer = shop.search(**params, **({"cursor": cursor} if cursor else {}))
        assert answer.status_code == 200, answer.text
        pages.append([e["after"]["amount"] for e in answer.json()["items"]])
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            break
    # then they come newest first, and the last page says so
    assert pages == [[5, 4], [3, 2], [1]]
    # and time, action and actor narrow the search
    since, until = start + timedelta(minutes=90), start + timedelta(hours=3, minutes=30)
    timed = shop.entries(target=target, since=since.isoformat(), until=until.isoformat())
    assert [e["after"]["amount"] for e in timed] == [4, 3]
    assert len(shop.entries(action="points.earn")) == 6
    assert shop.entries(action="points.spend") == []
    actor = staff_name(shop.db, shop.operator)
    assert len(shop.entries(actor=actor)) == 6
    assert shop.entries(actor=actor + "-nobody") == []
    assert {e["after"]["id"] for e in shop.entries(target=target)} == set(ids)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "nonsense",
        "!!!",
        _b64("audit:abc"),
        _b64("audit:-1"),
        _b64("audit: 5"),
        _b64("seq:5"),  # another list's cursor
        _b64("audit:" + "9" * 21),  # beyond any id
    ],
)
def test_a_cursor_this_api_did_not_give_out_is_invalid_input(shop: Shop, cursor: str) -> None:
    answer = shop.search(cursor=cursor)
    assert answer.status_code == 422
    assert answer.json()["code"] == "invalid_input"


def test_search_refuses_malformed_filters(shop: Shop) -> None:
    assert shop.search(since="yesterday").status_code == 422
    assert shop.search(since="2026-01-01T00:00:00").status_code == 422  # no offset
    assert shop.search(actor="a\x00b").status_code == 422
    assert shop.search(limit=0).status_code == 422


# --------------------------------------------------------------------------- export


def _csv(answer: Any) -> list[dict[str, str]]:
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"].startswith('attachment; filename="')
    assert answer.content.startswith("\ufeff".encode())
    return list(csv.DictReader(io.StringIO(answer.content.decode("utf-8-sig"))))


def test_the_export_is_a_csv_of_the_filtered_entries(shop: Shop) -> None:
    # given three earnings, one with a Chinese reason, and one for bob
    for reason in ("积分奖励", "second", "third"):
        shop.earn(shop.alice, 10, reason=reason)
    shop.earn(shop.bob, 20)
    # when alice's entries are exported
    rows = _csv(
        shop.client.get(
            f"{AUDIT}/export.csv",
            params={"program": shop.program.code, "target": f"member:{shop.alice}"},
            headers=shop.auditor,
        )
    )
    # then the CSV reads back: a header, her three entries newest first, JSON before/after
    searched = shop.entries(target=f"member:{shop.alice}")
    assert [int(r["id"]) for r in rows] == [e["id"] for e in searched]
    assert [json.loads(r["after"])["reason"] for r in rows] == ["third", "second", "积分奖励"]
    assert {r["before"] for r in rows} == {""}
    assert rows[0]["action"] == "points.earn" and rows[0]["hash"] == searched[0]["hash"]
    assert rows[0]["at"].endswith("+00:00")


def test_the_export_guards_against_formulas_in_cells(shop: Shop) -> None:
    # given writes from clients whose user agent a spreadsheet would run as a formula
    agents = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "plain"]
    for agent in agents:
        shop.earn(shop.alice, 1, headers={**shop.operator, "User-Agent": agent})
    # when they are exported
    rows = _csv(
        shop.client.get(
            f"{AUDIT}/export.csv", params={"program": shop.program.code}, headers=shop.auditor
        )
    )
    # then each such cell starts with an apostrophe; the plain one is left alone
    assert [r["user_agent"] for r in rows] == ["plain", *["'" + a for a in reversed(agents[:-1])]]


def test_the_export_is_refused_for_a_programme_out_of_reach(
    client: TestClient, db: Database
) -> None:
    a, b = Shop(client, db), Shop(client, db)
    answer = client.get(
        f"{AUDIT}/export.csv", params={"program": b.program.code}, headers=a.auditor
    )
    assert answer.status_code == 403
    assert answer.headers["content-type"].startswith("application/problem+json")


def test_the_export_is_declared_as_csv_in_the_openapi_document(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/audit/export.csv"]["get"]
    assert operation["x-permission"] == "audit.read"
    assert operation["responses"]["200"]["content"] == {"text/csv": {"schema": {"type": "string"}}}


# --------------------------------------------------------------------------- verify


def test_verify_is_ok_until_an_entry_is_edited_in_sql(shop: Shop, db: Database) -> None:
    shop.earn(shop.alice, 40)
    everywhere = support.staff(db, "auditor")  # verifying reads every programme's chains
    assert shop.client.get(f"{AUDIT}/verify", headers=everywhere).json()["problems"] == []
    (entry,) = shop.entries(target=f"member:{shop.alice}")

    def set_after(after: dict[str, Any]) -> None:
        db.run(
            lambda uow: uow.conn.execute(
                update(audit_entries).where(audit_entries.c.id == entry["id"]).values(after=after)
            )
        )

    set_after({**entry["after"], "amount": 4000})
    try:
        broken = shop.client.get(f"{AUDIT}/verify", headers=everywhere).json()
        chinese = shop.client.get(
            f"{AUDIT}/verify", headers={**everywhere, "Accept-Language": "zh-CN"}
        ).json()
    finally:
        set_after(entry["after"])  # other tests verify this database too
    assert broken["ok"] is False
    assert broken["problems"] == [
        {
            "entry_id": entry["id"],
            "stripe": entry["stripe"],
            "seq": entry["seq"],
            "problem": f"entry {entry['id']} (stripe {entry['stripe']}, seq {entry['seq']}): "
            "was edited: its recorded fields no longer match its hash",
        }
    ]
    assert "被改动过" in chinese["problems"][0]["problem"]
    restored = shop.client.get(f"{AUDIT}/verify", headers=everywhere).json()
    assert restored["ok"] is True and restored["entries"] >= 1 and restored["chains"] >= 1
    stored = db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.after).where(audit_entries.c.id == entry["id"])
        ).scalar_one()
    )
    assert stored == entry["after"]
