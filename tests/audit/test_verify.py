"""The audit log's chains: verify recomputes each entry's hash and follows each stripe's
chain to its head, and ``jifen audit verify`` names every entry edited, removed or added
in SQL behind jifen's back.

The tampering tests run on a database of their own (each backend), so that the shared test
database's log stays whole for every other test that verifies it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, text
from typer.testing import CliRunner

from jifen.audit import service
from jifen.audit.core import (
    CHAINED_FIELDS,
    GENESIS,
    ChainVerifier,
    StoredEntry,
    as_utc,
    chained_fields,
    entry_digest,
    seal_root,
    stripe_of,
)
from jifen.audit.models import STRIPES, audit_checkpoints, audit_entries, audit_heads
from jifen.audit.schemas import AuditEntryCreate
from jifen.cli import app
from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.settings import get_settings
from tests.conftest import START

runner = CliRunner()


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def fresh(own_database: Database) -> Database:
    """A database of its own on each backend, migrated, with an empty audit log."""
    return own_database


def write(db: Database, target: str, **extra: Any) -> int:
    """Record one entry about ``target``, a little later than the one before."""
    assert isinstance(db.clock, ManualClock)
    db.clock.advance(timedelta(seconds=1, microseconds=1234))
    values: dict[str, Any] = {
        "program_id": None,
        "actor": "staff:alice",
        "role": "operator",
        "ip": "10.0.0.1",
        "user_agent": "pytest",
        "action": "points.earn",
        "target": target,
        "after": {"amount": 100, "reason": "订单 1"},
        **extra,
    }
    return db.run(lambda uow: service.record(uow, AuditEntryCreate(**values)))


def three_in_one_chain(db: Database) -> tuple[int, list[int]]:
    """Three entries about one member (so in one stripe), with one elsewhere between them:
    the stripe and the three entries' ids."""
    first = write(db, "member:1")
    write(db, "member:2")
    second = write(db, "member:1", before={"amount": 100})
    third = write(db, "member:1", action="points.spend", after={"amount": -40})
    return stripe_of("member:1", STRIPES), [first, second, third]


def execute(db: Database, sql: str, **params: Any) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(sql), params)


def jifen(db: Database, *args: str) -> tuple[int, str]:
    url = db.engine.url.render_as_string(hide_password=False)
    result = runner.invoke(app, ["--database-url", url, *args])
    return result.exit_code, result.output


def verified(db: Database) -> service.AuditReport:
    with service.snapshot(db) as uow:
        return service.verify_report(uow)


# --------------------------------------------------------------------------- the pure check


def chain(stripe: int, targets: list[str]) -> list[StoredEntry]:
    """Entries chained as record() chains them, all in ``stripe``."""
    entries, prev = [], GENESIS
    for seq, target in enumerate(targets, start=1):
        fields = chained_fields({"actor": "staff:a", "action": "x.y", "target": target})
        at = START + timedelta(seconds=seq)
        digest = entry_digest(prev, seq, at, fields)
        entries.append(StoredEntry(seq * 10, stripe, seq, at, fields, prev, digest))
        prev = digest
    return entries


def target_in(stripe: int) -> str:
    return next(f"member:{i}" for i in range(10_000) if stripe_of(f"member:{i}", 4) == stripe)


def heads_of(*chains: list[StoredEntry]) -> dict[int, tuple[int, str]]:
    heads = dict.fromkeys(range(4), (0, GENESIS))
    for entries in chains:
        heads[entries[-1].stripe] = (entries[-1].seq, entries[-1].hash)
    return heads


def test_the_pure_check_passes_whole_chains_and_counts_them() -> None:
    one, two = chain(1, [target_in(1)] * 3), chain(3, [target_in(3)] * 2)
    checker = ChainVerifier(4)
    for entry in one + two:
        checker.add(entry)
    assert checker.finish(heads_of(one, two)) == []
    assert (checker.entries, checker.chains) == (5, 2)


def test_the_pure_check_names_each_kind_of_damage() -> None:
    entries = chain(1, [target_in(1)] * 4)
    heads = heads_of(entries)
    edited = StoredEntry(**{**entries[1].__dict__, "fields": {**entries[1].fields, "ip": "x"}})
    moved = chain(2, [target_in(1)])  # a target of stripe 1 sitting in stripe 2
    checker = ChainVerifier(4)
    for entry in [entries[0], edited, entries[3], *moved]:  # entries[2] is gone
        checker.add(entry)
    problems = [str(p) for p in checker.finish({**heads, 2: (moved[0].seq, moved[0].hash)})]
    assert problems == [
        "entry 20 (stripe 1, seq 2): was edited: its recorded fields no longer match its hash",
        "entry 40 (stripe 1, seq 4): follows entry 20 (seq 2), but seq 3 of its chain is "
        "missing: entries were removed out of band",
        "entry 10 (stripe 2, seq 1): its target belongs to stripe 1: moved between chains "
        "out of band",
    ]


def test_the_pure_check_compares_every_head() -> None:
    entries = chain(0, [target_in(0)] * 2)
    checker = ChainVerifier(4)
    for entry in entries:
        checker.add(entry)
    heads = {0: (3, "f" * 64), 1: (0, "e" * 64), 3: (0, GENESIS)}  # 2 is missing
    assert [str(p) for p in checker.finish(heads)] == [
        "stripe 0, seq 3: the head says the chain holds 3 entries but it ends at seq 2 "
        "(entry 20): its last entries were removed, or the head was rewritten",
        "stripe 1, seq 0: the chain is empty but its head's hash is not the starting one: the "
        "head was rewritten",
        "stripe 2: has no head in audit_heads: the head row was deleted",
    ]


def test_what_is_hashed_is_what_a_json_column_gives_back() -> None:
    moment = datetime(2026, 5, 1, 8, 0, 0, 123456, tzinfo=UTC)
    fields = chained_fields(
        {"target": "member:1", "after": {"items": (1, 2), "at": moment, "名": "积分"}}
    )
    assert fields["after"] == {"items": [1, 2], "at": str(moment), "名": "积分"}
    assert fields["before"] is None and fields["program_id"] is None


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    prev=st.text("0123456789abcdef", min_size=64, max_size=64),
    seq=st.integers(1, 2**62),
    micros=st.integers(0, 10**15),
    values=st.fixed_dictionaries(
        {"actor": st.text(), "target": st.text(), "api_key_id": st.none() | st.integers()},
        optional={"before": _JSON, "after": _JSON},
    ),
)
def test_the_digest_is_the_sorted_json_of_link_position_time_and_fields(
    prev: str, seq: int, micros: int, values: dict[str, Any]
) -> None:
    # PostgreSQL hashes the pieces of digest_parts joined around the head it locks: they
    # must spell exactly the JSON that verify hashes
    at = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    fields = chained_fields(values)
    payload = json.dumps(
        {"prev": prev, "seq": seq, "at": at.isoformat(), **fields},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str,
    )  # fmt: skip
    assert entry_digest(prev, seq, at, fields) == hashlib.sha256(payload.encode()).hexdigest()


def test_a_time_read_back_naive_is_taken_as_utc() -> None:
    # SQLite keeps no zone: a time read without jifen's column type comes back naive
    entries = chain(1, [target_in(1)])
    naive = StoredEntry(**{**entries[0].__dict__, "at": entries[0].at.replace(tzinfo=None)})
    checker = ChainVerifier(4)
    checker.add(naive)
    assert checker.finish(heads_of(entries)) == []


def test_problems_speak_chinese_when_asked() -> None:
    entries = chain(1, [target_in(1)] * 2)
    checker = ChainVerifier(4)
    checker.add(entries[1])
    (problem,) = checker.finish(heads_of(entries))
    assert problem.message("zh") == (
        "条目 20(链 1,序号 2):前一条是链首,但本链序号 1 缺失:有记录在 jifen 之外被删除"
    )


# --------------------------------------------------------------------------- both backends


def test_a_clean_log_verifies_and_the_cli_counts_entries_and_chains(fresh: Database) -> None:
    # given an empty log: nothing to find
    code, output = jifen(fresh, "audit", "verify")
    assert code == 0, output
    assert "audit log verified: 0 entries in 0 chains" in output
    # when five entries are written about three targets
    three_in_one_chain(fresh)
    write(fresh, "role:7")
    chains = len({stripe_of(t, STRIPES) for t in ("member:1", "member:2", "role:7")})
    # then every one verifies, and the chains are counted
    code, output = jifen(fresh, "audit", "verify")
    assert code == 0, output
    assert f"audit log verified: 5 entries in {chains} chains" in output
    assert fresh.run(service.verify, read_only=True) == []


def test_values_read_back_hash_as_they_were_recorded(fresh: Database) -> None:
    # given entries with Chinese, nested JSON, floats, big numbers, NULLs, microseconds,
    # a clock in another zone, and a value JSON has no type for
    assert isinstance(fresh.clock, ManualClock)
    fresh.clock.set(datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=8))))
    write(
        fresh,
        "member:积分",
        program_id=2**40,
        api_key_id=7,
        role="",
        user_agent="Mozilla/5.0 (中文) \"quoted\" 'single' \\ back",
        before={"nested": {"list": [1, 2.5, -0.0, None, True], "empty": {}}, "big": 2**62},
        after={"reason": "积分 🎉", "at": datetime(2026, 1, 1, tzinfo=UTC), "ratio": 0.1},
    )
    write(fresh, "member:积分", before=None, after=None, ip="::1")
    # then both verify on this backend
    report = verified(fresh)
    assert report.problems == []
    assert report.entries == 2
    # and what was stored is what was hashed: a datetime kept as its text
    stored = fresh.run(
        lambda uow: (
            uow.conn.execute(select(audit_entries.c.after).order_by(audit_entries.c.id))
            .scalars()
            .first()
        )
    )
    assert stored["at"] == "2026-01-01 00:00:00+00:00"


def test_concurrent_entries_about_one_target_chain_one_after_another(fresh: Database) -> None:
    # given 8 writers recording 25 entries each about one target, so all in one chain
    entry = AuditEntryCreate(
        program_id=None,
        actor="key:bench",
        action="points.earn",
        target="member:7",
        after={"amount": 1},
    )
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(25):
                fresh.run(lambda uow: service.record(uow, entry))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # then the chain holds all 200, at positions 1 to 200, each linked to the one before
    seqs = fresh.run(
        lambda uow: (
            uow.conn.execute(select(audit_entries.c.seq).order_by(audit_entries.c.seq))
            .scalars()
            .all()
        )
    )
    assert seqs == list(range(1, 201))
    report = verified(fresh)
    assert report.problems == []
    assert report.entries == 200


def test_verify_names_an_entry_whose_after_was_changed_in_sql(fresh: Database) -> None:
    stripe, (_, second, _) = three_in_one_chain(fresh)
    execute(fresh, "UPDATE audit_entries SET after = :a WHERE id = :i", a='{"amount": 1}', i=second)
    code, output = jifen(fresh, "audit", "verify")
    assert code == 1
    assert (
        f"  PROBLEM entry {second} (stripe {stripe}, seq 2): was edited: its recorded fields no "
        "longer match its hash\n"
    ) in output
    assert "1 problem(s) in 4 entries: the audit log was changed outside jifen" in output


def test_verify_names_an_entry_whose_actor_was_changed_in_sql(fresh: Database) -> None:
    stripe, (first, _, _) = three_in_one_chain(fresh)
    execute(fresh, "UPDATE audit_entries SET actor = 'staff:mallory' WHERE id = :i", i=first)
    code, output = jifen(fresh, "audit", "verify")
    assert code == 1
    assert f"entry {first} (stripe {stripe}, seq 1): was edited" in output


def test_verify_finds_an_entry_removed_from_the_middle_of_a_chain(fresh: Database) -> None:
    stripe, (first, second, third) = three_in_one_chain(fresh)
    execute(fresh, "DELETE FROM audit_entries WHERE id = :i", i=second)
    code, output = jifen(fresh, "audit", "verify")
    assert code == 1
    assert (
        f"entry {third} (stripe {stripe}, seq 3): follows entry {first} (seq 1), but seq 2 of "
        "its chain is missing: entries were removed out of band"
    ) in output
    assert output.count("PROBLEM") == 1


def test_verify_finds_the_last_entry_of_a_chain_removed(fresh: Database) -> None:
    stripe, (_, second, third) = three_in_one_chain(fresh)
    execute(fresh, "DELETE FROM audit_entries WHERE id = :i", i=third)
    code, output = jifen(fresh, "audit", "verify")
    assert code == 1
    assert (
        f"stripe {stripe}, seq 3: the head says the chain holds 3 entries but it ends at seq 2 "
        f"(entry {second}): its last entries were removed, or the head was rewritten"
    ) in output


def test_verify_finds_a_whole_chain_removed_and_a_head_rewritten(fresh: Database) -> None:
    stripe, _ = three_in_one_chain(fresh)
    target = next(f"role:{i}" for i in range(100) if stripe_of(f"role:{i}", STRIPES) != stripe)
    other, last = stripe_of(target, STRIPES), write(fresh, target)
    seq = fresh.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.seq).where(audit_entries.c.id == last)
        ).scalar_one()
    )
    execute(fresh, "DELETE FROM audit_entries WHERE stripe = :s", s=stripe)
    execute(fresh, "UPDATE audit_heads SET hash = :h WHERE stripe = :s", h="a" * 64, s=other)
    assert {str(p) for p in verified(fresh).problems} == {
        f"stripe {stripe}, seq 3: the head says the chain holds 3 entries but it ends at seq 0 "
        "(no entry): its last entries were removed, or the head was rewritten",
        f"entry {last} (stripe {other}, seq {seq}): the chain's head does not hold this entry's "
        "hash: the head or this entry was rewritten",
    }


def test_verify_finds_an_entry_inserted_out_of_band(fresh: Database) -> None:
    stripe, (_, _, third) = three_in_one_chain(fresh)
    # a copy of the last entry as a fourth, its hash recomputed, the head left alone
    execute(
        fresh,
        "INSERT INTO audit_entries (stripe, seq, at, program_id, actor, role, api_key_id, ip,"
        " user_agent, action, target, before, after, prev_hash, hash) SELECT stripe, 4, at,"
        " program_id, actor, role, api_key_id, ip, user_agent, action, target, before, after,"
        " hash, hash FROM audit_entries WHERE id = :i",
        i=third,
    )
    code, output = jifen(fresh, "audit", "verify")
    assert code == 1
    assert f"stripe {stripe}, seq 4): was edited" in output
    assert "seq 4): the chain runs to this entry but the head says 3" in output


def rechain(db: Database, stripe: int) -> None:
    """What someone able to write the database does to hide an edit: compute the stripe's
    chain again from its first entry, and its head."""
    with db.engine.begin() as conn:
        rows = conn.execute(
            select(audit_entries).where(audit_entries.c.stripe == stripe)
            .order_by(audit_entries.c.seq)
        ).all()  # fmt: skip
        previous = GENESIS
        for row in rows:
            fields = chained_fields({name: row._mapping[name] for name in CHAINED_FIELDS})
            digest = entry_digest(previous, row.seq, as_utc(row.at), fields)
            conn.execute(
                audit_entries.update().where(audit_entries.c.id == row.id)
                .values(prev_hash=previous, hash=digest)
            )  # fmt: skip
            previous = digest
        conn.execute(
            audit_heads.update().where(audit_heads.c.stripe == stripe)
            .values(seq=rows[-1].seq, hash=previous)
        )  # fmt: skip


def test_a_checkpoint_catches_a_log_rewritten_and_chained_again(fresh: Database) -> None:
    stripe, (_, second, _) = three_in_one_chain(fresh)
    code, output = jifen(fresh, "audit", "checkpoint")
    assert code == 0, output
    root = output.split("checkpoint 1: ")[1].split()[0]
    assert len(root) == 64 and "--root" in output
    write(fresh, "member:1")  # the log goes on after the checkpoint
    code, output = jifen(fresh, "audit", "verify", "--root", root)
    assert code == 0 and "5 entries" in output and "1 checkpoints" in output, output
    # when an entry before the checkpoint is edited and its chain computed again
    execute(fresh, "UPDATE audit_entries SET after = :a WHERE id = :i", a='{"amount": 1}', i=second)
    rechain(fresh, stripe)
    # then the chains hold, but not the entry the checkpoint sealed
    code, output = jifen(fresh, "audit", "verify")
    assert code == 1
    assert f"stripe {stripe}, seq 3: the entry checkpoint 1 sealed here is gone or changed" in (
        output
    )
    # and when the checkpoint is made again over the new heads too, only the kept root tells
    with fresh.engine.begin() as conn:
        sealed = conn.execute(select(audit_checkpoints.c.heads)).scalar_one()
        sealed[str(stripe)] = [3, next(
            r.hash for r in conn.execute(select(audit_entries).where(
                audit_entries.c.stripe == stripe, audit_entries.c.seq == 3))
        )]  # fmt: skip
        new_root = seal_root(GENESIS, {int(k): (v[0], v[1]) for k, v in sealed.items()})
        conn.execute(audit_checkpoints.update().values(heads=sealed, root_hash=new_root))
    code, output = jifen(fresh, "audit", "verify")
    assert code == 0, output  # rewritten wholesale, the database agrees with itself
    code, output = jifen(fresh, "audit", "verify", "--root", root)
    assert code == 1
    assert f"no checkpoint has the root {root}" in output


def test_verify_reads_the_log_in_chunks(fresh: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # given a log read two entries at a time, with a gap at a chunk boundary
    monkeypatch.setattr(service, "_CHUNK", 2)
    stripe, (_, second, third) = three_in_one_chain(fresh)
    for i in range(5):
        write(fresh, f"member:{100 + i}")
    assert verified(fresh).ok
    execute(fresh, "DELETE FROM audit_entries WHERE id = :i", i=second)
    report = verified(fresh)
    # then every entry is still read, and the gap found once
    assert report.entries == 8
    assert [(p.entry_id, p.stripe, p.seq) for p in report.problems] == [(third, stripe, 3)]


def test_the_cli_speaks_chinese_when_asked(
    fresh: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    stripe, (_, second, _) = three_in_one_chain(fresh)
    monkeypatch.setenv("JIFEN_LANGUAGE", "zh")
    get_settings.cache_clear()
    try:
        clean = jifen(fresh, "audit", "verify")
        execute(fresh, "UPDATE audit_entries SET ip = '1.2.3.4' WHERE id = :i", i=second)
        broken = jifen(fresh, "audit", "verify")
    finally:
        monkeypatch.delenv("JIFEN_LANGUAGE")
        get_settings.cache_clear()
    chains = len({stripe_of(t, STRIPES) for t in ("member:1", "member:2")})
    assert clean == (0, f"审计日志已验证:{chains} 条链,共 4 条记录,0 个检查点\n")
    assert broken[0] == 1
    assert f"条目 {second}(链 {stripe},序号 2):被改动过" in broken[1]
    assert "4 条记录中有 1 个问题" in broken[1]


def test_verify_sees_one_moment_while_others_write(
    fresh: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given writers appending to a few chains the whole time, and a log read in small chunks
    monkeypatch.setattr(service, "_CHUNK", 3)
    three_in_one_chain(fresh)
    stop = threading.Event()

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            write(fresh, f"member:{i % 3}")
            i += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    reports = []
    try:
        # when the log is verified again and again meanwhile
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            reports.append(verified(fresh))
            if reports[-1].entries >= reports[0].entries + 30:
                break
    finally:
        stop.set()
        writer.join()
    # then no entry appended half-way through a check looks like damage
    assert [str(p) for report in reports for p in report.problems] == []
    assert reports[-1].entries >= reports[0].entries + 30


def test_the_cli_asks_for_a_migration_first(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    url = f"sqlite:///{empty}"
    result = runner.invoke(app, ["--database-url", url, "audit", "verify"])
    assert result.exit_code == 2
    assert "error[schema_not_current]" in result.output
