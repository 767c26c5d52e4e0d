"""Rewards over HTTP: operators keep the catalogue, members redeem for themselves (once per
key), cashiers accept vouchers at their own store once, staff fulfil orders, and every
refusal is a problem document in the caller's language."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.rewards.models import rewards as rewards_table
from jifen.rewards.schemas import RewardDef
from tests.api import support
from tests.api.earning import body
from tests.rewards.shop import Shop

Json = dict[str, Any]


class Till:
    """A programme with the documents' redemption terms, staff of each kind, and members."""

    def __init__(self, client: TestClient, db: Database) -> None:
        self.client = client
        self.shop = Shop.open(db)
        program = db.run(lambda uow: _code(uow, self.shop.program_id))
        self.base = f"/v1/programs/{program}"
        self.operator = support.staff(db, "operator", program_id=self.shop.program_id)
        self.reviewer = support.staff(db, "reviewer", program_id=self.shop.program_id)
        self.cashier = support.staff(
            db, "cashier", program_id=self.shop.program_id, merchant="hq", store="S1"
        )
        (self.alice,) = self.shop.member(5000, tier="银卡")
        (self.bob,) = self.shop.member(100, tier="普通")
        self.as_alice = support.member(db, self.alice)
        self.as_bob = support.member(db, self.bob)

    def get(self, path: str, headers: support.Headers, **params: Any) -> Any:
        return self.client.get(self.base + path, params=params, headers=headers)

    def post(self, path: str, json: Any, headers: support.Headers, *, language: str = "en",
             key: support.Headers | None = None) -> Any:  # fmt: skip
        return self.client.post(
            self.base + path, json=json,
            headers={**headers, **(key or support.key()), "Accept-Language": language},
        )  # fmt: skip


def _code(uow: Any, program_id: int) -> str:
    from jifen.programs.models import programs

    return str(uow.conn.execute(programs.select().where(programs.c.id == program_id)).one().code)


MUG = {"code": "mug", "kind": "physical", "name": {"zh": "马克杯", "en": "Mug"}, "points": 1000,
       "stock": 2, "category": "家居", "images": ["/static/mug.png"]}  # fmt: skip


def test_operators_keep_the_catalogue_and_members_only_read_it(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    created = body(till.post("/rewards", MUG, till.operator), 201)
    assert (created["stock_left"], created["band"], created["state"]) == (2, "1000-2000", "active")
    duplicate = till.post("/rewards", MUG, till.operator)
    assert duplicate.status_code == 409 and duplicate.json()["code"] == "duplicate_reference"
    bad = till.post("/rewards", {**MUG, "code": "c1", "kind": "coupon"}, till.operator)
    assert bad.status_code == 422, bad.text
    assert "coupon terms" in bad.text
    assert till.post("/rewards", {**MUG, "code": "m2"}, till.as_alice).status_code == 403
    assert till.post("/rewards", {**MUG, "code": "m2"}, till.reviewer).status_code == 403
    listed = body(till.get("/rewards", till.reviewer, kind="physical", min_points=500), 200)
    assert [r["code"] for r in listed["items"]] == ["mug"]
    assert body(till.get("/rewards", till.reviewer, kind="coupon"), 200)["items"] == []
    restocked = body(till.post("/rewards/mug/stock", {"add": 3}, till.operator), 200)
    assert restocked["stock_left"] == 5
    paused = body(till.post("/rewards/mug/state", {"state": "paused"}, till.operator), 200)
    assert paused["state"] == "paused"
    # a member does not see the staff list, only what it can get
    assert till.get("/rewards", till.as_alice).status_code == 403


def test_a_member_redeems_for_itself_once_per_key(client: TestClient, db: Database) -> None:
    till = Till(client, db)
    body(till.post("/rewards", MUG, till.operator), 201)
    offer = body(till.get(f"/members/{till.alice}/rewards", till.as_alice), 200)
    assert [(a["reward"]["code"], a["quote"]["points"]) for a in offer["now"]] == [("mug", 900)]
    quote = body(till.get(f"/members/{till.alice}/rewards/mug/quote", till.as_alice), 200)
    assert [s["factor"] for s in quote["steps"]] == ["1", "0.9"]
    key = support.key()
    first = till.post(f"/members/{till.alice}/redemptions", {"reward": "mug"}, till.as_alice,
                      key=key)  # fmt: skip
    order = body(first, 201)
    assert (order["state"], order["points"]) == ("created", 900)
    again = till.post(f"/members/{till.alice}/redemptions", {"reward": "mug"}, till.as_alice,
                      key=key)  # fmt: skip
    assert body(again, 201)["id"] == order["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert body(till.get("/rewards/mug", till.operator), 200)["stock_left"] == 1
    # a member acts only on itself
    other = till.post(f"/members/{till.alice}/redemptions", {"reward": "mug"}, till.as_bob)
    assert other.status_code == 403
    assert till.get(f"/members/{till.alice}/orders", till.as_bob).status_code == 403
    mine = body(till.get(f"/members/{till.alice}/orders", till.as_alice), 200)
    assert [o["id"] for o in mine["items"]] == [order["id"]]
    # and cancels its own order: the points come back
    cancelled = body(till.post(f"/members/{till.alice}/orders/{order['id']}/cancel", {},
                               till.as_alice), 200)  # fmt: skip
    assert cancelled["state"] == "cancelled"
    balance = body(till.get(f"/members/{till.alice}/points", till.as_alice), 200)
    assert balance["available"] == 5000


def test_refusals_are_problems_in_the_callers_language(client: TestClient, db: Database) -> None:
    till = Till(client, db)
    body(till.post("/rewards", {**MUG, "stock": 1}, till.operator), 201)
    poor = till.post(f"/members/{till.bob}/redemptions", {"reward": "mug"}, till.as_bob,
                     language="zh")  # fmt: skip
    assert poor.status_code == 409
    assert poor.headers["content-type"].startswith("application/problem+json")
    assert poor.json()["code"] == "insufficient_points"
    body(till.post(f"/members/{till.alice}/redemptions", {"reward": "mug"}, till.as_alice), 201)
    gone = till.post(f"/members/{till.alice}/redemptions", {"reward": "mug"}, till.as_alice,
                     language="zh")  # fmt: skip
    assert gone.status_code == 409 and gone.json()["code"] == "out_of_stock"
    assert gone.json()["detail"] == "礼品 'mug' 仅剩 0 件,本次需要 1 件。请减少数量或选择其他礼品。"
    unknown = till.post(f"/members/{till.alice}/redemptions", {"reward": "nope"}, till.as_alice)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_reward"
    extra = till.post(f"/members/{till.alice}/redemptions", {"reward": "mug", "points": 1},
                      till.as_alice)  # fmt: skip
    assert extra.status_code == 422  # no field can set a price


def test_a_reward_or_redemption_refused_as_a_whole_names_the_field_to_fix(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    start = "2026-03-01T00:00:00+08:00"
    prize = {"code": "p", "name": {"en": "P"}, "chance_ppm": 600_000, "points": 10}
    refused = {
        "body.sales_end": {**MUG, "sales_start": start, "sales_end": "2026-02-01T00:00:00Z"},
        "body.sales_start": {**MUG, "early_access": {"金卡": 24}},
        "body.coupon": {**MUG, "kind": "coupon"},
        "body.lottery": {**MUG, "lottery": {"prizes": [prize]}},
        "body.pickup": {**MUG, "kind": "virtual", "pickup": True},
        "body.max_quantity": {**MUG, "kind": "service", "max_quantity": 2},
        "body.visible_tiers": {**MUG, "visible_tiers": []},
        "body.limit_per_member": {**MUG, "limit_period": "month"},
        "body.validity_days": {**MUG, "validity_days": 30},
        "body.lottery.prizes": {
            **MUG, "kind": "lottery", "lottery": {"prizes": [prize, {**prize, "code": "q"}]},
        },
        "body.lottery.prizes.1.value": {
            **MUG, "kind": "lottery",
            "lottery": {"budget": 100, "prizes": [
                {**prize, "chance_ppm": 1}, {**prize, "code": "q", "points": 0}
            ]},
        },
    }  # fmt: skip
    for field, reward in refused.items():
        for language in ("en", "zh"):
            answer = till.post("/rewards", reward, till.operator, language=language)
            assert answer.status_code == 422, answer.text
            (error,) = answer.json()["errors"]
            assert error["field"] == field, (field, answer.text)
    said = till.post("/rewards", {**MUG, "validity_days": 30}, till.operator, language="zh")
    assert "不发券" in said.json()["errors"][0]["message"]
    # what does apply is taken: a monthly limit, a pickup voucher's days
    body(till.post("/rewards", {**MUG, "code": "m1", "limit_per_member": 1,
                                "limit_period": "month"}, till.operator), 201)  # fmt: skip
    body(till.post("/rewards", {**MUG, "code": "m2", "pickup": True, "validity_days": 7},
                   till.operator), 201)  # fmt: skip
    answer = till.post(f"/members/{till.alice}/redemptions", {"reward": "mug", "amount_fen": 9000},
                       till.cashier, language="zh")  # fmt: skip
    (error,) = answer.json()["errors"]
    assert error["field"] == "body.payment_ref" and "请同时给出 payment_ref" in error["message"]


def test_cashiers_accept_a_voucher_once_at_their_own_store(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    wash = {"code": "wash", "kind": "service", "name": {"zh": "洗车券"}, "points": 300}
    body(till.post("/rewards", wash, till.operator), 201)
    order = body(till.post(f"/members/{till.alice}/redemptions", {"reward": "wash"},
                           till.as_alice), 201)  # fmt: skip
    code = order["voucher"]["code"]
    vouchers = body(till.get(f"/members/{till.alice}/vouchers", till.as_alice), 200)
    assert [v["code"] for v in vouchers["items"]] == [code]
    elsewhere = till.post(f"/vouchers/{code}/use", {"store": "S2"}, till.cashier)
    assert elsewhere.status_code == 403, elsewhere.text
    assert till.post(f"/vouchers/{code}/use", {}, till.as_alice).status_code == 403
    used = body(till.post(f"/vouchers/{code}/use", {}, till.cashier), 200)
    assert (used["voucher"]["state"], used["voucher"]["used_store"]) == ("used", "S1")
    twice = till.post(f"/vouchers/{code}/use", {}, till.cashier, language="zh")
    assert twice.status_code == 409 and twice.json()["code"] == "voucher_not_usable"
    assert "已于" in twice.json()["detail"] and "S1" in twice.json()["detail"]


def test_a_voucher_typed_in_lower_case_is_audited_under_its_code(
    client: TestClient, db: Database
) -> None:
    from sqlalchemy import select

    from jifen.audit.models import audit_entries

    till = Till(client, db)
    body(till.post("/rewards", WASH, till.operator), 201)
    order = body(till.post(f"/members/{till.alice}/redemptions", {"reward": "wash"},
                           till.as_alice), 201)  # fmt: skip
    code = order["voucher"]["code"]
    typed = f"{code[:6].lower()}-{code[6:]}"
    used = body(till.post(f"/vouchers/{typed}/use", {}, till.cashier), 200)
    assert used["voucher"]["state"] == "used"
    targets = db.run(lambda uow: list(uow.conn.execute(
        select(audit_entries.c.target).where(audit_entries.c.action.like("%voucher%"))
    ).scalars()), read_only=True)  # fmt: skip
    assert f"voucher:{code}" in targets and f"voucher:{typed}" not in targets


def test_a_voucher_of_one_merchants_order_is_accepted_at_its_tills_only(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)  # its cashier acts for hq
    body(till.post("/rewards", WASH, till.operator), 201)
    program = till.shop.program_id
    mall = support.staff(db, "cashier", program_id=program, merchant="mall", store="M1")
    redeem = f"/members/{till.alice}/redemptions"
    at_mall = body(till.post(redeem, {"reward": "wash"}, mall), 201)["voucher"]["code"]
    own = body(till.post(redeem, {"reward": "wash"}, till.as_alice), 201)["voucher"]["code"]
    # hq's till finds no voucher of mall's order, by reading or using it
    for answer in (
        till.get(f"/vouchers/{at_mall}", till.cashier),
        till.post(f"/vouchers/{at_mall}/use", {}, till.cashier),
    ):
        assert answer.status_code == 404 and answer.json()["code"] == "unknown_voucher"
    assert body(till.get(f"/vouchers/{at_mall}", mall), 200)["state"] == "issued"
    # mall's own till accepts it; a voucher of alice's own app is accepted at any till
    assert body(till.post(f"/vouchers/{at_mall}/use", {}, mall), 200)["voucher"]["state"] == "used"
    assert body(till.post(f"/vouchers/{own}/use", {}, till.cashier), 200)["voucher"]["state"] == (
        "used"
    )


def test_staff_fulfil_orders_and_a_return_gives_points_and_stock_back(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    body(till.post("/rewards", MUG, till.operator), 201)
    order = body(till.post(f"/members/{till.alice}/redemptions", {"reward": "mug"},
                           till.as_alice), 201)  # fmt: skip
    queue = body(till.get("/orders", till.operator, state="created"), 200)
    assert [o["id"] for o in queue["items"]] == [order["id"]]
    path = f"/orders/{order['id']}"
    # the order's payment is given back by the order, never behind its back
    behind = till.post(f"/postings/{order['spend_posting_id']}/refund", {"reason": "x"},
                       till.operator)  # fmt: skip
    assert behind.status_code == 409 and f"orders/{order['id']}/cancel" in behind.text
    assert till.post(f"{path}/ship", {}, till.reviewer).status_code == 403
    shipped = body(till.post(f"{path}/ship", {"tracking": "SF1"}, till.operator), 200)
    assert shipped["outcome"]["tracking"] == "SF1"
    wrong = till.post(f"{path}/cancel", {}, till.operator)
    assert wrong.status_code == 409 and wrong.json()["code"] == "state_conflict"
    body(till.post(f"{path}/deliver", {}, till.operator), 200)
    returned = body(till.post(f"{path}/return", {"note": "damaged"}, till.operator), 200)
    assert returned["state"] == "returned" and returned["steps"][-1]["note"] == "damaged"
    assert body(till.get("/rewards/mug", till.operator), 200)["stock_left"] == 2
    balance = body(till.get(f"/members/{till.alice}/points", till.as_alice), 200)
    assert balance["available"] == 5000


def test_the_redemption_policy_is_part_of_the_programmes_settings(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    settings = body(till.get("/settings", till.reviewer), 200)
    assert settings["redemption"]["tiers"]["钻石"]["cooling_off_above"] == 5000
    assert settings["redemption"]["voucher_fee_pct"] == 10
    assert settings["redemption"]["payment_minutes"] == 30
    # a time to pay of 1 minute to a day may be asked for; none other
    for minutes, status in ((0, 422), (1441, 422), (1440, 202)):
        wanted = {**settings, "redemption": {**settings["redemption"], "payment_minutes": minutes}}
        answer = till.client.put(till.base + "/settings", json=wanted,
                                 headers={**till.operator, **support.key()})  # fmt: skip
        assert answer.status_code == status, answer.text
        if status == 422:
            assert "payment_minutes" in answer.text


def test_an_order_is_cancelled_only_by_its_own_merchant_and_a_member_names_none(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    body(till.post("/rewards", MUG, till.operator), 201)
    redeem = f"/members/{till.alice}/redemptions"
    named = till.post(redeem, {"reward": "mug", "merchant": "other"}, till.as_alice)
    assert named.status_code == 403, named.text
    # no role lets a member name one: the refusal says so, and sends it for no role
    assert named.json()["code"] == "wrong_caller" and "role" not in named.json()["detail"]
    hq = support.api_key(db, till.shop.program_id, merchant="hq")
    other = support.api_key(db, till.shop.program_id, merchant="other")
    order = body(till.post(redeem, {"reward": "mug"}, hq), 201)
    cancel = f"/members/{till.alice}/orders/{order['id']}/cancel"
    refused = till.post(cancel, {}, other)  # unknown to other, as a missing order is
    assert refused.status_code == 404 and refused.json()["code"] == "unknown_order"
    assert body(till.get(f"/members/{till.alice}/points", till.as_alice), 200)["available"] == 4100
    assert body(till.post(cancel, {}, hq), 200)["state"] == "cancelled"
    assert body(till.get(f"/members/{till.alice}/points", till.as_alice), 200)["available"] == 5000


def test_only_the_member_confirms_its_held_redemption(client: TestClient, db: Database) -> None:
    till = Till(client, db)
    (diamond,) = till.shop.member(20000, tier="钻石")
    body(till.post("/rewards", {**MUG, "code": "watch", "points": 10000}, till.operator), 201)
    hq = support.api_key(db, till.shop.program_id, merchant="hq")
    held = body(till.post(f"/members/{diamond}/redemptions", {"reward": "watch"}, hq), 201)
    assert (held["state"], held["points"]) == ("held", 7000)
    assert isinstance(db.clock, ManualClock)
    db.clock.advance(timedelta(hours=25))  # past the cooling-off (and the sessions)
    program = till.shop.program_id
    operator = support.staff(db, "operator", program_id=program)
    cashier = support.staff(db, "cashier", program_id=program, merchant="hq", store="S1")
    other = support.api_key(db, program, merchant="other")
    confirm = f"/members/{diamond}/orders/{held['id']}/confirm"
    for who in (operator, hq, other, cashier):
        refused = till.post(confirm, {}, who, language="zh")
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "wrong_caller"
        assert "本人在其应用中确认" in refused.json()["detail"]
    english = till.post(confirm, {}, operator)
    assert "confirms its held redemption, in its own app" in english.json()["detail"]
    assert body(till.get(f"/orders/{held['id']}", operator), 200)["state"] == "held"
    confirmed = body(till.post(confirm, {}, support.member(db, diamond)), 200)
    assert (confirmed["state"], confirmed["spend_posting_id"] is not None) == ("created", True)


WASH = {"code": "wash", "kind": "service", "name": {"zh": "洗车券"}, "points": 300}
TOWEL = {"code": "towel", "kind": "physical", "name": {"zh": "毛巾"}, "points": 300,
         "pickup": True}  # fmt: skip


def test_a_voucher_code_is_shown_whole_to_its_member_and_masked_to_everyone_else(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    body(till.post("/rewards", WASH, till.operator), 201)
    body(till.post("/rewards", TOWEL, till.operator), 201)
    # the till redeeming for alice at its counter is handed the code, to give her
    redeem = f"/members/{till.alice}/redemptions"
    order = body(till.post(redeem, {"reward": "wash"}, till.cashier), 201)
    code = order["voucher"]["code"]
    assert len(code) == 12 and "*" not in code and order["outcome"]["voucher"] == code
    hidden = "********" + code[-4:]
    # alice sees it whole wherever she reads it
    mine = [
        body(till.get(f"/members/{till.alice}/orders", till.as_alice), 200)["items"][0],
        body(till.get(f"/members/{till.alice}/orders/{order['id']}", till.as_alice), 200),
    ]
    assert [(o["voucher"]["code"], o["outcome"]["voucher"]) for o in mine] == [(code, code)] * 2
    vouchers = body(till.get(f"/members/{till.alice}/vouchers", till.as_alice), 200)["items"]
    assert [v["code"] for v in vouchers] == [code]
    # staff and API keys, whatever they read, see it masked
    key = support.api_key(db, till.shop.program_id)
    for who in (till.operator, till.reviewer, till.cashier, key):
        orders = [
            body(till.get("/orders", who), 200)["items"][0],
            body(till.get(f"/orders/{order['id']}", who), 200),
            body(till.get(f"/members/{till.alice}/orders", who), 200)["items"][0],
            body(till.get(f"/members/{till.alice}/orders/{order['id']}", who), 200),
        ]
        seen = [(o["voucher"]["code"], o["outcome"]["voucher"]) for o in orders]
        assert seen == [(hidden, hidden)] * 4
        listed = body(till.get(f"/members/{till.alice}/vouchers", who), 200)["items"]
        assert [v["code"] for v in listed] == [hidden]
    # and in the answers of the moves they make
    returned = body(till.post(f"/orders/{order['id']}/return", {}, till.operator), 200)
    assert (returned["state"], returned["voucher"]["code"]) == ("returned", hidden)
    towel = body(till.post(redeem, {"reward": "towel"}, till.as_alice), 201)
    cancel = f"/members/{till.alice}/orders/{towel['id']}/cancel"
    cancelled = body(till.post(cancel, {}, key), 200)
    assert cancelled["voucher"]["code"] == "********" + towel["voucher"]["code"][-4:]
    again = body(till.post(redeem, {"reward": "towel"}, till.as_alice), 201)
    cancel = f"/members/{till.alice}/orders/{again['id']}/cancel"
    assert body(till.post(cancel, {}, till.as_alice), 200)["voucher"] == again["voucher"] | {
        "state": "cancelled"
    }
    # the audit log keeps the till's redemption with the code masked
    auditor = support.staff(db, "auditor", program_id=till.shop.program_id)
    program = till.base.rsplit("/", 1)[1]
    log = client.get("/v1/audit", params={"program": program, "limit": 200}, headers=auditor)
    (entry,) = [e for e in body(log, 200)["items"] if e["target"] == f"member:{till.alice}"]
    assert entry["after"]["voucher"]["code"] == hidden
    assert code not in log.text
    # the voucher read by its code, and its use, show what the caller presented
    fresh = body(till.post(redeem, {"reward": "wash"}, till.as_alice), 201)["voucher"]["code"]
    assert body(till.get(f"/vouchers/{fresh}", till.cashier), 200)["code"] == fresh
    used = body(till.post(f"/vouchers/{fresh}/use", {}, till.cashier), 200)
    assert used["voucher"]["code"] == fresh


def test_credentials_of_one_merchant_read_only_its_own_orders(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    body(till.post("/rewards", WASH, till.operator), 201)
    mall = support.api_key(db, till.shop.program_id, merchant="mall")
    other = support.api_key(db, till.shop.program_id, merchant="other")
    redeem = f"/members/{till.alice}/redemptions"
    at_mall = body(till.post(redeem, {"reward": "wash"}, mall), 201)
    at_hq = body(till.post(redeem, {"reward": "wash"}, till.cashier), 201)
    own = body(till.post(redeem, {"reward": "wash"}, till.as_alice), 201)  # no merchant
    assert body(till.get("/orders", other), 200)["items"] == []
    assert [o["id"] for o in body(till.get("/orders", mall), 200)["items"]] == [at_mall["id"]]
    assert [o["id"] for o in body(till.get("/orders", till.cashier), 200)["items"]] == [at_hq["id"]]
    everyone = body(till.get("/orders", till.operator), 200)["items"]
    assert [o["id"] for o in everyone] == [own["id"], at_hq["id"], at_mall["id"]]
    for order in (at_hq, own):
        unknown = till.get(f"/orders/{order['id']}", mall)
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_order"
    assert body(till.get(f"/orders/{at_mall['id']}", mall), 200)["id"] == at_mall["id"]


def test_the_member_routes_show_one_merchants_credentials_its_own_orders_and_vouchers(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    body(till.post("/rewards", WASH, till.operator), 201)
    mall = support.api_key(db, till.shop.program_id, merchant="mall")
    redeem = f"/members/{till.alice}/redemptions"
    at_mall = body(till.post(redeem, {"reward": "wash"}, mall), 201)
    own = body(till.post(redeem, {"reward": "wash"}, till.as_alice), 201)  # no merchant
    orders, vouchers = f"/members/{till.alice}/orders", f"/members/{till.alice}/vouchers"
    # mall sees its own order and voucher of alice's, not the one of her own app
    assert [o["id"] for o in body(till.get(orders, mall), 200)["items"]] == [at_mall["id"]]
    listed = body(till.get(vouchers, mall), 200)["items"]
    assert [v["order_id"] for v in listed] == [at_mall["id"]]
    unknown = till.get(f"{orders}/{own['id']}", mall)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_order"
    # alice and the programme's staff see both
    for who in (till.as_alice, till.operator):
        seen = body(till.get(orders, who), 200)["items"]
        assert [o["id"] for o in seen] == [own["id"], at_mall["id"]]
        assert len(body(till.get(vouchers, who), 200)["items"]) == 2
        assert body(till.get(f"{orders}/{at_mall['id']}", who), 200)["id"] == at_mall["id"]


def test_credentials_of_one_store_see_and_move_only_the_orders_made_at_it(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)  # its cashier acts for hq at S1
    body(till.post("/rewards", MUG, till.operator), 201)
    program = till.shop.program_id
    s2 = support.staff(db, "cashier", program_id=program, merchant="hq", store="S2")
    hq = support.api_key(db, program, merchant="hq")
    redeem = f"/members/{till.alice}/redemptions"
    at_s1 = body(till.post(redeem, {"reward": "mug"}, till.cashier), 201)
    at_s2 = body(till.post(redeem, {"reward": "mug"}, s2), 201)
    orders = f"/members/{till.alice}/orders"
    for path in ("/orders", orders):
        assert [o["id"] for o in body(till.get(path, till.cashier), 200)["items"]] == [at_s1["id"]]
        both = [o["id"] for o in body(till.get(path, hq), 200)["items"]]
        assert both == [at_s2["id"], at_s1["id"]]
    for path in (f"/orders/{at_s2['id']}", f"{orders}/{at_s2['id']}"):
        assert till.get(path, till.cashier).status_code == 404
    cancel = till.post(f"{orders}/{at_s2['id']}/cancel", {}, till.cashier)
    assert cancel.status_code == 404 and cancel.json()["code"] == "unknown_order"
    assert body(till.get(f"/orders/{at_s2['id']}", hq), 200)["state"] == "created"
    assert body(till.post(f"{orders}/{at_s2['id']}/cancel", {}, s2), 200)["state"] == "cancelled"
    assert body(till.post(f"{orders}/{at_s1['id']}/cancel", {}, hq), 200)["state"] == "cancelled"


def test_the_payment_of_a_cash_part_is_named_by_the_till_once(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    kettle = {**MUG, "code": "kettle", "cash_fen": 9000, "stock": 5}
    body(till.post("/rewards", kettle, till.operator), 201)
    redeem = f"/members/{till.alice}/redemptions"
    claimed = till.post(redeem, {"reward": "kettle", "payment_ref": "made-up"}, till.as_alice)
    assert claimed.status_code == 403 and claimed.json()["code"] == "wrong_caller"
    assert "the till or the payment system" in claimed.json()["detail"]
    paid = body(till.post(redeem, {"reward": "kettle", "payment_ref": "pos-1"}, till.cashier), 201)
    assert (paid["payment_ref"], paid["cash_fen"]) == ("pos-1", 9000)
    again = till.post(redeem, {"reward": "kettle", "payment_ref": "pos-1"}, till.cashier,
                      language="zh")  # fmt: skip
    assert again.status_code == 409 and again.json()["code"] == "payment_used"
    assert f"已用于订单 {paid['id']}" in again.json()["detail"]
    assert body(till.get("/rewards/kettle", till.operator), 200)["stock_left"] == 4


def test_a_voucher_reward_sells_one_voucher_a_redemption(client: TestClient, db: Database) -> None:
    till = Till(client, db)
    refused = till.post("/rewards", {**WASH, "max_quantity": 3}, till.operator, language="zh")
    assert refused.status_code == 422 and "只能使用一次" in refused.text
    created = body(till.post("/rewards", WASH, till.operator), 201)
    # a reward stored before the rule, with 3 a redemption, still reads and lists
    terms = {k: v for k, v in created.items() if k in RewardDef.model_fields}
    stored = {**terms, "max_quantity": 3}
    stamp = db.clock.now() + timedelta(seconds=1)
    db.run(lambda uow: uow.conn.execute(rewards_table.update().where(
        rewards_table.c.id == created["id"]).values(terms=stored, updated_at=stamp)))  # fmt: skip
    assert body(till.get("/rewards/wash", till.operator), 200)["max_quantity"] == 3
    assert [r["max_quantity"] for r in body(till.get("/rewards", till.operator), 200)["items"]] == [
        3
    ]
    offer = body(till.get(f"/members/{till.alice}/rewards", till.as_alice), 200)
    assert [a["reward"]["code"] for a in offer["now"]] == ["wash"]
    three = till.post(f"/members/{till.alice}/redemptions", {"reward": "wash", "quantity": 3},
                      till.as_alice)  # fmt: skip
    assert three.status_code == 409 and "redeem one at a time" in three.text


def test_a_member_redeems_points_plus_cash_in_its_app_and_the_payment_system_pays(
    client: TestClient, db: Database
) -> None:
    till = Till(client, db)
    program = till.shop.program_id
    kettle = {**MUG, "code": "kettle", "cash_fen": 9000, "stock": 5, "pickup": True}
    body(till.post("/rewards", kettle, till.operator), 201)
    redeem = f"/members/{till.alice}/redemptions"
    points = f"/members/{till.alice}/points"
    # alice (银卡: 900 points) redeems in her app, naming no payment: the order awaits it
    order = body(till.post(redeem, {"reward": "kettle"}, till.as_alice), 201)
    assert (order["state"], order["points"], order["cash_fen"]) == ("awaiting_payment", 900, 9000)
    assert order["pay_by"] is not None and order["voucher"] is None
    frozen = body(till.get(points, till.as_alice), 200)
    assert (frozen["available"], frozen["frozen"]) == (4100, 900)
    assert body(till.get("/rewards/kettle", till.operator), 200)["stock_left"] == 4
    waiting = body(till.get("/orders", till.operator, state="awaiting_payment"), 200)["items"]
    assert [o["id"] for o in waiting] == [order["id"]]
    paid_url = f"/orders/{order['id']}/paid"
    payment = {"payment_ref": "wx-1", "amount_fen": 9000}
    # neither the member nor a key without orders.pay confirms a payment
    assert till.post(paid_url, payment, till.as_alice).status_code == 403
    assert till.post(paid_url, payment, support.api_key(db, program)).status_code == 403
    pay_system = support.api_key(db, program, permissions=["orders.pay", "orders.read"])
    # a payment of another amount is refused, naming both, in the caller's language
    wrong = till.post(paid_url, {**payment, "amount_fen": 900}, pay_system, language="zh")
    assert wrong.status_code == 409 and wrong.json()["code"] == "payment_amount_mismatch"
    assert "应付现金 9000 分" in wrong.json()["detail"] and "为 900 分" in wrong.json()["detail"]
    # the payment completes the order: points debited, voucher issued (masked to the key)
    paid = body(till.post(paid_url, payment, pay_system), 200)
    assert (paid["state"], paid["payment_ref"], paid["replayed"]) == ("created", "wx-1", False)
    assert paid["voucher"]["code"].startswith("********")
    again = body(till.post(paid_url, payment, pay_system), 200)  # sent again: answered
    assert again["replayed"] and again["state"] == "created" and again["steps"] == paid["steps"]
    spent = body(till.get(points, till.as_alice), 200)
    assert (spent["available"], spent["frozen"]) == (4100, 0)
    mine = body(till.get(f"/members/{till.alice}/orders/{order['id']}", till.as_alice), 200)
    code = mine["voucher"]["code"]  # whole to alice, to collect the kettle with
    assert "*" not in code and code[-4:] == paid["voucher"]["code"][-4:]
    # an order the member cancelled is not paid: the payment is to be refunded
    second = body(till.post(redeem, {"reward": "kettle"}, till.as_alice), 201)
    cancel = f"/members/{till.alice}/orders/{second['id']}/cancel"
    assert body(till.post(cancel, {}, till.as_alice), 200)["state"] == "cancelled"
    late = {"payment_ref": "wx-2", "amount_fen": 9000}
    refused = till.post(f"/orders/{second['id']}/paid", late, pay_system)
    assert refused.status_code == 409 and refused.json()["code"] == "state_conflict"
    assert "Refund payment 'wx-2' of 9000 fen" in refused.json()["detail"]
    # a payment that paid for one order pays for no other; the operator may confirm one too
    third = body(till.post(redeem, {"reward": "kettle"}, till.as_alice), 201)
    reused = till.post(f"/orders/{third['id']}/paid", payment, till.operator)
    assert reused.status_code == 409 and reused.json()["code"] == "payment_used"
    confirmed = till.post(f"/orders/{third['id']}/paid", late, till.operator)
    assert body(confirmed, 200)["state"] == "created"
    assert body(till.get("/rewards/kettle", till.operator), 200)["stock_left"] == 3
    # the document names the state and who may confirm a payment
    spec = client.get("/openapi.json").json()
    state = spec["components"]["schemas"]["OrderRead"]["properties"]["state"]
    assert "awaiting_payment" in state["enum"]
    route = spec["paths"]["/v1/programs/{program}/orders/{order_id}/paid"]["post"]
    assert route["x-permission"] == "orders.pay"
