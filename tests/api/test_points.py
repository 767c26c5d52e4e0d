"""The points ledger over HTTP: every change, idempotency, states, merchant scope."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from jifen.api.app import create_app
from jifen.db.uow import Database
from jifen.members.models import members
from jifen.points import service as points
from jifen.points.models import postings
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import assert_ledger_sound, new_members, new_program


class Shop:
    """A programme with two members and an operator, over one backend."""

    def __init__(self, client: TestClient, db: Database) -> None:
        self.client = client
        self.db = db
        self.program = new_program(db)
        self.alice, self.bob = new_members(db, self.program.id, 2)
        self.operator = support.staff(db, "operator", program_id=self.program.id)

    def member_url(self, member_id: int, tail: str = "") -> str:
        return f"/v1/programs/{self.program.code}/members/{member_id}/points{tail}"

    def posting_url(self, posting_id: int, tail: str = "") -> str:
        return f"/v1/programs/{self.program.code}/postings/{posting_id}{tail}"

    def post(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.client.post(
            url, json=body, headers={**(headers or self.operator), **support.key()}
        )

    def earn(self, member_id: int, amount: int, **extra: Any) -> dict[str, Any]:
        answer = self.post(self.member_url(member_id, "/earn"), {"amount": amount, **extra})
        assert answer.status_code == 201, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def balance(self, member_id: int) -> dict[str, Any]:
        answer = self.client.get(self.member_url(member_id), headers=self.operator)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result


def _shop(client: TestClient, db: Database) -> Shop:
    return Shop(client, db)


def test_earn_spend_refund_reverse_transfer_freeze_unfreeze_keep_the_ledger_sound(
    client: TestClient, db: Database
) -> None:
    shop = _shop(client, db)
    # given 1000 points earned by alice
    earned = shop.earn(shop.alice, 1000, reason="order 1")
    assert earned["kind"] == "earn" and earned["member_id"] == shop.alice
    # when she spends, gets part refunded, has part of an earning reversed, transfers,
    # and has points frozen and released
    spent = shop.post(shop.member_url(shop.alice, "/spend"), {"amount": 300})
    assert spent.status_code == 201, spent.text
    refunded = shop.post(shop.posting_url(spent.json()["id"], "/refund"), {"amount": 100})
    assert refunded.status_code == 201, refunded.text
    assert refunded.json()["ref_posting_id"] == spent.json()["id"]
    reversed_ = shop.post(shop.posting_url(earned["id"], "/reverse"), {"amount": 50})
    assert reversed_.status_code == 201, reversed_.text
    moved = shop.post(
        shop.member_url(shop.alice, "/transfer"), {"to_member_id": shop.bob, "amount": 200}
    )
    assert moved.status_code == 201, moved.text
    frozen = shop.post(shop.member_url(shop.alice, "/freeze"), {"amount": 150, "reason": "review"})
    assert frozen.status_code == 201, frozen.text
    after_freeze = shop.balance(shop.alice)
    released = shop.post(shop.posting_url(frozen.json()["id"], "/unfreeze"), {"amount": 100})
    assert released.status_code == 201, released.text
    # then the balances are what the postings say
    assert after_freeze["frozen"] == 150
    alice = shop.balance(shop.alice)
    assert alice["available"] == 1000 - 300 + 100 - 50 - 200 - 150 + 100
    assert alice["frozen"] == 50
    assert shop.balance(shop.bob)["available"] == 200
    # and the history lists every posting, newest first, filterable by kind
    history = client.get(shop.member_url(shop.alice, "/history"), headers=shop.operator).json()
    assert [e["kind"] for e in history["items"]] == [
        "unfreeze", "freeze", "transfer", "reverse", "refund", "spend", "earn",
    ]  # fmt: skip
    only = client.get(
        shop.member_url(shop.alice, "/history"),
        params={"kind": ["spend", "refund"]},
        headers=shop.operator,
    ).json()
    assert [e["kind"] for e in only["items"]] == ["refund", "spend"]
    # and one posting can be read back, but not through another programme
    one = client.get(shop.posting_url(spent.json()["id"]), headers=shop.operator)
    assert one.status_code == 200 and one.json()["amount"] == 300
    other = new_program(db)
    admin = support.staff(db, "super_admin")
    elsewhere = client.get(
        f"/v1/programs/{other.code}/postings/{spent.json()['id']}", headers=admin
    )
    assert elsewhere.status_code == 404
    # and the ledger is sound
    assert_ledger_sound(db, shop.program.id)


def test_history_pages_with_a_cursor_and_lots_show_the_default_validity(
    client: TestClient, db: Database
) -> None:
    shop = _shop(client, db)
    for amount in (10, 20, 30):
        shop.earn(shop.alice, amount)
    first = client.get(
        shop.member_url(shop.alice, "/history"), params={"limit": 2}, headers=shop.operator
    ).json()
    second = client.get(
        shop.member_url(shop.alice, "/history"),
        params={"limit": 2, "cursor": first["next_cursor"]},
        headers=shop.operator,
    ).json()
    assert [e["amount"] for e in first["items"] + second["items"]] == [30, 20, 10]
    assert second["next_cursor"] is None
    lots = client.get(shop.member_url(shop.alice, "/lots"), headers=shop.operator).json()["items"]
    # the programme default: valid 365 days, to the end of the day (Asia/Shanghai)
    assert {datetime.fromisoformat(lot["expires_at"]) for lot in lots} == {
        datetime(2027, 1, 2, tzinfo=ZoneInfo("Asia/Shanghai"))
    }
    # the balance says the same: all 60 lapse together, at the start of 2 January
    assert shop.balance(shop.alice) == {
        "member_id": shop.alice, "balance": 60, "available": 60, "pending": 0, "overdue": 0,
        "frozen": 0, "debt": 0, "expiring": [{"date": "2027-01-02", "amount": 60}],
    }  # fmt: skip


def test_lots_page_by_expiry_with_never_expiring_ones_last(
    client: TestClient, db: Database
) -> None:
    shop = _shop(client, db)
    start = db.clock.now()
    expiries = [start + timedelta(days=d) for d in (90, 30, 30, 60)]
    for amount, expires_at in zip((1, 2, 3, 4), expiries, strict=True):
        db.run(
            lambda uow, a=amount, e=expires_at: points.earn(
                uow, member_id=shop.alice, amount=a, key=f"lot-{a}", expires_at=e
            )
        )
    db.run(lambda uow: points.earn(uow, member_id=shop.alice, amount=5, key="lot-5"))
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        page = client.get(
            shop.member_url(shop.alice, "/lots"), params=params, headers=shop.operator
        ).json()
        seen += [lot["amount"] for lot in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [2, 3, 4, 1, 5] and pages == 3
    bad = client.get(
        shop.member_url(shop.alice, "/lots"), params={"cursor": "nonsense"}, headers=shop.operator
    )
    assert bad.status_code == 422


def test_a_replayed_earn_returns_the_first_posting_and_a_changed_body_is_refused(
    client: TestClient, db: Database
) -> None:
    shop = _shop(client, db)
    headers = {**shop.operator, **support.key()}
    url = shop.member_url(shop.alice, "/earn")
    # when the same earn is sent twice with one key
    first = client.post(url, json={"amount": 70}, headers=headers)
    again = client.post(url, json={"amount": 70}, headers=headers)
    # then the second is the first's answer, replayed, and only one posting exists
    assert first.status_code == again.status_code == 201
    assert again.json() == {**first.json(), "replayed": True}
    assert first.json()["replayed"] is False
    assert again.headers["Idempotent-Replayed"] == "true"
    assert shop.balance(shop.alice)["available"] == 70
    # and another body with that key is refused
    other = client.post(url, json={"amount": 71}, headers=headers)
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_conflict"


def test_eight_threads_with_one_key_make_one_posting(pg: Database) -> None:
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    operator = support.staff(pg, "operator", program_id=program.id)
    headers = {**operator, **support.key()}
    url = f"/v1/programs/{program.code}/members/{member_id}/points/earn"
    answers: list[tuple[int, Any]] = []
    barrier = threading.Barrier(8)
    with TestClient(create_app(pg, api_settings())) as client:

        def send() -> None:
            barrier.wait()
            answer = client.post(url, json={"amount": 5}, headers=headers)
            answers.append((answer.status_code, answer.json()))

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # then all eight got the same posting and the ledger holds it once
    assert {status for status, _ in answers} == {201}
    assert len({body["id"] for _, body in answers}) == 1
    count = pg.run(
        lambda uow: uow.conn.execute(
            select(func.count()).where(postings.c.program_id == program.id)
        ).scalar_one()
    )
    assert count == 1
    assert_ledger_sound(pg, program.id)


def test_concurrent_earns_on_one_member_each_post_once_in_one_chain(pg: Database) -> None:
    # given 8 clients earning for one member at once, 10 times each, each with its own key:
    # the API locks the account in its first round trip, and the posting goes from there
    program = new_program(pg)
    (member_id,) = new_members(pg, program.id, 1)
    operator = support.staff(pg, "operator", program_id=program.id)
    url = f"/v1/programs/{program.code}/members/{member_id}/points/earn"
    statuses: list[int] = []
    barrier = threading.Barrier(8)
    before = pg.combiner.stats.transactions, pg.combiner.stats.functions
    with TestClient(create_app(pg, api_settings())) as client:

        def send(worker: int) -> None:
            barrier.wait()
            for n in range(10):
                headers = {**operator, "Idempotency-Key": f"earn-{worker}-{n}"}
                answer = client.post(url, json={"amount": worker + 1}, headers=headers)
                statuses.append(answer.status_code)

        threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # then every earn posted, the balance is their sum and the chain and caches hold
    assert statuses == [201] * 80
    balance = pg.run(lambda uow: points.balance(uow, member_id=member_id))
    assert balance.available == 10 * sum(range(1, 9))
    assert_ledger_sound(pg, program.id)
    # earnings that met on the account shared commits: fewer transactions than requests
    transactions = pg.combiner.stats.transactions - before[0]
    assert pg.combiner.stats.functions - before[1] == 80 > transactions


def test_an_overdraft_is_refused_in_the_callers_language(client: TestClient, db: Database) -> None:
    shop = _shop(client, db)
    shop.earn(shop.alice, 10)
    answer = client.post(
        shop.member_url(shop.alice, "/spend"),
        json={"amount": 11},
        headers={**shop.operator, **support.key(), "Accept-Language": "zh"},
    )
    assert answer.status_code == 409
    assert answer.json()["code"] == "insufficient_points"
    assert "可用积分为 10" in answer.json()["detail"]
    assert shop.balance(shop.alice)["available"] == 10


def test_a_frozen_member_cannot_earn_or_spend_but_its_earlier_writes_replay(
    client: TestClient, db: Database
) -> None:
    shop = _shop(client, db)
    earned, spent = {**shop.operator, **support.key()}, {**shop.operator, **support.key()}
    earn, spend = shop.member_url(shop.alice, "/earn"), shop.member_url(shop.alice, "/spend")
    first_earn = client.post(earn, json={"amount": 10}, headers=earned)
    first_spend = client.post(spend, json={"amount": 4}, headers=spent)
    assert first_earn.status_code == first_spend.status_code == 201
    db.run(
        lambda uow: uow.conn.execute(
            update(members).where(members.c.id == shop.alice).values(state="frozen")
        )
    )
    for url in (earn, spend):
        answer = shop.post(url, {"amount": 1})
        assert answer.status_code == 409
        assert answer.json()["code"] == "state_conflict"
    # a request made before the freeze is answered as it was, not checked again
    for url, amount, headers, first in (
        (earn, 10, earned, first_earn),
        (spend, 4, spent, first_spend),
    ):
        again = client.post(url, json={"amount": amount}, headers=headers)
        assert again.status_code == 201 and again.json() == {**first.json(), "replayed": True}
        assert again.headers["Idempotent-Replayed"] == "true"
    assert shop.balance(shop.alice)["balance"] == 6


def test_a_member_of_another_programme_is_not_found(client: TestClient, db: Database) -> None:
    shop = _shop(client, db)
    other = new_program(db)
    (stranger,) = new_members(db, other.id, 1)
    shop.earn(shop.alice, 10)
    assert shop.post(shop.member_url(stranger, "/earn"), {"amount": 10}).status_code == 404
    moved = shop.post(
        shop.member_url(shop.alice, "/transfer"), {"to_member_id": stranger, "amount": 5}
    )
    assert moved.status_code == 404
    assert shop.balance(shop.alice)["available"] == 10


def test_a_merchant_key_acts_only_for_its_merchant(client: TestClient, db: Database) -> None:
    shop = _shop(client, db)
    x = support.api_key(db, shop.program.id, merchant="merchant-x")
    y = support.api_key(db, shop.program.id, merchant="merchant-y")
    # given a spend made by merchant Y
    shop.post(shop.member_url(shop.alice, "/earn"), {"amount": 100}, y)
    y_spend = shop.post(shop.member_url(shop.alice, "/spend"), {"amount": 40}, y)
    assert y_spend.status_code == 201
    # when merchant X's key earns for Y, or refunds Y's spend
    for_y = shop.post(
        shop.member_url(shop.alice, "/earn"), {"amount": 5, "merchant": "merchant-y"}, x
    )
    refund = shop.post(shop.posting_url(y_spend.json()["id"], "/refund"), {}, x)
    # then both are refused (Y's spend is unknown to X, as a missing posting is), and Y's
    # own refund goes through
    assert for_y.status_code == 403
    assert refund.status_code == 404 and refund.json()["code"] == "unknown_posting"
    own = shop.post(shop.posting_url(y_spend.json()["id"], "/refund"), {}, y)
    assert own.status_code == 201, own.text
    assert shop.balance(shop.alice)["available"] == 100
    assert_ledger_sound(db, shop.program.id)


def test_a_stores_credentials_give_back_only_what_was_made_at_that_store(
    client: TestClient, db: Database
) -> None:
    shop = _shop(client, db)
    program = shop.program.id
    s1 = support.staff(db, "cashier", program_id=program, merchant="hq", store="S1")
    s2 = support.staff(db, "cashier", program_id=program, merchant="hq", store="S2")
    hq = support.api_key(db, program, merchant="hq")  # the merchant's own, at no store
    shop.earn(shop.alice, 1000)
    spend = shop.member_url(shop.alice, "/spend")
    at_s1, at_s2, at_hq, own = (
        shop.post(spend, {"amount": 10}, who).json()["id"] for who in (s1, s2, hq, shop.operator)
    )
    refund = shop.posting_url
    # another store's spend is unknown to S1; the merchant's own and the programme's refused
    other_store = shop.post(refund(at_s2, "/refund"), {}, s1)
    assert other_store.status_code == 404 and other_store.json()["code"] == "unknown_posting"
    merchants = shop.post(refund(at_hq, "/refund"), {}, s1)
    assert merchants.status_code == 403 and "none of the merchant's stores" in merchants.text
    programmes = shop.post(refund(own, "/refund"), {}, s1)
    assert programmes.status_code == 403 and "made for no merchant" in programmes.text
    assert shop.balance(shop.alice)["available"] == 960  # nothing was given back
    # S1 gives back its own; the merchant's credentials any of its stores'
    assert shop.post(refund(at_s1, "/refund"), {}, s1).status_code == 201
    assert shop.post(refund(at_s2, "/refund"), {}, hq).status_code == 201
    assert shop.balance(shop.alice)["available"] == 980
    assert_ledger_sound(db, program)


def test_credentials_of_one_merchant_release_only_the_freezes_made_for_it(
    client: TestClient, db: Database
) -> None:
    shop = _shop(client, db)
    program = shop.program.id
    mall = support.staff(db, "operator", program_id=program, merchant="mall")
    other = support.staff(db, "operator", program_id=program, merchant="other")
    risk = support.staff(db, "risk_officer", program_id=program)
    shop.earn(shop.alice, 1000)
    freeze = shop.member_url(shop.alice, "/freeze")
    by_mall = shop.post(freeze, {"amount": 100, "reason": "dispute"}, mall).json()["id"]
    by_risk = shop.post(freeze, {"amount": 200, "reason": "fraud"}, risk).json()["id"]
    release = shop.posting_url
    # the risk officer's freeze is the programme's own; mall's is unknown to other
    refused = shop.post(release(by_risk, "/unfreeze"), {}, mall)
    assert refused.status_code == 403 and "made for no merchant" in refused.json()["detail"]
    unknown = shop.post(release(by_mall, "/unfreeze"), {}, other)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_posting"
    assert shop.balance(shop.alice)["frozen"] == 300
    # mall releases its own; the programme's staff release any
    assert shop.post(release(by_mall, "/unfreeze"), {"amount": 40}, mall).status_code == 201
    assert shop.post(release(by_mall, "/unfreeze"), {}, risk).status_code == 201
    assert shop.post(release(by_risk, "/unfreeze"), {}, risk).status_code == 201
    assert shop.balance(shop.alice)["frozen"] == 0
    assert_ledger_sound(db, program)


def test_transfers_follow_the_programme_settings(client: TestClient, db: Database) -> None:
    shop = _shop(client, db)
    shop.earn(shop.alice, 100)
    # given settings, approved, that cap transfers at 30 points
    settings = {"transfers_enabled": True, "transfer_max": 30}
    filed = client.put(
        f"/v1/programs/{shop.program.code}/settings",
        json=settings,
        headers={**shop.operator, **support.key()},
    )
    assert filed.status_code == 202, filed.text
    reviewer = support.staff(db, "reviewer", program_id=shop.program.id)
    approvals = f"/v1/programs/{shop.program.code}/approvals/{filed.json()['id']}"
    approved = client.post(approvals + "/approve", json={}, headers={**reviewer, **support.key()})
    assert approved.status_code == 200, approved.text
    # when alice transfers more than the cap, then less
    url = shop.member_url(shop.alice, "/transfer")
    too_much = shop.post(url, {"to_member_id": shop.bob, "amount": 31})
    enough = shop.post(url, {"to_member_id": shop.bob, "amount": 30})
    # then only the second moves points
    assert too_much.status_code == 409
    assert enough.status_code == 201
    assert shop.balance(shop.bob)["available"] == 30


def test_unknown_fields_and_bad_amounts_are_refused(client: TestClient, db: Database) -> None:
    shop = _shop(client, db)
    url = shop.member_url(shop.alice, "/earn")
    for body in (
        {"amount": 0}, {"amount": 10**12 + 1}, {"amount": 5, "balance": 9},
        {"amount": True}, {"amount": 1.0}, {"amount": "2"},  # a number of points, strictly
    ):  # fmt: skip
        answer = shop.post(url, body)
        assert answer.status_code == 422, body
    zero = shop.post(shop.member_url(shop.alice, "/adjust"), {"amount": 0, "reason": "x"})
    assert zero.status_code == 422
    dated_debit = shop.post(
        shop.member_url(shop.alice, "/adjust"),
        {"amount": -5, "reason": "x", "expires_at": "2030-01-01T00:00:00+08:00"},
    )
    assert dated_debit.status_code == 422 and "leave expires_at out" in dated_debit.text
    # A time is RFC 3339 text: a number (or a text of one) is not read as seconds since 1970.
    for when in (1893456000, "20300101", "1893456000000", 1.5e9):
        answer = shop.post(url, {"amount": 5, "expires_at": when})
        assert answer.status_code == 422, when
        assert "RFC 3339" in answer.json()["errors"][0]["message"], answer.text
    assert shop.balance(shop.alice)["balance"] == 0


def test_a_member_reads_its_own_points_only(client: TestClient, db: Database) -> None:
    shop = _shop(client, db)
    shop.earn(shop.alice, 12)
    alice = support.member(db, shop.alice)
    mine = client.get(shop.member_url(shop.alice), headers=alice)
    assert mine.status_code == 200 and mine.json()["available"] == 12
    assert client.get(shop.member_url(shop.bob), headers=alice).status_code == 403
    # and may not earn for itself
    assert shop.post(shop.member_url(shop.alice, "/earn"), {"amount": 1}, alice).status_code == 403


def test_giving_back_a_posting_of_another_kind_names_its_kind(
    client: TestClient, db: Database
) -> None:
    """Refunding an earning (or reversing a spend, unfreezing either) is refused as before
    (404, unknown_posting), with a message that says what the posting is rather than that
    there is no such posting, which the member's history would contradict."""
    shop = _shop(client, db)
    earned = shop.earn(shop.alice, 100)
    spent = shop.post(shop.member_url(shop.alice, "/spend"), {"amount": 40}).json()
    for posting, tail, said in (
        (earned, "/refund", "is an earn posting, not a spend one"),
        (spent, "/reverse", "is a spend posting, not an earn one"),
        (spent, "/unfreeze", "is a spend posting, not a freeze one"),
    ):
        refused = shop.post(shop.posting_url(posting["id"], tail), {})
        assert refused.status_code == 404 and refused.json()["code"] == "unknown_posting"
        assert f"Posting {posting['id']} {said}" in refused.json()["detail"]
    missing = shop.post(shop.posting_url(10**12, "/refund"), {})
    assert missing.status_code == 404 and "There is no" in missing.json()["detail"]
    assert shop.balance(shop.alice)["available"] == 60


def test_a_transfer_names_its_receiver_by_a_whole_number(client: TestClient, db: Database) -> None:
    """``to_member_id`` is a member's id, a JSON whole number: ``true``, ``1.0`` or ``"1"``
    is refused (422), not read as member 1, who would get the points."""
    shop = _shop(client, db)
    shop.earn(shop.alice, 100)
    url = shop.member_url(shop.alice, "/transfer")
    for receiver in (True, float(shop.bob), str(shop.bob)):
        refused = shop.post(url, {"to_member_id": receiver, "amount": 5})
        assert refused.status_code == 422, (receiver, refused.text)
        assert refused.json()["errors"][0]["field"] == "body.to_member_id"
    assert shop.balance(shop.alice)["available"] == 100
    assert shop.post(url, {"to_member_id": shop.bob, "amount": 5}).status_code == 201


def test_a_debt_is_paid_first_by_an_earning_a_credit_and_a_transfer_and_each_says_so(
    client: TestClient, db: Database
) -> None:
    """What a claw-back could not take is owed; an earning, a credit by adjustment and a
    transfer received pay it off before the member holds any points, and each posting
    answers (and reads back) how much of the debt it paid."""
    shop = _shop(client, db)
    # given alice owing 100: an earning spent, then clawed back
    earned = shop.earn(shop.alice, 100)
    assert shop.post(shop.member_url(shop.alice, "/spend"), {"amount": 100}).status_code == 201
    clawed = shop.post(shop.posting_url(earned["id"], "/reverse"), {})
    assert clawed.status_code == 201 and clawed.json()["debt_change"] == 100
    # when she earns 30, staff credit her 20, and bob gives her 80
    assert shop.earn(shop.alice, 30)["debt_change"] == -30
    credited = shop.post(shop.member_url(shop.alice, "/adjust"), {"amount": 20, "reason": "care"})
    assert credited.status_code == 201, credited.text
    assert credited.json()["debt_change"] == -20
    shop.earn(shop.bob, 200)
    moved = shop.post(
        shop.member_url(shop.bob, "/transfer"), {"to_member_id": shop.alice, "amount": 80}
    )
    assert moved.status_code == 201, moved.text
    # then the transfer paid the 50 still owed, and she holds only the other 30
    assert (moved.json()["debt_change"], moved.json()["counterparty_debt_change"]) == (0, -50)
    alice = shop.balance(shop.alice)
    assert (alice["balance"], alice["available"], alice["debt"]) == (30, 30, 0)
    assert shop.balance(shop.bob)["balance"] == 120
    read = client.get(shop.posting_url(moved.json()["id"]), headers=shop.operator).json()
    assert read["counterparty_debt_change"] == -50
    # and her history shows each repayment as a line to the receivable account
    history = client.get(shop.member_url(shop.alice, "/history"), headers=shop.operator).json()
    assert [
        (e["kind"], e["change"], [x["amount"] for x in e["lines"] if x["account"] == "receivable"])
        for e in history["items"][:3]
    ] == [("transfer", 30, [50]), ("adjust", 0, [20]), ("earn", 0, [30])]
    assert_ledger_sound(db, shop.program.id)
