"""The channels against real servers started by the tests: email through an SMTP server
(aiosmtpd), webhooks to an HTTP receiver that checks every signature."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import trustme
from sqlalchemy import select

from jifen.audit import service as audit
from jifen.audit.service import AuditFilter
from jifen.clock import Clock, ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import StateConflict, WebhookTargetRefused
from jifen.notify import core, service
from jifen.notify.models import webhook_subscriptions
from jifen.notify.schemas import WebhookCreate, WebhookUpdate
from jifen.notify.senders import HttpWebhookSender, Senders, SmtpEmailSender
from jifen.notify.service import Notification
from jifen.settings import Settings
from tests.factories import new_program
from tests.notify.conftest import Receiver, SmtpServer, SmtpsServer
from tests.notify.helpers import member, outbox_rows, public_resolver, settle
from tests.points.test_concurrency import run_together

# --------------------------------------------------------------------------- email


def test_templated_emails_in_chinese_and_english_reach_a_real_smtp_server(
    db: Database, smtp_server: SmtpServer
) -> None:
    settle(db)
    program = new_program(db)
    li = member(db, program.id, email="li@example.com")
    ann = member(db, program.id, email="ann@example.com")
    data = {"points": 300, "expires_on": "2026-03-31", "schedule": "  2026-03-31  300",
            "suggestions_zh": "  (暂无)", "suggestions_en": "  (none yet)"}  # fmt: skip
    # given one reminder in Chinese (the default) and one in English
    for who, key, extra in [(li, "li", {}), (ann, "ann", {"language": "en"})]:
        note = Notification(
            program_id=program.id, member_id=who, template="expiry.reminder",
            data={**data, **extra}, key=f"expiry:{key}", channels=("email",),
        )  # fmt: skip
        db.run(lambda uow, n=note: service.notify(uow, n))
    smtp = SmtpEmailSender(
        host=smtp_server.host, port=smtp_server.port, sender="积分 <points@example.com>",
        tls="none",
    )  # fmt: skip
    # when the sender runs
    report = service.deliver_due(db, senders=Senders(email=smtp))
    # then the server received both, each in its language, with its outbox Message-ID
    assert report.sent == 2
    by_to = {m["To"]: m for m in smtp_server.inbox.messages}
    zh, en = by_to["li@example.com"], by_to["ann@example.com"]
    assert zh["Subject"] == "您有 300 积分将于 2026-03-31 到期"
    assert "请在到期前使用" in zh.get_content()
    assert en["Subject"] == "300 of your points expire on 2026-03-31"
    assert "Use them before then." in en.get_content()
    assert "points@example.com" in zh["From"]
    rows = {row.recipient: row for row in outbox_rows(db, program.id)}
    assert zh["Message-ID"] == f"<{rows['l****@example.com'].delivery_id}@jifen.outbox>"
    assert {row.status for row in rows.values()} == {"sent"}
    assert sorted(smtp_server.inbox.recipients) == [["ann@example.com"], ["li@example.com"]]


def test_a_line_break_in_what_a_subject_shows_cannot_add_headers_or_hold_up_the_email(
    db: Database, smtp_server: SmtpServer
) -> None:
    settle(db)
    program = new_program(db)
    li = member(db, program.id, email="li@example.com")
    # given a tier whose name carries a line break and a header of its own
    note = Notification(
        program_id=program.id, member_id=li, template="tier.changed",
        data={"tier": "Gold\r\nBcc: thief@example.net", "previous_tier": "-", "language": "en"},
        key="tier:1",
        channels=("email",),
    )  # fmt: skip
    db.run(lambda uow: service.notify(uow, note))
    smtp = SmtpEmailSender(
        host=smtp_server.host, port=smtp_server.port, sender="points@example.com",
        tls="none",
    )  # fmt: skip
    # when the sender runs, the email goes out at once, on one subject line, to the member only
    report = service.deliver_due(db, senders=Senders(email=smtp))
    assert (report.sent, report.retrying, report.errors) == (1, 0, [])
    (got,) = smtp_server.inbox.messages
    assert got["Subject"] == "Your membership tier is now Gold Bcc: thief@example.net"
    assert got["Bcc"] is None
    assert smtp_server.inbox.recipients == [["li@example.com"]]


def test_an_email_carries_its_date_and_sender_as_every_email_must(
    db: Database, clock: ManualClock, smtp_server: SmtpServer
) -> None:
    settle(db)
    program = new_program(db)
    li = member(db, program.id, email="li@example.com")
    note = Notification(
        program_id=program.id, member_id=li, template="tier.kept", data={"tier": "gold"},
        key="k", channels=("email",),
    )  # fmt: skip
    db.run(lambda uow: service.notify(uow, note))
    clock.advance(timedelta(minutes=3))
    smtp = SmtpEmailSender(host=smtp_server.host, port=smtp_server.port, sender="p@example.com",
                           tls="none")  # fmt: skip
    assert service.deliver_due(db, senders=Senders(email=smtp)).sent == 1
    (got,) = smtp_server.inbox.messages
    # RFC 5322 3.6: the origination date and the originator are the two required fields
    assert got["Date"] is not None and got["Date"].datetime == clock.now()
    assert got["From"] == "p@example.com"


def an_email_queued(db: Database, key: str) -> None:
    """An email to li@example.com of a new programme, due now."""
    settle(db)
    program = new_program(db)
    who = member(db, program.id, email="li@example.com")
    db.run(lambda uow: service.notify(uow, Notification(
        program_id=program.id, member_id=who, template="points.earned",
        data={"points": 5, "balance": 5}, key=key, channels=("email",),
    )))  # fmt: skip


def test_an_email_reaches_a_server_speaking_implicit_tls_trusting_the_configured_authority(
    db: Database, smtps_server: SmtpsServer
) -> None:
    """``JIFEN_SMTP_TLS=implicit`` (SMTPS, port 465) speaks TLS from the first byte, and
    checks the server's certificate against ``JIFEN_SMTP_CA_FILE``'s authorities."""
    an_email_queued(db, "tls-1")
    settings = Settings(
        smtp_host=smtps_server.host, smtp_port=smtps_server.port, smtp_from="p@example.com",
        smtp_tls="implicit", smtp_ca_file=smtps_server.ca_file,
    )  # fmt: skip
    report = service.deliver_due(db, senders=Senders.from_settings(settings))
    assert (report.sent, report.errors) == (1, [])
    (got,) = smtps_server.inbox.messages
    assert got["To"] == "li@example.com" and got["Subject"] == "您获得了 5 积分"


def test_an_smtps_server_whose_authority_is_not_trusted_is_not_sent_to(
    db: Database, smtps_server: SmtpsServer
) -> None:
    an_email_queued(db, "tls-2")
    # with no authority configured, the system's are trusted, and they do not know it
    untrusting = Settings(
        smtp_host=smtps_server.host, smtp_port=smtps_server.port, smtp_tls="implicit"
    )
    report = service.deliver_due(db, senders=Senders.from_settings(untrusting))
    assert (report.sent, report.retrying) == (0, 1)
    assert "CERTIFICATE_VERIFY_FAILED" in report.errors[0]
    assert smtps_server.inbox.messages == []


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"smtp_port": 465}, "implicit"),
        ({"smtp_port": 587}, "starttls"),
        ({"smtp_port": 25, "smtp_starttls": False}, "none"),
        ({"smtp_port": 465, "smtp_tls": "starttls"}, "starttls"),
        ({"smtp_port": 2465, "smtp_tls": "implicit"}, "implicit"),
    ],
)
def test_the_smtp_tls_mode_is_implicit_on_port_465_unless_told(
    given: dict[str, Any], expected: str
) -> None:
    assert Settings(**given).resolved_smtp_tls() == expected


def _one_email_queued(
    db: Database, smtp_server: SmtpServer, address: str
) -> tuple[int, SmtpEmailSender]:
    """A programme with one email queued to a member at ``address``, and a sender to the
    test's SMTP server."""
    settle(db)
    program = new_program(db)
    to = member(db, program.id, email=address)
    note = Notification(
        program_id=program.id, member_id=to, template="tier.kept", data={"tier": "gold"},
        key="k", channels=("email",),
    )  # fmt: skip
    db.run(lambda uow: service.notify(uow, note))
    smtp = SmtpEmailSender(host=smtp_server.host, port=smtp_server.port, sender="p@example.com",
                           tls="none")  # fmt: skip
    return program.id, smtp


def test_an_email_to_a_mailbox_the_server_says_does_not_exist_is_given_up_at_once(
    db: Database, smtp_server: SmtpServer
) -> None:
    smtp_server.inbox.unknown.add("gone@example.com")
    program_id, smtp = _one_email_queued(db, smtp_server, "gone@example.com")
    # when the server refuses the recipient for good (5xx)
    report = service.deliver_due(db, senders=Senders(email=smtp))
    # then the email is dead with the server's reason, not tried again for two days
    assert (report.sent, report.retrying, report.dead) == (0, 0, 1)
    (row,) = outbox_rows(db, program_id)
    assert row.status == "dead" and "550" in (row.last_error or "")
    assert smtp_server.inbox.messages == []


def test_a_recipient_refused_for_now_is_tried_again_and_its_address_stays_masked(
    db: Database, smtp_server: SmtpServer
) -> None:
    smtp_server.inbox.busy.add("busy@example.com")
    program_id, smtp = _one_email_queued(db, smtp_server, "busy@example.com")
    # when the server refuses the recipient for now (4xx)
    report = service.deliver_due(db, senders=Senders(email=smtp))
    # then the email waits for its next attempt, and what staff read of the error shows the
    # address masked, as the outbox shows it everywhere
    assert (report.retrying, report.dead) == (1, 0)
    (row,) = outbox_rows(db, program_id)
    assert row.status == "pending" and "450" in (row.last_error or "")
    assert "busy@example.com" not in (row.last_error or "")
    assert "b****@example.com" in (row.last_error or "")
    assert all("busy@example.com" not in error for error in report.errors)


# --------------------------------------------------------------------------- webhooks


def _subscribe(
    db: Database, program_id: int, url: str, *, events: list[str] | None = None
) -> service.WebhookSecret:
    body = WebhookCreate(url=url, event_types=events or ["points.earned"], allow_private=True)
    return db.run(
        lambda uow: service.create_webhook(uow, program_id=program_id, body=body, actor="test")
    )


def _subscribed(
    db: Database,
    clock: ManualClock,
    receiver_factory: Callable[[Clock], Receiver],
    events: list[str] | None = None,
) -> tuple[int, Receiver, service.WebhookSecret]:
    """A new programme and a receiver subscribed to ``events`` of it, which checks the
    subscription's signature: the programme's id, the receiver and the subscription."""
    settle(db)
    program = new_program(db)
    receiver = receiver_factory(clock)
    created = _subscribe(db, program.id, receiver.url, events=events)
    receiver.secrets = [created.secret]
    return program.id, receiver, created


def _senders() -> Senders:
    return Senders(webhook=HttpWebhookSender(timeout=5.0))


def test_a_receiver_that_fails_three_times_then_succeeds_gets_the_event_exactly_once(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    program_id, receiver, created = _subscribed(db, clock, receiver_factory)
    receiver.fail_first = 3
    # given an event published in a change's transaction
    queued = db.run(
        lambda uow: service.publish(
            uow, program_id=program_id, event_type="points.earned",
            data={"member": 7, "points": 50, "名称": "积分"}, key="posting:1",
        )
    )  # fmt: skip
    assert queued == 1
    # when the sender runs each time the backoff allows
    for _ in range(4):
        service.deliver_due(db, senders=_senders())
        (row,) = outbox_rows(db, program_id)
        if row.status != "pending":
            break
        clock.set(row.next_attempt_at)
    # then the receiver accepted exactly one delivery, after four signed attempts
    assert receiver.bad_signatures == 0
    assert len(receiver.requests) == 4
    (accepted,) = receiver.accepted
    event = json.loads(accepted["body"])
    assert (event["type"], event["data"]) == (
        "points.earned",
        {"member": 7, "points": 50, "名称": "积分"},
    )
    assert accepted["headers"][core.EVENT_HEADER] == "points.earned"
    assert {r["headers"][core.DELIVERY_HEADER] for r in receiver.requests} == {row.delivery_id}
    # and the delivery log has the four attempts
    (delivery,), _ = db.run(
        lambda uow: service.list_deliveries(uow, program_id=program_id, webhook_id=created.id)
    )
    assert (delivery.status, delivery.attempts) == ("sent", 4)
    assert [(a.attempt, a.status_code) for a in delivery.attempt_log] == [
        (1, 500), (2, 500), (3, 500), (4, 200),
    ]  # fmt: skip
    assert delivery.attempt_log[0].error == "the receiver answered HTTP 500"
    assert delivery.attempt_log[-1].error is None
    # the same key publishes nothing more
    again = db.run(
        lambda uow: service.publish(
            uow, program_id=program_id, event_type="points.earned", data={}, key="posting:1"
        )
    )
    assert again == 0


def test_a_manual_redelivery_sends_the_same_event_with_the_same_delivery_id(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    program_id, receiver, created = _subscribed(db, clock, receiver_factory, ["*"])
    db.run(
        lambda uow: service.publish(
            uow, program_id=program_id, event_type="tier.changed", data={"tier": "gold"}, key="t1"
        )
    )
    service.deliver_due(db, senders=_senders())
    (first,) = outbox_rows(db, program_id)
    # when an operator redelivers it
    again = db.run(
        lambda uow: service.redeliver(
            uow, program_id=program_id, webhook_id=created.id, delivery=first.id
        )
    )
    assert (again.delivery_id, again.redelivery_of, again.status) == (
        first.delivery_id,
        first.id,
        "pending",
    )
    # a second redelivery while that one is under way is refused
    with pytest.raises(StateConflict):
        db.run(
            lambda uow: service.redeliver(
                uow, program_id=program_id, webhook_id=created.id, delivery=first.id
            )
        )
    service.deliver_due(db, senders=_senders())
    # then the receiver got the same body and delivery id twice, and kept it once
    assert len(receiver.requests) == 2
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"]
    assert len(receiver.accepted) == 1
    deliveries, _ = db.run(
        lambda uow: service.list_deliveries(uow, program_id=program_id, webhook_id=created.id)
    )
    assert [(d.status, len(d.attempt_log)) for d in deliveries] == [("sent", 1), ("sent", 1)]


def test_deliveries_queued_before_a_pause_wait_for_the_resume_and_then_go_once(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    program_id, receiver, created = _subscribed(db, clock, receiver_factory, ["*"])
    receiver.fail_first = 1
    for key in ("a", "b"):
        db.run(
            lambda uow, key=key: service.publish(
                uow, program_id=program_id, event_type="tier.changed", data={"k": key}, key=key
            )
        )
    # given the first delivery's first attempt failed (a retry is due later), the second
    # not tried yet
    service.deliver_due(db, limit=1, senders=_senders())
    assert len(receiver.requests) == 1

    def pause(active: bool) -> None:
        db.run(
            lambda uow: service.update_webhook(
                uow, program_id=program_id, webhook_id=created.id,
                body=WebhookUpdate(active=active),
            )
        )  # fmt: skip

    # when the subscription is paused and the senders run long after every retry was due
    pause(False)
    clock.advance(timedelta(days=3))
    report = service.deliver_due(db, senders=_senders())
    # then nothing is sent and nothing is given up: both wait, pending, due at no time
    assert (report.sent, report.dead, len(receiver.requests)) == (0, 0, 1)
    rows = outbox_rows(db, program_id)
    assert [(r.status, r.next_attempt_at) for r in rows] == [("pending", None)] * 2
    assert sorted(r.attempts for r in rows) == [0, 1]
    # and an event raised while it is paused is not queued for it
    db.run(
        lambda uow: service.publish(
            uow, program_id=program_id, event_type="tier.changed", data={}, key="c"
        )
    )
    assert len(outbox_rows(db, program_id)) == 2
    # once resumed, each queued delivery reaches the receiver once
    pause(True)
    report = service.deliver_due(db, senders=_senders())
    assert (report.sent, report.dead) == (2, 0)
    assert sorted(json.loads(r["body"])["data"]["k"] for r in receiver.accepted) == ["a", "b"]
    assert {r.status for r in outbox_rows(db, program_id)} == {"sent"}


def test_deliveries_held_by_a_pause_go_dead_when_the_subscription_is_deleted(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    program_id, receiver, created = _subscribed(db, clock, receiver_factory, ["*"])
    for key in ("a", "b"):
        db.run(
            lambda uow, key=key: service.publish(
                uow, program_id=program_id, event_type="points.earned", data={}, key=key
            )
        )
    # given the subscription was paused and its two deliveries are held by the senders
    db.run(
        lambda uow: service.update_webhook(
            uow, program_id=program_id, webhook_id=created.id, body=WebhookUpdate(active=False)
        )
    )
    service.deliver_due(db, senders=_senders())
    assert [r.status for r in outbox_rows(db, program_id)] == ["pending", "pending"]
    # when it is deleted
    db.run(lambda uow: service.delete_webhook(uow, program_id=program_id, webhook_id=created.id))
    # then its queued deliveries are given up, saying why, and none is ever sent
    rows = outbox_rows(db, program_id)
    assert [(r.status, r.next_attempt_at) for r in rows] == [("dead", None)] * 2
    assert all("deleted" in (r.last_error or "") for r in rows)
    clock.advance(timedelta(days=3))
    report = service.deliver_due(db, senders=_senders())
    assert (report.sent, report.dead, receiver.requests) == (0, 0, [])


def _publish_two(db: Database, program_id: int) -> None:
    for key in ("a", "b"):
        db.run(
            lambda uow, key=key: service.publish(
                uow, program_id=program_id, event_type="points.earned", data={}, key=key
            )
        )


def test_a_receiver_that_answers_410_gone_ends_the_delivery_and_pauses_the_subscription(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    program_id, receiver, created = _subscribed(db, clock, receiver_factory)
    receiver.answer = 410
    _publish_two(db, program_id)
    # when the first delivery is answered 410 Gone
    report = service.deliver_due(db, limit=1, senders=_senders())
    # then it is given up at once, saying why, with no retry scheduled
    assert (report.dead, report.retrying) == (1, 0)
    first, _ = outbox_rows(db, program_id)
    assert (first.status, first.attempts, first.next_attempt_at) == ("dead", 1, None)
    assert "410 Gone" in (first.last_error or "")
    # and the subscription is paused: its other delivery waits, and nothing more is sent
    webhook = db.run(
        lambda uow: service.get_webhook(uow, program_id=program_id, webhook_id=created.id)
    )
    assert webhook.active is False
    clock.advance(timedelta(days=3))
    later = service.deliver_due(db, senders=_senders())
    assert (later.sent, later.dead, len(receiver.requests)) == (0, 0, 1)
    (_, held) = outbox_rows(db, program_id)
    assert (held.status, held.next_attempt_at, held.attempts) == ("pending", None, 0)
    # the delivery log and the audit log say why
    (_, delivery), _ = db.run(
        lambda uow: service.list_deliveries(uow, program_id=program_id, webhook_id=created.id)
    )
    assert [(a.status_code, "410 Gone" in (a.error or "")) for a in delivery.attempt_log] == [
        (410, True)
    ]
    entries, _ = db.run(
        lambda uow: audit.search(
            uow, AuditFilter(programs=[program_id], target=f"webhook:{created.id}")
        ),
        read_only=True,
    )
    (paused,) = [e for e in entries if e.actor == "system"]
    assert paused.after is not None and paused.after["active"] is False
    assert "410 Gone" in paused.after["reason"]
    # once the receiver is back and the subscription resumed, the held delivery goes
    receiver.answer = None
    db.run(
        lambda uow: service.update_webhook(
            uow, program_id=program_id, webhook_id=created.id, body=WebhookUpdate(active=True)
        )
    )
    assert service.deliver_due(db, senders=_senders()).sent == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_receiver_that_redirects_fails_the_delivery_at_once_naming_where_to(
    db: Database,
    clock: ManualClock,
    receiver_factory: Callable[[Clock], Receiver],
    status: int,
) -> None:
    program_id, receiver, created = _subscribed(db, clock, receiver_factory)
    receiver.answer, receiver.location = status, "https://hooks.example.com/jifen/v2"
    _publish_two(db, program_id)
    report = service.deliver_due(db, senders=_senders())
    # both deliveries are given up at once: the redirect is not followed, nor retried
    assert (report.dead, report.retrying, report.sent) == (2, 0, 0)
    assert len(receiver.requests) == 2
    rows = outbox_rows(db, program_id)
    assert [(r.status, r.attempts, r.next_attempt_at) for r in rows] == [("dead", 1, None)] * 2
    error = rows[0].last_error or ""
    assert "redirected to https://hooks.example.com/jifen/v2" in error
    assert "update the subscription's URL" in error
    deliveries, _ = db.run(
        lambda uow: service.list_deliveries(uow, program_id=program_id, webhook_id=created.id)
    )
    assert {a.status_code for d in deliveries for a in d.attempt_log} == {status}
    # a redirect is no reason to pause the subscription
    webhook = db.run(
        lambda uow: service.get_webhook(uow, program_id=program_id, webhook_id=created.id)
    )
    assert webhook.active is True


@pytest.mark.parametrize("status", [401, 404, 408, 429, 503])
def test_other_failing_answers_are_tried_again_later(
    db: Database,
    clock: ManualClock,
    receiver_factory: Callable[[Clock], Receiver],
    status: int,
) -> None:
    program_id, receiver, _ = _subscribed(db, clock, receiver_factory)
    receiver.answer = status
    db.run(lambda uow: service.publish(
        uow, program_id=program_id, event_type="points.earned", data={}, key="k"
    ))  # fmt: skip
    report = service.deliver_due(db, senders=_senders())
    assert (report.retrying, report.dead) == (1, 0)
    (row,) = outbox_rows(db, program_id)
    assert row.status == "pending" and row.next_attempt_at is not None
    assert row.last_error == f"the receiver answered HTTP {status}"


def test_a_receiver_whose_address_has_chinese_in_its_path_gets_its_events(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    settle(db)
    program = new_program(db)
    receiver = receiver_factory(clock)
    base = receiver.url.split("/hooks/")[0]
    created = _subscribe(db, program.id, f"{base}/回调/积分?来源=jifen&a=%2F")
    receiver.secrets = [created.secret]
    db.run(
        lambda uow: service.publish(
            uow, program_id=program.id, event_type="points.earned", data={}, key="e"
        )
    )
    report = service.deliver_due(db, senders=_senders())
    assert (report.sent, report.errors) == (1, [])
    assert len(receiver.accepted) == 1
    # the address goes on the request line percent-encoded (UTF-8), what was encoded kept
    assert receiver.paths == [
        "/%E5%9B%9E%E8%B0%83/%E7%A7%AF%E5%88%86?%E6%9D%A5%E6%BA%90=jifen&a=%2F"
    ]


def test_after_a_rotation_both_secrets_sign_until_the_previous_one_expires(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    settle(db)
    program = new_program(db)
    receiver = receiver_factory(clock)
    created = _subscribe(db, program.id, receiver.url)
    rotated = db.run(
        lambda uow: service.rotate_secret(
            uow, program_id=program.id, webhook_id=created.id,
            previous_valid_for=timedelta(hours=1),
        )
    )  # fmt: skip
    assert rotated.secret != created.secret
    assert rotated.previous_secret_valid_until == clock.now() + timedelta(hours=1)

    def publish(key: str) -> None:
        db.run(
            lambda uow: service.publish(
                uow, program_id=program.id, event_type="points.earned", data={}, key=key
            )
        )
        service.deliver_due(db, senders=_senders())

    # a receiver still holding the old secret accepts during the hour
    receiver.secrets = [created.secret]
    publish("during")
    assert len(receiver.accepted) == 1
    assert receiver.requests[-1]["headers"][core.SIGNATURE_HEADER].count("v1=") == 2
    # after it, only the new secret signs: the old one is refused, the new one accepted
    clock.advance(timedelta(hours=1, seconds=1))
    publish("after")
    assert receiver.bad_signatures == 1
    assert receiver.requests[-1]["headers"][core.SIGNATURE_HEADER].count("v1=") == 1
    receiver.secrets = [rotated.secret]
    clock.advance(core.RETRY_DELAYS[0])
    service.deliver_due(db, senders=_senders())
    assert len(receiver.accepted) == 2


def test_private_targets_are_refused_unless_allowed_and_checked_again_at_delivery(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    settle(db)
    program = new_program(db)
    receiver = receiver_factory(clock)
    # a loopback address is refused without allow_private
    body = WebhookCreate(url=receiver.url, event_types=["*"])
    with pytest.raises(WebhookTargetRefused, match=r"127\.0\.0\.1"):
        db.run(lambda uow: service.create_webhook(uow, program_id=program.id, body=body, actor="t"))
    for url in ["http://localhost:1/x", "http://[::1]/x", "http://169.254.169.254/latest"]:
        bad = WebhookCreate(url=url, event_types=["*"])
        with pytest.raises(WebhookTargetRefused):
            db.run(
                lambda uow, b=bad: service.create_webhook(
                    uow, program_id=program.id, body=b, actor="t"
                )
            )
    # given a name that resolved to a public address when it was subscribed …
    public = WebhookCreate(url="http://hooks.example.test/in", event_types=["*"])
    created = db.run(
        lambda uow: service.create_webhook(
            uow, program_id=program.id, body=public, actor="t", resolver=public_resolver
        )
    )
    # … but to loopback when the event is delivered
    db.run(
        lambda uow: service.publish(uow, program_id=program.id, event_type="x", data={}, key="x")
    )
    rebound = HttpWebhookSender(resolver=lambda host, port: ["127.0.0.1"])
    report = service.deliver_due(db, senders=Senders(webhook=rebound))
    # then nothing is sent, and the delivery is given up with the reason
    assert report.dead == 1
    (delivery,), _ = db.run(
        lambda uow: service.list_deliveries(uow, program_id=program.id, webhook_id=created.id)
    )
    assert delivery.status == "dead" and "127.0.0.1" in (delivery.last_error or "")
    assert receiver.requests == []
    # withdrawing allow_private from a loopback subscription is refused too
    allowed = _subscribe(db, program.id, receiver.url)
    with pytest.raises(WebhookTargetRefused):
        db.run(
            lambda uow: service.update_webhook(
                uow,
                program_id=program.id,
                webhook_id=allowed.id,
                body=WebhookUpdate(allow_private=False),
            )
        )


def test_only_active_subscriptions_to_the_event_get_it(db: Database) -> None:
    program = new_program(db)

    def sub(events: list[str], active: bool = True) -> int:
        body = WebhookCreate(url="http://hooks.example.test/in", event_types=events, active=active)
        return db.run(
            lambda uow: service.create_webhook(
                uow, program_id=program.id, body=body, actor="t", resolver=public_resolver
            )
        ).id

    wanted, everything = sub(["points.earned"]), sub(["*"])
    sub(["member.tier_changed"])
    sub(["points.earned"], active=False)
    deleted = sub(["points.earned"])
    db.run(lambda uow: service.delete_webhook(uow, program_id=program.id, webhook_id=deleted))
    db.run(
        lambda uow: service.publish(
            uow, program_id=program.id, event_type="points.earned", data={"a": 1}, key="e"
        )
    )
    rows = outbox_rows(db, program.id)
    assert sorted(row.subscription_id for row in rows) == sorted([wanted, everything])
    assert len({row.delivery_id for row in rows}) == 2
    assert len({json.loads(row.body)["id"] for row in rows}) == 1


def test_a_receiver_with_an_address_that_is_down_gets_its_events_at_another(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    settle(db)
    program = new_program(db)
    receiver = receiver_factory(clock)
    port = receiver.url.split(":")[2].split("/")[0]
    # given a receiver's name with two addresses, the first of which takes no connection
    two = lambda host, port: ["127.0.0.2", "127.0.0.1"]  # noqa: E731
    body = WebhookCreate(
        url=f"http://hooks.example.test:{port}/in", event_types=["*"], allow_private=True
    )
    created = db.run(
        lambda uow: service.create_webhook(
            uow, program_id=program.id, body=body, actor="t", resolver=two
        )
    )
    receiver.secrets = [created.secret]
    db.run(
        lambda uow: service.publish(uow, program_id=program.id, event_type="x", data={}, key="x")
    )
    # when the sender runs, the event reaches the receiver at its other address
    report = service.deliver_due(db, senders=Senders(webhook=HttpWebhookSender(resolver=two)))
    assert (report.sent, report.errors) == (1, [])
    assert len(receiver.accepted) == 1


class _Meeting:
    """The real webhook sender, but each post waits until ``parties`` posts wait together:
    only a sender that sends that many at once gets any through (one after another, the
    first would wait out the barrier and fail)."""

    def __init__(self, parties: int) -> None:
        self.real = HttpWebhookSender(timeout=5.0)
        self.barrier = threading.Barrier(parties, timeout=10)

    def post(self, **message: Any) -> int:
        self.barrier.wait()
        return self.real.post(**message)


def test_the_sender_sends_several_messages_at_once_each_once(
    db: Database, clock: ManualClock, receiver_factory: Callable[[Clock], Receiver]
) -> None:
    settle(db)
    program = new_program(db)
    receiver = receiver_factory(clock)
    receiver.secrets = [_subscribe(db, program.id, receiver.url).secret]
    for n in range(8):
        db.run(lambda uow, n=n: service.publish(
            uow, program_id=program.id, event_type="points.earned", data={"n": n}, key=f"e{n}"
        ))  # fmt: skip
    meeting = _Meeting(4)
    report = service.deliver_due(db, senders=Senders(webhook=meeting), concurrency=4)
    assert (report.sent, report.retrying, report.errors) == (8, 0, [])
    assert not meeting.barrier.broken
    assert receiver.bad_signatures == 0
    got = sorted(json.loads(r["body"])["data"]["n"] for r in receiver.accepted)
    assert got == list(range(8))  # each once
    assert {row.status for row in outbox_rows(db, program.id)} == {"sent"}


def test_an_https_receiver_gets_events_only_when_its_certificate_is_trusted(
    db: Database, clock: ManualClock, receiver_factory: Callable[..., Receiver]
) -> None:
    settle(db)
    program = new_program(db)
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_tls)
    receiver = receiver_factory(clock, tls=server_tls)
    assert receiver.url.startswith("https://localhost:")
    receiver.secrets = [_subscribe(db, program.id, receiver.url).secret]
    db.run(lambda uow: service.publish(
        uow, program_id=program.id, event_type="points.earned", data={"n": 1}, key="tls"
    ))  # fmt: skip

    def loopback(host: str, port: int) -> list[str]:
        assert host == "localhost"  # the name is what the certificate is checked against
        return ["127.0.0.1"]

    # the system's authorities do not know the receiver's: the attempt fails, to be retried
    untrusting = HttpWebhookSender(timeout=5.0, resolver=loopback)
    first = service.deliver_due(db, senders=Senders(webhook=untrusting))
    assert (first.sent, first.retrying) == (0, 1)
    assert "CERTIFICATE_VERIFY_FAILED" in first.errors[0]
    assert receiver.requests == []
    # trusting its authority, the next attempt gets through, signed
    (row,) = outbox_rows(db, program.id)
    clock.set(row.next_attempt_at)
    client_tls = ssl.create_default_context()
    authority.configure_trust(client_tls)
    trusting = HttpWebhookSender(timeout=5.0, resolver=loopback, tls=client_tls)
    second = service.deliver_due(db, senders=Senders(webhook=trusting))
    assert (second.sent, second.errors) == (1, [])
    assert receiver.bad_signatures == 0 and len(receiver.accepted) == 1


class _Accepting:
    """A webhook receiver that takes everything, without a network."""

    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []

    def post(self, **message: Any) -> int:
        self.posted.append(message)
        return 200


def test_a_delivery_redelivered_by_several_operators_at_once_is_queued_once(pg: Database) -> None:
    settle(pg)
    program = new_program(pg)
    body = WebhookCreate(url="http://hooks.example.test/in", event_types=["*"])
    created = pg.run(
        lambda uow: service.create_webhook(
            uow, program_id=program.id, body=body, actor="t", resolver=public_resolver
        )
    )
    pg.run(
        lambda uow: service.publish(uow, program_id=program.id, event_type="x", data={}, key="x")
    )
    service.deliver_due(pg, senders=Senders(webhook=_Accepting()))
    (first,) = outbox_rows(pg, program.id)
    assert first.status == "sent"
    # when eight operators press "redeliver" at the same instant
    results = run_together(
        8,
        lambda _: pg.run(
            lambda uow: service.redeliver(
                uow, program_id=program.id, webhook_id=created.id, delivery=first.id
            )
        ),
    )
    # then one redelivery is queued and the others are told it is under way
    queued = [r for r in results if isinstance(r, service.DeliveryRead)]
    refused = [r for r in results if isinstance(r, StateConflict)]
    assert (len(queued), len(refused)) == (1, 7), results
    assert len(outbox_rows(pg, program.id)) == 2
    receiver = _Accepting()
    service.deliver_due(pg, senders=Senders(webhook=receiver))
    assert len(receiver.posted) == 1


def test_two_rotations_at_once_leave_both_new_secrets_signing(pg: Database) -> None:
    program = new_program(pg)
    body = WebhookCreate(url="http://hooks.example.test/in", event_types=["*"])
    created = pg.run(
        lambda uow: service.create_webhook(
            uow, program_id=program.id, body=body, actor="t", resolver=public_resolver
        )
    )
    for _ in range(5):
        # when two operators rotate the secret at the same instant
        rotated = run_together(
            2,
            lambda _: pg.run(
                lambda uow: service.rotate_secret(uow, program_id=program.id, webhook_id=created.id)
            ),
        )
        # then the two secrets they were shown are the two that sign: one rotation came
        # after the other, and neither secret was lost
        shown = {r.secret for r in rotated}

        def signing(uow: UnitOfWork) -> set[str]:
            row = uow.conn.execute(
                select(webhook_subscriptions).where(webhook_subscriptions.c.id == created.id)
            ).one()
            return set(service._signing_secrets(row, uow.clock.now()))

        assert pg.run(signing, read_only=True) == shown


def test_a_receiver_that_trickles_its_answer_is_cut_off_and_the_attempt_failed() -> None:
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))

    def trickle() -> None:
        peer, _ = server.accept()
        with peer:
            peer.recv(65536)
            peer.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():  # a header line now and then, never the end
                try:
                    peer.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    return
                time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    port = server.getsockname()[1]
    sender = HttpWebhookSender(timeout=1.0, deadline=2.0)
    outcome: list[object] = []

    def post() -> None:
        try:
            outcome.append(sender.post(url=f"http://127.0.0.1:{port}/in", body=b"{}",
                                       headers={}, allow_private=True))  # fmt: skip
        except Exception as exc:
            outcome.append(exc)

    posting = threading.Thread(target=post, daemon=True)
    started = time.monotonic()
    posting.start()
    posting.join(timeout=10)
    stop.set()
    server.close()
    # the attempt ends by the deadline, a failure (not the 200 the receiver began with)
    assert not posting.is_alive() and time.monotonic() - started < 5
    (failed,) = outcome
    assert isinstance(failed, TimeoutError) and "2" in str(failed)
