"""Queueing in the caller's transaction, dedupe by key, the inbox, and sending after
commit: retries with backoff, dead after the last attempt, a crashed sender's lease, and
several senders at once — on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import pytest

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import InvalidInput, UnknownInboxMessage
from jifen.members import service as members_service
from jifen.notify import core, service
from jifen.notify.service import Notification, Senders
from tests.factories import new_program
from tests.notify.helpers import FailingEmail, RecordingSms, member, outbox_rows, settle


def _note(
    program_id: int, member_id: int | None, key: str, *channels: str, **data: Any
) -> Notification:
    return Notification(
        program_id=program_id, member_id=member_id, template="expiry.reminder",
        data={"points": 120, "expires_on": "2026-12-31", "schedule": "  2026-12-31  120",
              "suggestions_zh": "", "suggestions_en": "", **data}, key=key,
        channels=channels or ("inbox",),
    )  # fmt: skip


def test_a_key_is_queued_once_ever(db: Database) -> None:
    program = new_program(db)
    alice = member(db, program.id, email="alice@example.com", phone="13800138000")
    # when the same notification is sent twice, in two transactions
    first = db.run(
        lambda uow: service.notify(uow, _note(program.id, alice, "k1", "inbox", "email", "sms"))
    )
    again = db.run(lambda uow: service.notify(uow, _note(program.id, alice, "k1", "email")))
    # then it is queued once, one row per channel
    assert (first, again) == (3, 0)
    rows = outbox_rows(db, program.id)
    assert sorted(row.channel for row in rows) == ["email", "inbox", "sms"]
    by_channel = {row.channel: row for row in rows}
    # personal addresses are masked in the record and stored only encrypted
    assert by_channel["email"].recipient == "a****@example.com"
    assert by_channel["sms"].recipient == "138****8000"
    assert "alice" not in by_channel["email"].address_enc
    assert by_channel["inbox"].status == "sent"
    assert by_channel["email"].status == by_channel["sms"].status == "pending"
    # the same key in another programme is another notification
    other = new_program(db)
    bob = member(db, other.id)
    assert db.run(lambda uow: service.notify(uow, _note(other.id, bob, "k1"))) == 1
    # a job can ask which of its keys are queued already, in this programme only
    asked = ["k1", "k2", "k1"]
    assert db.run(lambda uow: service.queued_keys(uow, program_id=program.id, keys=asked)) == {"k1"}
    assert db.run(lambda uow: service.queued_keys(uow, program_id=other.id, keys=["k2"])) == set()


def test_a_message_missing_what_its_template_reads_is_refused_and_queues_nothing(
    db: Database,
) -> None:
    program = new_program(db)
    li = member(db, program.id, email="li@example.com")
    short = Notification(
        program_id=program.id, member_id=li, template="order.shipped",
        data={"order_id": 7}, key="order:7:shipped", channels=("inbox", "email"),
    )  # fmt: skip
    with pytest.raises(InvalidInput) as refused:
        db.run(lambda uow: service.notify(uow, short))
    assert refused.value.params["field"] == "template"
    assert "tracking" in refused.value.message("en") and "未提供" in refused.value.message("zh")
    assert outbox_rows(db, program.id) == []
    # the key is not spent: the message given its data is queued under it
    whole = Notification(**{**short.__dict__, "data": {"order_id": 7, "tracking": "SF1"}})
    assert db.run(lambda uow: service.notify(uow, whole)) == 2


def test_a_key_given_twice_in_one_batch_is_queued_once_with_the_first_ones_text(
    db: Database,
) -> None:
    program = new_program(db)
    alice = member(db, program.id)
    first = _note(program.id, alice, "twice", points=120)
    second = _note(program.id, alice, "twice", points=999, expires_on="2027-06-30")
    assert db.run(lambda uow: service.notify_many(uow, [first, second])) == 1
    (message,), _ = db.run(
        lambda uow: service.list_inbox(uow, program_id=program.id, member_id=alice)
    )
    assert message.title == "您有 120 积分将于 2026-12-31 到期"


def test_the_outbox_is_written_in_the_callers_transaction_and_rolls_back_with_it(
    db: Database,
) -> None:
    program = new_program(db)
    alice = member(db, program.id, email="alice@example.com")

    class ChangeFailed(Exception):
        pass

    # given a change that queues a notification and then fails
    def change_and_fail() -> None:
        with db.transaction() as uow:
            assert service.notify(uow, _note(program.id, alice, "k", "inbox", "email")) == 2
            raise ChangeFailed

    with pytest.raises(ChangeFailed):
        change_and_fail()
    # then nothing was queued, and the key is still free
    assert outbox_rows(db, program.id) == []
    assert (
        db.run(lambda uow: service.unread_count(uow, program_id=program.id, member_id=alice)) == 0
    )
    assert db.run(lambda uow: service.notify(uow, _note(program.id, alice, "k", "email"))) == 1


def test_channels_the_member_cannot_be_reached_on_are_left_out(db: Database) -> None:
    program = new_program(db)
    bare = member(db, program.id)
    assert (
        db.run(lambda uow: service.notify(uow, _note(program.id, bare, "k", "email", "sms"))) == 0
    )
    assert outbox_rows(db, program.id) == []
    with pytest.raises(InvalidInput):
        db.run(lambda uow: service.notify(uow, _note(program.id, bare, "k2", "pigeon")))


def test_the_inbox_has_the_message_at_once_and_keeps_read_and_unread(db: Database) -> None:
    program = new_program(db)
    alice, bob = member(db, program.id), member(db, program.id)
    db.run(lambda uow: service.notify(uow, _note(program.id, alice, "a1")))
    db.run(lambda uow: service.notify(uow, _note(program.id, alice, "a2", language="en")))
    db.run(lambda uow: service.notify(uow, _note(program.id, bob, "b1")))
    items, cursor = db.run(
        lambda uow: service.list_inbox(uow, program_id=program.id, member_id=alice, limit=1)
    )
    assert cursor is not None and items[0].title == "120 of your points expire on 2026-12-31"
    rest, end = db.run(lambda uow: service.list_inbox(
        uow, program_id=program.id, member_id=alice, after_id=int(cursor)))  # fmt: skip
    assert end is None and rest[0].title == "您有 120 积分将于 2026-12-31 到期"
    # when alice reads one
    read = db.run(
        lambda uow: service.mark_read(
            uow, program_id=program.id, member_id=alice, message_id=rest[0].id
        )
    )
    assert read.read_at == db.clock.now()
    assert (
        db.run(lambda uow: service.unread_count(uow, program_id=program.id, member_id=alice)) == 1
    )
    unread, _ = db.run(
        lambda uow: service.list_inbox(
            uow, program_id=program.id, member_id=alice, unread_only=True
        )
    )
    assert [m.id for m in unread] == [items[0].id]
    # she cannot mark bob's message, which stays unread
    (bobs,), _ = db.run(lambda uow: service.list_inbox(uow, program_id=program.id, member_id=bob))
    with pytest.raises(UnknownInboxMessage):
        db.run(
            lambda uow: service.mark_read(
                uow, program_id=program.id, member_id=alice, message_id=bobs.id
            )
        )
    assert (
        db.run(lambda uow: service.mark_all_read(uow, program_id=program.id, member_id=alice)) == 1
    )
    assert db.run(lambda uow: service.unread_count(uow, program_id=program.id, member_id=bob)) == 1


def _drain(db: Database, senders: Senders) -> service.DeliveryReport:
    return service.deliver_due(db, senders=senders, limit=1000)


def test_sms_are_sent_after_commit_once(db: Database) -> None:
    settle(db)
    program = new_program(db)
    alice = member(db, program.id, phone="13800138000")
    db.run(lambda uow: service.notify(uow, _note(program.id, alice, "k", "sms")))
    gateway = RecordingSms()
    _drain(db, Senders(sms=gateway))
    _drain(db, Senders(sms=gateway))
    mine = [sent for sent in gateway.sent if "120" in sent[1]]
    (row,) = outbox_rows(db, program.id)
    assert [(p, m) for p, _, m in mine if m == row.delivery_id] == [
        ("13800138000", row.delivery_id)
    ]
    assert (row.status, row.attempts, row.sent_at, row.next_attempt_at) == (
        "sent",
        1,
        db.clock.now(),
        None,
    )


class _NamingGateway:
    """An SMS gateway that refuses the number, naming it in its error, as real ones do."""

    def send(self, *, phone: str, text: str, message_id: str) -> None:
        raise RuntimeError(f"gateway: +86{phone} is out of service ({phone})")


class _NamingEmail:
    def send(self, message: EmailMessage) -> None:
        raise ConnectionError(f"relay refused {message['To']}")


def test_a_senders_error_naming_the_address_is_kept_with_the_address_masked(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    settle(db)
    program = new_program(db)
    alice = member(db, program.id, phone="13800138000", email="alice@example.cn")
    db.run(lambda uow: service.notify(uow, _note(program.id, alice, "k", "sms", "email")))
    report = _drain(db, Senders(sms=_NamingGateway(), email=_NamingEmail()))
    assert report.retrying == 2
    errors = sorted(row.last_error or "" for row in outbox_rows(db, program.id))
    assert errors == [
        "ConnectionError: relay refused a****@example.cn",
        "RuntimeError: gateway: +86138****8000 is out of service (138****8000)",
    ]
    said = " ".join(report.errors) + caplog.text
    assert "13800138000" not in said and "alice@example.cn" not in said


def test_emails_wait_unclaimed_while_no_smtp_server_is_configured(db: Database) -> None:
    settle(db)
    program = new_program(db)
    alice = member(db, program.id, email="alice@example.com")
    db.run(lambda uow: service.notify(uow, _note(program.id, alice, "k", "email")))
    report = _drain(db, Senders(email=None))
    assert report.waiting_email >= 1
    (row,) = outbox_rows(db, program.id)
    assert (row.status, row.attempts) == ("pending", 0)


def test_failures_are_retried_with_backoff_then_given_up(db: Database, clock: ManualClock) -> None:
    settle(db)
    program = new_program(db)
    alice = member(db, program.id, email="alice@example.com")
    db.run(lambda uow: service.notify(uow, _note(program.id, alice, "k", "email")))
    sender = FailingEmail()
    senders = Senders(email=sender)
    # the first attempt fails: the next is 30 s later, not before
    _drain(db, senders)
    (row,) = outbox_rows(db, program.id)
    assert (row.status, row.attempts, row.next_attempt_at) == (
        "pending",
        1,
        clock.now() + timedelta(seconds=30),
    )
    assert "ConnectionRefusedError" in row.last_error
    clock.advance(timedelta(seconds=29))
    _drain(db, senders)
    assert outbox_rows(db, program.id)[0].attempts == 1
    # each later attempt waits as the schedule says, until the last one
    for attempt in range(2, core.MAX_ATTEMPTS + 1):
        clock.set(outbox_rows(db, program.id)[0].next_attempt_at)
        _drain(db, senders)
        (row,) = outbox_rows(db, program.id)
        assert row.attempts == attempt
        delay = core.retry_delay(attempt)
        if delay is not None:
            assert (row.status, row.next_attempt_at) == ("pending", clock.now() + delay)
    assert (row.status, row.next_attempt_at, row.sent_at) == ("dead", None, None)
    # a dead message is never tried again; every attempt carried the same Message-ID
    clock.advance(timedelta(days=30))
    _drain(db, senders)
    assert outbox_rows(db, program.id)[0].attempts == core.MAX_ATTEMPTS
    ids = {
        m["Message-ID"]
        for m in sender.tried
        if m["To"] == "alice@example.com" and m["Message-ID"] == f"<{row.delivery_id}@jifen.outbox>"
    }
    assert len(ids) == 1


class Crash(BaseException):
    """The sender process dies mid-send (not an exception a sender catches)."""


def test_a_crashed_senders_row_is_taken_again_after_its_lease(
    db: Database, clock: ManualClock
) -> None:
    settle(db)
    program = new_program(db)
    alice = member(db, program.id, email="alice@example.com")
    db.run(lambda uow: service.notify(uow, _note(program.id, alice, "k", "email")))
    got: list[EmailMessage] = []

    class CrashingEmail:
        def send(self, message: EmailMessage) -> None:
            got.append(message)
            raise Crash

    class GoodEmail:
        def send(self, message: EmailMessage) -> None:
            got.append(message)

    # given a sender that claimed the row and died while sending
    with pytest.raises(Crash):
        _drain(db, Senders(email=CrashingEmail()))
    (row,) = outbox_rows(db, program.id)
    assert (row.status, row.attempts) == ("sending", 1)
    # then no one takes it while the lease runs
    _drain(db, Senders(email=GoodEmail()))
    assert outbox_rows(db, program.id)[0].status == "sending"
    # and the next sender sends it once the lease is over, with the same Message-ID
    clock.advance(core.LEASE)
    _drain(db, Senders(email=GoodEmail()))
    (row,) = outbox_rows(db, program.id)
    assert (row.status, row.attempts) == ("sent", 2)
    mine = [m for m in got if m["Message-ID"] == f"<{row.delivery_id}@jifen.outbox>"]
    assert len(mine) == 2


def test_several_senders_at_once_send_each_message_once(db: Database) -> None:
    settle(db)
    program = new_program(db)
    people = [member(db, program.id, phone=f"1380013{n:04d}") for n in range(12)]
    for n, person in enumerate(people):
        db.run(lambda uow, p=person, n=n: service.notify(uow, _note(program.id, p, f"k{n}", "sms")))
    gateway = RecordingSms()
    lock = threading.Lock()

    class SlowSms:
        def send(self, *, phone: str, text: str, message_id: str) -> None:
            with lock:
                gateway.send(phone=phone, text=text, message_id=message_id)

    threads = [threading.Thread(target=_drain, args=(db, Senders(sms=SlowSms()))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = outbox_rows(db, program.id)
    assert {row.status for row in rows} == {"sent"}
    ids = [m for _, _, m in gateway.sent if m in {row.delivery_id for row in rows}]
    assert sorted(ids) == sorted(row.delivery_id for row in rows)


def test_an_email_queued_while_its_member_is_erased_is_not_sent_to_the_erased_address(
    pg: Database,
) -> None:
    settle(pg)
    program = new_program(pg)
    gone = member(pg, program.id, email="gone@example.com")
    pg.run(
        lambda uow: members_service.change_state(
            uow, program_id=program.id, member_id=gone, state="closed"
        )
    )
    told, erased = threading.Event(), threading.Event()

    def tell() -> None:
        # a change that tells the member, reading its address before the erasure commits
        with pg.transaction() as uow:
            service.notify(uow, _note(program.id, gone, "late", "email"))
            told.set()
            erased.wait(timeout=2)  # the erasure waits for this change (or else commits)

    def erase(uow: UnitOfWork) -> None:
        members_service.erase_personal_data(uow, program_id=program.id, member_id=gone)
        service.erase_messages_to_member(uow, program_id=program.id, member_id=gone)

    telling = threading.Thread(target=tell)
    telling.start()
    assert told.wait(timeout=10)
    pg.run(erase)
    erased.set()
    telling.join()
    # then nothing of the address is left, and the sender sends nothing to it
    rows = outbox_rows(pg, program.id)
    assert [(row.status, row.address_enc, row.recipient) for row in rows] == [
        ("dead", None, service.ERASED_RECIPIENT)
    ]
    got: list[EmailMessage] = []

    class Keep:
        def send(self, message: EmailMessage) -> None:
            got.append(message)

    service.deliver_due(pg, senders=Senders(email=Keep()))
    assert got == []
