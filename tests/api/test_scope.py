"""Credentials act and see no further than their scope: a merchant or store its own orders,
vouchers, postings, freezes and events; programme-wide configuration, webhooks and the audit
check for credentials that cover it all; writes for staff who signed in with TOTP; and no
answer tells what lies outside the scope."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient

from jifen.api.app import create_app
from jifen.auth import service as auth
from jifen.db.uow import Database
from tests.api import support
from tests.api.conftest import api_settings
from tests.api.earning import Shop as EarningShop
from tests.api.earning import body, order
from tests.api.test_rewards import MUG, WASH, Till

Json = dict[str, Any]


# --------------------------------------------------------------------------- orders


def test_member_order_routes_hide_another_merchants_orders(
    client: TestClient, db: Database
) -> None:
    """A merchant's credentials see only its own orders through a member's routes too:
    GET …/members/{id}/orders leaves another merchant's order out, and …/orders/{id} answers
    404 for it, as the programme's order routes do."""
    till = Till(client, db)
    body(till.post("/rewards", WASH, till.operator), 201)
    mall = support.api_key(db, till.shop.program_id, merchant="mall")
    other = support.api_key(db, till.shop.program_id, merchant="other")
    at_mall = body(till.post(f"/members/{till.alice}/redemptions", {"reward": "wash"}, mall), 201)
    # the programme's order route hides mall's order from 'other'
    assert till.get(f"/orders/{at_mall['id']}", other).status_code == 404
    # and so do the member's routes
    listed = body(till.get(f"/members/{till.alice}/orders", other), 200)["items"]
    one = till.get(f"/members/{till.alice}/orders/{at_mall['id']}", other)
    assert [o["id"] for o in listed] == [] and one.status_code == 404, (listed, one.text)


def test_a_cashier_pays_only_its_own_stores_orders(client: TestClient, db: Database) -> None:
    """A cashier acts at its own store: an order made at another store of the merchant is
    unknown to it (404), both to see and to confirm the payment of."""
    till = Till(client, db)
    kettle = {**MUG, "code": "kettle", "cash_fen": 9000, "stock": 5}
    body(till.post("/rewards", kettle, till.operator), 201)
    program = till.shop.program_id
    s2 = support.staff(db, "cashier", program_id=program, merchant="hq", store="S2")
    made = body(till.post(f"/members/{till.alice}/redemptions", {"reward": "kettle"}, s2), 201)
    assert made["state"] == "awaiting_payment"
    seen = till.get(f"/orders/{made['id']}", till.cashier)  # hq / S1
    paid = till.post(
        f"/orders/{made['id']}/paid", {"payment_ref": "pos-s1", "amount_fen": 9000}, till.cashier
    )
    # another store's order is unknown to a write as to a read: 404, not 403
    assert (seen.status_code, paid.status_code) == (404, 404), (seen.text, paid.text)


def test_a_merchant_cannot_accept_another_merchants_voucher(
    client: TestClient, db: Database
) -> None:
    """A voucher is accepted only at the tills of the merchant its order was made for
    (rewards.service.use_voucher): mall's voucher is refused at another merchant's till and
    nothing changes, so codes cannot be tried at other merchants' tills."""
    till = Till(client, db)
    body(till.post("/rewards", WASH, till.operator), 201)
    program = till.shop.program_id
    mall = support.api_key(db, program, merchant="mall")
    at_mall = body(till.post(f"/members/{till.alice}/redemptions", {"reward": "wash"}, mall), 201)
    code = at_mall["voucher"]["code"]
    stranger = support.staff(db, "cashier", program_id=program, merchant="other", store="X1")
    used = till.post(f"/vouchers/{code}/use", {}, stranger)
    assert used.status_code in (403, 404), used.text


def test_another_merchants_order_is_unknown_not_forbidden(client: TestClient, db: Database) -> None:
    """Another merchant's order is unknown to a write as it is to a read: cancelling it
    answers 404, as cancelling an order that does not exist does, so no answer tells a
    merchant which order ids exist at other merchants."""
    till = Till(client, db)
    body(till.post("/rewards", WASH, till.operator), 201)
    program = till.shop.program_id
    mall = support.api_key(db, program, merchant="mall")
    at_mall = body(till.post(f"/members/{till.alice}/redemptions", {"reward": "wash"}, mall), 201)
    other = support.staff(db, "operator", program_id=program, merchant="other")
    missing = till.post("/orders/999999999/cancel", {}, other)
    theirs = till.post(f"/orders/{at_mall['id']}/cancel", {}, other)
    assert missing.status_code == 404
    assert theirs.status_code == 404, theirs.text


# --------------------------------------------------------------------------- points


def test_a_cashier_refunds_only_its_own_stores_spends(client: TestClient, db: Database) -> None:
    """A cashier refunds only spends made at its own store: points.api._own_posting checks
    the posting's store as well as its merchant, so a spend made at S2 is unknown (404) to a
    cashier of S1."""
    till = Till(client, db)
    program = till.shop.program_id
    s2 = support.staff(db, "cashier", program_id=program, merchant="hq", store="S2")
    spend = body(till.post(f"/members/{till.alice}/points/spend", {"amount": 100}, s2), 201)
    refund = till.post(f"/postings/{spend['id']}/refund", {}, till.cashier)  # hq / S1
    # another store's posting is unknown, as another merchant's is: 404, not 403
    assert refund.status_code == 404, refund.text


def test_a_merchant_cannot_release_a_risk_officers_freeze(client: TestClient, db: Database) -> None:
    """A freeze made by risk control is made for no merchant: it is the programme's own, and
    credentials of one merchant cannot release it (403), as they cannot give back any other
    posting made for no merchant."""
    till = Till(client, db)
    program = till.shop.program_id
    risk = support.staff(db, "risk_officer", program_id=program)
    frozen = body(
        till.post(f"/members/{till.alice}/points/freeze", {"amount": 4000, "reason": "fraud"},
                  risk), 201,
    )  # fmt: skip
    mall_operator = support.staff(db, "operator", program_id=program, merchant="mall")
    released = till.post(f"/postings/{frozen['id']}/unfreeze", {}, mall_operator)
    assert released.status_code == 403, released.text


# --------------------------------------------------------------------------- events


def test_a_merchant_reads_only_its_own_events(client: TestClient, db: Database) -> None:
    """An event is read only with credentials of the merchant it was made for: GET
    …/events/{id} answers 404 to another merchant's key, so one merchant does not read
    another's orders (member, lines, points)."""
    shop = EarningShop(client, db)
    hq = support.api_key(db, shop.program.id, merchant="hq")
    other = support.api_key(db, shop.program.id, merchant="other")
    sent = body(
        shop.send(shop.event(shop.alice, "hq-order-1", order("A1", ("TV", "家电", 1000))), hq),
        201,
    )
    seen = shop.get(f"/events/{sent['id']}", other)
    assert seen.status_code == 404, seen.text


# --------------------------------------------------------------------------- webhooks


def test_a_merchants_operator_cannot_take_over_programme_webhooks(
    client: TestClient, db: Database
) -> None:
    """Webhooks carry every merchant's postings and orders, so they need a grant covering
    the whole programme: an operator of one merchant cannot rotate (and so learn) the secret
    of the programme's subscription."""
    shop = EarningShop(client, db)
    program = shop.program.id
    mall_operator = support.staff(db, "operator", program_id=program, merchant="mall")
    hook = body(shop.post("/webhooks", {"url": "http://93.184.216.34/all", "event_types": ["*"]}),
                201)  # fmt: skip
    rotated = shop.post(f"/webhooks/{hook['id']}/rotate", {}, mall_operator)
    assert rotated.status_code in (403, 404), rotated.text


def test_a_merchants_operator_cannot_subscribe_to_the_programmes_events(
    client: TestClient, db: Database
) -> None:
    """A subscription receives every merchant's events, so a merchant's operator cannot
    subscribe at all (nor read the programme's outbox): a programme-wide grant is needed."""
    shop = EarningShop(client, db)
    program = shop.program.id
    mall_operator = support.staff(db, "operator", program_id=program, merchant="mall")
    mine = shop.post("/webhooks", {"url": "http://93.184.216.34/m", "event_types": ["*"]},
                     mall_operator)  # fmt: skip
    outbox = shop.get("/outbox", mall_operator)
    assert (mine.status_code, outbox.status_code) == (403, 403), (mine.text, outbox.text)
    assert mine.json()["code"] == outbox.json()["code"] == "scope_too_narrow"
    assert "a grant covering the whole programme" in mine.json()["detail"]
    assert body(shop.get("/webhooks"), 200)["items"] == []


def test_a_merchants_key_cannot_link_members_into_a_family(
    client: TestClient, db: Database
) -> None:
    """A family's main account sees every member's points, earned at any merchant: linking
    needs a grant covering the whole programme, not one merchant's key or operator."""
    shop = EarningShop(client, db)
    program = shop.program.id
    family = ["members.read", "members.family"]
    mall_key = support.api_key(db, program, merchant="mall", permissions=family)
    mall_operator = support.staff(db, "operator", program_id=program, merchant="mall")
    path = f"/members/{shop.alice}/family/members/{shop.bob}"
    for headers in (mall_key, mall_operator):
        refused = shop.put(path, {}, headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "scope_too_narrow"
    assert body(shop.get(f"/members/{shop.bob}/family"), 200)["main_member_id"] is None
    programme_key = support.api_key(db, program, permissions=family)
    linked = body(shop.put(path, {}, programme_key), 200)
    assert [m["member_id"] for m in linked["members"]] == [shop.alice, shop.bob]


def test_a_merchants_key_cannot_move_a_member_between_tiers(
    client: TestClient, db: Database
) -> None:
    """A member's tier multiplies its earnings and discounts its redemptions at every
    merchant: one merchant's key or operator cannot set it, evaluate it or dry-run the
    programme's evaluation."""
    from jifen.tiers import service as tiers
    from jifen.tiers.schemas import TierDef

    shop = EarningShop(client, db)
    program = shop.program.id
    db.run(
        lambda uow: tiers.set_tiers(
            uow, program_id=program,
            definitions=[TierDef(code="普通", name="普通", rank=0),
                         TierDef(code="钻石", name="钻石", rank=1)],
        )
    )  # fmt: skip
    mall_key = support.api_key(db, program, merchant="mall", permissions=["tiers.write"])
    mall_operator = support.staff(db, "operator", program_id=program, merchant="mall")
    tier = f"/members/{shop.alice}/tier"
    for headers in (mall_key, mall_operator):
        for answer in (
            shop.put(tier, {"tier": "钻石", "reason": "vip"}, headers),
            shop.post(f"{tier}/evaluate", {}, headers),
            shop.post("/tiers/dry-run", {}, headers),
        ):
            assert answer.status_code == 403, answer.text
            assert answer.json()["code"] == "scope_too_narrow"
    assert body(shop.get(tier), 200)["tier"] is None
    moved = shop.put(tier, {"tier": "钻石", "reason": "vip"})
    assert body(moved, 200)["tier"] == "钻石"


def test_a_merchants_operator_cannot_take_over_a_members_sign_in(
    client: TestClient, db: Database
) -> None:
    """A member's password and bound phone sign it in to the points it earned at every
    merchant: one merchant's operator can reset neither (it would sign in as the member)."""
    shop = EarningShop(client, db)
    program = shop.program.id
    mall_operator = support.staff(db, "operator", program_id=program, merchant="mall")
    member = f"/members/{shop.alice}"
    for answer in (
        shop.put(f"{member}/password", {"new_password": "a-long-enough-pass"}, mall_operator),
        shop.put(
            f"{member}/identity",
            {"id_number": _id_number(7), "phone": "13800138000"},
            mall_operator,
        ),
    ):
        assert answer.status_code == 403, answer.text
        assert answer.json()["code"] == "scope_too_narrow"
    assert body(shop.get(member), 200)["phone"] is None
    reset = shop.put(f"{member}/password", {"new_password": "a-long-enough-pass"})
    assert reset.status_code == 200, reset.text


# --------------------------------------------------------------------------- sign-in


def test_a_session_opened_without_totp_does_not_gain_writes(
    client: TestClient, db: Database
) -> None:
    """Read-only staff may sign in without a TOTP code, and a session opened so never writes
    (sessions.totp_verified): a write role granted later is refused through it, so writing
    always takes a sign-in with the second factor."""
    shop = EarningShop(client, db)
    program = shop.program.id

    username = f"later-{uuid.uuid4().hex[:8]}"

    def make(uow: Any) -> int:
        created = auth.create_staff(uow, username=username, password="correct horse 1")
        auth.grant_role(uow, staff_id=created.id, role="auditor", program_id=program)
        return created.id

    staff_id = db.run(make)
    signed = client.post(
        "/v1/auth/staff/sign-in", json={"username": username, "password": "correct horse 1"}
    )
    token = body(signed, 200)["token"]
    db.run(lambda uow: auth.grant_role(uow, staff_id=staff_id, role="operator", program_id=program))
    earned = shop.post(f"/members/{shop.alice}/points/earn", {"amount": 10}, support.bearer(token))
    assert earned.status_code in (401, 403), earned.text


# --------------------------------------------------------------------------- programme-wide


def test_a_merchants_operator_cannot_change_programme_wide_configuration(
    client: TestClient, db: Database
) -> None:
    """The programme's settings and reward catalogue bind every merchant, so changing them
    needs a grant covering the whole programme: a merchant's operator is refused (403), as
    merchant-scoped administrators are for roles, API keys and programmes."""
    shop = EarningShop(client, db)
    program = shop.program.id
    mall_operator = support.staff(db, "operator", program_id=program, merchant="mall")
    settings = body(shop.get("/settings"), 200)
    filed = shop.put("/settings", {**settings, "transfers_enabled": True}, mall_operator)
    reward = shop.post(
        "/rewards", {"code": "free", "kind": "virtual", "name": {"zh": "免费"}, "points": 1},
        mall_operator,
    )  # fmt: skip
    assert (filed.status_code, reward.status_code) == (403, 403), (filed.text, reward.text)


def test_only_an_installation_wide_auditor_verifies_the_chains(
    client: TestClient, db: Database
) -> None:
    """/audit/verify follows chains that run through every programme's entries, so only an
    auditor of every programme verifies them: an auditor of one programme is refused (403
    scope_too_narrow), and its answer tells nothing of other programmes' activity."""
    mine = EarningShop(client, db)
    auditor = support.staff(db, "auditor", program_id=mine.program.id)
    refused = client.get("/v1/audit/verify", headers=auditor)
    assert refused.status_code == 403, refused.text
    assert refused.json()["code"] == "scope_too_narrow"
    everywhere = support.staff(db, "auditor")
    assert body(client.get("/v1/audit/verify", headers=everywhere), 200)["entries"] > 0


def test_another_programmes_existence_is_not_revealed(client: TestClient, db: Database) -> None:
    """A key of one programme gets the same answer for another programme's code as for a
    code that does not exist (api.deps._program), so it cannot learn which programme codes
    exist."""
    mine, theirs = EarningShop(client, db), EarningShop(client, db)
    existing = client.get(f"/v1/programs/{theirs.program.code}/members/1/points", headers=mine.key)
    missing = client.get("/v1/programs/no-such-programme/members/1/points", headers=mine.key)
    assert existing.status_code == missing.status_code, (existing.text, missing.text)


# --------------------------------------------------------------------------- personal data


def _id_number(seed: int) -> str:
    from jifen.members.core import id_check_digit

    first17 = f"11010519900307{seed:03d}"
    return first17 + id_check_digit(first17)


def test_a_member_cannot_go_on_probing_whose_phone_or_id_number_is_bound(
    db: Database,
) -> None:
    """A member's own binding refused because another member holds the number says so (409);
    a member may try only ``rate_limit_identity`` bindings of its own, so that it cannot
    try number after number to learn whose they are. Staff binding for members are not
    counted."""
    app = create_app(db, api_settings(rate_limit_identity="3/day"))
    with TestClient(app) as client:
        shop = EarningShop(client, db)
        members = "/members"
        body(shop.put(f"{members}/{shop.bob}/identity",
                      {"id_number": _id_number(1), "phone": "13900000001"}), 200)  # fmt: skip
        as_alice = support.member(db, shop.alice)
        tries = [
            shop.put(f"{members}/{shop.alice}/identity",
                     {"id_number": _id_number(n), "phone": f"1390000001{n}"}, as_alice)
            for n in (1, 1, 2, 3)
        ]  # fmt: skip
        assert [t.status_code for t in tries] == [409, 409, 200, 429]
        assert tries[3].json()["code"] == "rate_limited"
        assert "real-name binding" in tries[3].json()["detail"]
        # staff go on binding for members
        for n in (4, 5, 6, 7):
            staff = shop.put(f"{members}/{shop.bob}/identity",
                             {"id_number": _id_number(n), "phone": f"1390000002{n}"})  # fmt: skip
            assert staff.status_code == 200, staff.text
