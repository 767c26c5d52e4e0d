"""Tiers over HTTP: the programme defines its tiers, a member is put in one, an unknown tier
is refused with the known ones named, and rules read a member's tier (a tier multiplier)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from jifen.db.uow import Database
from tests.api import support
from tests.api.earning import RATES, TIERS, Shop, body, order, rule
from tests.factories import assert_ledger_sound, new_members, new_program


def test_tiers_are_defined_and_a_member_is_put_in_one(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    # given the programme's tiers, sent out of order
    defined = body(shop.put("/tiers", {"tiers": TIERS[::-1]}), 200)
    # then they are kept entry tier first
    assert [t["code"] for t in defined["items"]] == ["普通", "银卡", "金卡"]
    assert body(shop.get("/tiers"), 200) == defined
    # a member has no tier until put in one
    assert body(shop.get(f"/members/{shop.alice}/tier"), 200)["tier"] is None
    put = shop.set_tier(shop.alice, "金卡")
    assert put["tier"] == "金卡" and put["reason"] == "test"
    me = body(client.get("/v1/auth/me", headers=shop.operator), 200)
    read = body(shop.get(f"/members/{shop.alice}/tier", shop.reviewer), 200)
    assert (read["tier"], read["set_by"], read["since"]) == ("金卡", me["name"], put["since"])
    # and can be moved to another
    shop.set_tier(shop.alice, "银卡")
    assert body(shop.get(f"/members/{shop.alice}/tier"), 200)["tier"] == "银卡"
    assert body(shop.get(f"/members/{shop.bob}/tier"), 200)["tier"] is None


def test_an_unknown_tier_is_refused_with_the_known_ones(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    # before any tier is defined
    none = shop.put(f"/members/{shop.alice}/tier", {"tier": "金卡"})
    assert none.status_code == 404 and none.json()["code"] == "unknown_tier"
    assert "(none defined)" in none.json()["detail"]
    shop.define_tiers()
    # after: in English and in Chinese, with the tiers it does have
    english = shop.put(f"/members/{shop.alice}/tier", {"tier": "钻石"})
    assert english.status_code == 404, english.text
    assert english.json()["code"] == "unknown_tier"
    assert english.json()["detail"] == (
        "This programme has no tier '钻石'; its tiers are 普通, 银卡, 金卡."
    )
    chinese = shop.put(f"/members/{shop.alice}/tier", {"tier": "钻石"}, language="zh")
    assert chinese.status_code == 404
    assert chinese.json()["detail"] == "本计划没有等级 '钻石';已有等级:普通, 银卡, 金卡。"
    assert body(shop.get(f"/members/{shop.alice}/tier"), 200)["tier"] is None
    # a member of another programme is not found here
    other = new_program(db)
    (stranger,) = new_members(db, other.id, 1)
    elsewhere = shop.put(f"/members/{stranger}/tier", {"tier": "金卡"})
    assert elsewhere.status_code == 404 and elsewhere.json()["code"] == "unknown_member"


def test_tier_definitions_are_checked_and_a_held_tier_is_kept(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    shop.set_tier(shop.alice, "金卡")
    # two tiers with one rank, or one code twice, are refused
    for tiers in (
        [{"code": "a", "name": "a", "rank": 0}, {"code": "b", "name": "b", "rank": 0}],
        [{"code": "a", "name": "a", "rank": 0}, {"code": "a", "name": "a", "rank": 1}],
    ):
        answer = shop.put("/tiers", {"tiers": tiers})
        assert answer.status_code == 422
        assert [e["field"] for e in answer.json()["errors"]] == ["tiers"]
    # a tier that a member holds cannot be removed
    dropped = shop.put("/tiers", {"tiers": TIERS[:2]})
    assert dropped.status_code == 409 and dropped.json()["code"] == "state_conflict"
    assert "'金卡'" in dropped.json()["detail"]
    assert [t["code"] for t in body(shop.get("/tiers"), 200)["items"]] == ["普通", "银卡", "金卡"]
    # an unknown field is refused
    extra = shop.put("/tiers", {"tiers": [{**TIERS[0], "multiplier": 2}]})
    assert extra.status_code == 422
    assert extra.json()["errors"][0]["field"] == "body.tiers.0.multiplier"


def test_a_tier_a_live_rule_names_is_kept_and_may_be_renamed(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    shop.activate(rule("vip", {"kind": "fixed", "points": 5}, condition='member.tier == "金卡"'))
    # removing 金卡 is refused as a state conflict, saying what names it, in either language
    dropped = shop.put("/tiers", {"tiers": TIERS[:2]})
    assert dropped.status_code == 409 and dropped.json()["code"] == "state_conflict"
    assert dropped.headers["content-type"].startswith("application/problem+json")
    assert "rule vip (version 1) names 金卡 in condition" in dropped.json()["detail"]
    chinese = shop.put("/tiers", {"tiers": TIERS[:2]}, language="zh")
    assert "规则 vip 第 1 版的 condition 引用了 金卡" in chinese.json()["detail"]
    assert [t["code"] for t in body(shop.get("/tiers"), 200)["items"]] == ["普通", "银卡", "金卡"]
    # its name may change
    renamed = [*TIERS[:2], {**TIERS[2], "name": "金卡 VIP"}]
    assert body(shop.put("/tiers", {"tiers": renamed}), 200)["items"][2]["name"] == "金卡 VIP"


def test_a_tier_multiplier_multiplies_that_members_order_points(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    carol = shop.carol
    shop.define_tiers()
    shop.set_tier(shop.alice, "金卡")
    shop.set_tier(shop.bob, "银卡")
    shop.set_tier(carol, "普通")
    shop.activate(rule("base", RATES))
    shop.activate(
        rule(
            "tier", {"kind": "multiplier", "by_tier": {"银卡": "1.2", "金卡": "1.5"}}, priority=150
        )
    )
    cart = order("A", ("T1", "日用品", 1000))
    # when each orders 1,000 yuan
    sent = {
        member: shop.earn(shop.event(member, f"o{member}", {**cart, "order_id": f"o{member}"}))
        for member in (shop.alice, shop.bob, carol)
    }
    # then the tier's factor multiplies the base points
    awards = {m: [(a["rule"], a["points"]) for a in s["awards"]] for m, s in sent.items()}
    assert awards[shop.alice] == [("base", 1000), ("tier", 500)]
    assert awards[shop.bob] == [("base", 1000), ("tier", 200)]
    assert awards[carol] == [("base", 1000)]
    assert sent[carol]["skipped"] == [{"rule": "tier", "why": "factor 1 for tier '普通'"}]
    tier_award = sent[shop.alice]["awards"][1]
    assert tier_award["kind"] == "multiplier"
    assert (tier_award["detail"]["factor"], tier_award["detail"]["base"]) == ("1.5", 1000)
    assert [shop.balance(m)["balance"] for m in (shop.alice, shop.bob, carol)] == [1500, 1200, 1000]
    # a dry run for the member shows the same
    tried = body(
        client.post(
            f"{shop.base}/rules/dry-run",
            json={"event": shop.event(shop.alice, "dry", cart)},
            headers=shop.operator,
        ),
        200,
    )
    assert tried["total"] == 1500
    # and a member moved up a tier earns at the new factor from then on
    shop.set_tier(carol, "金卡")
    later = shop.earn(shop.event(carol, "o-later", cart))
    assert later["points"] == 1500
    assert_ledger_sound(db, shop.program.id)


def test_who_may_set_tiers(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    # a cashier and finance see tiers but do not set them
    for role in ("cashier", "finance"):
        headers = support.staff(db, role, program_id=shop.program.id)
        assert shop.get("/tiers", headers).status_code == 200
        assert shop.get(f"/members/{shop.alice}/tier", headers).status_code == 200
        assert shop.put("/tiers", {"tiers": TIERS}, headers).status_code == 403
        answer = shop.put(f"/members/{shop.alice}/tier", {"tier": "金卡"}, headers)
        assert answer.status_code == 403
    # a member cannot put itself in a tier
    alice = support.member(db, shop.alice)
    assert shop.put(f"/members/{shop.alice}/tier", {"tier": "金卡"}, alice).status_code == 403
    assert body(shop.get(f"/members/{shop.alice}/tier"), 200)["tier"] is None


# --------------------------------------------------------------------------- tiers by score

SCHEME = {
    "parts": {
        "spend": {"per_yuan": 1000, "score": 40},
        "earned": {"per_points": 1000, "score": 40},
    },
    "levels": [
        {"tier": "普通", "min_score": 0},
        {"tier": "银卡", "min_score": 101, "retention": 80},
        {"tier": "金卡", "min_score": 301, "retention": 240},
    ],
    "schedule": "quarterly",
    "upgrade_at_once": True,
    "benefits": {
        # every tier is capped: 普通's cap is also 银卡's (the nearest lower tier named), and
        # a member without a tier earns as one of 普通
        "普通": {"daily_earn_cap": 5000},
        "银卡": {"earn_multiplier": "1.2", "discount_pct": 90, "early_access_hours": 24},
        "金卡": {"earn_multiplier": "1.5", "discount_pct": 80, "daily_earn_cap": 2000},
    },
}


def _set_scheme(shop: Shop, scheme: dict[str, object]) -> dict[str, object]:
    filed = body(shop.put("/tiers/scheme", scheme), 202)
    assert filed["action"] == "programs.settings"
    body(shop.decide(filed["id"], "approve"), 200)
    return filed


def test_a_tier_scheme_goes_through_approval_and_moves_members_by_score(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    assert body(shop.get("/tiers/scheme"), 200) == {"scheme": None}
    # levels that are not the programme's tiers are refused before anything is filed
    two = {**SCHEME, "levels": SCHEME["levels"][:2], "benefits": {}}  # type: ignore[index]
    wrong = shop.put("/tiers/scheme", two)
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "levels"
    zh = shop.put("/tiers/scheme", two, language="zh")
    assert "必须与本计划的等级按级别顺序一致" in zh.json()["detail"]
    # filed, then applied when the reviewer approves
    filed = body(shop.put("/tiers/scheme", SCHEME), 202)
    assert body(shop.get("/tiers/scheme"), 200) == {"scheme": None}
    body(shop.decide(filed["id"], "approve"), 200)
    scheme = body(shop.get("/tiers/scheme"), 200)["scheme"]
    assert scheme["levels"][1] == {"tier": "银卡", "min_score": 101, "retention": 80}
    assert body(shop.get("/tiers/benefits"), 200)["benefits"]["银卡"]["earn_multiplier"] == "1.2"

    # an earning by the rules upgrades at once: 3,000 yuan at 1 point a yuan is 120 + 120
    shop.activate(rule("base", RATES))
    earned = shop.earn(shop.event(shop.alice, "o1", order("o1", ("T1", "日用品", 3000))))
    assert earned["points"] == 3000
    tier = body(shop.get(f"/members/{shop.alice}/tier"), 200)
    assert tier["tier"] == "银卡" and tier["set_by"] == "tiers"
    # from then on the matrix's 1.2 multiplies her spend awards
    again = shop.earn(shop.event(shop.alice, "o2", order("o2", ("T1", "日用品", 1000))))
    assert [(a["rule"], a["points"]) for a in again["awards"]] == [
        ("base", 1000), ("tier_benefit", 200),
    ]  # fmt: skip
    assert again["awards"][1]["detail"]["factor"] == "1.2"
    # (5,200 points = 200, 4,000 yuan = 160: 360, 金卡)
    changes = body(shop.get(f"/members/{shop.alice}/tier/changes"), 200)
    assert [(c["from_tier"], c["to_tier"], c["kind"]) for c in changes["items"]] == [
        ("银卡", "金卡", "upgrade"), (None, "银卡", "upgrade"),
    ]  # fmt: skip
    first = body(shop.get(f"/members/{shop.alice}/tier/changes", limit=1), 200)
    assert first["next_cursor"] is not None
    rest = body(shop.get(f"/members/{shop.alice}/tier/changes", cursor=first["next_cursor"]), 200)
    assert [c["to_tier"] for c in rest["items"]] == ["银卡"] and rest["next_cursor"] is None
    # the member sees its own history
    alice = support.member(db, shop.alice)
    assert shop.get(f"/members/{shop.alice}/tier/changes", alice).status_code == 200
    assert shop.get(f"/members/{shop.bob}/tier/changes", alice).status_code == 403

    # bob is put in 金卡 by hand; a dry run sees he would go down, and writes nothing
    shop.set_tier(shop.bob, "金卡")
    dry = body(shop.post("/tiers/dry-run", {}), 200)
    assert (dry["evaluated"], dry["upgraded"], dry["downgraded"]) == (3, 1, 1)
    assert body(shop.get(f"/members/{shop.bob}/tier"), 200)["tier"] == "金卡"
    # evaluated on demand, he goes down
    evaluated = body(shop.post(f"/members/{shop.bob}/tier/evaluate", {}), 200)
    assert evaluated["tier"]["tier"] == "普通" and evaluated["score"]["score"] == 0
    assert (
        evaluated["change"]["reason"]
        == "evaluated on demand; score 0 is below 金卡's retention line 240"
    )
    assert evaluated["change"]["kind"] == "evaluation"
    assert_ledger_sound(db, shop.program.id)


def test_the_benefits_matrix_is_changed_by_approval(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    # no scheme yet: nothing to put the matrix in
    none = shop.put("/tiers/benefits", {"benefits": {}})
    assert none.status_code == 409 and none.json()["code"] == "state_conflict"
    assert body(shop.get("/tiers/benefits"), 200) == {"benefits": {}}
    _set_scheme(shop, SCHEME)
    unknown = shop.put("/tiers/benefits", {"benefits": {"钻石": {}}})
    assert unknown.status_code == 422
    filed = body(shop.put("/tiers/benefits", {"benefits": {"金卡": {"discount_pct": 70}}}), 202)
    body(shop.decide(filed["id"], "approve"), 200)
    assert body(shop.get("/tiers/benefits"), 200)["benefits"] == {
        "金卡": {
            "earn_multiplier": "1", "discount_pct": 70, "daily_earn_cap": None,
            "monthly_earn_cap": None, "validity_months": None, "early_access_hours": 0,
            "birthday_gift": 0,
        }
    }  # fmt: skip
    # the levels stayed as they were
    assert len(body(shop.get("/tiers/scheme"), 200)["scheme"]["levels"]) == 3


def test_a_tier_scheme_put_with_the_settings_must_fit_the_tiers_too(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    settings = body(shop.get("/settings"), 200)
    # levels that are not the programme's tiers are refused before anything is filed
    two = {**SCHEME, "levels": SCHEME["levels"][:2], "benefits": {}}  # type: ignore[index]
    wrong = shop.put("/settings", {**settings, "tier_scheme": two})
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["errors"][0]["field"] == "levels"
    # a scheme that fits is filed; if the tiers change before it is approved, it fails
    filed = body(shop.put("/settings", {**settings, "tier_scheme": SCHEME}), 202)
    body(shop.put("/tiers", {"tiers": TIERS[:2]}), 200)
    failed = shop.decide(filed["id"], "approve")
    assert failed.status_code == 409, failed.text
    assert "levels" in failed.json()["detail"]
    assert body(shop.get("/tiers/scheme"), 200) == {"scheme": None}
    # settings that leave the scheme as it is are not held to it
    assert shop.put("/settings", {**settings, "return_window_days": 3}).status_code == 202


def test_who_may_change_the_scheme_and_evaluate(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    for role in ("cashier", "finance", "reviewer"):
        headers = support.staff(db, role, program_id=shop.program.id)
        assert shop.get("/tiers/scheme", headers).status_code == 200
        assert shop.put("/tiers/scheme", SCHEME, headers).status_code == 403
        assert shop.post(f"/members/{shop.alice}/tier/evaluate", {}, headers).status_code == 403
        assert shop.post("/tiers/dry-run", {}, headers).status_code == 403
    alice = support.member(db, shop.alice)
    assert shop.post(f"/members/{shop.alice}/tier/evaluate", {}, alice).status_code == 403


def test_an_earning_through_the_points_api_upgrades_at_once_too(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    _set_scheme(shop, SCHEME)
    earn = f"/members/{shop.bob}/points/earn"
    # 7,000 points credited at a till: 280, 银卡 at once (an event's earning would do so)
    till = {**shop.operator, **support.key()}
    first = body(shop.client.post(shop.base + earn, json={"amount": 7000}, headers=till), 201)
    tier = body(shop.get(f"/members/{shop.bob}/tier"), 200)
    assert (tier["tier"], tier["set_by"]) == ("银卡", "tiers")
    # sent again, the request changes nothing more
    again = shop.client.post(shop.base + earn, json={"amount": 7000}, headers=till)
    assert again.json()["id"] == first["id"]
    # 1,000 more: 320, 金卡
    body(shop.post(earn, {"amount": 1000}), 201)
    changes = body(shop.get(f"/members/{shop.bob}/tier/changes"), 200)["items"]
    assert [(c["from_tier"], c["to_tier"], c["kind"], c["score"]) for c in changes] == [
        ("银卡", "金卡", "upgrade", 320), (None, "银卡", "upgrade", 280),
    ]  # fmt: skip
    assert_ledger_sound(db, shop.program.id)


def test_without_upgrade_at_once_an_api_earning_waits_for_the_evaluation(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    _set_scheme(shop, {**SCHEME, "upgrade_at_once": False})
    body(shop.post(f"/members/{shop.bob}/points/earn", {"amount": 8000}), 201)
    assert body(shop.get(f"/members/{shop.bob}/tier"), 200)["tier"] is None
