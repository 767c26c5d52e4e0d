"""Events through NATS JetStream, on both backends: published once or twice, ingested exactly
once; refusals recorded on the dead-letter subject; workers sharing the durable consumer;
a worker killed in the middle of a batch, a NATS server restarted under a worker, a batch
whose transaction fails — and still no event lost, none applied twice.

The tests use the NATS server at ``JIFEN_TEST_NATS_URL`` (default ``nats://127.0.0.1:4222``)
and fail, not skip, when it cannot be reached. Each test has its own stream, subjects and
consumer (named with a uuid) and deletes its stream afterwards, so runs can repeat. The
restart test starts a private ``nats-server`` of its own, to be free to kill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js import api
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from jifen.db.uow import Database, UnitOfWork
from jifen.errors import JifenError
from jifen.events import service, stream
from jifen.events.models import event_awards, events
from jifen.events.schemas import EventIn
from jifen.points import service as points
from jifen.points.models import posting_origins, postings
from tests.conftest import START
from tests.events.test_service import activate
from tests.factories import assert_ledger_sound, new_members, new_program

NATS_URL = os.environ.get("JIFEN_TEST_NATS_URL", "nats://127.0.0.1:4222")
RATE = {"kind": "spend_rate", "rate": "1"}  # a point per yuan: totals are easy to foresee
DRAINED_WITHIN = 30.0


# --------------------------------------------------------------------------- NATS fixtures


async def _reachable(url: str) -> None:
    async def quiet(exc: Exception) -> None:
        pass

    nc = await nats.connect(
        url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=1, error_cb=quiet
    )
    try:
        await nc.jetstream().account_info()
    finally:
        await nc.close()


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The NATS server with JetStream the tests use; the test fails when it is not there."""
    try:
        asyncio.run(asyncio.wait_for(_reachable(NATS_URL), 10))
    except Exception as exc:
        problem = f"{exc.__class__.__name__}: {exc}"
    else:
        return NATS_URL
    pytest.fail(
        f"NATS with JetStream at {NATS_URL} is not reachable ({problem}). Start nats-server "
        "with -js, or point JIFEN_TEST_NATS_URL at one.",
        pytrace=False,
    )


@dataclass(frozen=True)
class Names:
    """One test's stream, subject prefix and durable consumer, unique to it."""

    url: str
    stream: str
    prefix: str
    durable: str

    def worker_options(self) -> dict[str, Any]:
        return {
            "url": self.url, "stream": self.stream, "subject_prefix": self.prefix,
            "durable": self.durable,
        }  # fmt: skip


async def _with_js(url: str, work: Callable[[Any], Any]) -> Any:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        return await work(nc.jetstream())
    finally:
        await nc.close()


def with_js(url: str, work: Callable[[Any], Any]) -> Any:
    """Run ``await work(js)`` on a short-lived connection."""
    return asyncio.run(_with_js(url, work))


def delete_stream(url: str, name: str) -> None:
    async def delete(js: Any) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)

    with_js(url, delete)


def new_names(url: str) -> Names:
    tag = uuid.uuid4().hex[:12]
    return Names(url, f"JIFEN_TEST_{tag}", f"jifen.test{tag}.events", f"worker-{tag}")


@pytest.fixture
def names(nats_url: str) -> Iterator[Names]:
    made = new_names(nats_url)
    try:
        yield made
    finally:
        delete_stream(nats_url, made.stream)


# --------------------------------------------------------------------------- helpers


def order(external_id: str, member: int, yuan: int) -> EventIn:
    return EventIn(
        source="pos",
        external_id=external_id,
        type="order.paid",
        occurred_at=START,
        member_id=member,
        payload={"order_id": external_id, "lines": [{"sku": "A", "amount_fen": yuan * 100}]},
    )


def publish_raw(names: Names, subject: str, data: bytes) -> None:
    """A message as a careless producer sends it: no ``Nats-Msg-Id``, nothing checked."""

    async def send(js: Any) -> None:
        await js.publish(subject, data, stream=names.stream)

    with_js(names.url, send)


def consumer_state(names: Names) -> tuple[int, int] | None:
    """(messages not yet delivered, messages delivered and not acknowledged); None while no
    worker has made the consumer yet."""

    async def info(js: Any) -> tuple[int, int] | None:
        try:
            got = await js.consumer_info(names.stream, names.durable)
        except nats.js.errors.NotFoundError:
            return None
        return int(got.num_pending or 0), int(got.num_ack_pending or 0)

    result: tuple[int, int] | None = with_js(names.url, info)
    return result


def wait_until(what: str, check: Callable[[], bool], within: float = DRAINED_WITHIN) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not {what} after {within:.0f} s"
        time.sleep(0.05)


def wait_stored(db: Database, program_id: int, total: int, stall: float = DRAINED_WITHIN) -> None:
    """Until ``total`` events of the programme are stored. A slow machine is given the time
    it needs: this fails only when no event was stored for ``stall`` seconds."""
    seen, moved = -1, time.monotonic()
    while (count := stored_count(db, program_id)) != total:
        assert count < total, f"{count} events stored, more than the {total} published"
        if count != seen:
            seen, moved = count, time.monotonic()
        assert time.monotonic() - moved < stall, f"stuck at {count} of {total} for {stall:.0f} s"
        time.sleep(0.05)


def wait_drained(names: Names, within: float = DRAINED_WITHIN) -> None:
    """Until every message was delivered and acknowledged."""
    wait_until("drained", lambda: consumer_state(names) == (0, 0), within)


def dead_letters(names: Names) -> list[dict[str, Any]]:
    """Every record on the stream's dead-letter subjects."""

    async def read(js: Any) -> list[dict[str, Any]]:
        sub = await js.pull_subscribe(
            f"{names.prefix}.{stream.DEAD}.>", stream=names.stream,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE),
        )  # fmt: skip
        found: list[dict[str, Any]] = []
        with contextlib.suppress(TimeoutError):  # nats raises its own or plain asyncio's
            while True:
                for msg in await sub.fetch(100, timeout=0.5):
                    found.append({"recorded_on": msg.subject, **json.loads(msg.data)})
        await sub.unsubscribe()
        return found

    result: list[dict[str, Any]] = with_js(names.url, read)
    return result


class Worker:
    """``run_worker`` in a thread of this process, stopped on demand."""

    def __init__(self, db: Database, names: Names, **options: Any) -> None:
        self.stop = threading.Event()
        self.stats: stream.WorkerStats | None = None
        self.error: BaseException | None = None
        options = {**names.worker_options(), **options}
        self.thread = threading.Thread(target=self._run, args=(db, options), daemon=True)
        self.thread.start()

    def _run(self, db: Database, options: dict[str, Any]) -> None:
        try:
            self.stats = stream.run_worker(db, stop=self.stop, **options)
        except BaseException as exc:  # the test thread reports it
            self.error = exc

    def finish(self) -> stream.WorkerStats:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert self.error is None, repr(self.error)
        assert self.stats is not None
        return self.stats


@contextlib.contextmanager
def running(db: Database, names: Names, **options: Any) -> Iterator[Worker]:
    worker = Worker(db, names, **options)
    try:
        yield worker
    finally:
        worker.stop.set()
        worker.thread.join(timeout=30)


def stored_count(db: Database, program_id: int) -> int:
    return db.run(
        lambda uow: uow.conn.execute(
            select(func.count()).where(events.c.program_id == program_id)
        ).scalar_one(),
        read_only=True,
    )


def balances(db: Database, member_ids: list[int]) -> list[int]:
    return db.run(
        lambda uow: [points.balance(uow, member_id=m).balance for m in member_ids],
        read_only=True,
    )


def assert_each_once(db: Database, program_id: int, orders: list[EventIn]) -> None:
    """Every order is stored once, posted once, and nothing else is there."""

    def read(uow: UnitOfWork) -> tuple[list[tuple[str, str]], int]:
        keys = uow.conn.execute(
            select(events.c.source, events.c.external_id).where(events.c.program_id == program_id)
        ).all()
        earned = uow.conn.execute(
            select(func.count()).where(
                postings.c.program_id == program_id, postings.c.kind == "earn"
            )
        ).scalar_one()
        return [(row.source, row.external_id) for row in keys], int(earned)

    keys, earned = db.run(read, read_only=True)
    assert Counter(keys) == Counter((o.source, o.external_id) for o in orders)
    assert earned == len(orders), "an order posted more (or less) than once"


def expected_balances(orders: list[EventIn], member_ids: list[int]) -> list[int]:
    """What the rule gives, computed apart from jifen: a point per yuan paid."""
    totals: Counter[int] = Counter()
    for event in orders:
        assert event.member_id is not None
        totals[event.member_id] += sum(line["amount_fen"] for line in event.payload["lines"]) // 100
    return [totals[m] for m in member_ids]


# --------------------------------------------------------------------------- pure decisions


def test_the_decisions_of_the_door() -> None:
    event = order("o1", 7, 10)
    assert stream.message_id("shop", event) == "shop:pos:o1"
    assert stream.event_subject("jifen.events", "shop") == "jifen.events.shop"
    assert stream.dead_subject("jifen.events", "shop") == "jifen.events.dead.shop"
    assert stream.program_of("jifen.events.shop", "jifen.events") == "shop"
    assert stream.safe_url("nats://jifen:s3cret@a:4222, tls://t0ken@b:4222,nats://c:4222") == (
        "nats://***@a:4222,tls://***@b:4222,nats://c:4222"
    )
    assert stream.safe_url("jifen:s3cret@a:4222") == "a:4222"
    # A comma is allowed in a password: no part of it shows, whatever the server list.
    assert stream.safe_url("nats://jifen:s3,cret@a:4222,nats://c:4222") == (
        "nats://***@a:4222,nats://c:4222"
    )
    assert stream.safe_url("jifen:s3,cret@a:4222") == "a:4222"
    for subject in ("jifen.events", "jifen.events.dead.shop", "other.shop"):
        with pytest.raises(JifenError, match=r"is not jifen\.events\.<programme code>"):
            stream.program_of(subject, "jifen.events")
    assert stream.read_event(event.model_dump_json().encode()) == event
    with pytest.raises(JifenError, match=r"^event: Invalid JSON"):
        stream.read_event(b"not json")
    with pytest.raises(JifenError, match=r"^source: Field required"):
        stream.read_event(b'{"external_id": "x"}')
    with pytest.raises(JifenError, match="member_id or by member_ref"):
        stream.read_event(order("o2", 7, 1).model_dump_json(exclude={"member_id"}).encode())
    assert stream.incoming("jifen.events.shop", b"{", "jifen.events").refused is not None

    assert stream.action_for(stream.Applied(1, 10, replayed=True)) is stream.Action.ACK
    assert stream.action_for(stream.Refused("x", "y")) is stream.Action.DEAD_LETTER
    assert stream.action_for(stream.Failed("z")) is stream.Action.RETRY
    waiting = stream.Waiting(stream.Refused("order_not_seen", "not yet"))
    assert stream.action_for(waiting, 1) is stream.Action.RETRY
    assert stream.action_for(waiting, stream.WAIT_DELIVERIES) is stream.Action.DEAD_LETTER
    assert [stream.retry_delay(n) for n in (1, 2, 3, 7, 8, 1000)] == [
        0.5, 1.0, 2.0, 30.0, 30.0, 30.0,
    ]  # fmt: skip
    record = stream.dead_letter(
        "jifen.events.shop", b"\xff", stream.Refused("invalid_input", "bad"), sequence=3,
        delivered=1,
    )  # fmt: skip
    assert json.loads(record)["event"] == "\ufffd"
    # A record that would not fit in one message describes the message instead.
    huge = b"\xff" * 400_000  # escaped, three times larger than the 1 MB a message may be
    record = stream.dead_letter(
        "jifen.events.shop", huge, stream.Refused("invalid_input", "x" * 10_000), sequence=9,
        delivered=1, limit=1024 * 1024,
    )  # fmt: skip
    described = json.loads(record)
    assert len(record) < 1024 * 1024 - 1024 and described["stream_sequence"] == 9
    assert described["event"]["too_large"] is True and described["event"]["bytes"] == 400_000
    assert len(described["message"]) == 2000


# --------------------------------------------------------------------------- through NATS


def test_workers_and_publishers_creating_the_stream_at_once_all_succeed(nats_url: str) -> None:
    """Each of them finds the stream missing and creates it; the server refuses some of the
    later ones ("subjects overlap with an existing stream", err_code 10065), and each must
    then find it made. The race is narrow and depends on the machine's load, so rounds of 8
    connections released together run for a few seconds (a refusal in them shows the real
    server's race handled), and the server's refusal is then given for certain: raised by a
    creation that came after another connection made the stream."""

    async def creator(made: Names, go: asyncio.Event) -> list[str]:
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=1)
        try:
            js = nc.jetstream()
            await go.wait()
            await stream.ensure_stream(js, made.stream, made.prefix)
            return list((await js.stream_info(made.stream)).config.subjects)
        finally:
            await nc.close()

    async def rounds() -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            made = new_names(nats_url)
            go = asyncio.Event()
            try:
                racers = [asyncio.create_task(creator(made, go)) for _ in range(8)]
                await asyncio.sleep(0.01)  # let every connection open
                go.set()
                assert await asyncio.gather(*racers) == [[f"{made.prefix}.>"]] * 8
            finally:
                await asyncio.to_thread(delete_stream, nats_url, made.stream)

    asyncio.run(rounds())

    refusal = {"code": 400, "err_code": 10065,
               "description": "subjects overlap with an existing stream"}  # fmt: skip

    async def refused_after_another_made_it(js: Any, made: Names, made_first: bool) -> Any:
        async def late(*args: Any, **kwargs: Any) -> Any:
            if made_first:  # another connection's creation got there first
                await _with_js(nats_url, lambda other: other.add_stream(*args, **kwargs))
            raise nats.js.errors.BadRequestError(**refusal)

        js.add_stream = late
        await stream.ensure_stream(js, made.stream, made.prefix)
        return list((await js.stream_info(made.stream)).config.subjects)

    made = new_names(nats_url)
    try:
        answer = with_js(nats_url, lambda js: refused_after_another_made_it(js, made, True))
        assert answer == [f"{made.prefix}.>"]
    finally:
        delete_stream(nats_url, made.stream)
    # A refusal that leaves the stream missing is the server's error, as it said it.
    made = new_names(nats_url)
    with pytest.raises(nats.js.errors.BadRequestError, match="subjects overlap"):
        with_js(nats_url, lambda js: refused_after_another_made_it(js, made, False))


def test_a_publisher_the_stream_has_no_responder_for_yet_sends_again(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetStream answers "no responders" for a stream not ready to take messages (just made,
    its leader being chosen): the publisher sends again until it is, and counts each event
    once. Here the stream does not exist yet when the events are first sent."""
    create = stream.ensure_stream

    async def made_late(js: Any, name: str, prefix: str) -> None:
        async def later() -> None:
            await asyncio.sleep(0.3)
            await _with_js(names.url, lambda other: create(other, name, prefix))

        made.append(asyncio.create_task(later()))

    made: list[asyncio.Task[None]] = []
    monkeypatch.setattr(stream, "ensure_stream", made_late)
    events = [order(f"o{i}", 1, 10) for i in range(3)]
    published = stream.publish_sync(
        names.url, "p", events, subject_prefix=names.prefix, stream=names.stream
    )
    assert published == stream.Published(stored=3, duplicates=0)
    assert len(made) == 1
    stored = with_js(names.url, lambda js: js.stream_info(names.stream))
    assert stored.state.messages == 3


def test_published_events_are_ingested_once_and_refusals_recorded(
    db: Database, names: Names
) -> None:
    program = new_program(db)
    members = new_members(db, program.id, 3)
    activate(db, program.id, "base", RATE)
    orders = [order(f"o{i}", members[i % 3], 10 + i) for i in range(30)]
    orders[3].payload["store"] = "S7"  # its points are posted for that store
    bad_payload = EventIn(
        source="pos", external_id="bad", type="order.paid", occurred_at=START,
        member_id=members[0], payload={"order_id": "bad"},
    )  # fmt: skip
    stranger = order("stranger", 10**12, 5)

    first = stream.publish_sync(
        names.url, program.code, [*orders, bad_payload, stranger], subject_prefix=names.prefix,
        stream=names.stream,
    )  # fmt: skip
    assert first == stream.Published(stored=32, duplicates=0)
    again = stream.publish_sync(
        names.url, program.code, orders[:5], subject_prefix=names.prefix, stream=names.stream
    )
    assert again == stream.Published(stored=0, duplicates=5)  # the server's duplicate window
    subject = stream.event_subject(names.prefix, program.code)
    publish_raw(names, subject, orders[7].model_dump_json().encode())  # only ingest sees it again
    publish_raw(names, subject, b"not json at all")
    publish_raw(names, stream.event_subject(names.prefix, "no-such-programme"),
                orders[0].model_dump_json().encode())  # fmt: skip

    with running(db, names, batch=7) as worker:
        wait_drained(names)
        stats = worker.finish()
    assert (stats.applied, stats.replayed, stats.refused, stats.retried) == (30, 1, 4, 0)
    assert_each_once(db, program.id, orders)
    stores = db.run(lambda uow: dict(uow.conn.execute(
        select(events.c.external_id, posting_origins.c.store)
        .join(event_awards, event_awards.c.event_id == events.c.id)
        .join(posting_origins, posting_origins.c.posting_id == event_awards.c.posting_id)
        .where(events.c.program_id == program.id)).all()))  # fmt: skip
    assert stores == {"o3": "S7"}  # posted for its store; the others name none

    letters = dead_letters(names)
    dead = stream.dead_subject(names.prefix, program.code)
    assert Counter((letter["code"], letter["recorded_on"]) for letter in letters) == {
        ("invalid_input", dead): 2,  # the bad payload, the message that is not JSON
        ("unknown_member", dead): 1,
        ("unknown_program", stream.dead_subject(names.prefix, "no-such-programme")): 1,
    }
    assert Counter(letter["subject"] for letter in letters) == {
        subject: 3,
        stream.event_subject(names.prefix, "no-such-programme"): 1,
    }
    by_event = {
        letter["event"]["external_id"] if isinstance(letter["event"], dict) else letter["event"]:
        letter
        for letter in letters
    }  # fmt: skip
    assert by_event["bad"]["message"] == "payload.lines: Field required"
    assert by_event["not json at all"]["message"].startswith("event: Invalid JSON")
    assert by_event["stranger"]["message"].startswith("There is no member 1000000000000")
    assert by_event["o0"]["message"].startswith("There is no programme no-such-programme")
    assert all(letter["delivered"] == 1 for letter in letters)

    # The same events ingested directly give the same ledger.
    twin = new_program(db)
    twin_members = new_members(db, twin.id, 3)
    activate(db, twin.id, "base", RATE)
    to_twin = dict(zip(members, twin_members, strict=True))

    def direct(uow: UnitOfWork) -> dict[str, int]:
        answers: dict[str, int] = {}
        for event in [*orders, bad_payload, stranger]:
            moved = event.model_copy(
                update={"member_id": to_twin.get(event.member_id or 0, 10**12)}
            )
            try:
                with uow.conn.begin_nested():
                    answers[event.external_id] = service.ingest(
                        uow, program_id=twin.id, event=moved
                    ).points
            except JifenError:
                answers[event.external_id] = -1
        return answers

    directly = db.run(direct)
    through = db.run(
        lambda uow: {
            row.external_id: int(row.points)
            for row in uow.conn.execute(select(events).where(events.c.program_id == program.id))
        },
        read_only=True,
    )
    assert {k: v for k, v in directly.items() if v >= 0} == through
    assert {k for k, v in directly.items() if v < 0} == {"bad", "stranger"}
    assert balances(db, members) == balances(db, twin_members)
    assert balances(db, members) == expected_balances(orders, members)
    assert_ledger_sound(db, program.id)


def test_a_refused_message_too_large_to_record_whole_is_recorded_and_settled(
    db: Database, names: Names
) -> None:
    program = new_program(db)
    subject = stream.event_subject(names.prefix, program.code)
    stream.publish_sync(names.url, program.code, [], subject_prefix=names.prefix,
                        stream=names.stream)  # fmt: skip
    publish_raw(names, subject, b"\xff" * 400_000)  # not JSON; escaped, over a megabyte
    with running(db, names, batch=1) as worker:
        wait_drained(names)
        stats = worker.finish()
    assert (stats.refused, stats.retried) == (1, 0)
    (letter,) = dead_letters(names)
    assert letter["code"] == "invalid_input" and letter["event"]["bytes"] == 400_000


def test_workers_sharing_the_consumer_split_the_work(db: Database, names: Names) -> None:
    program = new_program(db)
    members = new_members(db, program.id, 10)
    activate(db, program.id, "base", RATE)
    orders = [order(f"o{i}", members[i % 10], 1 + i % 50) for i in range(400)]
    stream.publish_sync(
        names.url, program.code, orders, subject_prefix=names.prefix, stream=names.stream
    )
    with running(db, names, batch=20) as one, running(db, names, batch=20) as two:
        wait_drained(names)
        first, second = one.finish(), two.finish()
    assert first.applied > 0 and second.applied > 0, (first, second)
    assert first.applied + second.applied == len(orders)
    assert first.replayed + second.replayed + first.retried + second.retried == 0
    assert_each_once(db, program.id, orders)
    assert balances(db, members) == expected_balances(orders, members)
    assert_ledger_sound(db, program.id)


def test_a_batch_whose_transaction_fails_is_handed_back_and_applied_once(
    db: Database, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = new_program(db)
    members = new_members(db, program.id, 2)
    activate(db, program.id, "base", RATE)
    orders = [order(f"o{i}", members[i % 2], 3) for i in range(50)]
    stream.publish_sync(
        names.url, program.code, orders, subject_prefix=names.prefix, stream=names.stream
    )
    real, failures = stream.apply_batch, []

    def failing_once(uow: UnitOfWork, items: Any) -> list[stream.Outcome]:
        outcomes = real(uow, items)  # everything ingested, then the connection "drops"
        if not failures:
            failures.append(len(items))
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return outcomes

    monkeypatch.setattr(stream, "apply_batch", failing_once)
    with running(db, names, batch=20) as worker:
        wait_drained(names)
        stats = worker.finish()
    assert failures == [20]
    assert (stats.applied, stats.replayed, stats.retried) == (50, 0, 20)
    assert_each_once(db, program.id, orders)
    assert balances(db, members) == expected_balances(orders, members)


def test_a_message_that_fails_every_time_holds_back_no_other(
    db: Database, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = new_program(db)
    members = new_members(db, program.id, 3)
    activate(db, program.id, "base", RATE)
    orders = [order(f"o{i}", members[i % 3], 4) for i in range(60)]
    stream.publish_sync(
        names.url, program.code, orders, subject_prefix=names.prefix, stream=names.stream
    )
    real = service.ingest_many

    def stuck_on_o10(uow: UnitOfWork, *, events: list[EventIn], **given: Any) -> Any:
        if any(e.external_id == "o10" for e in events):  # fails the transaction, every time
            raise OperationalError("SELECT", {}, Exception("canceling statement: timeout"))
        return real(uow, events=events, **given)

    monkeypatch.setattr(service, "ingest_many", stuck_on_o10)
    with running(db, names, batch=20) as worker:
        wait_until("the others stored", lambda: stored_count(db, program.id) == 59)
        held = worker.finish()
    assert held.applied == 59 and held.retried >= 20, held
    monkeypatch.undo()  # the cause is fixed: the message held back goes in
    with running(db, names, batch=20) as worker:
        wait_drained(names)
        fixed = worker.finish()
    assert (fixed.applied, fixed.replayed) == (1, 0)
    assert_each_once(db, program.id, orders)
    assert balances(db, members) == expected_balances(orders, members)


def test_a_worker_started_before_nats_waits_and_stops_when_asked(
    sqlite_database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop = threading.Event()
    threading.Timer(2.5, stop.set).start()
    started = time.monotonic()
    url = f"nats://jifen:s3cret@127.0.0.1:{port}"
    with caplog.at_level(logging.WARNING, logger=stream.log.name):
        stats = stream.run_worker(sqlite_database, url=url, stop=stop)
    assert stats == stream.WorkerStats()
    assert 2.5 <= time.monotonic() - started < 6
    # It said what it waits for, without the password.
    assert f"waiting for NATS at nats://***@127.0.0.1:{port}" in caplog.text, caplog.text
    assert "s3cret" not in caplog.text


# --------------------------------------------------------------------------- crash and restart

WORKER = """
import logging, sys
from datetime import datetime
from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.events.stream import run_worker, stop_on_signals

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
url, start, nats_url, stream, prefix, durable = sys.argv[1:]
database = Database(url, clock=ManualClock(datetime.fromisoformat(start)))
run_worker(database, url=nats_url, stop=stop_on_signals(), stream=stream,
           subject_prefix=prefix, durable=durable, batch=100, ack_wait=3, report_every=1)
database.dispose()
"""


class WorkerProcess:
    """A worker as a separate process, killed or stopped like one."""

    def __init__(self, db: Database, names: Names, log: Path) -> None:
        url = db.engine.url.render_as_string(hide_password=False)
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, url, START.isoformat(), names.url, names.stream,
             names.prefix, names.durable],
            stdout=self.log, stderr=self.log, start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self.log.close()


def test_a_worker_killed_in_the_middle_of_a_batch_loses_nothing_and_doubles_nothing(
    db: Database, names: Names, tmp_path: Path
) -> None:
    total = 2000
    program = new_program(db)
    members = new_members(db, program.id, 20)
    activate(db, program.id, "base", RATE)
    orders = [order(f"o{i}", members[i % 20], 1 + (i * 7) % 90) for i in range(total)]
    log = tmp_path / "worker.log"
    started = time.monotonic()
    first = WorkerProcess(db, names, log)
    second: WorkerProcess | None = None
    try:
        stream.publish_sync(
            names.url, program.code, orders, subject_prefix=names.prefix, stream=names.stream
        )
        wait_until("ingesting", lambda: stored_count(db, program.id) >= total // 5)
        first.kill()
        at_kill = stored_count(db, program.id)
        state = consumer_state(names)
        assert state is not None
        pending, in_flight = state
        assert at_kill < total, "the worker finished before the kill: publish more events"
        assert in_flight > 0, "the kill did not land in a batch"
        second = WorkerProcess(db, names, log)
        wait_stored(db, program.id, total)
        wait_drained(names)
        assert second.stop() == 0, log.read_text()[-3000:]
    finally:
        first.close()
        if second is not None:
            second.close()
    took = time.monotonic() - started
    print(
        f"{db.dialect}: killed with {at_kill} of {total} events stored, {pending} not yet "
        f"delivered and {in_flight} in flight; all {total} in {took:.1f} s"
    )
    assert_each_once(db, program.id, orders)
    assert balances(db, members) == expected_balances(orders, members)
    assert_ledger_sound(db, program.id)
    assert "stopped:" in log.read_text().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateNats:
    """A nats-server with JetStream of this test's own, to stop and start at will."""

    def __init__(self, store: Path, log: Path) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():
            pytest.fail("this test starts its own nats-server; install it (apt nats-server)")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.command = [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store)]
        self.log = log.open("ab")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            assert time.monotonic() < deadline, "the private nats-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        self.kill()
        self.log.close()


def test_the_worker_rides_out_a_nats_restart(db: Database, tmp_path: Path) -> None:
    server = PrivateNats(tmp_path / "nats", tmp_path / "nats.log")
    server.start()
    try:
        names = new_names(server.url)
        program = new_program(db)
        members = new_members(db, program.id, 5)
        activate(db, program.id, "base", RATE)
        orders = [order(f"o{i}", members[i % 5], 2) for i in range(600)]
        stream.publish_sync(
            names.url, program.code, orders, subject_prefix=names.prefix, stream=names.stream
        )
        with running(db, names, batch=25, ack_wait=2) as worker:
            wait_until("ingesting", lambda: stored_count(db, program.id) >= 50)
            server.kill()
            time.sleep(1.0)
            assert stored_count(db, program.id) < len(orders), "finished before the restart"
            server.start()
            wait_stored(db, program.id, len(orders))
            wait_drained(names)
            stats = worker.finish()
    finally:
        server.close()
    assert stats.applied == len(orders)
    assert_each_once(db, program.id, orders)
    assert balances(db, members) == expected_balances(orders, members)


def test_a_refund_before_its_order_waits_for_it(db: Database, names: Names) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", RATE)
    refund = EventIn(
        source="pos",
        external_id="r1",
        type="order.refunded",
        occurred_at=START,
        member_id=member,
        payload={"order_id": "late", "whole": True},
    )
    with running(db, names):
        stream.publish_sync(
            names.url, program.code, [refund], subject_prefix=names.prefix, stream=names.stream
        )
        time.sleep(1.0)  # the refund is tried, and handed back
        stream.publish_sync(
            names.url,
            program.code,
            [order("late", member, 30)],
            subject_prefix=names.prefix,
            stream=names.stream,
        )
        # (a message handed back with a delay counts as neither pending nor unacknowledged
        # while it waits: wait for the refund itself)
        wait_until("the refund applied", lambda: stored_count(db, program.id) == 2)
        wait_drained(names)
    assert balances(db, [member]) == [0]  # earned 30, then taken back
    assert dead_letters(names) == []
    assert_ledger_sound(db, program.id)
