"""Postings raise points.<kind> for the programme's webhooks: those made through the API
(with the merchant and store they were made for), by an event's rules, by a refund event's
claw-back; each once, a replayed request raising nothing more."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from jifen.api.app import create_app
from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.events import service as events
from jifen.events.schemas import EventIn, EventResult
from jifen.expiry.schemas import ExpiryPolicy, Validity
from jifen.notify import service
from jifen.notify.schemas import WebhookCreate
from jifen.points import service as points
from tests.api import support
from tests.api.conftest import api_settings
from tests.conftest import START
from tests.events.test_doors import shop
from tests.expiry.test_service import at, earn, job, move, with_policy
from tests.factories import new_program
from tests.notify.helpers import member, outbox_rows


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(db, api_settings())) as test_client:
        yield test_client


def _subscribe(db: Database, program_id: int, events_: list[str]) -> None:
    body = WebhookCreate(url="http://127.0.0.1:9/hooks", event_types=events_, allow_private=True)
    db.run(lambda uow: service.create_webhook(uow, program_id=program_id, body=body, actor="t"))


def _told(db: Database, program_id: int) -> list[tuple[str, dict[str, object]]]:
    rows = [r for r in outbox_rows(db, program_id) if r.channel == "webhook"]
    return [(r.template, json.loads(r.body)["data"]) for r in rows]


def test_api_postings_raise_their_events_once_with_merchant_and_store(
    client: TestClient, db: Database
) -> None:
    program = new_program(db)
    alice = member(db, program.id)
    _subscribe(db, program.id, ["points.earned", "points.spent", "points.refunded"])
    till = support.api_key(db, program.id, merchant="M1", store="S1")
    base = f"/v1/programs/{program.code}/members/{alice}/points"
    earn = {"amount": 300, "reason": "order 1001"}
    earned = client.post(f"{base}/earn", json=earn, headers={**till, "Idempotency-Key": "e1"})
    assert earned.status_code == 201, earned.text
    spent = client.post(
        f"{base}/spend", json={"amount": 120}, headers={**till, "Idempotency-Key": "s1"}
    )
    assert spent.status_code == 201, spent.text
    # the same earn sent again replays its answer and raises nothing more
    again = client.post(f"{base}/earn", json=earn, headers={**till, "Idempotency-Key": "e1"})
    assert again.headers.get("Idempotent-Replayed") == "true"
    refunded = client.post(
        f"/v1/programs/{program.code}/postings/{spent.json()['id']}/refund",
        json={"amount": 20}, headers={**till, "Idempotency-Key": "r1"},
    )  # fmt: skip
    assert refunded.status_code == 201, refunded.text
    told = _told(db, program.id)
    assert [t for t, _ in told] == ["points.earned", "points.spent", "points.refunded"]
    (_, e), (_, s), (_, r) = told
    assert (e["posting_id"], e["member_id"], e["amount"]) == (earned.json()["id"], alice, 300)
    assert (e["merchant"], e["store"], e["reason"]) == ("M1", "S1", "order 1001")
    assert (s["kind"], s["amount"]) == ("spend", 120)
    assert (r["amount"], r["ref_posting_id"]) == (20, spent.json()["id"])


def test_a_programme_without_webhooks_queues_nothing_for_a_posting(
    client: TestClient, db: Database
) -> None:
    program = new_program(db)
    alice = member(db, program.id)
    till = support.api_key(db, program.id)
    answer = client.post(
        f"/v1/programs/{program.code}/members/{alice}/points/earn",
        json={"amount": 5}, headers={**till, "Idempotency-Key": "e1"},
    )  # fmt: skip
    assert answer.status_code == 201
    assert outbox_rows(db, program.id) == []


def test_points_earned_by_events_and_taken_back_by_a_refund_raise_their_events(
    db: Database, clock: ManualClock
) -> None:
    program = shop(db)
    clock.set(START + timedelta(days=1))
    _subscribe(db, program.id, ["points.earned", "points.reversed"])
    when = START + timedelta(hours=3)
    paid = [
        EventIn.model_validate({
            "source": "pos", "external_id": f"o{n}", "member_ref": ref, "occurred_at": when,
            "type": "order.paid", "payload": {"order_id": f"o{n}", "lines": [
                {"sku": "T", "category": "日用品", "amount_fen": 20_000}]},
        })
        for n, ref in enumerate(["d0", "d1"])
    ]  # fmt: skip
    outcomes = db.run(lambda uow: events.ingest_many(uow, program_id=program.id, events=paid))
    assert all(isinstance(o, EventResult) for o in outcomes), outcomes
    assert all(isinstance(o, EventResult) and o.points > 0 for o in outcomes)
    postings = {a.posting_id for o in outcomes if isinstance(o, EventResult) for a in o.awards} - {
        None
    }
    earned = _told(db, program.id)
    assert {t for t, _ in earned} == {"points.earned"}
    assert {d["posting_id"] for _, d in earned} == postings
    # the same events again change nothing and raise nothing
    db.run(lambda uow: events.ingest_many(uow, program_id=program.id, events=paid))
    assert len(_told(db, program.id)) == len(earned)
    refund = EventIn.model_validate({
        "source": "pos", "external_id": "r0", "member_ref": "d0",
        "occurred_at": when + timedelta(hours=1), "type": "order.refunded",
        "payload": {"order_id": "o0", "whole": True},
    })  # fmt: skip
    (back,) = db.run(lambda uow: events.ingest_many(uow, program_id=program.id, events=[refund]))
    assert isinstance(back, EventResult) and back.points < 0
    reversed_ = [d for t, d in _told(db, program.id) if t == "points.reversed"]
    assert sum(int(str(d["amount"])) for d in reversed_) == -back.points
    assert {d["reason"] for d in reversed_} == {"order o0 refunded"}


@pytest.mark.parametrize("on_expiry", ["expire", "freeze"])
def test_the_expiry_run_raises_an_event_for_each_account_it_took_points_from(
    db: Database, on_expiry: str
) -> None:
    policy = ExpiryPolicy(validity=Validity(kind="rolling", days=30), on_expiry=on_expiry)
    program_id, (alice, bob, carol) = with_policy(db, policy)
    wanted = "points.frozen" if on_expiry == "freeze" else "points.expired"
    _subscribe(db, program_id, [wanted])
    move(db, at(2026, 1, 5, 9))
    earn(db, program_id, alice, 400, "a1")
    earn(db, program_id, bob, 70, "b1")
    db.run(lambda uow: points.spend(uow, member_id=alice, amount=150, key="s1"))
    move(db, at(2026, 1, 20, 9))
    earn(db, program_id, carol, 90, "c1")  # not due on the run's day
    job(db, "points.expire", program_id, at(2026, 2, 6, 0, 10))
    told = _told(db, program_id)
    assert {t for t, _ in told} == {wanted}
    assert sorted((d["member_id"], d["amount"]) for _, d in told) == sorted(
        [(alice, 250), (bob, 70)]
    )
    # the run again for the same moment takes nothing and tells nothing more
    job(db, "points.expire", program_id, at(2026, 2, 6, 0, 10))
    assert len(_told(db, program_id)) == 2
