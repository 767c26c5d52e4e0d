"""What a redemption order's moves tell: its member, in the inbox, of the moves that send
goods or give points back; the programme's webhooks of every move; each once."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

from jifen.clock import Clock, ManualClock
from jifen.db.uow import Database
from jifen.notify import service
from jifen.notify.schemas import WebhookCreate
from jifen.notify.senders import HttpWebhookSender, Senders
from jifen.rewards import service as rewards
from tests.notify.conftest import Receiver
from tests.notify.helpers import outbox_rows, settle
from tests.rewards.shop import Shop


def _subscribe(db: Database, program_id: int, url: str, events: list[str]) -> str:
    body = WebhookCreate(url=url, event_types=events, allow_private=True)
    created = db.run(
        lambda uow: service.create_webhook(uow, program_id=program_id, body=body, actor="test")
    )
    return created.secret


def _inbox(db: Database, program_id: int) -> list[tuple[str, str, str]]:
    """(template, subject, body) of the inbox notes queued for the programme's members."""
    rows = outbox_rows(db, program_id)
    return [(r.template, r.subject, r.body) for r in rows if r.channel == "inbox"]


def _webhooks(db: Database, program_id: int) -> list[tuple[str, dict[str, object]]]:
    """(event type, data) of the webhook deliveries queued for the programme."""
    rows = [r for r in outbox_rows(db, program_id) if r.channel == "webhook"]
    return [(r.template, json.loads(r.body)["data"]) for r in rows]


def test_a_shipped_order_reaches_the_webhook_and_the_member_hears_of_it_once(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    settle(db)
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    kettle = shop.reward(points=1000, stock=3, name={"zh": "水壶", "en": "Kettle"})
    receiver = receiver_factory(clock)
    receiver.secrets = [
        _subscribe(db, shop.program_id, receiver.url, ["reward_order.created",
                                                       "reward_order.shipped"])
    ]  # fmt: skip
    # given an order, confirmed and then shipped with its tracking number
    order = shop.redeem(member, kettle.code)
    shop.move(order.id, "confirm")
    shop.move(order.id, "ship", tracking="SF1234567890")
    # then the webhook has the order made and shipped (not confirmed: not subscribed)
    assert [t for t, _ in _webhooks(db, shop.program_id)] == [
        "reward_order.created", "reward_order.shipped",
    ]  # fmt: skip
    service.deliver_due(db, senders=Senders(webhook=HttpWebhookSender(timeout=5.0)))
    assert receiver.bad_signatures == 0
    events = [json.loads(a["body"]) for a in receiver.accepted]
    # (sent by several threads at once: they may arrive in either order)
    assert sorted(e["type"] for e in events) == ["reward_order.created", "reward_order.shipped"]
    shipped = next(e["data"] for e in events if e["type"] == "reward_order.shipped")
    assert shipped["order_id"] == order.id and shipped["member_id"] == member
    assert (shipped["reward"], shipped["state"], shipped["points"]) == (
        kettle.code,
        "shipped",
        1000,
    )
    assert shipped["tracking"] == "SF1234567890"
    # and the member's inbox has one note, of the shipping, with the tracking number
    ((template, subject, body),) = _inbox(db, shop.program_id)
    assert template == "order.shipped"
    assert subject == f"您的兑换订单 {order.id} 已发货"
    assert "SF1234567890" in body
    # and nothing more is told when the shipped order is moved on
    shop.move(order.id, "deliver")
    assert len(_inbox(db, shop.program_id)) == 1


def test_a_cancelled_order_tells_the_member_its_points_are_back(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    gift = shop.reward(points=800, stock=2)
    _subscribe(db, shop.program_id, "http://127.0.0.1:9/hooks", ["*"])
    order = shop.redeem(member, gift.code)
    shop.move(order.id, "cancel", note="customer changed mind")
    ((template, _, body),) = _inbox(db, shop.program_id)
    assert template == "order.cancelled"
    assert f"订单 {order.id}" in body and "800 积分已退回" in body
    told = _webhooks(db, shop.program_id)
    assert [t for t, _ in told] == ["reward_order.created", "reward_order.cancelled"]
    cancelled = told[1][1]
    assert cancelled["refund_posting_id"] is not None
    assert "customer changed mind" not in json.dumps(told, ensure_ascii=False)  # notes stay


def test_a_member_is_told_of_its_order_by_the_rewards_name_not_its_code(db: Database) -> None:
    from jifen.notify import core

    shop = Shop.open(db)
    (member,) = shop.member(5000)
    kettle = shop.reward(code="kettle-2026", points=800, stock=2,
                         name={"zh": "水壶", "en": "Kettle"})  # fmt: skip
    mug = shop.reward(points=100, name={"en": "Mug"})  # no Chinese name: the English one
    _subscribe(db, shop.program_id, "http://127.0.0.1:9/hooks", ["reward_order.cancelled"])
    for gift in (kettle, mug):
        shop.move(shop.redeem(member, gift.code).id, "cancel")
    notes = [body for template, _, body in _inbox(db, shop.program_id)]
    assert "(水壶 × 1)" in notes[0] and "kettle-2026" not in notes[0]
    assert "(Mug × 1)" in notes[1]
    _, data = _webhooks(db, shop.program_id)[0]
    assert data["reward"] == "kettle-2026"  # the code stays for the programme's systems
    english = core.render("order.cancelled", "en", data)
    assert "(Kettle × 1)" in english.text


def test_an_order_that_lapsed_unpaid_is_told_as_cancelled(db: Database, clock: ManualClock) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    combo = shop.reward(points=1000, cash_fen=9000, stock=2)
    order = shop.redeem(member, combo.code)  # from the app: no payment yet
    assert order.state == "awaiting_payment"
    assert _inbox(db, shop.program_id) == []  # the member made it: nothing to tell
    clock.advance(timedelta(hours=1))
    db.run(lambda uow: rewards.lapse_payments(uow, program_id=shop.program_id))
    ((template, _, body),) = _inbox(db, shop.program_id)
    assert template == "order.cancelled" and "1000 积分已退回" in body


def test_an_expired_voucher_tells_what_came_back_and_the_fee(
    db: Database, clock: ManualClock
) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    wash = shop.reward(kind="service", points=1000, name={"zh": "洗车券"})
    _subscribe(db, shop.program_id, "http://127.0.0.1:9/hooks", ["voucher.expired"])
    order = shop.redeem(member, wash.code)
    assert order.voucher is not None
    clock.advance(timedelta(days=91))
    db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))
    db.run(lambda uow: rewards.expire_vouchers(uow, program_id=shop.program_id))  # again
    ((template, _, body),) = _inbox(db, shop.program_id)
    assert template == "voucher.expired"
    assert order.voucher.code in body and "900 积分已退回" in body and "手续费 100" in body
    ((event_type, data),) = _webhooks(db, shop.program_id)
    assert event_type == "voucher.expired"
    assert (data["points_returned"], data["fee"]) == (900, 100)


def test_a_programme_without_webhooks_queues_nothing_for_a_redemption(db: Database) -> None:
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    gift = shop.reward(points=500)
    shop.redeem(member, gift.code)
    assert outbox_rows(db, shop.program_id) == []
    # a subscription made later hears of the next order
    _subscribe(db, shop.program_id, "http://127.0.0.1:9/hooks", ["reward_order.created"])
    second = shop.redeem(member, gift.code)
    ((event_type, data),) = _webhooks(db, shop.program_id)
    assert (event_type, data["order_id"]) == ("reward_order.created", second.id)
