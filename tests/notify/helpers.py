"""Builders shared by the notify tests."""

from __future__ import annotations

import uuid
from email.message import EmailMessage

from sqlalchemy import select

from jifen.db.uow import Database, UnitOfWork
from jifen.members import service as members
from jifen.members.schemas import MemberCreate
from jifen.notify.models import outbox


def member(
    db: Database, program_id: int, *, email: str | None = None, phone: str | None = None
) -> int:
    body = MemberCreate(external_ref=f"m-{uuid.uuid4().hex[:10]}", email=email, phone=phone)
    return db.run(lambda uow: members.register(uow, program_id=program_id, body=body).id)


def outbox_rows(db: Database, program_id: int) -> list[object]:
    def read(uow: UnitOfWork) -> list[object]:
        return list(
            uow.conn.execute(
                select(outbox).where(outbox.c.program_id == program_id).order_by(outbox.c.id)
            ).all()
        )

    return db.run(read, read_only=True)


def public_resolver(host: str, port: int) -> list[str]:
    """DNS as the tests want it: every name is a public address."""
    return ["93.184.216.34"]


class RecordingSms:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    def send(self, *, phone: str, text: str, message_id: str) -> None:
        self.sent.append((phone, text, message_id))


class FailingEmail:
    """An email sender whose server is down."""

    def __init__(self) -> None:
        self.tried: list[EmailMessage] = []

    def send(self, message: EmailMessage) -> None:
        self.tried.append(message)
        raise ConnectionRefusedError("connection refused")


def settle(db: Database) -> None:
    """Give up every message left due by earlier tests: the sender takes due rows of every
    programme, and a test means to see only its own."""
    db.run(
        lambda uow: uow.conn.execute(
            outbox.update()
            .where(outbox.c.status.in_(("pending", "sending")))
            .values(status="dead", next_attempt_at=None, last_error="left by an earlier test")
        )
    )
