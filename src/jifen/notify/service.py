"""Notifications use cases: queueing messages in the caller's transaction, sending them
after commit, the member's inbox, and webhook subscriptions with their delivery log.

**Queueing.** :func:`notify` and :func:`publish` only INSERT, in the caller's unit of work:
a message exists exactly when the change that caused it commits, and a rolled-back change
leaves no message behind (nor its dedupe key). A key is queued once per programme, ever.

**The inbox** is written at :func:`notify` time, not by the sender: it is a table in the
same database, so writing it in the caller's transaction *is* its delivery — atomic with
the change, once by construction, visible at once without a running sender. Its outbox row
is written already ``sent``, so staff see every message in one list.

**Sending.** :func:`deliver_due` takes one due row at a time: it claims it in a short
transaction of its own (PostgreSQL ``FOR UPDATE SKIP LOCKED``, so several senders never
take the same row; SQLite serialises writers) and commits the claim — status ``sending``,
the attempt counted, and a lease (:data:`core.LEASE`) after which a crashed sender's row is
claimed again. It then sends with no transaction open, and records the outcome in another
short transaction: ``sent``, ``pending`` with the next attempt after a backoff, or ``dead``
after the last attempt. A row marked sent is never claimed again.

**"Never twice", honestly.** jifen never sends a row it has recorded as sent. What no
sender can rule out is a crash (or a lost database connection) after the receiver got the
message and before the result was recorded: the lease then runs out and the message is sent
again. So every webhook carries a ``Jifen-Delivery`` id and every email a ``Message-ID``
that stay the same on every attempt, and a receiver that drops ids it has already seen gets
each message exactly once.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, String, and_, bindparam, case, func, or_, select, update

from jifen import crypto
from jifen.audit import service as audit_service
from jifen.audit.schemas import AuditEntryCreate
from jifen.db import bulk
from jifen.db.prepared import Prepared, Read
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import (
    Forbidden,
    InvalidInput,
    Refusal,
    StateConflict,
    UnknownDelivery,
    UnknownInboxMessage,
    UnknownWebhook,
    WebhookTargetRefused,
)
from jifen.members import service as members_service
from jifen.members.core import mask_phone
from jifen.notify import core
from jifen.notify.models import (
    inbox_messages,
    notification_keys,
    outbox,
    webhook_attempts,
    webhook_subscriptions,
)
from jifen.notify.schemas import (
    AttemptRead,
    DeliveryRead,
    InboxMessageRead,
    MessageToMember,
    OutboxRead,
    WebhookCreate,
    WebhookRead,
    WebhookSecret,
    WebhookUpdate,
)
from jifen.notify.senders import (
    EmailSender,
    PermanentFailure,
    Redirected,
    Resolver,
    Senders,
    SmsGateway,
    WebhookSender,
    resolve,
)
from jifen.points.schemas import PostingRead, posting_event
from jifen.settings import get_settings

__all__ = [
    "CHANNELS",
    "DeliveryReport",
    "EmailSender",
    "Notification",
    "Senders",
    "SmsGateway",
    "WebhookSender",
    "check_webhook_url",
    "create_webhook",
    "delete_webhook",
    "deliver_due",
    "get_webhook",
    "list_deliveries",
    "list_inbox",
    "list_outbox",
    "list_webhooks",
    "mark_all_read",
    "mark_read",
    "notify",
    "publish",
    "redeliver",
    "rotate_secret",
    "unread_count",
    "update_webhook",
]

log = logging.getLogger("jifen.notify")

CHANNELS = ("inbox", "email", "sms")
"""Channels of :class:`Notification`; webhooks go through :func:`publish`."""

_ERROR_CHARS = 500
_SUBSCRIPTION_DELETED = "the webhook subscription was deleted"
_GONE = (
    "the receiver answered HTTP 410 Gone: the endpoint no longer exists, so the "
    "subscription was paused (its other deliveries wait); give it a working URL and resume it"
)


@dataclass(frozen=True)
class Notification:
    """A message to a member (or, with ``member_id`` None, to the addresses in ``data``:
    ``email``, ``phone``; an inbox message without a member is kept in the outbox only,
    for staff). ``data["language"]`` (zh or en) picks the language; Chinese otherwise."""

    program_id: int
    member_id: int | None
    template: str
    """e.g. "expiry.reminder", "tier.changed", "stock.low"."""
    data: dict[str, Any]
    """JSON-safe values the template reads."""
    key: str
    """Dedupe: the same key in a programme is queued once, ever."""
    channels: tuple[str, ...] = ("inbox",)
    """Any of inbox, email, sms."""


# --------------------------------------------------------------------------- queueing


def _first_times(uow: UnitOfWork, program_id: int, kind: str, keys: Sequence[str]) -> set[str]:
    """Record ``keys``; answers those not seen before. A concurrent twin waits for this
    transaction on PostgreSQL, then finds the key (or, if this one rolls back, takes it)."""
    for key in keys:
        if not key or len(key) > 200:
            raise InvalidInput(
                field="key",
                problem="give a key of 1 to 200 characters",
                problem_zh="请提供 1 至 200 个字符的键",
            )
    if not keys:
        return set()
    now = uow.clock.now()
    rows = bulk.insert_many(
        uow.conn, notification_keys,
        [{"program_id": program_id, "kind": kind, "key": key, "created_at": now}
         for key in dict.fromkeys(keys)],
        returning=[notification_keys.c.key], skip_conflicts=True,
    )  # fmt: skip
    return {key for (key,) in rows}


def queued_keys(uow: UnitOfWork, *, program_id: int, keys: Sequence[str]) -> set[str]:
    """Those of ``keys`` already queued in the programme: :func:`notify` would queue them
    no more (a job can skip the work of preparing them)."""
    if not keys:
        return set()
    rows = uow.conn.execute(
        select(notification_keys.c.key).where(
            notification_keys.c.program_id == program_id,
            notification_keys.c.kind == "notify",
            bulk.among(uow.dialect, notification_keys.c.key, list(set(keys)), String()),
        )
    )
    return set(rows.scalars())


def notify(uow: UnitOfWork, n: Notification) -> int:
    """Queue ``n`` in the caller's transaction: one outbox row per channel the recipient
    can be reached on (an email address, a phone number). Answers the rows queued: 0 when
    the key was seen before, or no channel reaches the recipient."""
    return notify_many(uow, [n])


def notify_many(uow: UnitOfWork, notifications: Sequence[Notification]) -> int:
    """:func:`notify` for many notifications of one programme at once: the members'
    addresses read in one query and every row written in a few statements (a job telling
    thousands of members)."""
    if not notifications:
        return 0
    program_id = notifications[0].program_id
    if any(n.program_id != program_id for n in notifications):
        raise InvalidInput(
            field="program_id",
            problem="notify_many takes one programme",
            problem_zh="notify_many 一次只能处理一个计划",
        )
    for n in notifications:
        unknown = [channel for channel in n.channels if channel not in CHANNELS]
        if unknown or not n.channels:
            raise InvalidInput(
                field="channels",
                problem=f"choose from {', '.join(CHANNELS)}",
                problem_zh=f"请从以下渠道中选择:{', '.join(CHANNELS)}",
            )
    reachable = {n.member_id for n in notifications if n.member_id is not None
                 and ("email" in n.channels or "sms" in n.channels)}  # fmt: skip
    phones = any("sms" in n.channels for n in notifications if n.member_id is not None)
    members = {n.member_id for n in notifications if n.member_id is not None}
    # A message in the language its data names, else the one its member chose, else Chinese.
    chosen = members_service.languages(uow, program_id=program_id, member_ids=members)
    rendered = {}
    for n in notifications:
        if n.key in rendered:
            continue  # a key twice in one batch: the first is queued, with its own text
        language = core.language_of(
            n.data if "language" in n.data or n.member_id not in chosen
            else {"language": chosen[n.member_id]}
        )  # fmt: skip
        try:
            rendered[n.key] = core.render(n.template, language, n.data)
        except ValueError as exc:
            chinese = exc.zh if isinstance(exc, Refusal) else f"模板有误({exc})"
            raise InvalidInput(field="template", problem=str(exc), problem_zh=chinese) from exc
    contacts = members_service.contacts(
        uow, program_id=program_id, member_ids=reachable, phones=phones
    )
    fresh = _first_times(uow, program_id, "notify", [n.key for n in notifications])
    now = uow.clock.now()
    rows: list[dict[str, Any]] = []
    inbox: list[tuple[Notification, str]] = []
    for n in notifications:
        if n.key not in fresh:
            continue
        fresh.discard(n.key)  # a key twice in one batch is queued once
        message = rendered[n.key]
        if n.member_id is not None:
            email, phone = contacts.get(n.member_id, (None, None))
        else:
            email, phone = n.data.get("email"), n.data.get("phone")
        common = {
            "program_id": program_id, "member_id": n.member_id, "template": n.template,
            "subject": message.subject, "body": message.text, "created_at": now,
            "dedupe_key": n.key, "delivery_id": uuid.uuid4().hex, "recipient": "",
            "status": "pending", "next_attempt_at": now, "sent_at": None, "attempts": 0,
            "address_enc": None,
        }  # fmt: skip
        for channel in dict.fromkeys(n.channels):
            if channel == "inbox":
                recipient = f"member:{n.member_id}" if n.member_id is not None else "programme"
                rows.append({**common, "channel": "inbox", "recipient": recipient,
                             "status": "sent", "next_attempt_at": None, "sent_at": now,
                             "attempts": 1})  # fmt: skip
                if n.member_id is not None:
                    inbox.append((n, n.key))
            elif channel == "email" and email:
                rows.append({**common, "channel": "email", "recipient": core.mask_email(email),
                             "address_enc": crypto.encrypt(email)})  # fmt: skip
            elif channel == "sms" and phone:
                rows.append({**common, "channel": "sms", "recipient": mask_phone(phone),
                             "address_enc": crypto.encrypt(phone)})  # fmt: skip
    if not rows:
        return 0
    written = bulk.insert_many(
        uow.conn, outbox, rows, returning=[outbox.c.id, outbox.c.dedupe_key, outbox.c.channel]
    )
    inbox_ids = {key: row_id for row_id, key, channel in written if channel == "inbox"}
    if inbox:
        bulk.insert_many(
            uow.conn, inbox_messages,
            [{"program_id": program_id, "member_id": n.member_id, "outbox_id": inbox_ids[key],
              "template": n.template, "title": rendered[key].subject, "body": rendered[key].text,
              "created_at": now}
             for n, key in inbox],
        )  # fmt: skip
    return len(rows)


def _subscribed(event_types: Sequence[str], event_type: str) -> bool:
    return event_type in event_types or "*" in event_types


_LIVE = (webhook_subscriptions.c.active.is_(True), webhook_subscriptions.c.deleted_at.is_(None))


def _subscriptions_key(program_id: int) -> str:
    return f"webhooks:{program_id}"


def _subscriptions(uow: UnitOfWork, program_id: int) -> Sequence[Any]:
    """The programme's live subscriptions, read once a transaction (a change of one in the
    transaction drops what was read)."""
    key = _subscriptions_key(program_id)
    found: Sequence[Any] | None = uow.local.get(key)
    if found is None:
        found = uow.local[key] = uow.conn.execute(_LIVE_ROWS, {"program": program_id}).all()
    return found


_LIVE_ROWS = (
    select(webhook_subscriptions.c.id, webhook_subscriptions.c.url,
           webhook_subscriptions.c.event_types)
    .where(webhook_subscriptions.c.program_id == bindparam("program"), *_LIVE)
    .order_by(webhook_subscriptions.c.id)
)  # fmt: skip
"""The programme's live subscriptions."""


def _forget_subscriptions(uow: UnitOfWork, program_id: int) -> None:
    uow.local.pop(_subscriptions_key(program_id), None)


def may_publish(uow: UnitOfWork, *, program_id: int) -> bool:
    """Whether any webhook of the programme may receive an event: a caller that has work to
    do only to publish (reading what the event says) asks first."""
    return bool(_subscriptions(uow, program_id))


_LIVE_COUNT = Prepared(
    select(func.count())
    .select_from(webhook_subscriptions)
    .where(webhook_subscriptions.c.program_id == bindparam("program"), *_LIVE)
)


def subscriptions_read(uow: UnitOfWork, program_id: int) -> Read[None]:
    """A read to go with others (``read_together``) on a busy path that may publish: where
    the programme has no live webhook, :func:`publish` and :func:`may_publish` then know
    it without a statement of their own."""
    key = _subscriptions_key(program_id)
    if key in uow.local:
        return Read(None, {}, lambda _: None)

    def answer(row: Any) -> None:
        if row is None or not row[0]:
            uow.local[key] = []

    return Read(_LIVE_COUNT, {"program": program_id}, answer)


def announce_postings(
    uow: UnitOfWork,
    *,
    program_id: int,
    postings: Sequence[tuple[PostingRead, str | None, str | None]],
) -> None:
    """Raise each posting's ``points.<kind>`` event (with the merchant and store it was
    made for) for the programme's webhooks, in the postings' transaction, once: a posting
    answered again (``replayed``) raises nothing more."""
    by_type: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for posting, merchant, store in postings:
        if not posting.replayed:
            event_type, key, data = posting_event(posting, merchant, store)
            by_type.setdefault(event_type, []).append((key, data))
    for event_type, items in by_type.items():
        publish_many(uow, program_id=program_id, event_type=event_type, items=items)


def publish(
    uow: UnitOfWork, *, program_id: int, event_type: str, data: dict[str, Any], key: str
) -> int:
    """Queue, in the caller's transaction, one webhook delivery of the event per active
    subscription of the programme to ``event_type`` (or ``"*"``). Answers the deliveries
    queued: 0 when the key was seen before."""
    return publish_many(uow, program_id=program_id, event_type=event_type, items=[(key, data)])


def publish_many(
    uow: UnitOfWork,
    *,
    program_id: int,
    event_type: str,
    items: Sequence[tuple[str, dict[str, Any]]],
) -> int:
    """:func:`publish` for many events of one type at once, as (key, data) pairs: the
    subscriptions read once and the deliveries written in one statement."""
    if not core.TEMPLATE_NAME.match(event_type):
        raise InvalidInput(
            field="event_type",
            problem="lower case letters, digits, '.', '_' or '-'",
            problem_zh="只能用小写字母、数字及 '.'、'_' 或 '-'",
        )
    targets = [row for row in _subscriptions(uow, program_id)
               if _subscribed(row.event_types, event_type)]  # fmt: skip
    if not targets:
        return 0  # no one to tell: nothing recorded, not even the keys
    fresh = _first_times(uow, program_id, "event", [key for key, _ in items])
    if not fresh:
        return 0
    now = uow.clock.now()
    rows = []
    for key, data in items:
        if key not in fresh:
            continue
        fresh.discard(key)
        event = {
            "id": f"evt_{uuid.uuid4().hex}", "type": event_type, "program_id": program_id,
            "created_at": now.isoformat(), "data": data,
        }  # fmt: skip
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str)
        rows += [
            {"program_id": program_id, "channel": "webhook", "recipient": row.url[:200],
             "template": event_type, "body": body, "created_at": now, "status": "pending",
             "next_attempt_at": now, "dedupe_key": key, "subscription_id": row.id,
             "delivery_id": f"dlv_{uuid.uuid4().hex}"}
            for row in targets
        ]  # fmt: skip
    bulk.insert_many(uow.conn, outbox, rows)
    return len(rows)


# --------------------------------------------------------------------------- sending


@dataclass
class DeliveryReport:
    """What one :func:`deliver_due` run did."""

    sent: int = 0
    retrying: int = 0
    """Failed, with another attempt scheduled."""
    dead: int = 0
    """Failed for the last time (or in a way no retry mends)."""
    lost: int = 0
    """Sent or failed after the lease ran out: another sender had taken the row, and this
    result was not recorded (the delivery log still has the attempt)."""
    waiting_email: int = 0
    """Emails due but not claimed: no SMTP server is configured."""
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Claim:
    id: int
    program_id: int | None
    channel: str
    attempt: int
    template: str
    subject: str
    body: str
    address: str | None
    delivery_id: str
    subscription_id: int | None = None
    url: str = ""
    secrets: tuple[str, ...] = ()
    allow_private: bool = False
    usable: bool = True
    """False: the subscription was deleted since the event was queued."""


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    error: str | None = None
    status_code: int | None = None
    duration_ms: int = 0
    permanent: bool = False
    gone: bool = False
    """The receiver answered 410 Gone: the subscription is paused (:data:`_GONE`)."""


def _signing_secrets(row: Any, now: datetime) -> tuple[str, ...]:
    keys = [crypto.decrypt(row.secret_enc)]
    if row.previous_secret_enc and row.previous_valid_until and row.previous_valid_until > now:
        keys.append(crypto.decrypt(row.previous_secret_enc))
    return tuple(keys)


def _claim(uow: UnitOfWork, channels: Sequence[str], program_id: int | None) -> _Claim | None:
    """The next due message (of the programme ``program_id``; None: of any), taken for this
    sender (``sending``, under a lease). A webhook delivery whose subscription is paused is
    not taken: it is held, still pending and due at no time, until the subscription is
    resumed (:func:`update_webhook`)."""
    now = uow.clock.now()
    query = (
        select(outbox)
        .where(
            outbox.c.next_attempt_at <= now,
            outbox.c.status.in_(("pending", "sending")),
            outbox.c.channel.in_(channels),
        )
        .order_by(outbox.c.next_attempt_at, outbox.c.id)
        .limit(1)
    )
    if program_id is not None:
        query = query.where(outbox.c.program_id == program_id)
    if uow.dialect == "postgresql":
        query = query.with_for_update(skip_locked=True)
    while True:
        row = uow.conn.execute(query).first()
        if row is None:
            return None
        sub = None
        if row.channel == "webhook":
            sub = uow.conn.execute(
                select(webhook_subscriptions).where(
                    webhook_subscriptions.c.id == row.subscription_id
                )
            ).one()
            if not sub.active and sub.deleted_at is None:
                uow.conn.execute(
                    update(outbox)
                    .where(outbox.c.id == row.id)
                    .values(status="pending", next_attempt_at=None)
                )
                continue
        break
    attempt = row.attempts + 1
    uow.conn.execute(
        update(outbox)
        .where(outbox.c.id == row.id)
        .values(status="sending", attempts=attempt, next_attempt_at=now + core.LEASE)
    )
    claim = _Claim(
        id=row.id, program_id=row.program_id, channel=row.channel, attempt=attempt,
        template=row.template, subject=row.subject or row.template, body=row.body,
        address=crypto.decrypt(row.address_enc) if row.address_enc else None,
        delivery_id=row.delivery_id or f"outbox-{row.id}",
    )  # fmt: skip
    if sub is None:
        return claim
    return _Claim(
        **{**claim.__dict__, "subscription_id": sub.id, "url": sub.url,
           "secrets": _signing_secrets(sub, now), "allow_private": sub.allow_private,
           "usable": sub.deleted_at is None},
    )  # fmt: skip


def _email(claim: _Claim, now: datetime) -> EmailMessage:
    message = EmailMessage()
    assert claim.address is not None
    message["To"] = claim.address
    message["Subject"] = claim.subject
    message["Date"] = format_datetime(now)  # a field every email must carry (RFC 5322)
    # The same on every attempt: a mail system that got it before drops the duplicate.
    message["Message-ID"] = f"<{claim.delivery_id}@jifen.outbox>"
    message.set_content(claim.body)
    return message


def _send(db: Database, claim: _Claim, senders: Senders) -> _Outcome:
    """Send one claimed message; never raises for a failed send."""
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        if claim.channel == "email":
            if claim.address is None:
                raise PermanentFailure("no email address was recorded for this message")
            assert senders.email is not None, "emails are claimed only with a sender"
            senders.email.send(_email(claim, db.clock.now()))
            return _Outcome(ok=True, duration_ms=elapsed())
        if claim.channel == "sms":
            if claim.address is None:
                raise PermanentFailure("no phone number was recorded for this message")
            senders.sms.send(phone=claim.address, text=claim.body, message_id=claim.delivery_id)
            return _Outcome(ok=True, duration_ms=elapsed())
        if claim.channel != "webhook":
            raise PermanentFailure(f"no sender for channel {claim.channel!r}")
        if not claim.usable:
            raise PermanentFailure(_SUBSCRIPTION_DELETED)
        body = claim.body.encode()
        timestamp = int(db.clock.now().timestamp())
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "jifen-webhooks",
            core.SIGNATURE_HEADER: core.sign(body, claim.secrets, timestamp),
            core.DELIVERY_HEADER: claim.delivery_id,
            core.EVENT_HEADER: claim.template,
        }
        status = senders.webhook.post(
            url=claim.url, body=body, headers=headers, allow_private=claim.allow_private
        )
        if 200 <= status < 300:
            return _Outcome(ok=True, status_code=status, duration_ms=elapsed())
        if 300 <= status < 400:  # a sender that reads no Location
            raise Redirected(status, None)
        if status == 410:
            return _Outcome(ok=False, status_code=status, duration_ms=elapsed(),
                            error=_GONE, permanent=True, gone=True)  # fmt: skip
        # Any other answer may mend (a receiver being deployed, 404 or 401 for a moment;
        # 408, 429 and 5xx by their meaning): tried again on the backoff schedule.
        return _Outcome(
            ok=False, status_code=status, duration_ms=elapsed(),
            error=f"the receiver answered HTTP {status}",
        )  # fmt: skip
    except Redirected as exc:
        return _Outcome(ok=False, status_code=exc.status, error=str(exc)[:_ERROR_CHARS],
                        duration_ms=elapsed(), permanent=True)  # fmt: skip
    except PermanentFailure as exc:
        return _Outcome(ok=False, error=_masked(str(exc), claim)[:_ERROR_CHARS],
                        duration_ms=elapsed(), permanent=True)  # fmt: skip
    except Exception as exc:  # any failure of the far side is a failed attempt, retried
        error = _masked(f"{type(exc).__name__}: {exc}", claim)[:_ERROR_CHARS]
        return _Outcome(ok=False, error=error, duration_ms=elapsed())


def _masked(error: str, claim: _Claim) -> str:
    """``error`` with the message's address masked, as the outbox shows it: a gateway or
    mail server that names the number or mailbox it failed to reach ("invalid number
    13800138000") must not put it in the outbox's error, which staff read, nor in the log."""
    if not claim.address or claim.channel not in ("sms", "email"):
        return error
    masked = mask_phone(claim.address) if claim.channel == "sms" else core.mask_email(claim.address)
    return error.replace(claim.address, masked)


def _record(uow: UnitOfWork, *, claim: _Claim, outcome: _Outcome) -> str:
    """Record the outcome, if the row is still this sender's (its lease did not run out
    and another sender take it). Answers sent, retrying, dead or lost."""
    now = uow.clock.now()
    if outcome.ok:
        values: dict[str, Any] = {
            "status": "sent", "sent_at": now, "next_attempt_at": None, "last_error": None,
        }  # fmt: skip
        result = "sent"
    else:
        delay = None if outcome.permanent else core.retry_delay(claim.attempt)
        if delay is None:
            values = {"status": "dead", "next_attempt_at": None, "last_error": outcome.error}
            result = "dead"
        else:
            values = {"status": "pending", "next_attempt_at": now + delay,
                      "last_error": outcome.error}  # fmt: skip
            result = "retrying"
    changed = uow.conn.execute(
        update(outbox)
        .where(outbox.c.id == claim.id, outbox.c.status == "sending",
               outbox.c.attempts == claim.attempt)
        .values(**values)
    ).rowcount  # fmt: skip
    if claim.channel == "webhook":
        assert claim.subscription_id is not None
        assert claim.program_id is not None
        if outcome.gone:
            _pause_gone(uow, claim.program_id, claim.subscription_id)
        uow.conn.execute(
            webhook_attempts.insert().values(
                program_id=claim.program_id, subscription_id=claim.subscription_id,
                outbox_id=claim.id, delivery_id=claim.delivery_id, attempt=claim.attempt,
                status_code=outcome.status_code, error=outcome.error,
                duration_ms=outcome.duration_ms, created_at=now,
            )
        )  # fmt: skip
    return result if changed else "lost"


def _pause_gone(uow: UnitOfWork, program_id: int, subscription_id: int) -> None:
    """Pause a subscription whose receiver answered 410 Gone (if it is live and not paused
    already), recording why in the audit log: its queued deliveries wait, as for a pause by
    staff, until it is resumed."""
    paused = uow.conn.execute(
        update(webhook_subscriptions)
        .where(webhook_subscriptions.c.id == subscription_id, *_LIVE)
        .values(active=False, updated_at=uow.clock.now())
    ).rowcount
    if not paused:
        return
    _forget_subscriptions(uow, program_id)
    log.warning("webhook %s of programme %s: %s", subscription_id, program_id, _GONE)
    audit_service.record(
        uow,
        AuditEntryCreate(
            program_id=program_id, actor="system", action="webhooks.write",
            target=f"webhook:{subscription_id}", before={"active": True},
            after={"active": False, "reason": _GONE},
        ),
    )  # fmt: skip


def deliver_due(
    db: Database,
    *,
    limit: int = 100,
    senders: Senders | None = None,
    concurrency: int | None = None,
    program_id: int | None = None,
) -> DeliveryReport:
    """Send up to ``limit`` messages due at ``db.clock.now()`` (of the programme
    ``program_id``; None: of every programme), each claimed and recorded in its own short
    transaction (safe with several senders at once), ``concurrency`` at a time (default
    ``JIFEN_DELIVERY_CONCURRENCY``): a slow receiver holds up one sending thread, not the
    others. Emails wait, unclaimed, while there is no email sender (no
    ``JIFEN_SMTP_HOST``)."""
    senders = senders or Senders.from_settings()
    threads = concurrency if concurrency is not None else get_settings().delivery_concurrency
    report = DeliveryReport()
    channels = ["sms", "webhook"] + (["email"] if senders.email is not None else [])
    if senders.email is None:

        def waiting(uow: UnitOfWork) -> int:
            query = select(func.count()).where(
                outbox.c.channel == "email",
                outbox.c.next_attempt_at <= uow.clock.now(),
                outbox.c.status.in_(("pending", "sending")),
            )
            if program_id is not None:
                query = query.where(outbox.c.program_id == program_id)
            return int(uow.conn.execute(query).scalar_one())

        report.waiting_email = db.run(waiting, read_only=True)
        if report.waiting_email:
            log.warning(
                "%d email(s) wait in the outbox: no SMTP server is configured (JIFEN_SMTP_HOST)",
                report.waiting_email,
            )
    lock = threading.Lock()
    left = [limit]

    def send_next() -> bool:
        with lock:
            if left[0] <= 0:
                return False
            left[0] -= 1
        claim = db.run(lambda uow: _claim(uow, channels, program_id))
        if claim is None:
            return False
        outcome = _send(db, claim, senders)
        result = db.run(partial(_record, claim=claim, outcome=outcome))
        with lock:
            setattr(report, result, getattr(report, result) + 1)
            if not outcome.ok:
                report.errors.append(f"outbox {claim.id} ({claim.channel}): {outcome.error}")
        return True

    def sender() -> None:
        while send_next():
            pass

    if threads <= 1:
        sender()
        return report
    with ThreadPoolExecutor(threads, thread_name_prefix="jifen-deliver") as pool:
        for running in [pool.submit(sender) for _ in range(threads)]:
            running.result()
    return report


# --------------------------------------------------------------------------- the inbox


def _message(row: Any) -> InboxMessageRead:
    return InboxMessageRead.model_validate(row)


def list_inbox(
    uow: UnitOfWork,
    *,
    program_id: int,
    member_id: int,
    unread_only: bool = False,
    after_id: int = 0,
    limit: int = 50,
) -> tuple[list[InboxMessageRead], str | None]:
    """The member's inbox, newest first; ``after_id`` is the last id of the previous page."""
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    query = select(inbox_messages).where(
        inbox_messages.c.program_id == program_id, inbox_messages.c.member_id == member_id
    )
    if unread_only:
        query = query.where(inbox_messages.c.read_at.is_(None))
    if after_id:
        query = query.where(inbox_messages.c.id < after_id)
    rows = uow.conn.execute(query.order_by(inbox_messages.c.id.desc()).limit(limit + 1)).all()
    items = [_message(row) for row in rows[:limit]]
    return items, (str(items[-1].id) if len(rows) > limit else None)


def unread_count(uow: UnitOfWork, *, program_id: int, member_id: int) -> int:
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    return int(
        uow.conn.execute(
            select(func.count()).where(
                inbox_messages.c.program_id == program_id,
                inbox_messages.c.member_id == member_id,
                inbox_messages.c.read_at.is_(None),
            )
        ).scalar_one()
    )


def mark_read(
    uow: UnitOfWork, *, program_id: int, member_id: int, message_id: int
) -> InboxMessageRead:
    """Mark one message read (again: it keeps the first time it was read)."""
    where = (
        inbox_messages.c.id == message_id,
        inbox_messages.c.program_id == program_id,
        inbox_messages.c.member_id == member_id,
    )
    uow.conn.execute(
        update(inbox_messages)
        .where(*where, inbox_messages.c.read_at.is_(None))
        .values(read_at=uow.clock.now())
    )
    row = uow.conn.execute(select(inbox_messages).where(*where)).first()
    if row is None:
        raise UnknownInboxMessage(member_id=member_id, message_id=message_id)
    return _message(row)


def mark_all_read(uow: UnitOfWork, *, program_id: int, member_id: int) -> int:
    """Mark every unread message of the member read; answers how many were unread."""
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    return int(
        uow.conn.execute(
            update(inbox_messages)
            .where(
                inbox_messages.c.program_id == program_id,
                inbox_messages.c.member_id == member_id,
                inbox_messages.c.read_at.is_(None),
            )
            .values(read_at=uow.clock.now())
        ).rowcount
    )


# --------------------------------------------------------------------------- webhooks


def check_webhook_url(url: str, *, allow_private: bool, resolver: Resolver = resolve) -> None:
    """Refuse ``url`` unless it is http(s), resolves, and (without ``allow_private``)
    resolves to public addresses only. Checked again on every delivery."""
    try:
        target = core.parse_target(url)
    except ValueError as exc:
        chinese = exc.zh if isinstance(exc, Refusal) else str(exc)
        raise WebhookTargetRefused(field="url", problem=str(exc), problem_zh=chinese) from exc
    try:
        addresses = resolver(target.host, target.port)
    except (OSError, UnicodeError) as exc:  # no such name; a name IDNA cannot encode
        raise WebhookTargetRefused(
            field="url",
            problem=f"the host name {target.host} cannot be resolved",
            problem_zh=f"无法解析主机名 {target.host}",
        ) from exc
    refused = core.refused_addresses(addresses)
    if refused and not allow_private:
        raise WebhookTargetRefused(
            field="url",
            problem=f"{target.host} resolves to {', '.join(refused)}, a private, loopback or "
            "reserved address; an operator holding webhooks.allow_private can allow it",
            problem_zh=f"{target.host} 解析为私有、环回或保留地址 {', '.join(refused)};"
            "需由拥有 webhooks.allow_private 权限的运营人员明确允许",
        )


def _new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _webhook_read(row: Any) -> WebhookRead:
    return WebhookRead(
        id=row.id, url=row.url, event_types=list(row.event_types),
        description=row.description, active=row.active, allow_private=row.allow_private,
        previous_secret_valid_until=row.previous_valid_until if row.previous_secret_enc else None,
        created_by=row.created_by, created_at=row.created_at, updated_at=row.updated_at,
        deleted_at=row.deleted_at,
    )  # fmt: skip


def _webhook_row(
    uow: UnitOfWork, program_id: int, webhook_id: int, *, live: bool = True, lock: bool = False
) -> Any:
    query = select(webhook_subscriptions).where(
        webhook_subscriptions.c.id == webhook_id, webhook_subscriptions.c.program_id == program_id
    )
    if live:
        query = query.where(webhook_subscriptions.c.deleted_at.is_(None))
    if lock:
        query = query.with_for_update()
    row = uow.conn.execute(query).first()
    if row is None:
        raise UnknownWebhook(webhook_id=webhook_id)
    return row


def create_webhook(
    uow: UnitOfWork,
    *,
    program_id: int,
    body: WebhookCreate,
    actor: str,
    resolver: Resolver = resolve,
) -> WebhookSecret:
    """Subscribe ``body.url`` to the programme's events; answers the signing secret, which
    is stored encrypted and shown this once. ``allow_private`` is the caller's to check."""
    check_webhook_url(body.url, allow_private=body.allow_private, resolver=resolver)
    now = uow.clock.now()
    secret = _new_secret()
    _forget_subscriptions(uow, program_id)
    webhook_id = uow.conn.execute(
        webhook_subscriptions.insert()
        .values(
            program_id=program_id, url=body.url, event_types=sorted(set(body.event_types)),
            description=body.description, secret_enc=crypto.encrypt(secret),
            active=body.active, allow_private=body.allow_private, created_by=actor,
            created_at=now, updated_at=now,
        )
        .returning(webhook_subscriptions.c.id)
    ).scalar_one()  # fmt: skip
    read = _webhook_read(_webhook_row(uow, program_id, webhook_id))
    return WebhookSecret(**read.model_dump(), secret=secret)


def list_webhooks(
    uow: UnitOfWork, *, program_id: int, after_id: int = 0, limit: int = 50
) -> tuple[list[WebhookRead], str | None]:
    """The programme's subscriptions (not deleted ones), oldest first."""
    rows = uow.conn.execute(
        select(webhook_subscriptions)
        .where(webhook_subscriptions.c.program_id == program_id,
               webhook_subscriptions.c.deleted_at.is_(None),
               webhook_subscriptions.c.id > after_id)
        .order_by(webhook_subscriptions.c.id)
        .limit(limit + 1)
    ).all()  # fmt: skip
    items = [_webhook_read(row) for row in rows[:limit]]
    return items, (str(items[-1].id) if len(rows) > limit else None)


def get_webhook(uow: UnitOfWork, *, program_id: int, webhook_id: int) -> WebhookRead:
    return _webhook_read(_webhook_row(uow, program_id, webhook_id, live=False))


def update_webhook(
    uow: UnitOfWork,
    *,
    program_id: int,
    webhook_id: int,
    body: WebhookUpdate,
    may_allow_private: bool = False,
    resolver: Resolver = resolve,
) -> WebhookRead:
    """Change what ``body`` names; a new address (or a withdrawn ``allow_private``) is
    checked again. Setting ``allow_private`` is the caller's to check; a new address for a
    subscription that keeps ``allow_private`` is refused unless ``may_allow_private`` (the
    caller holds ``webhooks.allow_private``): the permission was given for the old one."""
    row = _webhook_row(uow, program_id, webhook_id)
    changes = body.model_dump(exclude_none=True)
    if "event_types" in changes:
        changes["event_types"] = sorted(set(changes["event_types"]))
    url = changes.get("url", row.url)
    allow_private = changes.get("allow_private", row.allow_private)
    if url != row.url and allow_private and not may_allow_private:
        raise Forbidden(
            problem=f"webhook {webhook_id} may reach private addresses (allow_private), so "
            "changing its address needs webhooks.allow_private; or set allow_private to "
            "false with the new address.",
            problem_zh=f"Webhook {webhook_id} 允许访问私有地址(allow_private),修改其地址需要"
            " webhooks.allow_private 权限;或在修改地址的同时将 allow_private 设为 false。",
        )
    if url != row.url or allow_private != row.allow_private:
        check_webhook_url(url, allow_private=allow_private, resolver=resolver)
    _forget_subscriptions(uow, program_id)
    now = uow.clock.now()
    uow.conn.execute(
        update(webhook_subscriptions)
        .where(webhook_subscriptions.c.id == webhook_id)
        .values(**changes, updated_at=now)
    )
    if changes.get("active") is True and not row.active:
        # Resumed: the deliveries held while it was paused are due again, in their order.
        uow.conn.execute(
            update(outbox)
            .where(
                outbox.c.subscription_id == webhook_id,
                outbox.c.status == "pending",
                outbox.c.next_attempt_at.is_(None),
            )
            .values(next_attempt_at=now)
        )
    return _webhook_read(_webhook_row(uow, program_id, webhook_id))


def delete_webhook(uow: UnitOfWork, *, program_id: int, webhook_id: int) -> WebhookRead:
    """Delete a subscription: it gets no new events, its queued deliveries go dead; its
    delivery log is kept. Those waiting for an attempt (held by a pause, due at no time,
    among them) go dead now; one a sender is trying as this runs is recorded as it ends."""
    _webhook_row(uow, program_id, webhook_id)
    now = uow.clock.now()
    _forget_subscriptions(uow, program_id)
    uow.conn.execute(
        update(webhook_subscriptions)
        .where(webhook_subscriptions.c.id == webhook_id)
        .values(active=False, deleted_at=now, updated_at=now)
    )
    uow.conn.execute(
        update(outbox)
        .where(outbox.c.subscription_id == webhook_id, outbox.c.status == "pending")
        .values(status="dead", next_attempt_at=None, last_error=_SUBSCRIPTION_DELETED)
    )
    return _webhook_read(_webhook_row(uow, program_id, webhook_id, live=False))


def rotate_secret(
    uow: UnitOfWork,
    *,
    program_id: int,
    webhook_id: int,
    previous_valid_for: timedelta = timedelta(hours=24),
) -> WebhookSecret:
    """Make a new signing secret (answered this once); the current one keeps signing
    beside it for ``previous_valid_for``, so receivers can switch without losing events.
    Rotations of a subscription wait for one another (its row locked): the second keeps
    the first's new secret as its previous one, and no secret shown is lost."""
    row = _webhook_row(uow, program_id, webhook_id, lock=True)
    now = uow.clock.now()
    secret = _new_secret()
    uow.conn.execute(
        update(webhook_subscriptions)
        .where(webhook_subscriptions.c.id == webhook_id)
        .values(
            secret_enc=crypto.encrypt(secret), previous_secret_enc=row.secret_enc,
            previous_valid_until=now + previous_valid_for, updated_at=now,
        )
    )  # fmt: skip
    read = _webhook_read(_webhook_row(uow, program_id, webhook_id))
    return WebhookSecret(**read.model_dump(), secret=secret)


def _attempt_logs(uow: UnitOfWork, outbox_ids: Iterable[int]) -> dict[int, list[AttemptRead]]:
    logs: dict[int, list[AttemptRead]] = {}
    ids = list(outbox_ids)
    if not ids:
        return logs
    rows = uow.conn.execute(
        select(webhook_attempts)
        .where(webhook_attempts.c.outbox_id.in_(ids))
        .order_by(webhook_attempts.c.id)
    ).all()
    for row in rows:
        logs.setdefault(row.outbox_id, []).append(
            AttemptRead(
                attempt=row.attempt, status_code=row.status_code, error=row.error,
                duration_ms=row.duration_ms, at=row.created_at,
            )
        )  # fmt: skip
    return logs


def _delivery(row: Any, attempt_log: list[AttemptRead]) -> DeliveryRead:
    return DeliveryRead(
        id=row.id, delivery_id=row.delivery_id, event_type=row.template, status=row.status,
        attempts=row.attempts, next_attempt_at=row.next_attempt_at, last_error=row.last_error,
        sent_at=row.sent_at, created_at=row.created_at, redelivery_of=row.redelivery_of,
        payload=row.body, attempt_log=attempt_log,
    )  # fmt: skip


def list_deliveries(
    uow: UnitOfWork, *, program_id: int, webhook_id: int, after_id: int = 0, limit: int = 50
) -> tuple[list[DeliveryRead], str | None]:
    """The subscription's deliveries, newest first, each with its log of attempts."""
    _webhook_row(uow, program_id, webhook_id, live=False)
    query = select(outbox).where(outbox.c.subscription_id == webhook_id)
    if after_id:
        query = query.where(outbox.c.id < after_id)
    rows = uow.conn.execute(query.order_by(outbox.c.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    logs = _attempt_logs(uow, (row.id for row in page))
    items = [_delivery(row, logs.get(row.id, [])) for row in page]
    return items, (str(items[-1].id) if len(rows) > limit else None)


def redeliver(uow: UnitOfWork, *, program_id: int, webhook_id: int, delivery: int) -> DeliveryRead:
    """Queue the delivery ``delivery`` (an id from the list) once more: the same event, the
    same body and ``Jifen-Delivery`` id, as a new row with attempts of its own. Refused
    while that delivery is still being tried: redeliveries of a subscription wait for one
    another (its row locked), so two at once queue one."""
    _webhook_row(uow, program_id, webhook_id, lock=True)
    row = uow.conn.execute(
        select(outbox).where(outbox.c.id == delivery, outbox.c.subscription_id == webhook_id)
    ).first()
    if row is None:
        raise UnknownDelivery(webhook_id=webhook_id, delivery_id=delivery)
    busy = uow.conn.execute(
        select(outbox.c.id).where(
            outbox.c.subscription_id == webhook_id,
            outbox.c.delivery_id == row.delivery_id,
            outbox.c.status.in_(("pending", "sending")),
        )
    ).first()
    if busy is not None:
        raise StateConflict(
            problem=f"Delivery {row.delivery_id} is still being tried (outbox {busy.id}); "
            "wait until it is sent or dead.",
            problem_zh=f"投递 {row.delivery_id} 仍在重试中(outbox {busy.id});"
            "请等它成功或放弃后再重新投递。",
        )
    now = uow.clock.now()
    new_id = uow.conn.execute(
        outbox.insert()
        .values(
            program_id=row.program_id, channel="webhook", recipient=row.recipient,
            template=row.template, body=row.body, created_at=now, status="pending",
            next_attempt_at=now, dedupe_key=row.dedupe_key, subscription_id=webhook_id,
            delivery_id=row.delivery_id, redelivery_of=row.id,
        )
        .returning(outbox.c.id)
    ).scalar_one()  # fmt: skip
    created = uow.conn.execute(select(outbox).where(outbox.c.id == new_id)).one()
    return _delivery(created, [])


# --------------------------------------------------------------------------- the outbox


def list_outbox(
    uow: UnitOfWork,
    *,
    program_id: int,
    channel: str | None = None,
    status: str | None = None,
    member_id: int | None = None,
    after_id: int = 0,
    limit: int = 50,
) -> tuple[list[OutboxRead], str | None]:
    """The programme's messages, newest first, as staff see them (recipients masked)."""
    query = select(outbox).where(outbox.c.program_id == program_id)
    if channel is not None:
        query = query.where(outbox.c.channel == channel)
    if status is not None:
        query = query.where(outbox.c.status == status)
    if member_id is not None:
        query = query.where(outbox.c.member_id == member_id)
    if after_id:
        query = query.where(outbox.c.id < after_id)
    rows = uow.conn.execute(query.order_by(outbox.c.id.desc()).limit(limit + 1)).all()
    items = [OutboxRead.model_validate(row) for row in rows[:limit]]
    return items, (str(items[-1].id) if len(rows) > limit else None)


# --------------------------------------------------------------------------- members' data

ERASED_RECIPIENT = "(erased)"
_NOT_SENT = "not sent: the member's personal data was erased"


def _to_member(program_id: int, member_id: int, key_prefixes: Sequence[str]) -> ColumnElement[bool]:
    """The outbox rows of messages to the member: those naming it, and those sent to one of
    its addresses without naming it, found by the start of the key they were queued under
    (``key_prefixes``, given by the domain that queued them). Webhook deliveries go to the
    merchant's systems, not to the member."""
    about = [outbox.c.member_id == member_id]
    about += [outbox.c.dedupe_key.startswith(prefix, autoescape=True) for prefix in key_prefixes]
    return and_(outbox.c.program_id == program_id, outbox.c.channel != "webhook", or_(*about))


def messages_to_member(
    uow: UnitOfWork, *, program_id: int, member_id: int, key_prefixes: Sequence[str] = ()
) -> list[MessageToMember]:
    """Every message to the member, oldest first, its address masked."""
    rows = uow.conn.execute(
        select(
            outbox.c.id, outbox.c.channel, outbox.c.template, outbox.c.recipient,
            outbox.c.status, outbox.c.created_at, outbox.c.sent_at,
        )
        .where(_to_member(program_id, member_id, key_prefixes))
        .order_by(outbox.c.id)
    ).all()  # fmt: skip
    return [MessageToMember.model_validate(row._mapping) for row in rows]


def erase_messages_to_member(
    uow: UnitOfWork, *, program_id: int, member_id: int, key_prefixes: Sequence[str] = ()
) -> None:
    """Remove the personal parts of the member's messages: the in-app messages go, and each
    outbox row keeps its channel, template, state and times only (address, masked recipient,
    subject, text and error cleared). One not sent yet is given up (dead): there is no
    address left to send it to."""
    unsent = outbox.c.status.in_(("pending", "sending"))
    uow.conn.execute(
        update(outbox)
        .where(_to_member(program_id, member_id, key_prefixes))
        .values(
            recipient=ERASED_RECIPIENT, address_enc=None, subject=None, body="",
            last_error=case((unsent | (outbox.c.last_error == _NOT_SENT), _NOT_SENT), else_=None),
            status=case((unsent, "dead"), else_=outbox.c.status),
            next_attempt_at=None,
        )
    )  # fmt: skip
    uow.conn.execute(
        inbox_messages.delete().where(
            inbox_messages.c.program_id == program_id, inbox_messages.c.member_id == member_id
        )
    )
