"""The fingerprint an event is stored with, to know it when it is sent again: keyed under
the installation's secret (a member reference is often a phone number, which an unkeyed
digest would let a copy of the database test guesses of), while the events stored with
the unkeyed digest of before are still known by it."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from jifen import crypto
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import IdempotencyConflict
from jifen.events import service
from jifen.events.models import events
from jifen.events.schemas import EventIn, EventResult
from jifen.jobs import service as jobs
from jifen.members import service as members
from tests.factories import new_program, secret_keys

PHONE = "13812345678"


def order_event(
    db: Database, external_id: str = "o1", amount_fen: int = 20000, order_id: str = "A1"
) -> EventIn:
    """An order sent for the member whose reference is its phone number."""
    return EventIn(
        source="pos", external_id=external_id, type="order.paid", occurred_at=db.clock.now(),
        member_ref=PHONE,
        payload={"order_id": order_id,
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


def canonical(event: EventIn, payload: dict[str, Any]) -> str:
    """The event's canonical text (with its payload as stored), which its fingerprint
    digests."""
    return json.dumps(
        {"type": event.type, "occurred_at": event.occurred_at.isoformat(),
         "member_id": event.member_id, "member_ref": event.member_ref, "payload": payload},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )  # fmt: skip


def unkeyed(event: EventIn, payload: dict[str, Any]) -> str:
    """The plain SHA-256 of the event's canonical text: what events were stored with before
    their fingerprint was keyed."""
    return hashlib.sha256(canonical(event, payload).encode()).hexdigest()


def test_an_event_is_stored_with_a_keyed_fingerprint(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the same order sent, naming its member by phone, in two programmes
    first_program, second_program = program_with_member(db), program_with_member(db)
    event = order_event(db)
    first = send(db, first_program, event)
    # one of them by an installation with another secret key
    with secret_keys(monkeypatch, "another-secret-key-" + "y" * 32):
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


SEAL = "events.seal_fingerprints"


def store_as(db: Database, hashes: dict[int, str]) -> None:
    """Write ``hashes`` (by event id) into the events' rows, as a release before stored
    them."""

    def write(uow: UnitOfWork) -> None:
        for event_id, value in hashes.items():
            uow.conn.execute(
                update(events).where(events.c.id == event_id).values(request_hash=value)
            )

    db.run(write)


def fingerprints(db: Database, program_id: int) -> dict[int, str]:
    return db.run(
        lambda uow: {
            row.id: row.request_hash
            for row in uow.conn.execute(
                select(events.c.id, events.c.request_hash).where(events.c.program_id == program_id)
            )
        },
        read_only=True,
    )


def orders_stored_before(db: Database, program_id: int) -> list[tuple[EventIn, int]]:
    """Three orders of the programme's member, the first two stored with the unkeyed
    digest of before sealing, the third with the bare keyed HMAC of the release between."""
    sent = [order_event(db, f"o{n}", amount_fen=10000 * n, order_id=f"A{n}") for n in (1, 2, 3)]
    ids = [send(db, program_id, event).id for event in sent]
    payloads = [stored(db, event_id).payload for event_id in ids]
    store_as(db, {
        ids[0]: unkeyed(sent[0], payloads[0]),
        ids[1]: unkeyed(sent[1], payloads[1]),
        ids[2]: crypto.event_fingerprint(canonical(sent[2], payloads[2])),
    })  # fmt: skip
    return list(zip(sent, ids, strict=True))


def assert_known_again(db: Database, program_id: int, orders: list[tuple[EventIn, int]]) -> None:
    """Each order sent again is a replay of the one stored; with another amount, refused."""
    for event, event_id in orders:
        again = send(db, program_id, event)
        assert again.replayed and again.id == event_id
        changed = event.model_copy(update={"payload": {**event.payload, "order_id": "B"}})
        with pytest.raises(IdempotencyConflict):
            send(db, program_id, changed)


def test_the_job_seals_the_fingerprints_events_were_stored_with_before(db: Database) -> None:
    # given a programme's orders stored before fingerprints were sealed, and another
    # programme's order stored with the unkeyed digest
    program_id, other_program = program_with_member(db), program_with_member(db)
    orders = orders_stored_before(db, program_id)
    other_event = order_event(db, "x1")
    other = send(db, other_program, other_event)
    other_plain = unkeyed(other_event, stored(db, other.id).payload)
    store_as(db, {other.id: other_plain})
    before = fingerprints(db, program_id)
    moment = datetime(2026, 12, 8, 4, 30, tzinfo=db.clock.now().tzinfo)
    # when the job is run dry, it counts them and changes nothing
    dry = jobs.run(db, SEAL, program_id=program_id, now=moment, size=2, dry_run=True)
    assert dry.figures == {"sealed": 3} and fingerprints(db, program_id) == before
    # when it is run, two at a time
    run = jobs.run(db, SEAL, program_id=program_id, now=moment, size=2)
    assert run.state == "done" and run.figures == {"sealed": 3} and run.chunks == 2
    # then no event of the programme keeps the digest of its content, unkeyed or keyed:
    # each is sealed
    after = fingerprints(db, program_id)
    for event, event_id in orders:
        payload = stored(db, event_id).payload
        assert after[event_id] not in (
            unkeyed(event, payload),
            crypto.event_fingerprint(canonical(event, payload)),
        )
        assert after[event_id].startswith(service.SEALED_FINGERPRINT)
        assert len(after[event_id]) == 64
    # the other programme's is left to its own run
    assert fingerprints(db, other_program) == {other.id: other_plain}
    # yet each order sent again is still known, and another content under its id refused
    assert_known_again(db, program_id, orders)
    # and the next run finds nothing to seal: it changes nothing
    later = jobs.run(db, SEAL, program_id=program_id, now=moment + timedelta(days=1))
    assert later.state == "done" and later.figures == {"sealed": 0}
    assert fingerprints(db, program_id) == after
    assert_known_again(db, program_id, orders)


def test_erasure_leaves_the_fingerprints_the_job_sealed_as_they_are(db: Database) -> None:
    # given a member's orders stored before fingerprints were sealed, sealed by the job
    program_id = program_with_member(db)
    orders = orders_stored_before(db, program_id)
    moment = datetime(2026, 12, 8, 4, 30, tzinfo=db.clock.now().tzinfo)
    assert jobs.run(db, SEAL, program_id=program_id, now=moment).figures == {"sealed": 3}
    sealed = fingerprints(db, program_id)
    member_id = stored_member(db, orders[0][1])
    # when the member's events' fingerprints are erased
    changed = db.run(
        lambda uow: service.erase_fingerprints(uow, program_id=program_id, member_id=member_id)
    )
    # then none changes, and each order sent again is still known
    assert changed == 0 and fingerprints(db, program_id) == sealed
    assert_known_again(db, program_id, orders)


def stored_member(db: Database, event_id: int) -> int:
    return int(
        db.run(
            lambda uow: uow.conn.execute(
                select(events.c.member_id).where(events.c.id == event_id)
            ).scalar_one(),
            read_only=True,
        )
    )


def test_the_job_reads_the_unsealed_events_by_their_partial_index(db: Database) -> None:
    """Once sealed, a programme's events are out of ``ix_events_unsealed``: the job's query
    repeats the index's predicate, so that the database reads that (nearly empty) index,
    not every event of the programme, each day."""
    from sqlalchemy import event as sqlalchemy_event

    program_id = program_with_member(db)
    orders_stored_before(db, program_id)
    seen: list[tuple[str, Any]] = []

    def remember(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "request_hash" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    sqlalchemy_event.listen(db.engine, "before_cursor_execute", remember)
    try:
        db.run(lambda uow: service.seal_fingerprints(uow, program_id=program_id, limit=10))
    finally:
        sqlalchemy_event.remove(db.engine, "before_cursor_execute", remember)
    ((statement, parameters),) = seen
    postgresql = db.dialect == "postgresql"
    explain = "EXPLAIN " if postgresql else "EXPLAIN QUERY PLAN "
    with db.engine.connect() as conn:
        if postgresql:
            conn.exec_driver_sql("SET enable_seqscan = off")  # a table this small is scanned
        plan = " ".join(str(row) for row in conn.exec_driver_sql(explain + statement, parameters))
    assert "ix_events_unsealed" in plan
