"""The notify routes: a member reads its own inbox only; operators keep webhooks, whose
secret is shown once; only a holder of webhooks.allow_private lets one reach loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from jifen.api.app import create_app
from jifen.api.deps import SHOWN_ONCE
from jifen.auth.models import one_time_codes
from jifen.db.uow import Database, UnitOfWork
from jifen.notify import service
from jifen.notify.service import Notification
from jifen.notify.sms import SmsMessage
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import new_program
from tests.notify.helpers import member


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(db, api_settings())) as test_client:
        yield test_client


def _tell(db: Database, program_id: int, member_id: int, key: str, **data: Any) -> None:
    note = Notification(
        program_id=program_id, member_id=member_id, template="tier.changed",
        data={"tier": "金卡", "previous_tier": "银卡", **data}, key=key,
    )  # fmt: skip
    db.run(lambda uow: service.notify(uow, note))


def test_a_member_reads_and_marks_its_own_inbox_and_no_one_elses(
    client: TestClient, db: Database
) -> None:
    program = new_program(db)
    alice, bob = member(db, program.id), member(db, program.id)
    _tell(db, program.id, alice, "a1")
    _tell(db, program.id, alice, "a2", language="en")
    _tell(db, program.id, bob, "b1")
    base = f"/v1/programs/{program.code}/members"
    as_alice = support.member(db, alice)
    # alice sees her two messages, newest first, both unread
    page = client.get(f"{base}/{alice}/inbox", headers=as_alice).json()
    assert [m["title"] for m in page["items"]] == [
        "Your membership tier is now 金卡", "您的会员等级已变为 金卡",
    ]  # fmt: skip
    count = client.get(f"{base}/{alice}/inbox/unread-count", headers=as_alice)
    assert count.json() == {"unread": 2}
    # she marks one read
    first = page["items"][0]["id"]
    marked = client.post(
        f"{base}/{alice}/inbox/{first}/read", headers={**as_alice, **support.key()}
    )
    assert marked.status_code == 200 and marked.json()["read_at"] is not None
    unread = client.get(f"{base}/{alice}/inbox", params={"unread_only": True}, headers=as_alice)
    assert [m["id"] for m in unread.json()["items"]] == [page["items"][1]["id"]]
    # bob's inbox and messages are not hers
    assert client.get(f"{base}/{bob}/inbox", headers=as_alice).status_code == 403
    (bobs,) = client.get(f"{base}/{bob}/inbox", headers=support.member(db, bob)).json()["items"]
    stranger = client.post(
        f"{base}/{alice}/inbox/{bobs['id']}/read", headers={**as_alice, **support.key()}
    )
    assert stranger.status_code == 404 and stranger.json()["code"] == "unknown_inbox_message"
    # read-all leaves none unread
    done = client.post(f"{base}/{alice}/inbox/read-all", headers={**as_alice, **support.key()})
    assert done.json() == {"unread": 0}
    # an operator (customer service) may read a member's inbox; the outbox lists them all
    operator = support.staff(db, "operator", program_id=program.id)
    assert len(client.get(f"{base}/{bob}/inbox", headers=operator).json()["items"]) == 1
    outbox = client.get(
        f"/v1/programs/{program.code}/outbox", params={"channel": "inbox"}, headers=operator
    )
    assert outbox.status_code == 200 and len(outbox.json()["items"]) == 3
    assert client.get(f"/v1/programs/{program.code}/outbox", headers=as_alice).status_code == 403


def test_operators_keep_webhooks_and_see_the_secret_once(client: TestClient, db: Database) -> None:
    program = new_program(db)
    base = f"/v1/programs/{program.code}/webhooks"
    operator = support.staff(db, "operator", program_id=program.id)
    body = {"url": "http://93.184.216.34/jifen", "event_types": ["points.earned"]}
    key = support.key()
    # when an operator subscribes
    created = client.post(base, json=body, headers={**operator, **key})
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["secret"].startswith("whsec_") and not hook["allow_private"]
    # then a replay of the request does not show the secret again
    replay = client.post(base, json=body, headers={**operator, **key})
    assert replay.json()["secret"] == SHOWN_ONCE and replay.json()["id"] == hook["id"]
    listed = client.get(base, headers=operator).json()["items"]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    # the secret rotates, the previous one valid for the hours asked
    rotated = client.post(
        f"{base}/{hook['id']}/rotate", json={"previous_valid_hours": 2},
        headers={**operator, **support.key()},
    )  # fmt: skip
    assert rotated.status_code == 200
    assert rotated.json()["secret"] not in (hook["secret"], SHOWN_ONCE)
    assert rotated.json()["previous_secret_valid_until"] is not None
    # it can be paused, changed and deleted
    patched = client.patch(
        f"{base}/{hook['id']}", json={"active": False, "event_types": ["*"]},
        headers={**operator, **support.key()},
    )  # fmt: skip
    assert (patched.json()["active"], patched.json()["event_types"]) == (False, ["*"])
    assert client.get(f"{base}/{hook['id']}/deliveries", headers=operator).json()["items"] == []
    missing = client.post(
        f"{base}/{hook['id']}/deliveries/999999/redeliver", headers={**operator, **support.key()}
    )
    assert missing.status_code == 404 and missing.json()["code"] == "unknown_delivery"
    gone = client.delete(f"{base}/{hook['id']}", headers={**operator, **support.key()})
    assert gone.status_code == 200 and gone.json()["deleted_at"] is not None
    assert client.get(base, headers=operator).json()["items"] == []
    # a cashier may not see webhooks at all
    cashier = support.staff(db, "cashier", program_id=program.id)
    assert client.get(base, headers=cashier).status_code == 403


def test_a_subscription_to_an_event_type_jifen_never_raises_is_refused(
    client: TestClient, db: Database
) -> None:
    program = new_program(db)
    base = f"/v1/programs/{program.code}/webhooks"
    operator = support.staff(db, "operator", program_id=program.id)
    # a typo of points.earned, and an event type of the rules' catalogue that no webhook gets
    for typo in ["points.earnd", "order.paid"]:
        body = {"url": "http://93.184.216.34/jifen", "event_types": ["points.spent", typo]}
        refused = client.post(
            base, json=body, headers={**operator, **support.key(), "Accept-Language": "zh"}
        )
        assert refused.status_code == 422, refused.text
        (error,) = refused.json()["errors"]
        assert (
            error["field"] == "body.event_types.1"
            and "不是 jifen 会发出的事件类型" in error["message"]
        )
    assert client.get(base, headers=operator).json()["items"] == []
    # a real one and "*" are taken; a change to an unknown one is refused and changes nothing
    good = {"url": "http://93.184.216.34/jifen", "event_types": ["points.earned"]}
    hook = client.post(base, json=good, headers={**operator, **support.key()}).json()
    typo = client.patch(
        f"{base}/{hook['id']}", json={"event_types": ["reward_order.shiped"]},
        headers={**operator, **support.key()},
    )  # fmt: skip
    assert typo.status_code == 422 and "points.earned" in typo.json()["errors"][0]["message"]
    assert client.get(f"{base}/{hook['id']}", headers=operator).json()["event_types"] == [
        "points.earned"
    ]
    every = client.patch(
        f"{base}/{hook['id']}", json={"event_types": ["*", "reward_order.shipped"]},
        headers={**operator, **support.key()},
    )  # fmt: skip
    assert every.status_code == 200 and every.json()["event_types"] == ["*", "reward_order.shipped"]


@pytest.mark.parametrize(
    ("url", "zh"),
    [("http://93.184.216.34:0/hook", "端口须为 1 到 65535"), ("http://[2001:db8::1/hook", "IPv6")],
)
def test_an_address_with_port_0_or_an_unclosed_ipv6_bracket_is_refused_in_either_language(
    client: TestClient, db: Database, url: str, zh: str
) -> None:
    program = new_program(db)
    base = f"/v1/programs/{program.code}/webhooks"
    operator = support.staff(db, "operator", program_id=program.id)
    for language, says in [("zh", zh), ("en", "")]:
        refused = client.post(
            base, json={"url": url, "event_types": ["*"]},
            headers={**operator, **support.key(), "Accept-Language": language},
        )  # fmt: skip
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "webhook_target_refused"
        assert says in refused.json()["detail"]
        if language == "zh":  # said in Chinese alone, not in Python's English
            assert "Invalid" not in refused.json()["detail"]
    assert client.get(base, headers=operator).json()["items"] == []


def _webhooks_operator_and_admin(db: Database) -> tuple[str, dict[str, str], dict[str, str]]:
    """A new programme's webhooks path, an operator's headers (no webhooks.allow_private)
    and a super administrator's (who holds it)."""
    program = new_program(db)
    return (
        f"/v1/programs/{program.code}/webhooks",
        support.staff(db, "operator", program_id=program.id),
        support.staff(db, "super_admin", program_id=program.id),
    )


def test_only_a_holder_of_allow_private_lets_a_webhook_reach_loopback(
    client: TestClient, db: Database
) -> None:
    base, operator, admin = _webhooks_operator_and_admin(db)
    loopback = {"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}
    # without allow_private the address is refused, in the caller's language
    refused = client.post(
        base, json=loopback, headers={**operator, **support.key(), "Accept-Language": "zh"}
    )
    assert refused.status_code == 422 and refused.json()["code"] == "webhook_target_refused"
    assert "私有" in refused.json()["detail"]
    # an operator may not set allow_private
    asked = {**loopback, "allow_private": True}
    forbidden = client.post(base, json=asked, headers={**operator, **support.key()})
    assert forbidden.status_code == 403 and "webhooks.allow_private" in forbidden.json()["detail"]
    # a super administrator (who holds webhooks.allow_private) may
    allowed = client.post(base, json=asked, headers={**admin, **support.key()})
    assert allowed.status_code == 201 and allowed.json()["allow_private"] is True


def test_a_new_address_for_a_private_webhook_needs_allow_private(
    client: TestClient, db: Database
) -> None:
    base, operator, admin = _webhooks_operator_and_admin(db)
    # given a super administrator allowed one internal receiver
    internal = {"url": "http://127.0.0.1:9/receiver", "event_types": ["*"], "allow_private": True}
    hook = client.post(base, json=internal, headers={**admin, **support.key()}).json()
    url = f"{base}/{hook['id']}"
    # when an operator (webhooks.write, not webhooks.allow_private) points it elsewhere
    for target in ["http://169.254.169.254/latest/meta-data/", "http://[::1]:6379/"]:
        moved = client.patch(
            url, json={"url": target, "event_types": ["*"]}, headers={**operator, **support.key()}
        )
        # then it is refused, in both languages, and nothing changes
        assert moved.status_code == 403, moved.text
        assert moved.json()["code"] == "forbidden"
        assert "webhooks.allow_private" in moved.json()["detail"]
    zh = client.patch(
        url, json={"url": "http://127.0.0.1:5432/"},
        headers={**operator, **support.key(), "Accept-Language": "zh"},
    )  # fmt: skip
    assert zh.status_code == 403 and "私有地址" in zh.json()["detail"]
    unchanged = client.get(url, headers=operator).json()
    assert (unchanged["url"], unchanged["allow_private"]) == (internal["url"], True)
    # an operator may still pause it, or give it a public address without allow_private
    paused = client.patch(url, json={"active": False}, headers={**operator, **support.key()})
    assert paused.status_code == 200 and paused.json()["url"] == internal["url"]
    public = {"url": "http://93.184.216.34/in", "allow_private": False}
    withdrawn = client.patch(url, json=public, headers={**operator, **support.key()})
    assert withdrawn.status_code == 200
    assert (withdrawn.json()["url"], withdrawn.json()["allow_private"]) == (public["url"], False)
    # and a holder of webhooks.allow_private may point a private one at another receiver
    again = {"url": "http://127.0.0.1:10/other", "allow_private": True}
    moved_by_admin = client.patch(url, json=again, headers={**admin, **support.key()})
    assert moved_by_admin.status_code == 200 and moved_by_admin.json()["url"] == again["url"]


class _GatewayDown:
    """An SMS provider whose gateway does not answer."""

    def __init__(self) -> None:
        self.tried = 0

    def send(self, uow: UnitOfWork, message: SmsMessage) -> None:
        self.tried += 1
        raise TimeoutError("the SMS gateway did not answer")


def test_a_sign_in_code_the_sms_provider_cannot_send_is_refused_plainly(db: Database) -> None:
    program = new_program(db)
    li = member(db, program.id, phone="13800138000")
    gateway = _GatewayDown()
    ask = {"program": program.code, "phone": "13800138000"}
    with TestClient(create_app(db, api_settings(), sms=gateway)) as client:
        # when the provider fails, the caller is told the text was not sent, in both languages
        failed = client.post("/v1/auth/members/codes", json=ask)
        assert failed.status_code == 503, failed.text
        assert failed.json()["code"] == "sms_unavailable"
        assert "not sent" in failed.json()["detail"]
        zh = client.post("/v1/auth/members/codes", json=ask, headers={"Accept-Language": "zh"})
        assert zh.json()["code"] == "sms_unavailable" and "短信" in zh.json()["detail"]
    # and no code was kept: none can sign in, and asking again is not held back a minute
    assert gateway.tried == 2
    stored = db.run(
        lambda uow: uow.conn.execute(
            select(func.count()).where(one_time_codes.c.member_id == li)
        ).scalar()
    )
    assert stored == 0
