"""Earning rules over HTTP: a draft goes live only when a second person approves it, versions
follow each other, a version pauses, resumes and retires, bad rules are refused with the
field that is wrong, dry runs change nothing, earning caps change through an approval and
bite, and each role may do only its part."""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi.testclient import TestClient

from jifen.clock import ManualClock
from jifen.db.uow import Database
from tests.api import support
from tests.api.earning import RATES, Shop, body, order, rule
from tests.factories import assert_ledger_sound, new_program


def test_a_drafted_rule_goes_live_only_when_another_person_approves_it(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    # given a draft by the operator
    draft = shop.draft(rule("base", RATES))
    assert (draft["status"], draft["version"], draft["approval_id"]) == ("draft", 1, None)
    assert draft["created_by"].startswith("staff:operator-")
    # when it is submitted, it waits for an approval
    approval = shop.submit(draft["id"])
    assert approval["action"] == "rules.approve" and approval["status"] == "pending"
    assert approval["params"]["version_id"] == draft["id"]
    submitted = shop.version(draft["id"])
    assert submitted["status"] == "submitted" and submitted["approval_id"] == approval["id"]
    # and an order meanwhile earns nothing from it
    before = shop.earn(shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 100))))
    assert before["awards"] == [] and before["points"] == 0
    # the operator who asked cannot approve it
    own = shop.decide(approval["id"], "approve", shop.operator)
    assert own.status_code == 403 and own.json()["code"] == "forbidden"
    assert shop.version(draft["id"])["status"] == "submitted"
    # a second person approves it: the version is active from now, and says who approved it
    decided = body(shop.decide(approval["id"], "approve"), 200)
    assert decided["status"] == "approved"
    assert decided["result"]["rule"]["status"] == "active"
    active = shop.version(draft["id"])
    reviewer = body(client.get("/v1/auth/me", headers=shop.reviewer), 200)
    assert active["status"] == "active"
    assert active["approved_by"] == reviewer["name"]
    assert active["active_from"] is not None and active["active_to"] is None
    # approving it again, or rejecting it now, is refused and changes nothing
    for verb in ("approve", "reject"):
        again = shop.decide(approval["id"], verb)
        assert again.status_code == 409 and again.json()["code"] == "state_conflict"
    assert shop.version(draft["id"])["status"] == "active"
    # and the next order earns through it
    after = shop.earn(shop.event(shop.alice, "o2", order("A2", ("T1", "日用品", 100))))
    assert [(a["rule"], a["points"]) for a in after["awards"]] == [("base", 100)]
    assert_ledger_sound(db, shop.program.id)


def test_nobody_approves_their_own_rule_even_with_the_right_to_decide(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    admin = support.staff(db, "super_admin", program_id=shop.program.id)
    # given a rule drafted and submitted by someone who may also decide approvals
    draft = body(shop.post("/rules", rule("base", RATES), admin), 201)
    approval = shop.submit(draft["id"], admin)
    # then they cannot approve (or reject) it themselves
    for verb in ("approve", "reject"):
        own = shop.decide(approval["id"], verb, admin)
        assert own.status_code == 403, own.text
        assert "your own" in own.json()["detail"]
    assert shop.version(draft["id"])["status"] == "submitted"
    pending = body(shop.get("/approvals", shop.reviewer, status="pending"), 200)
    assert [a["id"] for a in pending["items"]] == [approval["id"]]
    # and another reviewer can
    assert shop.decide(approval["id"], "approve").status_code == 200
    assert shop.version(draft["id"])["status"] == "active"


def test_a_rejected_rule_stays_rejected_and_earns_nothing(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    draft = shop.draft(rule("base", RATES))
    approval = shop.submit(draft["id"])
    # when the reviewer rejects the request
    rejected = body(shop.decide(approval["id"], "reject", note="rate too high"), 200)
    assert rejected["status"] == "rejected" and rejected["decision_note"] == "rate too high"
    # then the version is rejected, and stays so
    assert shop.version(draft["id"])["status"] == "rejected"
    again = shop.decide(approval["id"], "approve")
    assert again.status_code == 409 and again.json()["code"] == "state_conflict"
    assert shop.version(draft["id"])["status"] == "rejected"
    # it cannot be submitted again, and the refused submission files no request
    resubmitted = shop.post(f"/rules/{draft['id']}/submit", {})
    assert resubmitted.status_code == 409 and resubmitted.json()["code"] == "state_conflict"
    pending = body(shop.get("/approvals", shop.reviewer, status="pending"), 200)
    assert pending["items"] == []
    # and an order earns nothing from it
    sent = shop.earn(shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 100))))
    assert sent["awards"] == [] and sent["points"] == 0
    assert shop.balance(shop.alice)["balance"] == 0


def test_a_draft_changes_until_submitted_and_a_new_version_replaces_the_old(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    first = shop.activate(rule("base", RATES))
    # given a second version, changed while it is a draft
    draft = shop.draft(rule("base", {"kind": "spend_rate", "rate": "1"}))
    assert draft["version"] == 2 and draft["status"] == "draft"
    changed = body(
        shop.put(f"/rules/{draft['id']}", rule("base", {"kind": "spend_rate", "rate": "2"})), 200
    )
    assert changed["spec"]["params"]["rate"] == "2"
    # a version keeps its code
    renamed = shop.put(f"/rules/{draft['id']}", rule("other", RATES))
    assert renamed.status_code == 422
    assert renamed.json()["errors"][0]["field"] == "code"
    # once submitted it no longer changes
    approval = shop.submit(draft["id"])
    frozen = shop.put(f"/rules/{draft['id']}", rule("base", {"kind": "spend_rate", "rate": "9"}))
    assert frozen.status_code == 409 and frozen.json()["code"] == "state_conflict"
    # when it is approved, it replaces the first version from that moment
    assert isinstance(db.clock, ManualClock)
    db.clock.advance(timedelta(minutes=1))
    body(shop.decide(approval["id"], "approve"), 200)
    old = shop.version(first["id"])
    assert old["status"] == "retired" and old["active_to"] is not None
    assert shop.version(draft["id"])["status"] == "active"
    # so that an order now earns 2 points per yuan, once
    sent = shop.earn(shop.event(shop.alice, "o1", order("A1", ("TV", "家电", 100))))
    assert [(a["rule"], a["version"], a["points"]) for a in sent["awards"]] == [("base", 2, 200)]
    # and the list shows both versions, filterable by code and state, page by page
    listed = body(shop.get("/rules", code="base"), 200)["items"]
    assert [(v["version"], v["status"]) for v in listed] == [(1, "retired"), (2, "active")]
    active = body(shop.get("/rules", state="active"), 200)["items"]
    assert [v["id"] for v in active] == [draft["id"]]
    page = body(shop.get("/rules", limit=1), 200)
    rest = body(shop.get("/rules", limit=1, cursor=page["next_cursor"]), 200)
    assert [v["version"] for v in page["items"] + rest["items"]] == [1, 2]
    every = body(shop.get("/rules"), 200)["items"]
    assert body(shop.get("/rules", limit=len(every)), 200)["next_cursor"] is None  # no empty page
    # a version of another programme is not found here
    other = new_program(db)
    admin = support.staff(db, "super_admin")
    elsewhere = client.get(f"/v1/programs/{other.code}/rules/{draft['id']}", headers=admin)
    assert elsewhere.status_code == 404 and elsewhere.json()["code"] == "unknown_rule"


def test_a_scheduled_version_takes_over_at_its_time_and_one_version_is_live_at_a_time(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    clock = db.clock
    assert isinstance(clock, ManualClock)
    first = shop.activate(rule("base", RATES))
    cart = order("A", ("T1", "日用品", 100))

    def earned(external_id: str) -> list[tuple[int, int]]:
        sent = shop.earn(shop.event(shop.alice, external_id, {**cart, "order_id": external_id}))
        return [(a["version"], a["points"]) for a in sent["awards"]]

    # given version 2 approved to start tomorrow
    tomorrow = clock.now() + timedelta(days=1)
    second = shop.draft(rule("base", {"kind": "spend_rate", "rate": "2"}))
    filed = body(
        shop.post(f"/rules/{second['id']}/submit", {"activate_at": tomorrow.isoformat()}), 202
    )
    body(shop.decide(filed["id"], "approve"), 200)
    scheduled = shop.version(second["id"])
    assert scheduled["status"] == "scheduled"
    assert datetime.fromisoformat(scheduled["active_from"]) == tomorrow
    assert datetime.fromisoformat(shop.version(first["id"])["active_to"]) == tomorrow
    # a version that has not started cannot be paused (resumed, it would go live before
    # its approved start and end version 1 early)
    paused = shop.post(f"/rules/{second['id']}/pause")
    assert paused.status_code == 409 and "has not started" in paused.json()["detail"], paused.text
    assert "尚未开始" in shop.post(f"/rules/{second['id']}/pause", language="zh").json()["detail"]
    assert shop.version(second["id"])["status"] == "scheduled"
    # then version 1 earns until then, and version 2 from then on
    clock.advance(timedelta(minutes=1))
    assert earned("o1") == [(1, 100)]
    clock.advance(timedelta(days=1))
    assert earned("o2") == [(2, 200)]

    # given, on another rule, version 2 scheduled for tomorrow and version 3 approved now
    shop.operator = support.staff(db, "operator", program_id=shop.program.id)
    shop.reviewer = support.staff(db, "reviewer", program_id=shop.program.id)
    old = shop.activate(rule("bonus", {"kind": "fixed", "points": 1}))
    clock.advance(timedelta(minutes=1))
    later = shop.draft(rule("bonus", {"kind": "fixed", "points": 2}))
    filed = body(
        shop.post(
            f"/rules/{later['id']}/submit",
            {"activate_at": (clock.now() + timedelta(days=1)).isoformat()},
        ),
        202,
    )
    body(shop.decide(filed["id"], "approve"), 200)
    clock.advance(timedelta(minutes=1))
    now = shop.activate(rule("bonus", {"kind": "fixed", "points": 3}))
    # then only version 3 is live, now and tomorrow: the others ended when it began
    clock.advance(timedelta(minutes=1))
    bonus = [
        (a["version"], a["points"])
        for a in shop.earn(shop.event(shop.alice, "o3", {**cart, "order_id": "o3"}))["awards"]
        if a["rule"] == "bonus"
    ]
    assert bonus == [(3, 3)]
    ended, dropped = shop.version(old["id"]), shop.version(later["id"])
    assert ended["status"] == dropped["status"] == "retired"
    assert ended["active_to"] == now["active_from"]
    assert dropped["active_from"] is None  # its start never came
    clock.advance(timedelta(days=1))
    bonus = [
        (a["version"], a["points"])
        for a in shop.earn(shop.event(shop.alice, "o4", {**cart, "order_id": "o4"}))["awards"]
        if a["rule"] == "bonus"
    ]
    assert bonus == [(3, 3)]
    assert_ledger_sound(db, shop.program.id)


def test_a_version_retired_before_its_start_leaves_the_live_version_live(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    clock = db.clock
    assert isinstance(clock, ManualClock)
    first = shop.activate(rule("base", RATES))
    cart = order("A", ("T1", "日用品", 100))
    # given version 2 approved to start tomorrow: version 1 is to end then
    tomorrow = clock.now() + timedelta(days=1)
    second = shop.draft(rule("base", {"kind": "spend_rate", "rate": "2"}))
    filed = body(
        shop.post(f"/rules/{second['id']}/submit", {"activate_at": tomorrow.isoformat()}), 202
    )
    body(shop.decide(filed["id"], "approve"), 200)
    assert datetime.fromisoformat(shop.version(first["id"])["active_to"]) == tomorrow
    # when version 2 is retired before it starts
    clock.advance(timedelta(hours=1))
    retired = body(shop.post(f"/rules/{second['id']}/retire"), 200)
    assert retired["status"] == "retired" and retired["active_from"] is None
    # then version 1 stays live, after tomorrow too, and can be retired in its turn
    kept = shop.version(first["id"])
    assert kept["status"] == "active" and kept["active_to"] is None
    clock.advance(timedelta(days=2))
    sent = shop.earn(shop.event(shop.alice, "o1", {**cart, "order_id": "o1"}))
    assert [(a["version"], a["points"]) for a in sent["awards"]] == [(1, 100)]
    shop.operator = support.staff(db, "operator", program_id=shop.program.id)  # signed in again
    assert body(shop.post(f"/rules/{first['id']}/retire"), 200)["status"] == "retired"
    assert_ledger_sound(db, shop.program.id)


def test_a_version_pauses_resumes_and_retires(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    clock = db.clock
    assert isinstance(clock, ManualClock)
    version = shop.activate(rule("base", RATES))
    path = f"/rules/{version['id']}"
    cart = order("A", ("T1", "日用品", 100))

    def earned(external_id: str) -> int:
        clock.advance(timedelta(minutes=1))
        each = {**cart, "order_id": external_id}  # an order earns once
        points: int = shop.earn(shop.event(shop.alice, external_id, each))["points"]
        clock.advance(timedelta(minutes=1))
        return points

    assert earned("o1") == 100
    # paused: events after it do not meet the rule
    assert body(shop.post(path + "/pause"), 200)["status"] == "paused"
    assert earned("o2") == 0
    # resumed: they do again
    assert body(shop.post(path + "/resume"), 200)["status"] == "active"
    assert earned("o3") == 100
    # retired: for good
    retired = body(shop.post(path + "/retire"), 200)
    assert retired["status"] == "retired" and retired["active_to"] is not None
    assert earned("o4") == 0
    for move in ("/resume", "/pause", "/retire"):
        refused = shop.post(path + move)
        assert refused.status_code == 409 and refused.json()["code"] == "state_conflict"
    # an event from before the pause still meets the version live at its own time
    started = datetime.fromisoformat(version["active_from"])
    late = shop.earn(shop.event(shop.alice, "o0", cart, when=started))
    assert late["points"] == 100
    assert shop.balance(shop.alice)["balance"] == 300
    assert_ledger_sound(db, shop.program.id)


def test_a_condition_that_does_not_compile_is_refused_with_its_field(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    for condition, said in [
        ("event.amount_fen >", "Syntax error"),
        ("event.amount_fen + 1", "must be true or false"),
    ]:
        # when a rule is drafted with a condition that cannot work
        answer = shop.post("/rules", rule("big", RATES, condition=condition))
        # then it is refused, naming the field and saying why
        assert answer.status_code == 422, answer.text
        problem = answer.json()
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert problem["code"] == "invalid_input"
        assert [e["field"] for e in problem["errors"]] == ["condition"]
        assert said in problem["errors"][0]["message"] and said in problem["detail"]
    # a draft cannot be changed to one either
    draft = shop.draft(rule("big", RATES, condition="event.amount_fen >= 100000"))
    changed = shop.put(f"/rules/{draft['id']}", rule("big", RATES, condition="event.("))
    assert changed.status_code == 422
    assert [e["field"] for e in changed.json()["errors"]] == ["condition"]
    kept = shop.version(draft["id"])
    assert kept["spec"]["condition"] == "event.amount_fen >= 100000"
    assert [v["id"] for v in body(shop.get("/rules"), 200)["items"]] == [draft["id"]]


def test_a_rule_of_an_unknown_kind_or_with_an_unknown_field_is_refused(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    cases = [
        (rule("x", {"kind": "teleport", "points": 5}), "body.params", "union_tag_invalid"),
        ({**rule("x", RATES), "colour": "red"}, "body.colour", "extra_forbidden"),
        (
            rule("x", {"kind": "fixed", "points": 5, "bonus": 1}),
            "body.params.fixed.bonus",
            "extra_forbidden",
        ),
        (rule("x", {"kind": "fixed"}), "body.params.fixed.points", "missing"),
        (rule("x", RATES, event_types=()), "body.event_types", "too_short"),
    ]
    for spec, field, kind in cases:
        answer = shop.post("/rules", spec)
        assert answer.status_code == 422, spec
        problem = answer.json()
        assert problem["code"] == "invalid_request"
        assert [(e["field"], e["type"]) for e in problem["errors"]] == [(field, kind)], spec
    assert body(shop.get("/rules"), 200)["items"] == []


def test_a_dry_run_shows_the_awards_and_changes_nothing(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    live = shop.activate(rule("base", RATES))
    body(shop.post(f"/members/{shop.alice}/points/earn", {"amount": 10}), 201)
    draft = shop.draft(
        rule("big-order", {"kind": "threshold", "min_amount_fen": 100000, "points": 200})
    )
    event = shop.event(shop.alice, "o1", order("A1", ("TV", "家电", 1000), ("T1", "日用品", 5)))
    # when the draft, with the live rule, is tried on an order
    tried = body(
        client.post(
            f"{shop.base}/rules/dry-run",
            json={"event": event, "rules": [live["spec"], draft["spec"]]},
            headers=shop.operator,
        ),
        200,
    )
    # then the awards are shown
    assert [(a["rule"], a["points"]) for a in tried["awards"]] == [
        ("base", 3005),
        ("big-order", 200),
    ]
    assert tried["total"] == 3205
    # and nothing was stored or posted
    assert shop.balance(shop.alice)["balance"] == 10
    assert shop.stored_events() == 0
    assert shop.version(draft["id"])["status"] == "draft"
    # without rules, the run is against the rules live at the event's time
    live_only = body(
        client.post(f"{shop.base}/rules/dry-run", json={"event": event}, headers=shop.operator),
        200,
    )
    assert [(a["rule"], a["points"]) for a in live_only["awards"]] == [("base", 3005)]
    # and the same event, sent for real afterwards, is new
    sent = shop.earn(event)
    assert sent["replayed"] is False and sent["points"] == 3005
    assert shop.balance(shop.alice)["balance"] == 3015
    # a dry run with a draft that cannot work is refused like the draft itself
    bad = client.post(
        f"{shop.base}/rules/dry-run",
        json={"event": event, "rules": [rule("x", RATES, condition="event.(")]},
        headers=shop.operator,
    )
    assert bad.status_code == 422
    assert [e["field"] for e in bad.json()["errors"]] == ["condition"]


def test_earning_caps_change_through_an_approval_and_cut_an_order_at_the_tier_day_cap(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    shop.define_tiers()
    shop.set_tier(shop.alice, "普通")
    shop.activate(rule("base", RATES))
    caps = {
        "by_tier": {"普通": {"day": 1000, "month": 5000}, "金卡": {"day": 2000}},
        "budget": None,
    }
    # when the operator puts new caps, they are only a request
    filed = body(shop.put("/earning-caps", caps), 202)
    assert filed["action"] == "rules.caps" and filed["status"] == "pending"
    assert body(shop.get("/earning-caps"), 200) == {"by_tier": {}, "budget": None}
    # and the operator cannot approve it
    assert shop.decide(filed["id"], "approve", shop.operator).status_code == 403
    # out-of-range caps are refused outright
    bad = shop.put("/earning-caps", {"by_tier": {"普通": {"day": 0}}})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "body.by_tier.普通.day"
    # and so are caps naming a tier the programme does not have (it would bind no member)
    for language, says in ((None, "'gold' is not a tier of this programme"),
                           ("zh", "'gold' 不是本计划的等级")):  # fmt: skip
        typo = shop.put("/earning-caps", {"by_tier": {"gold": {"day": 10}}}, language=language)
        assert typo.status_code == 422 and typo.json()["code"] == "tier_not_defined"
        assert says in typo.json()["detail"] and "普通" in typo.json()["detail"]
        assert typo.json()["errors"][0]["field"] == "by_tier"
    # as is a rule naming one
    typo = shop.post("/rules", rule("tier", {"kind": "multiplier", "by_tier": {"金 卡": "1.5"}}))
    assert typo.status_code == 422 and typo.json()["code"] == "tier_not_defined"
    assert typo.json()["errors"][0]["field"] == "params.by_tier"
    # the reviewer approves it: now they apply
    body(shop.decide(filed["id"], "approve"), 200)
    shown = body(shop.get("/earning-caps"), 200)
    assert shown["by_tier"]["普通"] == {"day": 1000, "month": 5000}
    assert shown["by_tier"]["金卡"] == {"day": 2000, "month": None}
    # when alice orders 1,500 yuan in a day, only the 1,000 points that fit post
    sent = shop.earn(shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 1500))))
    (award,) = sent["awards"]
    assert (award["wanted"], award["points"]) == (1500, 1000)
    assert award["cap"] == "tier_day (普通: 1000)"
    assert sent["points"] == 1000
    # a second order that day gets nothing, and says why
    more = shop.earn(shop.event(shop.alice, "o2", order("A2", ("T1", "日用品", 10))))
    assert [(a["points"], a["wanted"], a["cap"]) for a in more["awards"]] == [
        (0, 10, "tier_day (普通: 1000)"),
    ]
    assert shop.balance(shop.alice)["balance"] == 1000
    # the next day earns again (the API key's events; a staff session would have lapsed)
    assert isinstance(db.clock, ManualClock)
    db.clock.advance(timedelta(days=1))
    next_day = shop.earn(shop.event(shop.alice, "o3", order("A3", ("T1", "日用品", 10))))
    assert next_day["points"] == 10 and next_day["awards"][0]["cap"] is None
    assert_ledger_sound(db, shop.program.id)


def test_a_cashier_sends_events_but_does_not_write_rules(client: TestClient, db: Database) -> None:
    shop = Shop(client, db)
    shop.activate(rule("base", RATES))
    cashier = support.staff(db, "cashier", program_id=shop.program.id)
    sent = shop.send(shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 10))), cashier)
    assert sent.status_code == 201, sent.text
    assert sent.json()["points"] == 10
    refused = [
        shop.post("/rules", rule("mine", RATES), cashier),
        shop.put("/earning-caps", {"by_tier": {}}, cashier),
        client.post(
            f"{shop.base}/rules/dry-run",
            json={"event": shop.event(shop.alice, "x", {})},
            headers=cashier,
        ),
        shop.get("/rules", cashier),
    ]
    for answer in refused:
        assert answer.status_code == 403, answer.text
        assert answer.json()["code"] == "forbidden"
    assert body(shop.get("/rules"), 200)["items"][0]["code"] == "base"


def test_finance_reads_rules_and_events_but_writes_neither(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    version = shop.activate(rule("base", RATES))
    sent = shop.earn(shop.event(shop.alice, "o1", order("A1", ("T1", "日用品", 10))))
    finance = support.staff(db, "finance", program_id=shop.program.id)
    # finance reads
    assert body(shop.get("/rules", finance), 200)["items"][0]["id"] == version["id"]
    assert body(shop.get(f"/rules/{version['id']}", finance), 200)["status"] == "active"
    assert body(shop.get(f"/events/{sent['id']}", finance), 200)["points"] == 10
    assert body(shop.get("/earning-caps", finance), 200)["by_tier"] == {}
    # and writes nothing
    draft = shop.draft(rule("next", RATES))
    refused = [
        shop.post("/rules", rule("mine", RATES), finance),
        shop.put(f"/rules/{draft['id']}", rule("next", RATES), finance),
        shop.post(f"/rules/{draft['id']}/submit", {}, finance),
        shop.post(f"/rules/{version['id']}/pause", None, finance),
        shop.put("/earning-caps", {"by_tier": {}}, finance),
        shop.send(shop.event(shop.alice, "o2", order("A2", ("T1", "日用品", 10))), finance),
        client.post(
            f"{shop.base}/rules/dry-run",
            json={"event": shop.event(shop.alice, "x", {})},
            headers=finance,
        ),
    ]
    for answer in refused:
        assert answer.status_code == 403, answer.text
    assert shop.version(draft["id"])["status"] == "draft"
    assert shop.version(version["id"])["status"] == "active"
    assert shop.balance(shop.alice)["balance"] == 10


def test_a_rules_author_cannot_approve_it_even_when_another_submitted_it(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    author = support.staff(db, "super_admin", program_id=shop.program.id)
    # the author drafts, the operator submits
    draft = body(shop.post("/rules", rule("base", RATES), author), 201)
    filed = shop.submit(draft["id"])
    # the author may decide approvals, but not of its own rule: refused, still pending
    refused = shop.decide(filed["id"], "approve", author)
    assert refused.status_code == 403, refused.text
    assert "another person must approve it" in refused.json()["detail"]
    assert shop.version(draft["id"])["status"] == "submitted"
    # a reviewer, a second person, approves it
    body(shop.decide(filed["id"], "approve"), 200)
    assert shop.version(draft["id"])["status"] == "active"


def test_a_rule_that_cannot_work_is_not_approved_and_counts_start_at_zero(
    client: TestClient, db: Database
) -> None:
    shop = Shop(client, db)
    for spec, says in (
        (rule("typo", {"kind": "fixed", "points": 1}, event_types=("order.payed",)),
         "'order.payed' is no event type of the catalogue"),
        (rule("undeclared", {"kind": "fixed", "points": 1}, event_types=("custom.nope",)),
         "'custom.nope' is no event type"),
        (rule("vol", {"kind": "per_unit", "field": "hour", "points_per_unit": "5"},
              event_types=("activity.attended",)),
         "activity.attended events have no number 'hour' (their numbers: hours)"),
        # a condition reading a field no event of its type has would refuse every one
        (rule("chan", {"kind": "fixed", "points": 1}, condition='event.chanel == "app"'),
         "reads 'chanel', which order.paid events and their members do not have"),
        (rule("line", {"kind": "fixed", "points": 1},
              condition='event.lines.exists(l, l.categroy == "食品")'),
         "reads 'categroy'"),
        (rule("who", {"kind": "fixed", "points": 1}, condition='member.level == "金卡"'),
         "reads 'level'"),
    ):  # fmt: skip
        draft = shop.draft(spec)
        decided = shop.decide(shop.submit(draft["id"])["id"], "approve")
        assert decided.status_code == 409 and says in decided.json()["detail"], decided.text
        assert shop.version(draft["id"])["status"] == "submitted"
    # Every field of the type may be read, and a value the sample cannot take is no refusal.
    shop.define_tiers()  # (a condition compares the member's tier with one of them)
    for condition in ('event.channel == "app" && event.store == "S1"',
                      'event.lines.exists(l, l.category == "食品" && l.quantity > 1)',
                      'member.tier == "金卡" && "vip" in member.tags && member.region == "SH"',
                      'timestamp(event.order_id) < now',
                      'has(event.coupon) && event.coupon == "X"'):  # fmt: skip
        shop.activate(rule("ok", {"kind": "fixed", "points": 1}, condition=condition))
    # A condition on a counter of a type the member has not had yet reads 0.
    shop.activate(rule("loyal", {"kind": "fixed", "points": 5},
                       condition="member.counts['order.paid'] >= 1"))  # fmt: skip
    first = shop.earn(shop.event(shop.alice, "o1", order("o1", ("T1", "日用品", 10))))
    second = shop.earn(shop.event(shop.alice, "o2", order("o2", ("T1", "日用品", 10))))
    assert (first["points"], second["points"]) == (0, 5)
