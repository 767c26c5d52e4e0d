"""A crash loses nothing acknowledged: ``jifen serve`` killed with SIGKILL under load.

Eight clients earn and spend over HTTP against a real ``jifen serve`` on PostgreSQL while
the server is killed every five seconds and started again at once. A client retries a
request cut off by a kill with the same ``Idempotency-Key`` and body until it gets a
definite answer. Afterwards the ledger holds exactly the acknowledged postings, once each,
and every balance is what the answers add up to.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx2 as httpx
import pytest
from sqlalchemy import select

from jifen.auth import service as auth
from jifen.db.uow import Database
from jifen.points import service as points
from jifen.points.models import postings
from tests.factories import assert_ledger_sound, new_members, new_program

CLIENTS = 8
MEMBERS = 20
LOAD_SECONDS = 25.0
KILL_EVERY = 5.0
READY_WITHIN = 30.0
ANSWER_WITHIN = 60.0
"""A request that gets no definite answer for this long (across restarts) fails the test."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``jifen serve`` as a child process (its own process group) that can be killed and
    started again on the same port."""

    def __init__(self, database_url: str, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "jifen", "--database-url", database_url,
            "serve", "--port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "JIFEN_SECRET_KEY": os.environ["JIFEN_SECRET_KEY"],  # API key hashes must match
            "JIFEN_DATA_DIR": str(data_dir),
            "JIFEN_REDIS_URL": "",  # count rate limits in the process
            "JIFEN_RATE_LIMIT_IP": "1000000/minute",
            "JIFEN_RATE_LIMIT_KEY": "1000000/minute",
        }
        self.log_path = log
        self.log: IO[bytes] = log.open("ab")
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        """Start a new process and return once it answers ``/readyz`` with 200."""
        assert self.process is None
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=self.log, stderr=self.log,
            start_new_session=True,
        )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + READY_WITHIN
        with httpx.Client(timeout=2.0) as probe:
            while True:
                try:
                    if probe.get(f"{self.base}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert self.process.poll() is None, f"jifen serve exited:\n{self.log_tail()}"
                assert time.monotonic() < deadline, f"jifen serve not ready:\n{self.log_tail()}"
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the process (and anything it started) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        self.kills += 1

    def close(self) -> None:
        self.kill()
        self.log.close()

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]


@dataclass(frozen=True)
class Acknowledged:
    """An operation the server answered with 201."""

    key: str
    kind: str
    member_id: int
    amount: int
    posting_id: int
    replayed: bool


@dataclass
class Tally:
    """What all clients saw, filled under a lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: list[Acknowledged] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    connection_errors: int = 0
    rate_limited: int = 0
    retried_requests: int = 0
    unanswered: list[str] = field(default_factory=list)
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set when the test fails while clients run: they stop retrying at once."""


def client(
    base: str, token: str, program: str, member_ids: list[int], seed: int,
    stop: threading.Event, tally: Tally,
) -> None:  # fmt: skip
    """Earn or spend at random until ``stop``; each request is retried to a definite answer."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=15.0) as http:
            while not stop.is_set():
                member = rng.choice(member_ids)
                if rng.random() < 0.6:
                    kind, amount = "earn", rng.randint(1, 100)
                else:
                    kind, amount = "spend", rng.randint(1, 30)
                key = uuid.uuid4().hex
                path = f"/v1/programs/{program}/members/{member}/points/{kind}"
                answer(http, path, key, kind, member, amount, tally)
                if tally.unexpected or tally.unanswered:
                    return
    except Exception as exc:  # a thread's failure must reach the test, not vanish
        with tally.lock:
            tally.unexpected.append(f"client {seed} crashed: {exc!r}")


def answer(
    http: httpx.Client, path: str, key: str, kind: str, member: int, amount: int, tally: Tally
) -> None:
    """Send one request, and again with the same key and body, until it is answered."""
    body = {"amount": amount, "reason": f"crash test {kind}"}
    deadline = time.monotonic() + ANSWER_WITHIN
    attempts = 0
    while True:
        attempts += 1
        if attempts == 2:
            with tally.lock:
                tally.retried_requests += 1
        if time.monotonic() > deadline or tally.abandoned.is_set():
            with tally.lock:
                tally.unanswered.append(f"{kind} {key} on member {member}")
            return
        try:
            response = http.post(path, json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:  # refused, reset or cut off by a kill: ask again
            with tally.lock:
                tally.connection_errors += 1
            time.sleep(0.05)
            continue
        status = response.status_code
        if status >= 500:
            with tally.lock:
                tally.server_errors.append(f"{status} {kind} {key}: {response.text[:500]}")
            time.sleep(0.05)
            continue
        if status == 429:
            with tally.lock:
                tally.rate_limited += 1
            time.sleep(0.2)
            continue
        if status == 201:
            data = response.json()
            done = Acknowledged(
                key=key, kind=kind, member_id=member, amount=amount, posting_id=data["id"],
                replayed=response.headers.get("idempotent-replayed") == "true",
            )  # fmt: skip
            with tally.lock:
                tally.acknowledged.append(done)
            assert (data["kind"], data["amount"], data["member_id"]) == (kind, amount, member)
            return
        code = response.json().get("code", "") if response.content else ""
        if status == 409 and kind == "spend" and code == "insufficient_points":
            with tally.lock:
                tally.refused[code] += 1
            return
        with tally.lock:  # any other answer (another 409, a 422, 401, 404) is a bug here
            tally.unexpected.append(f"{status} {kind} {key}: {response.text[:500]}")
        return


@pytest.fixture
def server(postgres_url: str, pg: Database, tmp_path: Path) -> Iterator[Server]:
    """A ``jifen serve`` on the test schema; always killed at the end."""
    running = Server(postgres_url, tmp_path / "data", tmp_path / "serve.log")
    try:
        yield running
    finally:
        running.close()


def test_a_crash_loses_nothing_acknowledged(pg: Database, server: Server) -> None:
    program = new_program(pg)
    member_ids = new_members(pg, program.id, MEMBERS)
    key = pg.run(
        lambda uow: auth.create_api_key(uow, program_id=program.id, name="crash", created_by="test")
    )
    server.start()

    tally, stop = Tally(), threading.Event()
    threads = [
        threading.Thread(
            target=client,
            args=(server.base, key.token, program.code, member_ids, seed, stop, tally),
            name=f"crash-client-{seed}",
            daemon=True,
        )
        for seed in range(CLIENTS)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        for kill in range(1, int(LOAD_SECONDS / KILL_EVERY) + 1):
            time.sleep(max(0.0, started + kill * KILL_EVERY - time.monotonic()))
            server.kill()
            server.start()
            if tally.unexpected or tally.unanswered:
                break
    except BaseException:
        tally.abandoned.set()
        raise
    finally:
        stop.set()  # the clients finish what is in flight against the running server
        for thread in threads:
            thread.join(timeout=ANSWER_WITHIN + 30)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    server.kill()
    restarts = server.starts - 1

    acknowledged = tally.acknowledged
    kinds = Counter(a.kind for a in acknowledged)
    summary = (
        f"{restarts} kills and restarts in {LOAD_SECONDS:.0f} s; "
        f"{len(acknowledged)} acknowledged ({dict(kinds)}, "
        f"{sum(a.replayed for a in acknowledged)} replayed), {dict(tally.refused)} refused, "
        f"{tally.retried_requests} requests retried, {tally.connection_errors} connection "
        f"errors, {tally.rate_limited} rate-limited, {len(tally.server_errors)} 5xx"
    )
    print(summary)
    assert not stuck, f"clients never finished: {stuck}; {summary}"
    assert tally.unexpected == [], f"{tally.unexpected[:5]}\n{summary}\n{server.log_tail()}"
    assert tally.unanswered == [], f"{tally.unanswered[:5]}\n{summary}"
    # A kill cuts a connection; it cannot make the server answer 5xx. Any 5xx is a bug.
    assert tally.server_errors == [], f"{tally.server_errors[:5]}\n{summary}\n{server.log_tail()}"
    assert restarts == int(LOAD_SECONDS / KILL_EVERY), summary
    assert kinds["earn"] > 200 and kinds["spend"] > 50, summary

    # Every acknowledged posting is in the ledger once, as answered; nothing else is.
    by_id = {a.posting_id: a for a in acknowledged}
    assert len(by_id) == len(acknowledged), "two answers named the same posting"
    assert len({a.key for a in acknowledged}) == len(acknowledged)
    rows = pg.run(
        lambda uow: uow.conn.execute(
            select(
                postings.c.id, postings.c.kind, postings.c.amount, postings.c.idempotency_key
            ).where(postings.c.program_id == program.id)
        ).all(),
        read_only=True,
    )
    stored = {row.id: row for row in rows}
    assert len(stored) == len(rows)
    missing = sorted(set(by_id) - set(stored))
    assert missing == [], f"acknowledged but not in the ledger: {missing[:20]}"
    unanswered = sorted(row.idempotency_key for row in rows if row.id not in by_id)
    assert unanswered == [], f"in the ledger but never acknowledged: {unanswered[:20]}"
    ledger_keys = Counter(row.idempotency_key.rsplit(":", 1)[-1] for row in rows)
    assert max(ledger_keys.values()) == 1, "an idempotency key posted twice"
    for posting_id, done in by_id.items():
        row = stored[posting_id]
        assert (row.kind, row.amount) == (done.kind, done.amount), (row, done)
        assert row.idempotency_key.endswith(f":{done.key}"), (row, done)

    # Every balance is what the acknowledged answers add up to.
    expected: dict[int, int] = defaultdict(int)
    for done in acknowledged:
        expected[done.member_id] += done.amount if done.kind == "earn" else -done.amount

    def balances(uow: Any) -> dict[int, int]:
        return {m: points.balance(uow, member_id=m).balance for m in member_ids}

    assert pg.run(balances, read_only=True) == {m: expected[m] for m in member_ids}
    assert_ledger_sound(pg, program.id)
