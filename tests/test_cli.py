"""The ``jifen`` command against real databases: verify catches tampering done in SQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from jifen.cli import app
from jifen.db.uow import Database
from jifen.demo import service as demo
from jifen.points import service as points
from jifen.programs.schemas import ProgramRead
from tests.factories import assert_ledger_sound, new_members, new_program

runner = CliRunner()


def url_of(db: Database) -> str:
    return db.engine.url.render_as_string(hide_password=False)


def jifen(db: Database | str, *args: str) -> tuple[int, str]:
    url = db if isinstance(db, str) else url_of(db)
    result = runner.invoke(app, ["--database-url", url, *args])
    return result.exit_code, result.output


@pytest.fixture
def history(db: Database) -> tuple[Database, ProgramRead, dict[str, int]]:
    """A programme with a little of everything, and the ids of some of its postings."""
    program = new_program(db)
    alice, bob = new_members(db, program.id, 2)
    later = db.clock.now() + timedelta(days=60)
    ids = {}
    ids["earn"] = db.run(
        lambda u: points.earn(u, member_id=alice, amount=300, key="e", expires_at=later)
    ).id
    ids["spend"] = db.run(lambda u: points.spend(u, member_id=alice, amount=120, key="s")).id
    ids["transfer"] = db.run(
        lambda u: points.transfer(u, from_member_id=alice, to_member_id=bob, amount=50, key="t")
    ).id
    ids["refund"] = db.run(lambda u: points.refund(u, spend_id=ids["spend"], amount=20, key="r")).id
    ids["alice"], ids["bob"] = alice, bob
    return db, program, ids  # fmt: skip


def execute(db: Database, sql: str, **params: int) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(sql), params)


def test_verify_and_reconcile_pass_on_an_untouched_ledger(history: tuple) -> None:
    db, program, _ = history
    code, output = jifen(db, "ledger", "verify", "--program", program.code)
    assert code == 0, output
    assert "verified 4 postings, 2 member accounts" in output
    code, output = jifen(db, "ledger", "reconcile", "--program", program.code)
    assert code == 0, output
    assert "programme total 0" in output


def test_verify_names_a_posting_whose_line_was_changed_in_sql(history: tuple) -> None:
    db, program, ids = history
    execute(db, "UPDATE lines SET amount = amount + 5 WHERE posting_id = :p AND amount > 0",
            p=ids["spend"])  # fmt: skip
    code, output = jifen(db, "ledger", "verify", "--program", program.code)
    assert code == 1
    assert f"posting {ids['spend']}" in output
    assert "edited" in output


def test_verify_names_a_posting_whose_amount_field_was_changed_in_sql(history: tuple) -> None:
    db, program, ids = history
    execute(db, "UPDATE postings SET amount = 1 WHERE id = :p", p=ids["earn"])
    code, output = jifen(db, "ledger", "verify", "--program", program.code)
    assert code == 1
    assert f"posting {ids['earn']}: was edited" in output


def test_verify_finds_a_deleted_posting(history: tuple) -> None:
    db, program, ids = history
    # a whole transfer removed, every row of it, as someone hiding it would
    for table in ("chain_entries", "lines", "allocations", "lots"):
        execute(db, f"DELETE FROM {table} WHERE posting_id = :p", p=ids["transfer"])
    execute(db, "DELETE FROM postings WHERE id = :p", p=ids["transfer"])
    code, output = jifen(db, "ledger", "verify", "--program", program.code)
    assert code == 1
    assert "deleted" in output
    assert f"between {ids['spend']} and {ids['refund']}" in output


def test_verify_finds_a_posting_inserted_out_of_band(history: tuple) -> None:
    db, program, ids = history
    with db.engine.begin() as conn:
        accounts = dict(conn.execute(text(
            "SELECT system_code, id FROM accounts WHERE program_id = :p AND system_code IS NOT NULL"
        ), {"p": program.id}).all())  # fmt: skip
        member_account = conn.execute(
            text("SELECT id FROM accounts WHERE member_id = :m"), {"m": ids["alice"]}
        ).scalar_one()
        posting = conn.execute(text(
            "INSERT INTO postings (program_id, kind, idempotency_key, request_hash, account_id,"
            " amount, reason, actor, created_at, digest) VALUES (:p, 'earn', 'forged', 'x', :a,"
            " 1000, '', '', CURRENT_TIMESTAMP, 'x') RETURNING id"
        ), {"p": program.id, "a": member_account}).scalar_one()  # fmt: skip
        conn.execute(text(
            "INSERT INTO lines (posting_id, account_id, amount)"
            " VALUES (:p, :i, -1000), (:p, :m, 1000)"
        ), {"p": posting, "i": accounts["issued"], "m": member_account})  # fmt: skip
    code, output = jifen(db, "ledger", "verify", "--program", program.code)
    assert code == 1
    assert f"posting {posting}" in output
    assert "inserted out of band" in output


def test_reconcile_names_an_account_whose_balance_was_changed_in_sql(history: tuple) -> None:
    db, program, ids = history
    execute(db, "UPDATE accounts SET balance = balance + 7 WHERE member_id = :m", m=ids["bob"])
    code, output = jifen(db, "ledger", "reconcile", "--program", program.code)
    assert code == 1
    assert "balance (stored) vs its lines: 57 != 50" in output


def test_checkpoint_seals_heads_and_catches_a_rewritten_tail(history: tuple) -> None:
    db, program, ids = history
    code, output = jifen(db, "ledger", "checkpoint", "--program", program.code)
    assert code == 0
    assert "checkpoint" in output
    # Cut bob's only entry (the transfer's) and rewind his account head as well: the chain
    # alone now looks consistent, the checkpoint does not.
    execute(db, "DELETE FROM chain_entries WHERE account_id = (SELECT id FROM accounts WHERE "
            "member_id = :m)", m=ids["bob"])  # fmt: skip
    execute(db, "UPDATE accounts SET head_seq = 0, head_hash = :g WHERE member_id = :m",
            m=ids["bob"], g="0" * 64)  # type: ignore[arg-type]  # fmt: skip
    code, output = jifen(db, "ledger", "verify", "--program", program.code)
    assert code == 1
    assert "sealed by checkpoint" in output


def test_errors_are_one_line_with_a_code_and_no_traceback(db: Database) -> None:
    code, output = jifen(db, "ledger", "checkpoint", "--program", "no-such-programme")
    assert code == 2
    assert "error[unknown_program]" in output
    assert "Traceback" not in output


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    code, output = jifen("postgresql://nobody@127.0.0.1:1/none", "ledger", "verify")
    assert code == 2
    assert "error[database_unreachable]" in output
    assert "Traceback" not in output


def test_demo_builds_once_and_summarises_a_sound_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    code, output = jifen(url, "demo", "--members", "40")
    assert code == 0, output
    assert "40 members" in output
    assert "reconcile: ok" in output
    assert "verify: ok" in output
    code, again = jifen(url, "demo", "--members", "40")
    assert code == 0
    counts_line = [line for line in output.splitlines() if "members," in line]
    assert counts_line  # e.g. "40 members, 387 postings"
    assert counts_line == [line for line in again.splitlines() if "members," in line]
    database = Database(url)
    try:
        program_id = database.run(lambda u: demo.programs.get_program(u, code="demo").id)
        assert_ledger_sound(database, program_id)
        counts = database.run(lambda u: points.posting_counts(u, program_id=program_id))
        assert {"earn", "spend", "refund", "reverse", "transfer", "freeze", "expire"} <= set(counts)
    finally:
        database.dispose()
    code, _ = jifen(url, "demo", "--members", "5", "--reset")
    assert code == 0
    code, output = jifen(url, "db", "current")
    assert code == 0
    assert "current: 0001" in output
