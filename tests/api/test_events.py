"""Events over HTTP: an order from an API key earns through the live rules, pending for the
return window; an event is stored once per (source, external id), so that sending it again
answers the same and another payload under its id is refused; a batch answers item by item
and a refused item leaves nothing behind, in the caller's language."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from jifen.api.app import create_app
from jifen.audit import service as audit_service
from jifen.audit.models import audit_entries
from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.points import service as points_service
from tests.api import support
from tests.api.conftest import api_settings
from tests.api.earning import RATES, Shop, body, order, rule
from tests.factories import assert_ledger_sound, new_members, new_program

CJK = re.compile(r"[\u4e00-\u9fff]")


def at_once(count: int, send: Callable[[int], Any]) -> list[Any]:
    """``send(0)`` … ``send(count - 1)`` from as many threads, released together."""
    answers: list[Any] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        answers.append(send(index))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_an_order_from_an_api_key_earns_pending_points_and_a_resend_replays(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    event = shop.event(shop.alice, "o1", order("A1", ("TV", "家电", 1000), ("T1", "日用品", 200)))
    # when the POS sends the order with its API key
    first = shop.send(event)
    # then it is stored, with the award and the posting it made
    sent = body(first, 201)
    assert sent["replayed"] is False and sent["member_id"] == shop.alice
    (award,) = sent["awards"]
    assert (award["rule"], award["version"], award["kind"]) == ("base", 1, "spend_rate")
    assert award["points"] == award["wanted"] == 3200 and award["cap"] is None
    assert award["posting_id"] is not None and award["detail"]["eligible_fen"] == 120000
    assert sent["points"] == 3200
    # the points are the member's, pending for the return window (7 days by default)
    balance = shop.balance(shop.alice)
    assert (balance["balance"], balance["pending"], balance["available"]) == (3200, 3200, 0)
    # when the same event is sent again under a new Idempotency-Key
    again = body(shop.send(event), 201)
    # then it answers the first event, replayed, and posts nothing more
    assert again["replayed"] is True
    assert again["id"] == sent["id"] and again["awards"] == sent["awards"]
    assert shop.balance(shop.alice)["balance"] == 3200
    # the same request under the same Idempotency-Key is replayed by the API itself
    headers = {**shop.key, **support.key()}
    fresh = shop.event(shop.alice, "o2", order("A2", ("T1", "日用品", 10)))
    once = client.post(f"{shop.base}/events", json=fresh, headers=headers)
    twice = client.post(f"{shop.base}/events", json=fresh, headers=headers)
    assert once.status_code == twice.status_code == 201
    assert twice.json() == {**once.json(), "replayed": True}
    assert twice.headers["Idempotent-Replayed"] == "true"
    # another payload under the same source and external id is refused
    changed = shop.event(shop.alice, "o1", order("A1", ("TV", "家电", 2000)))
    conflict = shop.send(changed)
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["code"] == "idempotency_conflict"
    assert "pos:o1" in conflict.json()["detail"]
    assert shop.balance(shop.alice)["balance"] == 3210
    # the event can be read back, with its awards
    read = body(shop.get(f"/events/{sent['id']}", shop.key), 200)
    assert read["awards"] == sent["awards"] and read["replayed"] is False
    # and after the return window the points are available
    assert isinstance(db.clock, ManualClock)
    db.clock.advance(timedelta(days=7, seconds=1))
    balance = shop.balance(shop.alice)
    assert (balance["available"], balance["pending"]) == (3210, 0)
    assert shop.stored_events() == 2
    assert_ledger_sound(db, shop.program.id)


def test_an_event_is_read_only_in_its_own_programme(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    sent = shop.earn(shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 10))))
    # no rule is live: the event is stored with nothing earned
    assert sent["awards"] == [] and sent["points"] == 0
    assert body(shop.get(f"/events/{sent['id']}"), 200)["id"] == sent["id"]
    missing = shop.get(f"/events/{sent['id'] + 1000}")
    assert missing.status_code == 404 and missing.json()["code"] == "unknown_event"
    other = new_program(db)
    admin = support.staff(db, "super_admin")
    elsewhere = client.get(f"/v1/programs/{other.code}/events/{sent['id']}", headers=admin)
    assert elsewhere.status_code == 404
    # and a key of another programme reads nothing here
    stranger = support.api_key(db, other.id)
    assert shop.get(f"/events/{sent['id']}", stranger).status_code == 403


def test_an_event_naming_another_programmes_member_is_refused(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    other = new_program(db)
    (stranger,) = new_members(db, other.id, 1)
    answer = shop.send(shop.event(stranger, "o1", order("A1", ("T1", "日用品", 10))))
    assert answer.status_code == 404 and answer.json()["code"] == "unknown_member"
    assert shop.stored_events() == 0


def test_a_malformed_event_is_refused_before_anything_is_stored(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    good = shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 10)))
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "member_ref": "m0"}, "body"),
        ({k: v for k, v in good.items() if k != "member_id"}, "body"),
        ({**good, "occurred_at": "2026-01-01T09:00:00"}, "body.occurred_at"),
        ({**good, "type": "Order Paid"}, "body.type"),
        ({**good, "points": 5}, "body.points"),
    ]
    for event, field in cases:
        answer = shop.send(event)
        assert answer.status_code == 422, event
        assert answer.json()["errors"][0]["field"] == field, answer.text
    # a payload that does not fit its type is refused with the field named
    bad = shop.send({**good, "payload": {"order_id": "A1", "lines": []}})
    assert bad.status_code == 422
    assert [e["field"] for e in bad.json()["errors"]] == ["payload.lines"]
    assert shop.stored_events() == 0


def test_a_batch_answers_each_item_and_a_refused_item_leaves_nothing_behind(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    good = shop.event(shop.alice, "b1", order("B1", ("T1", "日用品", 100)))
    by_ref = shop.event(shop.bob, "b2", order("B2", ("TV", "家电", 10)))
    del by_ref["member_id"]
    by_ref["member_ref"] = "m1"  # bob's reference
    unknown_type = shop.event(shop.alice, "b3", {}, type_="order.teleported")
    negative = shop.event(shop.alice, "b4", order("B4", ("T1", "日用品", -5)))
    nobody = shop.event(10**12, "b5", order("B5", ("T1", "日用品", 100)))
    # a refund of an order never sent: refused only after the event was written
    no_order = shop.event(
        shop.alice, "b6", {"order_id": "NOPE", "whole": True}, type_="order.refunded"
    )
    batch = [good, by_ref, unknown_type, negative, nobody, no_order]
    # when the batch is sent
    answer = body(shop.post("/events/batch", {"events": batch}, shop.key), 200)
    # then each item has its own result
    assert (answer["accepted"], answer["refused"]) == (2, 4)
    items = answer["items"]
    assert [i["index"] for i in items] == list(range(6))
    assert [i["ok"] for i in items] == [True, True, False, False, False, False]
    assert items[0]["result"]["points"] == 100 and items[0]["result"]["member_id"] == shop.alice
    assert items[1]["result"]["points"] == 30 and items[1]["result"]["member_id"] == shop.bob
    refused = {i["index"]: (i["code"], i["detail"]) for i in items if not i["ok"]}
    assert all(i["result"] is None for i in items if not i["ok"])
    code, detail = refused[2]
    assert code == "invalid_input"
    assert detail.startswith("type: ") and "unknown event type 'order.teleported'" in detail
    code, detail = refused[3]
    assert code == "invalid_input"
    assert (
        detail.startswith("payload.lines.0.amount_fen: ") and "greater than or equal to 0" in detail
    )
    code, detail = refused[4]
    assert code == "unknown_member" and f"no member {10**12}" in detail
    code, detail = refused[5]
    assert code == "order_not_seen" and "No order.paid event for order 'NOPE'" in detail
    # and the refused items left nothing: two events, and only their points
    assert shop.stored_events() == 2
    assert shop.balance(shop.alice)["balance"] == 100
    assert shop.balance(shop.bob)["balance"] == 30
    # so that, put right, they go in under the same ids as new events
    fixed = [
        {**unknown_type, "type": "member.checked_in"},
        {**negative, "payload": order("B4", ("T1", "日用品", 5))},
        {**nobody, "member_id": shop.bob},
        {**no_order, "payload": {"order_id": "B1", "whole": True}},
    ]
    again = body(shop.post("/events/batch", {"events": fixed}, shop.key), 200)
    assert (again["accepted"], again["refused"]) == (4, 0), again
    assert not any(i["result"]["replayed"] for i in again["items"])
    assert again["items"][3]["result"]["points"] == -100  # B1's points taken back
    assert shop.stored_events() == 6
    assert shop.balance(shop.alice)["balance"] == 5
    assert shop.balance(shop.bob)["balance"] == 130
    assert_ledger_sound(db, shop.program.id)
    # and the audit log keeps a summary of each batch, in a chain that still verifies
    with db.transaction(read_only=True) as uow:
        summaries = uow.conn.execute(
            select(audit_entries.c.target, audit_entries.c.after)
            .where(
                audit_entries.c.program_id == shop.program.id,
                audit_entries.c.target.like("events:batch:%"),
            )
            .order_by(audit_entries.c.id)
        ).all()
        problems = audit_service.verify(uow)
    assert [target for target, _ in summaries] == ["events:batch:6", "events:batch:4"]
    first = summaries[0][1]
    assert (first["accepted"], first["refused"]) == (2, 4)
    assert first["items"][0] == {"index": 0, "event_id": items[0]["result"]["id"], "points": 100}
    assert first["items"][1]["points"] == 30
    assert [i["code"] for i in first["items"][2:]] == [
        "invalid_input",
        "invalid_input",
        "unknown_member",
        "order_not_seen",
    ]
    assert "awards" not in json.dumps(first)
    assert problems == []


def test_a_batch_replays_an_event_it_already_holds_and_refuses_a_changed_one(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    first = shop.earn(shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 100))))
    same = shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 100)))
    changed = shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 999)))
    answer = body(shop.post("/events/batch", {"events": [same, changed]}, shop.key), 200)
    replay, conflict = answer["items"]
    assert replay["ok"] and replay["result"]["id"] == first["id"] and replay["result"]["replayed"]
    assert not conflict["ok"] and conflict["code"] == "idempotency_conflict"
    assert shop.balance(shop.alice)["balance"] == 100
    # an empty batch, or one over 1,000 events, is refused whole
    assert shop.post("/events/batch", {"events": []}, shop.key).status_code == 422
    too_many = [shop.event(shop.alice, f"x{i}", {}, type_="member.checked_in") for i in range(1001)]
    assert shop.post("/events/batch", {"events": too_many}, shop.key).status_code == 422
    assert shop.stored_events() == 1


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("unknown_member", id="unknown-member"),
        pytest.param("unknown_type", id="unknown-type"),
        pytest.param("negative_amount", id="negative-amount"),
    ],
)
def test_a_batch_explains_refusals_in_chinese_when_asked(
    client: TestClient, db: Database, bad: str
) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    good = shop.event(shop.alice, "z1", order("Z1", ("T1", "日用品", 100)))
    refused = {
        "unknown_member": shop.event(10**12, "z2", order("Z2", ("T1", "日用品", 100))),
        "unknown_type": shop.event(shop.alice, "z2", {}, type_="order.teleported"),
        "negative_amount": shop.event(shop.alice, "z2", order("Z2", ("T1", "日用品", -5))),
    }[bad]
    answer = body(
        shop.post("/events/batch", {"events": [good, refused]}, shop.key, language="zh-CN"), 200
    )
    ok, item = answer["items"]
    assert ok["ok"] and not item["ok"]
    # the detail is in Chinese words, not only Chinese punctuation
    assert CJK.search(item["detail"]), item["detail"]


def test_eight_concurrent_sends_of_one_event_store_it_once(pg: Database) -> None:
    with TestClient(create_app(pg, api_settings())) as client:
        shop = Shop(client, pg)
        shop.activate(rule("base", RATES))
        event = shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 100)))
        # when the POS sends one order from eight threads at once, each with its own key
        answers = at_once(8, lambda _: shop.send(event))
        # then one stored it and the others answered it, replayed
        assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
        assert len({a.json()["id"] for a in answers}) == 1
        assert sorted(a.json()["replayed"] for a in answers) == [False] + [True] * 7
        assert shop.stored_events() == 1
        assert shop.balance(shop.alice)["balance"] == 100
        assert_ledger_sound(pg, shop.program.id)


def test_concurrent_orders_of_one_member_stay_within_the_tier_day_cap(pg: Database) -> None:
    with TestClient(create_app(pg, api_settings())) as client:
        shop = Shop(client, pg)
        shop.define_tiers()
        shop.set_tier(shop.alice, "普通")
        shop.activate(rule("base", RATES))
        shop.set_caps({"by_tier": {"普通": {"day": 1000}}})
        # when four orders of 600 points each arrive at once
        answers = at_once(
            4,
            lambda i: shop.send(
                shop.event(shop.alice, f"o{i}", order(f"A{i}", ("T", "日用品", 600)))
            ),
        )
        # then together they post no more than the day cap
        assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
        assert sorted(a.json()["points"] for a in answers) == [0, 0, 400, 600]
        assert shop.balance(shop.alice)["balance"] == 1000
        assert_ledger_sound(pg, shop.program.id)


def test_a_store_key_sends_orders_for_its_own_store_only(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    store_key = support.api_key(db, shop.program.id, merchant="merchant-x", store="s1")
    elsewhere = shop.event(shop.alice, "o1", {**order("A1", ("T1", "日用品", 10)), "store": "s2"})
    answer = shop.send(elsewhere, store_key)
    assert answer.status_code == 403, answer.text
    assert shop.balance(shop.alice)["balance"] == 0
    # its own store's order goes in, and the posting remembers where it was made
    own = shop.event(shop.alice, "o2", {**order("A2", ("T1", "日用品", 10)), "store": "s1"})
    answer = shop.send(own, store_key)
    assert answer.status_code == 201, answer.text
    posting_id = answer.json()["awards"][0]["posting_id"]
    assert db.run(lambda uow: points_service.origin_of(uow, posting_id=posting_id)) == (
        "merchant-x",
        "s1",
    )


WHOLE = {"order_id": "A-1", "whole": True}


def test_a_merchant_key_refunds_only_orders_paid_through_its_merchant(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    key_a = support.api_key(db, shop.program.id, merchant="merchant-a", store="s1")
    key_a2 = support.api_key(db, shop.program.id, merchant="merchant-a", store="s2")
    key_b = support.api_key(db, shop.program.id, merchant="merchant-b")
    paid = shop.send(
        shop.event(shop.alice, "a-1", {**order("A-1", ("TV", "家电", 1000)), "store": "s1"}),
        key_a,
    )
    assert body(paid, 201)["points"] == 3000
    # Merchant B's key, and a key of another store of merchant A, do not see A's s1 order:
    # refused as an order not seen, without naming the event that paid it.
    for key, external_id in ((key_b, "b-1"), (key_a2, "a2-1")):
        refund = shop.event(shop.alice, external_id, WHOLE, "order.refunded")
        answer = shop.send(refund, key)
        assert answer.status_code == 409, answer.text
        assert answer.json()["code"] == "order_not_seen"
        assert "a-1" not in answer.text
    assert shop.balance(shop.alice)["balance"] == 3000
    # The same order sent again under another id by A's other store is counted once, and
    # named; merchant B's own order that its till also numbered A-1 is another order.
    again = shop.event(shop.alice, "a2-2", {**order("A-1", ("TV", "家电", 1000))})
    answer = shop.send(again, key_a2)
    assert answer.status_code == 422, answer.text
    assert "a-1" in answer.json()["detail"], answer.text
    assert shop.balance(shop.alice)["balance"] == 3000
    theirs = shop.event(shop.alice, "b-2", {**order("A-1", ("T1", "日用品", 10))})
    assert body(shop.send(theirs, key_b), 201)["points"] == 10
    assert shop.balance(shop.alice)["balance"] == 3010
    # The store that took the order refunds it.
    refund = shop.event(shop.alice, "a-2", WHOLE, "order.refunded")
    assert body(shop.send(refund, key_a), 201)["points"] == -3000
    assert shop.balance(shop.alice)["balance"] == 10


def test_orders_of_two_merchants_that_share_an_id_are_two_orders(
    client: TestClient, db: Database
) -> None:
    # given a programme of two merchants whose tills both numbered an order 1001
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    key_a = support.api_key(db, shop.program.id, merchant="mall/a")  # a "/" in the code
    key_b = support.api_key(db, shop.program.id, merchant="mall")
    paid_a = shop.event(shop.alice, "a-1", order("1001", ("TV", "家电", 1000)))
    paid_b = shop.event(shop.alice, "b-1", order("1001", ("T1", "日用品", 100)))
    # when each sends it, one by one and in a batch, each earns
    assert body(shop.send(paid_a, key_a), 201)["points"] == 3000
    batch = body(shop.post("/events/batch", {"events": [paid_b]}, key_b), 200)
    assert batch["items"][0]["result"]["points"] == 100, batch
    # and a replay of either is answered from the one event stored
    assert body(shop.send(paid_a, key_a), 201)["replayed"] is True
    again = body(shop.post("/events/batch", {"events": [paid_b]}, key_b), 200)
    assert again["items"][0]["result"]["replayed"] is True, again
    assert shop.stored_events() == 2
    assert shop.balance(shop.alice)["balance"] == 3100
    # a refund for no merchant cannot tell the orders apart: refused, in both languages,
    # naming neither event, and nothing is kept
    unscoped = shop.event(shop.alice, "x-1", {"order_id": "1001", "whole": True}, "order.refunded")
    for language, words in (("en", "credentials of the merchant"), ("zh-CN", "商户的凭据")):
        answer = shop.post("/events", unscoped, shop.key, language=language)
        assert answer.status_code == 422, answer.text
        assert words in answer.text and "a-1" not in answer.text, answer.text
    assert shop.stored_events() == 2
    assert shop.balance(shop.alice)["balance"] == 3100
    # each merchant's refund takes back its own order's points only
    half = {"order_id": "1001", "lines": [{"sku": "TV", "amount_fen": 50_000}]}
    refund_a = shop.event(shop.alice, "a-2", half, "order.refunded")
    assert body(shop.send(refund_a, key_a), 201)["points"] == -1500
    refund_b = shop.event(shop.alice, "b-2", {"order_id": "1001", "whole": True}, "order.refunded")
    assert body(shop.send(refund_b, key_b), 201)["points"] == -100
    assert shop.balance(shop.alice)["balance"] == 1500
    # a merchant's refund does not reach the other merchant's order of that id
    more_b = shop.event(shop.alice, "b-3", half, "order.refunded")
    answer = shop.send(more_b, key_b)
    assert answer.status_code == 422, answer.text  # no TV line in B's order
    # an id only one merchant used is refunded for no merchant too, and the next refund
    # of that order, by its merchant, counts what that one gave back
    only_a = shop.event(shop.alice, "a-3", order("2002", ("TV", "家电", 100)))
    assert body(shop.send(only_a, key_a), 201)["points"] == 300
    part = {"order_id": "2002", "lines": [{"sku": "TV", "amount_fen": 6_000}]}
    refund = shop.event(shop.alice, "x-2", part, "order.refunded")
    assert body(shop.send(refund), 201)["points"] == -180
    rest = shop.event(shop.alice, "a-4", {"order_id": "2002", "whole": True}, "order.refunded")
    assert body(shop.send(rest, key_a), 201)["points"] == -120
    assert shop.balance(shop.alice)["balance"] == 1500
    assert_ledger_sound(db, shop.program.id)


def test_held_awards_are_listed_and_decided_by_another_person_once(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    declared = {"fields": {"requested_points": {"type": "integer", "required": True}}}
    body(shop.put("/event-types/custom.contribution", declared), 200)
    shop.activate(rule("contribution", {"kind": "reviewed", "max_points": 50},
                       event_types=("custom.contribution",), caps={"budget": 100}))  # fmt: skip
    # the operator sends three contributions in; each award waits for a reviewer
    for member, external_id, asked in (
        (shop.alice, "c1", 80), (shop.bob, "c2", 30), (shop.carol, "c3", 40),
    ):  # fmt: skip
        sent = body(shop.post("/events", shop.event(
            member, external_id, {"requested_points": asked}, "custom.contribution"
        ), shop.operator), 201)  # fmt: skip
        assert sent["points"] == 0 and sent["awards"][0]["held"] is True
    page = body(shop.get("/awards/held", shop.reviewer, limit=2), 200)
    rest = body(shop.get("/awards/held", shop.reviewer, cursor=page["next_cursor"]), 200)
    held = page["items"] + rest["items"]
    assert body(shop.get("/awards/held", shop.reviewer, limit=3), 200)["next_cursor"] is None
    assert [(a["member_id"], a["wanted"], a["points"]) for a in held] == [
        (shop.alice, 50, 50), (shop.bob, 30, 30), (shop.carol, 40, 40),
    ]  # fmt: skip
    first, second, third = (a["id"] for a in held)
    # the operator who sent them cannot decide them, nor can a role without awards.decide
    own = shop.post(f"/awards/{first}/approve", {}, shop.operator)
    assert own.status_code == 403, own.text
    admin = support.staff(db, "super_admin")
    mine = shop.post(f"/awards/{first}/approve", {}, admin)
    assert mine.status_code == 200, mine.text  # another person with the permission may
    assert shop.balance(shop.alice)["balance"] == 50
    # the rule's maximum holds; approved once
    too_much = shop.post(f"/awards/{second}/approve", {"points": 51}, shop.reviewer)
    assert too_much.status_code == 422 and too_much.json()["code"] == "invalid_input"
    approved = body(shop.post(f"/awards/{second}/approve", {"points": 25}, shop.reviewer), 200)
    assert approved["decision"] == "approved" and approved["points"] == 25
    again = shop.post(f"/awards/{second}/approve", {}, shop.reviewer)
    assert again.status_code == 409, again.text
    # the rule's budget (100) caps the third: 50 + 25 spent leave 25 of its 40
    capped = body(shop.post(f"/awards/{third}/approve", {}, shop.reviewer), 200)
    assert (capped["points"], capped["cap"]) == (25, "rule_budget (contribution: 100)")
    assert body(shop.get("/awards/held", shop.reviewer), 200)["items"] == []
    assert [shop.balance(m)["balance"] for m in (shop.alice, shop.bob, shop.carol)] == [50, 25, 25]
    # a rejected one posts nothing; each decision is audited
    sent = body(
        shop.post(
            "/events",
            shop.event(shop.alice, "c4", {"requested_points": 10}, "custom.contribution"),
            shop.operator,
        ),
        201,
    )
    (award,) = body(shop.get("/awards/held", shop.reviewer), 200)["items"]
    assert award["event_id"] == sent["id"]
    rejected = body(shop.post(f"/awards/{award['id']}/reject", {"note": "no"}, shop.reviewer), 200)
    assert rejected["decision"] == "rejected" and rejected["detail"]["note"] == "no"
    unknown = shop.post("/awards/999999/reject", {}, shop.reviewer)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_award"
    actions = db.run(lambda uow: uow.conn.execute(
        select(audit_entries.c.action).where(audit_entries.c.target.like("award:%"))
    ).scalars().all())  # fmt: skip
    assert sorted(actions) == ["awards.approve"] * 3 + ["awards.reject"]
    assert shop.balance(shop.alice)["balance"] == 50
    assert_ledger_sound(db, shop.program.id)


def test_a_merchants_reviewer_sees_and_decides_only_its_own_merchants_held_awards(
    client: TestClient, db: Database
) -> None:
    # given an award held for review of an event sent by merchant 'mall'
    shop = Shop(client, db)
    declared = {"fields": {"requested_points": {"type": "integer", "required": True}}}
    body(shop.put("/event-types/custom.contribution", declared), 200)
    shop.activate(rule("contribution", {"kind": "reviewed", "max_points": 50},
                       event_types=("custom.contribution",)))  # fmt: skip
    mall = support.api_key(db, shop.program.id, merchant="mall")
    event = shop.event(shop.alice, "c1", {"requested_points": 20}, "custom.contribution")
    sent = body(shop.send(event, mall), 201)
    (award,) = body(shop.get("/awards/held", shop.reviewer), 200)["items"]
    # when reviewers of merchants 'other' and 'mall' look for it and decide it
    other = support.staff(db, "reviewer", program_id=shop.program.id, merchant="other")
    own = support.staff(db, "reviewer", program_id=shop.program.id, merchant="mall")
    # then the other merchant's sees neither the award nor its event, and cannot decide it
    assert body(shop.get("/awards/held", other), 200)["items"] == []
    assert shop.get(f"/events/{sent['id']}", other).status_code == 404
    for decision in ("approve", "reject"):
        refused = shop.post(f"/awards/{award['id']}/{decision}", {}, other)
        assert refused.status_code == 404 and refused.json()["code"] == "unknown_award"
    # while the merchant's own reviewer does
    assert [a["id"] for a in body(shop.get("/awards/held", own), 200)["items"]] == [award["id"]]
    assert body(shop.get(f"/events/{sent['id']}", own), 200)["id"] == sent["id"]
    approved = body(shop.post(f"/awards/{award['id']}/approve", {}, own), 200)
    assert approved["decision"] == "approved" and approved["points"] == 20


def test_a_refund_for_no_merchant_takes_the_order_sent_for_no_merchant_or_the_members_own(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    key_a = support.api_key(db, shop.program.id, merchant="a")
    key_b = support.api_key(db, shop.program.id, merchant="b")
    whole = {"order_id": "a/7", "whole": True}
    # merchant a's order 7 and a programme-wide order "a/7" are two orders
    assert body(
        shop.send(shop.event(shop.alice, "a-1", order("7", ("T1", "日用品", 10))), key_a), 201
    )
    for external_id, order_id in (("p-1", "a/7"), ("p-2", "7")):
        paid = shop.event(shop.alice, external_id, order(order_id, ("T1", "日用品", 100)))
        assert body(shop.send(paid), 201)["points"] == 100
    # a refund for no merchant takes the order sent for no merchant by that id
    for external_id, order_id in (("p-3", "a/7"), ("p-4", "7")):
        refund = shop.event(
            shop.alice, external_id, {**whole, "order_id": order_id}, "order.refunded"
        )
        assert body(shop.send(refund), 201)["points"] == -100
    assert shop.balance(shop.alice)["balance"] == 10
    # merchants a and b both numbered an order 8, of two members: a refund for no merchant
    # of bob's order 8 is bob's, the one order 8 that is his
    assert body(
        shop.send(shop.event(shop.alice, "a-2", order("8", ("T1", "日用品", 10))), key_a), 201
    )
    assert body(
        shop.send(shop.event(shop.bob, "b-1", order("8", ("T1", "日用品", 20))), key_b), 201
    )
    refund = shop.event(shop.bob, "p-5", {"order_id": "8", "whole": True}, "order.refunded")
    assert body(shop.send(refund), 201)["points"] == -20
    assert (shop.balance(shop.alice)["balance"], shop.balance(shop.bob)["balance"]) == (20, 0)
