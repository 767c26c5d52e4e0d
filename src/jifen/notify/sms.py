"""Text messages to members, behind one interface that every SMS gateway implements.

The built-in :class:`OutboxSmsProvider` needs no gateway: it writes the message to the
outbox, in the transaction that caused it, with the number and any secret in it masked, and
writes the whole message to the ``jifen.sms`` log, so that a developer or a demo can read a
one-time code there. A real gateway plugs in as another :class:`SmsProvider`
(``create_app(sms=...)``); it must keep numbers and codes out of its own logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from jifen.db.uow import UnitOfWork
from jifen.members.core import mask_phone
from jifen.notify.models import outbox

log = logging.getLogger("jifen.sms")


@dataclass(frozen=True)
class SmsMessage:
    program_id: int | None
    phone: str
    """The normalised number, for the gateway only: masked everywhere it is stored."""
    template: str
    text: str
    secret: str = ""
    """A one-time code inside ``text``: masked in the outbox."""
    member_id: int | None = None
    """The member the text is for, when it is one's (its export lists it, its erasure
    clears it)."""


class SmsProvider(Protocol):
    def send(self, uow: UnitOfWork, message: SmsMessage) -> None:
        """Send ``message``, or queue it in ``uow``'s transaction for sending after commit."""


class OutboxSmsProvider:
    """The built-in provider: the outbox (masked) and the log (whole)."""

    def send(self, uow: UnitOfWork, message: SmsMessage) -> None:
        stored = message.text.replace(message.secret, "*" * len(message.secret))
        uow.conn.execute(
            outbox.insert(),
            {"program_id": message.program_id, "channel": "sms",
             "recipient": mask_phone(message.phone), "template": message.template,
             "body": stored, "created_at": uow.clock.now(), "member_id": message.member_id,
             # The log line below is the delivery: the outbox keeps the record, and the
             # sender (deliver_due) must not pick it up again.
             "status": "sent", "sent_at": uow.clock.now()},
        )  # fmt: skip
        log.info("SMS to %s: %s", mask_phone(message.phone), message.text)
