"""The fingerprint an event is stored with, to know it when it is sent again: keyed under
the installation's secret (a member reference is often a phone number, which an unkeyed
digest would let a copy of the database test guesses of), while the events stored with
the unkeyed digest of before are still known by it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select

from jifen import crypto
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import IdempotencyConflict
from jifen.events import service
from jifen.events.models import events
from jifen.events.schemas import EventIn, EventResult
from jifen.members import service as members
from jifen.settings import get_settings
from tests.factories import new_program

PHONE = "13812345678"


def order_event(db: Database, external_id: str = "o1", amount_fen: int = 20000) -> EventIn:
    """An order sent for the member whose reference is its phone number."""
    return EventIn(
        source="pos", external_id=external_id, type="order.paid", occurred_at=db.clock.now(),
        member_ref=PHONE,
        payload={"order_id": "A1",
                 "lines": [{"sku": "T1", "category": "日用品", "amount_fen": amount_fen}]},
    )  # fmt: skip


def program_with_member(db: Database) -> int:
    program = new_program(db)
    db.run(lambda uow: members.register_member(uow, program_id=program.id, external_ref=PHONE))
    return program.id


def send(db: Database, program_id: int, event: EventIn) -> EventResult:
    return db.run(lambda uow: service.ingest(uow, program_id=program_id, event=event))


def stored(db: Database, event_id: int) -> Any:
    return db.run(
        lambda uow: uow.conn.execute(
            select(events.c.request_hash, events.c.payload).where(events.c.id == event_id)
        ).one(),
        read_only=True,
    )


def unkeyed(event: EventIn, payload: dict[str, Any]) -> str:
    """The plain SHA-256 of the event's canonical text (with its payload as stored): what
    events were stored with before their fingerprint was keyed."""
    text = json.dumps(
        {"type": event.type, "occurred_at": event.occurred_at.isoformat(),
         "member_id": event.member_id, "member_ref": event.member_ref, "payload": payload},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def secret_key(monkeypatch: pytest.MonkeyPatch, value: str) -> Iterator[None]:
    """The installation's secret key ``value`` for a while, the run's one again after."""
    monkeypatch.setenv("JIFEN_SECRET_KEY", value)
    get_settings.cache_clear()
    crypto.forget_keys()
    try:
        yield
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        crypto.forget_keys()


def test_an_event_is_stored_with_a_keyed_fingerprint(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the same order sent, naming its member by phone, in two programmes
    first_program, second_program = program_with_member(db), program_with_member(db)
    event = order_event(db)
    first = send(db, first_program, event)
    # one of them by an installation with another secret key
    with secret_key(monkeypatch, "another-secret-key-" + "y" * 32):
        second = send(db, second_program, event)
    first_hash, payload = stored(db, first.id)
    second_hash, second_payload = stored(db, second.id)
    assert second_payload == payload  # the same content
    # then neither is stored with the plain digest of its content, which a copy of the
    # database could test the 11 digits of a phone number against
    assert unkeyed(event, payload) not in (first_hash, second_hash)
    assert len(first_hash) == 64 and first_hash.startswith(service.SEALED_FINGERPRINT)
    assert int(first_hash.removeprefix(service.SEALED_FINGERPRINT), 16) >= 0
    # and the fingerprint depends on the key
    assert first_hash != second_hash
    # while the event sent again is known by its own installation's key
    again = send(db, first_program, event)
    assert again.replayed and again.id == first.id


def test_an_event_stored_with_the_unkeyed_fingerprint_of_before_is_still_known(
    db: Database,
) -> None:
    # given an event stored before fingerprints were keyed: its row holds the plain digest
    program_id = program_with_member(db)
    event = order_event(db)
    first = send(db, program_id, event)
    keyed, payload = stored(db, first.id)
    legacy = unkeyed(event, payload)
    assert keyed != legacy

    def write_back(uow: UnitOfWork) -> None:
        uow.conn.execute(events.update().where(events.c.id == first.id).values(request_hash=legacy))

    db.run(write_back)
    # when it is sent again, it is answered as a replay, and stored as it was
    again = send(db, program_id, event)
    assert again.replayed and again.id == first.id and again.awards == first.awards
    assert stored(db, first.id).request_hash == legacy
    # and another content under its id is still refused
    with pytest.raises(IdempotencyConflict):
        send(db, program_id, order_event(db, amount_fen=30000))
