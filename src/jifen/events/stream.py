"""The NATS JetStream door for events: producers publish them, ``jifen worker`` ingests them.

The API takes events one request at a time; a stream lets source systems hand over events at
their own pace, survive jifen being down, and lets several workers share the load.

- **Publishing.** Each event goes as JSON to ``<prefix>.<programme code>`` in one stream
  (``JIFEN_EVENTS``, subjects ``<prefix>.>``), with ``Nats-Msg-Id`` set to the key ingest
  uses (programme, source, external id): a producer that publishes again after a timeout is
  deduplicated by the server within its duplicate window, and by ingest after it.
- **Sharing.** Workers fetch from one durable pull consumer, and the server hands each
  message to one fetch only: starting more workers splits the stream between them.
- **One transaction per batch.** A fetched batch is ingested in a single transaction
  (:meth:`Database.run`, which retries lost races), each event in its own savepoint, so that
  a refused event leaves nothing behind and keeps none of the others out.
- **Acknowledged only after commit.** A worker that dies before its commit leaves the batch
  unacknowledged; the server hands it out again after the ack wait. Ingest is idempotent by
  (programme, source, external id), so an event delivered again answers its stored result:
  at-least-once delivery, applied exactly once.
- **Refused events** (a :class:`JifenError`: bad payload, unknown member or programme) can
  never succeed as sent. They are logged, published to ``<prefix>.dead.<programme>`` with
  their error code and message (kept in the same stream for inspection and replay), then
  acknowledged.
- **Anything else** (the database down, an unexpected error) is not acknowledged: the
  messages are handed back with a growing delay and tried again.

The decisions (subject to programme, message to event, outcome to action) are small pure
functions; the loop around them only moves bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, TypeAlias, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from jifen.db.uow import Database, UnitOfWork
from jifen.errors import InvalidInput, JifenError, invalid_field
from jifen.events import service
from jifen.events.schemas import EventIn
from jifen.programs import service as programs_service

log = logging.getLogger("jifen.events.stream")

STREAM = "JIFEN_EVENTS"
SUBJECT_PREFIX = "jifen.events"
DURABLE = "jifen-worker"
DEAD = "dead"
"""The token after the prefix that marks dead letters: ``<prefix>.dead.<programme>``."""
MSG_ID = "Nats-Msg-Id"

PUBLISH_ATTEMPTS = 6
"""How many times a publication the stream had no responder for is sent (over about 3 s)."""

Stop: TypeAlias = asyncio.Event | threading.Event
T = TypeVar("T")


# --------------------------------------------------------------------------- pure decisions


def event_subject(subject_prefix: str, program_code: str) -> str:
    """Where events of a programme are published."""
    return f"{subject_prefix}.{program_code}"


def dead_subject(subject_prefix: str, program_code: str) -> str:
    """Where refused events of a programme are recorded. Still inside the stream's
    ``<prefix>.>``, so they are kept; outside the consumer's ``<prefix>.*``, so they are
    never ingested."""
    return f"{subject_prefix}.{DEAD}.{program_code}"


def message_id(program_code: str, event: EventIn) -> str:
    """The ``Nats-Msg-Id`` of an event. It names the programme as well as the source and
    external id: the stream is shared by every programme, and ingest keys events by all
    three, so two programmes' events with the same external id must not be taken for one."""
    return f"{program_code}:{event.source}:{event.external_id}"


def program_of(subject: str, subject_prefix: str) -> str:
    """The programme code an event's subject names; InvalidInput for any other subject."""
    head = subject_prefix + "."
    code = subject[len(head) :] if subject.startswith(head) else ""
    if not code or "." in code:
        raise InvalidInput(
            field="subject",
            problem=f"{subject!r} is not {subject_prefix}.<programme code>",
            problem_zh=f"{subject!r} 不符合 {subject_prefix}.<计划代码> 的格式",
        )
    return code


def read_event(data: bytes) -> EventIn:
    """The event a message carries; InvalidInput naming the first problem otherwise (not
    JSON, a missing or unknown field, no member)."""
    try:
        return EventIn.model_validate_json(data)
    except ValidationError as exc:
        raise invalid_field(exc, whole="event") from exc


@dataclass(frozen=True)
class Applied:
    """The event is stored: now, or before (``replayed``: a redelivery or a resend)."""

    event_id: int
    points: int
    replayed: bool


@dataclass(frozen=True)
class Refused:
    """The event can never be applied as sent."""

    code: str
    message: str

    @classmethod
    def of(cls, error: JifenError) -> Refused:
        return cls(error.code, error.message("en"))


@dataclass(frozen=True)
class Failed:
    """The event could not be applied for a reason that may pass (a concurrent twin, an
    unexpected error): it is tried again later."""

    error: str


@dataclass(frozen=True)
class Waiting:
    """The event needs another that has not arrived yet (a refund before its order): handed
    back until it has, or refused after :data:`WAIT_DELIVERIES` tries."""

    refused: Refused


WAIT_FOR = frozenset({"order_not_seen"})
"""Error codes that mean "not yet" rather than "never"."""
WAIT_DELIVERIES = 20
"""How often a waiting event is tried (with the growing delay, about eight minutes)."""

Outcome: TypeAlias = Applied | Refused | Failed | Waiting


@dataclass(frozen=True)
class Incoming:
    """One message as the database step sees it: its programme and event, or why it could
    not even be read."""

    program_code: str
    event: EventIn | None = None
    refused: Refused | None = None


def incoming(subject: str, data: bytes, subject_prefix: str) -> Incoming:
    """What a message asks for, decided before any database work."""
    try:
        return Incoming(program_of(subject, subject_prefix), read_event(data))
    except JifenError as exc:
        return Incoming(subject.rsplit(".", 1)[-1], refused=Refused.of(exc))


class Action(Enum):
    ACK = "ack"
    """Done: the event is in the database."""
    DEAD_LETTER = "dead letter"
    """Record it on the dead-letter subject, then acknowledge: retrying cannot help."""
    RETRY = "retry"
    """Hand it back (nak with a delay) to be delivered again."""


def action_for(outcome: Outcome, delivered: int = 1) -> Action:
    """What to tell the server about a message once its batch has committed (``delivered``:
    how often it has been delivered, this time included)."""
    if isinstance(outcome, Applied):
        return Action.ACK
    if isinstance(outcome, Refused):
        return Action.DEAD_LETTER
    if isinstance(outcome, Waiting):
        return Action.DEAD_LETTER if delivered >= WAIT_DELIVERIES else Action.RETRY
    return Action.RETRY


def retry_delay(delivered: int) -> float:
    """Seconds before a message handed back is delivered again: from half a second, doubling
    with each delivery up to 30 s, so that a database outage is not hammered."""
    return min(0.5 * 2.0 ** min(max(delivered - 1, 0), 10), 30.0)


def dead_letter(
    subject: str, data: bytes, refused: Refused, *, sequence: int, delivered: int,
    limit: int = 1024 * 1024,
) -> bytes:  # fmt: skip
    """The dead-letter record of a refused message: why, where from, and the message itself
    (as JSON when it was JSON, as text otherwise) so that it can be fixed and sent again.

    A record must fit in one message (``limit``: the server's maximum payload), or it could
    never be published and the message would be handed back forever. A message too large to
    carry whole (text that is not UTF-8 triples when escaped) is described instead: its size,
    digest and first characters; it stays in the stream at ``stream_sequence``."""
    try:
        original: Any = json.loads(data)
    except (ValueError, RecursionError):
        original = data.decode("utf-8", errors="replace")
    body = {
        "code": refused.code,
        "message": refused.message[:_MESSAGE_CHARS],
        "subject": subject,
        "stream_sequence": sequence,
        "delivered": delivered,
        "event": original,
    }
    record = _compact(body)
    if len(record) <= limit - _HEADROOM:
        return record
    head = data[:_HEAD_BYTES].decode("utf-8", errors="replace")
    body["event"] = {
        "too_large": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "head": head,
    }  # fmt: skip
    return _compact(body)


_MESSAGE_CHARS = 2000
_HEAD_BYTES = 2000
_HEADROOM = 1024
"""Bytes of a record's allowance kept for its headers (the message id)."""


def _compact(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- database step


def apply_batch(uow: UnitOfWork, items: Sequence[Incoming]) -> list[Outcome]:
    """Ingest ``items`` in the caller's transaction (each programme's together, in order)
    and say what became of each. Errors that concern the whole transaction (a lost race,
    the connection gone) are raised: :meth:`Database.run` retries the former, the worker
    hands the whole batch back for the latter."""
    outcomes: dict[int, Outcome] = {}
    by_program: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if item.event is None:
            assert item.refused is not None
            outcomes[index] = item.refused
        else:
            by_program.setdefault(item.program_code, []).append(index)
    for code in sorted(by_program):
        indexes = by_program[code]
        try:
            program_id = _program_id(uow, code)
        except JifenError as exc:  # an unknown programme
            outcomes.update((index, Refused.of(exc)) for index in indexes)
            continue
        taken = [e for e in (items[index].event for index in indexes) if e is not None]
        # A stream's producer is trusted as a whole, for no merchant in particular; the
        # points of an order are posted for the store it names, as through the API.
        results = service.ingest_many(
            uow, program_id=program_id, events=taken,
            origins=[(None, service.store_of(event)) for event in taken],
        )  # fmt: skip
        for index, result in zip(indexes, results, strict=True):
            if isinstance(result, JifenError):
                refused = Refused.of(result)
                outcomes[index] = Waiting(refused) if result.code in WAIT_FOR else refused
            elif isinstance(result, Exception):
                # Rolled back alone: an error of this event only, which may not last (a bug
                # fixed, a twin committed meanwhile): handed back, the others go on.
                outcomes[index] = Failed(f"{result.__class__.__name__}: {result}")
            else:
                outcomes[index] = Applied(result.id, result.points, result.replayed)
    return [outcomes[index] for index in range(len(items))]


def _program_id(uow: UnitOfWork, code: str) -> int:
    """The id of programme ``code``, cached per database: ids never change."""
    key = f"stream_program_id:{code}"
    cached: int | None = uow.cache.get(key)
    if cached is None:
        cached = programs_service.get_program(uow, code=code).id
        uow.cache[key] = cached
    return cached


# --------------------------------------------------------------------------- connections


def safe_url(url: str) -> str:
    """``url`` (one or more NATS servers, comma-separated) as messages and logs may show it:
    a user, password or token in it is replaced by ``***``. A password may hold a comma: a
    piece without a scheme is read with the server before it, so what comes before its
    ``@`` is hidden too (a server given without a scheme after one may be hidden with it)."""
    servers: list[str] = []
    for part in (piece.strip() for piece in url.split(",")):
        if servers and "://" not in part and "@" not in servers[-1]:
            servers[-1] += "," + part
        else:
            servers.append(part)
    shown = []
    for server in servers:
        head, at, tail = server.rpartition("@")
        scheme, sep, _userinfo = head.partition("://")
        shown.append(f"{scheme}{sep}***@{tail}" if at and sep else tail if at else server)
    return ",".join(shown)


def _servers(url: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` as the list of servers nats-py expects."""
    return [part.strip() for part in url.split(",") if part.strip()]


async def _on_error(exc: Exception) -> None:
    # Refused connections repeat every second while the server is away: keep them quiet.
    if isinstance(exc, OSError | TimeoutError):
        log.debug("NATS: %s", exc)
    else:
        log.warning("NATS: %s: %s", exc.__class__.__name__, exc)


async def ensure_stream(js: JetStreamContext, stream: str, subject_prefix: str) -> None:
    """Create the stream when it is missing. An existing stream keeps its configuration
    (an operator may have set replicas or limits); only its subjects are extended when they
    do not yet take ``<prefix>.>``."""
    wanted = f"{subject_prefix}.>"
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(name=stream, subjects=[wanted], storage=api.StorageType.FILE)
            return
        except nats.js.errors.BadRequestError as refused:
            # A worker and a publisher may create the stream at the same moment; the server
            # then refuses the later one ("subjects overlap with an existing stream") although
            # the stream it wanted now exists. Read it again; a stream still missing is an error.
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                raise refused from None
    subjects = list(info.config.subjects or [])
    if wanted not in subjects:
        await js.update_stream(replace(info.config, subjects=[*subjects, wanted]))


async def ensure_consumer(
    js: JetStreamContext, stream: str, subject_prefix: str, durable: str, ack_wait: float
) -> None:
    """Create the shared durable pull consumer, or bring its ack wait up to date."""
    config = api.ConsumerConfig(
        name=durable,
        durable_name=durable,
        description="jifen workers: events into the ledger",
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,  # a message is settled by jifen (ack or dead letter), never dropped
        filter_subject=f"{subject_prefix}.*",
    )
    await js.add_consumer(stream, config)


# --------------------------------------------------------------------------- publishing


@dataclass(frozen=True)
class Published:
    """What the server said to a publication."""

    stored: int
    duplicates: int
    """Messages the server dropped because one with the same id was stored recently."""


async def publish(
    url: str,
    program_code: str,
    events: Iterable[EventIn],
    *,
    subject_prefix: str = SUBJECT_PREFIX,
    stream: str = STREAM,
    timeout: float = 10.0,
    window: int = 1000,
) -> Published:
    """Publish ``events`` of a programme to the stream (made when missing), each stored by
    the server before this returns. ``window`` publications are in flight at once.

    JetStream answers "no responders" for a stream that is not ready to take messages yet
    (just made, its leader being chosen after a restart): such publications are sent again,
    with backoff, up to ``PUBLISH_ATTEMPTS`` times. Sending one again is safe: the server
    drops a message whose id it stored recently."""
    nc = Client()
    await nc.connect(
        _servers(url), connect_timeout=2, max_reconnect_attempts=5, reconnect_time_wait=1,
        error_cb=_on_error,
    )  # fmt: skip
    try:
        js = nc.jetstream(timeout=timeout)
        await ensure_stream(js, stream, subject_prefix)
        subject = event_subject(subject_prefix, program_code)
        stored = duplicates = 0
        # Each message (its data and id) with its acknowledgement to come; None: to be sent.
        pending: list[tuple[tuple[bytes, str], asyncio.Future[api.PubAck] | None]] = []

        async def send(message: tuple[bytes, str]) -> asyncio.Future[api.PubAck]:
            data, msg_id = message
            return await js.publish_async(subject, data, stream=stream, headers={MSG_ID: msg_id})

        async def settle() -> None:
            """Wait for the pending acknowledgements and count them, sending again (with
            backoff) what the stream had no responder for."""
            nonlocal stored, duplicates
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(nats.js.errors.NoStreamResponseError),
                stop=stop_after_attempt(PUBLISH_ATTEMPTS),
                wait=wait_exponential(multiplier=0.1, max=2),
                reraise=True,
            ):
                with attempt:
                    futures = [f if f is not None else await send(m) for m, f in pending]
                    acks = await asyncio.wait_for(
                        asyncio.gather(*futures, return_exceptions=True), timeout
                    )
                    unanswered: list[tuple[tuple[bytes, str], None]] = []
                    for (message, _), ack in zip(pending, acks, strict=True):
                        if isinstance(ack, nats.js.errors.NoStreamResponseError):
                            unanswered.append((message, None))
                        elif isinstance(ack, BaseException):
                            raise ack
                        elif ack.duplicate:
                            duplicates += 1
                        else:
                            stored += 1
                    pending[:] = unanswered
                    if pending:
                        raise nats.js.errors.NoStreamResponseError

        for event in events:
            message = (event.model_dump_json().encode(), message_id(program_code, event))
            pending.append((message, await send(message)))
            if len(pending) >= window:
                await settle()
        await settle()
        return Published(stored, duplicates)
    finally:
        await nc.close()


def publish_sync(
    url: str,
    program_code: str,
    events: Iterable[EventIn],
    *,
    subject_prefix: str = SUBJECT_PREFIX,
    stream: str = STREAM,
    timeout: float = 10.0,
) -> Published:
    """:func:`publish` for callers without an event loop (a CLI command, a script)."""
    return asyncio.run(
        publish(
            url, program_code, events, subject_prefix=subject_prefix, stream=stream,
            timeout=timeout,
        )
    )  # fmt: skip


# --------------------------------------------------------------------------- the worker


@dataclass
class WorkerStats:
    """What a worker did, in messages."""

    applied: int = 0
    """Events stored and evaluated."""
    replayed: int = 0
    """Events found already stored (delivered again, or sent twice): answered, not applied."""
    refused: int = 0
    """Events that can never be applied, sent to the dead-letter subject."""
    retried: int = 0
    """Messages handed back to be delivered again (their batch failed, or they did)."""
    batches: int = 0

    def describe(self) -> str:
        return (
            f"{self.applied} applied, {self.replayed} already stored, {self.refused} refused, "
            f"{self.retried} handed back, in {self.batches} batches"
        )

    def minus(self, earlier: WorkerStats) -> WorkerStats:
        return WorkerStats(
            self.applied - earlier.applied,
            self.replayed - earlier.replayed,
            self.refused - earlier.refused,
            self.retried - earlier.retried,
            self.batches - earlier.batches,
        )


def run_worker(
    database: Database,
    *,
    url: str,
    stop: Stop,
    stream: str = STREAM,
    subject_prefix: str = SUBJECT_PREFIX,
    durable: str = DURABLE,
    batch: int = 200,
    fetch_timeout: float = 1.0,
    ack_wait: float = 30.0,
    report_every: float = 10.0,
) -> WorkerStats:
    """Ingest events from the stream until ``stop`` is set, then finish the batch in hand
    and return what was done. Blocks; see :func:`consume` for the parameters."""
    return asyncio.run(
        consume(
            database, url=url, stop=stop, stream=stream, subject_prefix=subject_prefix,
            durable=durable, batch=batch, fetch_timeout=fetch_timeout, ack_wait=ack_wait,
            report_every=report_every,
        )
    )  # fmt: skip


def stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set (main thread only): the worker then finishes and
    acknowledges its batch and returns, instead of dying with it half done."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        log.info("%s: stopping after the batch in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


async def consume(
    database: Database,
    *,
    url: str,
    stop: Stop,
    stream: str = STREAM,
    subject_prefix: str = SUBJECT_PREFIX,
    durable: str = DURABLE,
    batch: int = 200,
    fetch_timeout: float = 1.0,
    ack_wait: float = 30.0,
    report_every: float = 10.0,
) -> WorkerStats:
    """The worker's loop. ``url``: one NATS server or several, comma-separated. ``durable``:
    the consumer the workers share (same name, same stream: the messages are split between
    them). ``batch``: messages per fetch, hence per transaction. ``ack_wait``: how long the
    server waits for a delivered message's acknowledgement before handing it out again;
    a batch still working past a third of it tells the server so. ``report_every``: seconds
    between progress lines in the log.

    The connection is retried until NATS answers, and re-established by the client when the
    server goes away; the stream and consumer are created when missing (or again, after
    they were lost). After a batch fails as a whole, the worker waits (longer after each
    failure in a row) and then takes as many messages one at a time: if one message makes
    every transaction it is in fail, it is held back alone, and the others pass."""
    stats = WorkerStats()
    nc = await _connect(url, stop)
    if nc is None:
        return stats
    reported, last_report = WorkerStats(), time.monotonic()
    sub: JetStreamContext.PullSubscription | None = None
    failures = 0  # batches failed in a row
    singly = 0  # messages still to take one per transaction
    try:
        js = nc.jetstream()
        while not stop.is_set():
            if time.monotonic() - last_report >= report_every:
                done = replace(stats)
                if done != reported:
                    log.info("last %.0f s: %s", report_every, done.minus(reported).describe())
                reported, last_report = done, time.monotonic()
            if sub is None:
                try:
                    await ensure_stream(js, stream, subject_prefix)
                    await ensure_consumer(js, stream, subject_prefix, durable, ack_wait)
                    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
                except nats.errors.Error as exc:
                    log.warning("cannot reach stream %s yet (%s); trying again", stream, exc)
                    await _pause(stop, 1.0)
                    continue
                log.info(
                    "ingesting %s.* from stream %s as consumer %s, batches of %d",
                    subject_prefix, stream, durable, batch,
                )  # fmt: skip
            try:
                msgs = await sub.fetch(1 if singly else batch, timeout=fetch_timeout)
            except TimeoutError:  # nothing to do, or the server is away for a moment
                continue
            except nats.errors.Error as exc:  # the consumer or its stream is gone, say
                log.warning("fetching from %s failed (%s); setting up again", stream, exc)
                with suppress(nats.errors.Error):
                    await sub.unsubscribe()
                sub = None
                await _pause(stop, 1.0)
                continue
            if await _handle(database, js, msgs, subject_prefix, ack_wait, stats, nc.max_payload):
                failures, singly = 0, max(singly - len(msgs), 0)
            else:
                failures, singly = failures + 1, max(singly, len(msgs))
                await _pause(stop, retry_delay(failures))
    finally:
        with suppress(nats.errors.Error, TimeoutError):
            await nc.flush(timeout=2)  # the last acknowledgements
        await nc.close()
    log.info("stopped: %s", stats.describe())
    return stats


async def _connect(url: str, stop: Stop) -> Client | None:
    """A connection that reconnects forever, made as soon as a server answers; None when
    ``stop`` is set first."""
    nc = Client()

    async def disconnected() -> None:
        if not nc.is_closed:  # closing on purpose disconnects too
            log.warning("disconnected from NATS; reconnecting")

    async def reconnected() -> None:
        log.info("reconnected to NATS")

    connecting = asyncio.ensure_future(
        nc.connect(
            _servers(url), name="jifen-worker", connect_timeout=2, max_reconnect_attempts=-1,
            reconnect_time_wait=1, error_cb=_on_error, disconnected_cb=disconnected,
            reconnected_cb=reconnected,
        )
    )  # fmt: skip
    warn_at = time.monotonic() + 2.0
    while not connecting.done():
        if stop.is_set():
            connecting.cancel()
            with suppress(asyncio.CancelledError):
                await connecting
            await nc.close()
            return None
        await asyncio.wait({connecting}, timeout=0.1)
        if not connecting.done() and time.monotonic() >= warn_at:
            log.warning("waiting for NATS at %s", safe_url(url))
            warn_at = float("inf")
    try:
        connecting.result()
    except BaseException:
        await nc.close()
        raise
    return nc


async def _pause(stop: Stop, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.1))


async def _handle(
    database: Database,
    js: JetStreamContext,
    msgs: list[Msg],
    subject_prefix: str,
    ack_wait: float,
    stats: WorkerStats,
    max_payload: int,
) -> bool:
    """Apply one fetched batch in one transaction, then settle each message; False when the
    transaction failed (every message is then handed back)."""
    stats.batches += 1
    items = [incoming(msg.subject, msg.data, subject_prefix) for msg in msgs]
    work = asyncio.to_thread(database.run, lambda uow: apply_batch(uow, items))
    try:
        outcomes = await _keeping_alive(work, msgs, ack_wait)
    except Exception:
        log.exception("the transaction of %d message(s) failed; handed back", len(msgs))
        stats.retried += len(msgs)
        for msg in msgs:
            await _tell(msg.nak(delay=retry_delay(msg.metadata.num_delivered)))
        return False
    # Committed: from here on, each message is settled on its own.
    for msg, item, outcome in zip(msgs, items, outcomes, strict=True):
        action = action_for(outcome, msg.metadata.num_delivered)
        if action is Action.ACK:
            assert isinstance(outcome, Applied)
            if outcome.replayed:
                stats.replayed += 1
            else:
                stats.applied += 1
            await _tell(msg.ack())
        elif action is Action.DEAD_LETTER:
            refused = outcome.refused if isinstance(outcome, Waiting) else outcome
            assert isinstance(refused, Refused)
            await _refuse(js, msg, item, refused, subject_prefix, stats, max_payload)
        else:
            assert isinstance(outcome, Failed | Waiting)
            reason = outcome.error if isinstance(outcome, Failed) else outcome.refused.message
            log.log(
                logging.ERROR if isinstance(outcome, Failed) else logging.INFO,
                "could not apply the message at stream sequence %d yet (%s); handed back",
                msg.metadata.sequence.stream, reason,
            )  # fmt: skip
            stats.retried += 1
            await _tell(msg.nak(delay=retry_delay(msg.metadata.num_delivered)))
    return True


async def _refuse(
    js: JetStreamContext,
    msg: Msg,
    item: Incoming,
    refused: Refused,
    subject_prefix: str,
    stats: WorkerStats,
    max_payload: int,
) -> None:
    """Log a refused message and record it on the dead-letter subject, then acknowledge it;
    if the record cannot be made, hand the message back instead: it is refused again later
    (the record's id makes a second copy a duplicate the server drops)."""
    meta = msg.metadata
    key = f"{item.event.source}:{item.event.external_id}" if item.event else "a message"
    log.warning(
        "refused %s on %s (stream sequence %d): %s: %s",
        key, msg.subject, meta.sequence.stream, refused.code, refused.message,
    )  # fmt: skip
    body = dead_letter(
        msg.subject, msg.data, refused, sequence=meta.sequence.stream,
        delivered=meta.num_delivered, limit=max_payload,
    )  # fmt: skip
    try:
        await js.publish(
            dead_subject(subject_prefix, item.program_code),
            body,
            headers={MSG_ID: f"{DEAD}:{meta.sequence.stream}"},
        )
    except nats.errors.Error as exc:
        log.warning("could not record the refusal (%s); handed back", exc)
        stats.retried += 1
        await _tell(msg.nak(delay=retry_delay(meta.num_delivered)))
        return
    stats.refused += 1
    await _tell(msg.ack())


async def _keeping_alive(work: Awaitable[T], msgs: Sequence[Msg], ack_wait: float) -> T:
    """Await ``work``, telling the server every third of the ack wait that the messages are
    still being worked on, so that a slow batch is not handed to another worker meanwhile."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=ack_wait / 3)
        if done:
            return task.result()
        for msg in msgs:
            await _tell(msg.in_progress())


async def _tell(reply: Awaitable[None]) -> None:
    """Send an acknowledgement (or nak, or progress). One that cannot be sent only delays
    the message: the server hands it out again after the ack wait, and ingest replays it."""
    try:
        await reply
    except nats.errors.Error as exc:
        log.warning("could not answer the server about a message: %s", exc)
