"""Every list of the API comes in pages: a page with more after it carries a ``next_cursor``,
passing it back gives the next items (none twice, none left out), and the last page carries
none, even when it is full."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jifen.auth import service as auth
from jifen.db.uow import Database
from tests.api import support
from tests.api.earning import body
from tests.factories import new_program
from tests.rewards.shop import Shop

Fetch = Callable[[dict[str, Any]], Any]


def walk(fetch: Fetch, limit: int) -> list[list[Any]]:
    """Every page of a list, following its cursors from the first page."""
    pages: list[list[Any]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        page = fetch(params)
        assert page["items"] or not pages, "a next_cursor never leads to an empty page"
        pages.append(page["items"])
        assert len(page["items"]) <= limit
        if page["next_cursor"] is None:
            return pages
        assert len(page["items"]) == limit, "only a full page points to another"
        params = {"limit": limit, "cursor": page["next_cursor"]}


def whole(fetch: Fetch) -> list[Any]:
    """Every item of a (short) list, checking that a page holding exactly all of them is the
    last one: it carries no ``next_cursor`` to an empty page."""
    everything: list[Any] = fetch({"limit": 200})["items"]
    assert everything
    exact = fetch({"limit": len(everything)})
    assert exact == {"items": everything, "next_cursor": None}
    if len(everything) > 1:
        pages = walk(fetch, len(everything) - 1)
        assert [len(page) for page in pages] == [len(everything) - 1, 1]
    return everything


def test_programmes_come_in_pages_of_those_the_caller_may_see(
    client: TestClient, db: Database
) -> None:
    made = [new_program(db) for _ in range(3)]
    admin = support.staff(db, "super_admin")

    def fetch(params: dict[str, Any]) -> Any:
        return body(client.get("/v1/programs", params=params, headers=admin), 200)

    everything = [p["code"] for p in fetch({"limit": 200})["items"]]
    pages = walk(fetch, 2)
    assert [p["code"] for page in pages for p in page] == everything
    assert {p.code for p in made} <= set(everything)
    # an operator of one programme sees that one only, in pages like everyone else
    operator = support.staff(db, "operator", program_id=made[1].id)
    mine = body(client.get("/v1/programs", params={"limit": 1}, headers=operator), 200)
    assert [p["code"] for p in mine["items"]] == [made[1].code]
    assert mine["next_cursor"] is None  # that page is the last: no request for an empty one


def test_roles_come_in_pages(client: TestClient, db: Database) -> None:
    program = new_program(db)
    operator = support.staff(db, "operator", program_id=program.id)
    for code in ("shift_lead", "store_manager"):
        made = client.post(
            f"/v1/programs/{program.code}/roles",
            json={"code": code, "name": code, "permissions": ["members.read"]},
            headers={**operator, **support.key()},
        )
        assert made.status_code == 201, made.text

    def fetch(params: dict[str, Any]) -> Any:
        answer = client.get(f"/v1/programs/{program.code}/roles", params=params, headers=operator)
        return body(answer, 200)

    everything = [r["code"] for r in fetch({"limit": 200})["items"]]
    assert {"operator", "cashier", "shift_lead", "store_manager"} <= set(everything)
    pages = walk(fetch, 3)
    assert [r["code"] for page in pages for r in page] == everything
    assert len(pages) >= 3
    assert [r["code"] for r in whole(fetch)] == everything


def test_members_come_in_pages_the_last_full_one_pointing_nowhere(
    client: TestClient, db: Database
) -> None:
    program = new_program(db)
    operator = support.staff(db, "operator", program_id=program.id)
    base = f"/v1/programs/{program.code}/members"
    for ref in ("P1", "P2", "P3", "P4"):
        made = client.post(base, json={"external_ref": ref},
                           headers={**operator, **support.key()})  # fmt: skip
        assert made.status_code == 201, made.text

    def fetch(params: dict[str, Any]) -> Any:
        return body(client.get(base, params=params, headers=operator), 200)

    assert [m["external_ref"] for m in whole(fetch)] == ["P1", "P2", "P3", "P4"]
    assert [len(page) for page in walk(fetch, 2)] == [2, 2]


def test_staff_and_api_keys_come_in_pages_the_last_full_one_pointing_nowhere(
    client: TestClient, db: Database
) -> None:
    program = new_program(db)
    admin = support.staff(db, "super_admin")
    operator = support.staff(db, "operator", program_id=program.id)
    tag = uuid.uuid4().hex[:6]
    for n in range(3):
        db.run(lambda uow, n=n: auth.create_staff(uow, username=f"p_{tag}-{n}",
                                                  password="correct horse 1"))  # fmt: skip
        support.api_key(db, program.id)

    def staff(params: dict[str, Any]) -> Any:
        answer = client.get("/v1/staff", params={**params, "username": f"p_{tag}"}, headers=admin)
        return body(answer, 200)

    assert [s["username"] for s in whole(staff)] == [f"p_{tag}-{n}" for n in range(3)]

    def keys(params: dict[str, Any]) -> Any:
        answer = client.get(f"/v1/programs/{program.code}/api-keys", params=params,
                            headers=operator)  # fmt: skip
        return body(answer, 200)

    assert len(whole(keys)) == 3


def test_stock_alerts_and_a_members_vouchers_come_in_pages(
    client: TestClient, db: Database
) -> None:
    shop = Shop.open(db)
    base = f"/v1/programs/{shop.code}"
    (member,) = shop.member(10000, tier="金卡")
    low = [shop.reward(points=100, stock=2, safety_stock=1) for _ in range(3)]
    for reward in low:
        shop.redeem(member, reward.code)  # one left: at the safety stock
    operator = support.staff(db, "operator", program_id=shop.program_id)

    def alerts(params: dict[str, Any]) -> Any:
        return body(client.get(f"{base}/stock-alerts", params=params, headers=operator), 200)

    pages = walk(alerts, 2)
    assert [a["reward"] for page in pages for a in page] == [r.code for r in low]
    assert [len(page) for page in pages] == [2, 1]

    wash = shop.reward(kind="service", points=100)
    codes = [shop.redeem(member, wash.code).voucher.code for _ in range(3)]  # type: ignore[union-attr]
    as_member = support.member(db, member)

    def vouchers(params: dict[str, Any]) -> Any:
        answer = client.get(f"{base}/members/{member}/vouchers", params=params, headers=as_member)
        return body(answer, 200)

    pages = walk(vouchers, 2)
    assert [v["code"] for page in pages for v in page] == codes[::-1]  # newest first


@pytest.mark.parametrize("cursor", ["abc", "-1", "9" * 20, "١٢"])
def test_a_cursor_not_given_by_a_page_is_refused(
    client: TestClient, db: Database, cursor: str
) -> None:
    admin = support.staff(db, "super_admin")
    answer = client.get("/v1/programs", params={"cursor": cursor}, headers=admin)
    assert answer.status_code == 422, answer.text
    assert "next_cursor" in answer.text
