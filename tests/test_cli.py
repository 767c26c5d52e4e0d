"""The ``jifen`` command against real databases: verify catches tampering done in SQL."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from jifen.api.app import create_app
from jifen.cli import _log_config, app
from jifen.db.migrate import head_revision
from jifen.db.uow import Database
from jifen.points import service as points
from jifen.programs.schemas import ProgramRead
from jifen.settings import get_settings
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import new_members, new_program

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


def test_reconcile_names_an_account_whose_member_state_was_changed_in_sql(
    history: tuple,
) -> None:
    db, program, ids = history
    execute(db, "UPDATE members SET state = 'frozen' WHERE id = :m", m=ids["bob"])
    code, output = jifen(db, "ledger", "reconcile", "--program", program.code)
    assert code == 1
    assert "member state carried by the account vs the member's: active != frozen" in output


def test_reconcile_names_each_row_that_leads_to_no_row(history: tuple) -> None:
    # the ledger's tables carry no foreign keys: reconcile finds a reference that leads
    # nowhere, in the programme's postings, and a row whose posting is gone in a whole run
    db, program, ids = history
    lines_of_earn = "UPDATE lines SET account_id = :a WHERE posting_id = :p AND amount > 0"
    with db.engine.connect() as conn:
        account = conn.execute(text("SELECT id FROM accounts WHERE member_id = :m"),
                               {"m": ids["alice"]}).scalar_one()  # fmt: skip
    execute(db, lines_of_earn, a=999999, p=ids["earn"])
    execute(db, "UPDATE lots SET source_lot_id = source_lot_id + 888888 WHERE posting_id = :p",
            p=ids["transfer"])  # fmt: skip
    execute(db, "UPDATE allocations SET posting_id = 777777 WHERE posting_id = :p", p=ids["refund"])
    try:
        code, output = jifen(db, "ledger", "reconcile", "--program", program.code)
        assert code == 1
        assert f"posting {ids['earn']}: lines (id " in output
        assert "account_id 999999 is no row of accounts" in output
        assert f"posting {ids['transfer']}: lots (id " in output
        assert "is no row of lots" in output
        assert "777777" not in output
        code, output = jifen(db, "ledger", "reconcile")
        assert code == 1
        assert "allocations (id " in output
        assert "posting_id 777777 is no row of postings" in output
    finally:  # the database is shared with other tests' programmes
        execute(db, lines_of_earn, a=account, p=ids["earn"])
        execute(db, "UPDATE lots SET source_lot_id = source_lot_id - 888888 WHERE posting_id = :p",
                p=ids["transfer"])  # fmt: skip
        execute(db, "UPDATE allocations SET posting_id = :p WHERE posting_id = 777777",
                p=ids["refund"])  # fmt: skip


def test_checkpoint_seals_heads_and_catches_a_rewritten_tail(history: tuple) -> None:
    db, program, ids = history
    code, output = jifen(db, "ledger", "checkpoint", "--program", program.code)
    assert code == 0
    root = output.split(": ")[1].split()[0]
    # the root kept outside the database is one of the checkpoints', another is not
    code, output = jifen(db, "ledger", "verify", "--program", program.code, "--root", root)
    assert code == 0, output
    code, output = jifen(db, "ledger", "verify", "--program", program.code, "--root", "f" * 64)
    assert code == 1 and f"no checkpoint has the root {'f' * 64}" in output
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


def test_a_problem_is_one_line_naming_its_posting_however_long(history: tuple) -> None:
    # given a posting edited behind the ledger's back
    db, program, ids = history
    execute(db, "UPDATE postings SET reason = 'rewritten' WHERE id = :p", p=ids["refund"])
    # when verify reports it in an 80-column terminal
    code, output = jifen(db, "ledger", "verify", "--program", program.code)
    # then the whole problem is on one line, for grep
    assert code == 1
    assert (
        f"  PROBLEM posting {ids['refund']}: was edited: its lines, lots or fields no longer "
        "match its digest\n"
    ) in output


def test_verify_asks_for_a_migration_on_a_database_without_the_schema(tmp_path: Path) -> None:
    # given an empty SQLite file
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    url = f"sqlite:///{path}"
    # when the ledger is verified
    code, output = jifen(url, "ledger", "verify")
    # then the operator is told to migrate first
    assert code == 2
    assert "error[schema_not_current]" in output
    assert "jifen db upgrade" in output
    # and after `jifen db upgrade` the empty ledger verifies
    code, output = jifen(url, "db", "upgrade")
    assert code == 0
    assert f"schema at revision {head_revision(create_engine(url))}" in output
    code, output = jifen(url, "ledger", "verify")
    assert code == 0, output
    assert "verified 0 postings" in output


@pytest.mark.parametrize(
    "url", ["nonsense", "nonsense://", "mysql://someone@host/db", "postgresql://u:pw@h:port/x"]
)
def test_a_database_url_jifen_cannot_use_is_a_clear_error(url: str) -> None:
    code, output = jifen(url, "ledger", "verify")
    assert code == 2
    assert "error[invalid_database_url]" in output
    assert "Traceback" not in output
    assert ":pw@" not in output  # a password is never echoed


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database, just notes\n" * 100)
    code, output = jifen(f"sqlite:///{path}", "ledger", "verify")
    assert code == 2
    assert "error[database_unreachable]" in output
    assert "file is not a database" in output
    assert "Traceback" not in output


def test_an_sqlite_file_that_cannot_be_created_is_a_clear_error() -> None:
    code, output = jifen("sqlite:////dev/null/jifen/jifen.db", "db", "upgrade")
    assert code == 2
    assert "error[database_unreachable]" in output
    assert "Traceback" not in output


def test_errors_speak_chinese_when_asked(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # given JIFEN_LANGUAGE=zh
    monkeypatch.setenv("JIFEN_LANGUAGE", "zh")
    get_settings.cache_clear()
    try:
        # when a programme that does not exist is checkpointed
        code, output = jifen(db, "ledger", "checkpoint", "--program", "nope")
    finally:
        monkeypatch.delenv("JIFEN_LANGUAGE")
        get_settings.cache_clear()
    # then the one-line error is in Chinese, under the same code
    assert code == 2
    assert "error[unknown_program]: 积分计划 nope 不存在。" in output


def test_a_rule_pack_that_is_not_valid_names_the_field_in_the_users_language(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = new_program(db)
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps({"rules": [{"code": "r", "kind": "fixed", "points": 5}]}))
    said = {}
    for language in ("en", "zh"):
        monkeypatch.setenv("JIFEN_LANGUAGE", language)
        get_settings.cache_clear()
        try:
            code, said[language] = jifen(db, "rules", "load", str(pack), "--program", program.code)
        finally:
            monkeypatch.delenv("JIFEN_LANGUAGE")
            get_settings.cache_clear()
        assert code == 2, said[language]
    assert "error[invalid_input]" in said["en"] and "Field required" in said["en"], said["en"]
    assert "必填,请提供该字段。" in said["zh"] and "Field required" not in said["zh"], said["zh"]


@pytest.mark.parametrize(
    "command", [("import", "orders"), ("import", "members"), ("rules", "load")]
)
def test_a_file_that_is_not_there_or_is_a_folder_is_one_line_in_the_users_language(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, str]
) -> None:
    program = new_program(db)
    said = {}
    for language, given in (("en", tmp_path / "missing.csv"), ("zh", tmp_path)):
        monkeypatch.setenv("JIFEN_LANGUAGE", language)
        get_settings.cache_clear()
        try:
            code, said[language] = jifen(db, *command, str(given), "--program", program.code)
        finally:
            monkeypatch.delenv("JIFEN_LANGUAGE")
            get_settings.cache_clear()
        assert code == 2, said[language]
    assert said["en"].strip() == (
        f"error[no_file]: there is no file {tmp_path / 'missing.csv'}: check its path"
    ), said["en"]
    assert said["zh"].strip() == f"error[no_file]: {tmp_path} 是文件夹,不是文件:请给出文件的路径", (
        said["zh"]
    )


def test_an_import_with_no_folder_for_the_secret_key_stops_before_its_first_row(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = new_program(db)
    rows = tmp_path / "members.csv"
    rows.write_text("external_ref,phone\nC1,13800138000\n")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("JIFEN_DATA_DIR", str(tmp_path / "file" / "data"))
    monkeypatch.delenv("JIFEN_SECRET_KEY", raising=False)
    get_settings.cache_clear()
    try:
        code, output = jifen(db, "import", "members", str(rows), "--program", program.code)
    finally:
        get_settings.cache_clear()
    assert code == 2, output
    assert output.startswith("error[no_secret_key]: cannot keep the secret key in"), output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file", "members.csv"]


def test_a_job_for_a_moment_out_of_range_or_in_the_future_is_refused(history: tuple) -> None:
    db, program, _ = history
    base = ["jobs", "run", "points.expire", "--program", program.code, "--now"]
    for moment in ("0001-01-01T00:00+08:00", "9999-12-31T23:59+00:00"):
        code, output = jifen(db, *base, moment)
        assert (code, "Traceback" in output) == (2, False), output
        assert "outside the years the ledger stores" in output
    ahead = (db.clock.now() + timedelta(days=400)).isoformat()
    code, output = jifen(db, *base, ahead)
    assert code == 2 and "is in the future" in output and "--allow-future" in output
    assert expired(db, program.id) == 0
    code, output = jifen(db, *base, ahead, "--dry-run")  # a dry run may look ahead
    assert code == 0 and "dry run, nothing changed" in output, output
    code, output = jifen(db, *base, ahead, "--allow-future")
    assert code == 0, output
    # Alice's lot and the part of it transferred to Bob (which keeps its date) lapse.
    assert expired(db, program.id) == 2


def test_a_dry_run_of_reconcile_leaves_no_run_behind(history: tuple) -> None:
    db, program, _ = history
    run = ["jobs", "run", "ledger.reconcile", "--program", program.code]
    code, output = jifen(db, *run, "--dry-run")
    assert code == 0 and "dry run, nothing changed" in output, output
    code, output = jifen(db, *run)
    assert code == 0 and ": done in" in output, output


def test_a_birthday_date_out_of_range_and_a_bad_log_level_are_clear_errors(
    history: tuple,
) -> None:
    db, program, _ = history
    code, output = jifen(
        db, "events", "birthdays", "--program", program.code, "--date", "1900-03-01"
    )
    assert code == 2 and "outside the years the ledger stores" in output, output
    code, output = jifen(db, "serve", "--log-level", "loud")
    assert code == 2 and "--log-level: give one of critical" in output, output


def test_the_served_access_log_hides_query_values(db: Database) -> None:
    """A member search by phone carries the number in the query string; ``jifen serve``'s
    access log used to write it in clear."""
    line = support.phone_search_access_log(db, create_app(db, api_settings()), _log_config())
    assert "GET /v1/programs/<code>/members?phone=***&limit=*** HTTP/1.1" in line


@pytest.mark.parametrize(
    "command",
    [["ledger", "verify"], ["ledger", "reconcile"], ["db", "current"], ["audit", "verify"],
     ["rewards", "expire-vouchers", "--program", "x"]],
)  # fmt: skip
def test_a_mistyped_database_path_is_refused_and_left_uncreated(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "typo" / "jifen.db"
    code, output = jifen(f"sqlite:///{missing}", *command)
    assert code == 2, output
    assert f"error[no_database]: there is no database at {missing}" in output
    assert not missing.parent.exists()


def test_a_schema_written_by_a_newer_jifen_is_left_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    assert jifen(url, "db", "upgrade")[0] == 0
    with create_engine(url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    for command in (["db", "upgrade"], ["db", "current"], ["ledger", "verify"]):
        code, output = jifen(url, *command)
        assert code == 2, output
        assert "error[schema_unknown]" in output and "0999" in output and "newer jifen" in output


def test_upgrading_warns_when_postgresql_runs_without_autovacuum(db: Database) -> None:
    code, output = jifen(db, "db", "upgrade")
    assert code == 0, output
    autovacuum = "on"
    if db.dialect == "postgresql":
        with db.engine.connect() as conn:
            autovacuum = conn.execute(text("SHOW autovacuum")).scalar_one()
    # (this machine's PostgreSQL runs with it off; SQLite has no such thing)
    assert ("warning: autovacuum is off" in output) == (autovacuum == "off"), output


def test_demo_reset_deletes_only_an_sqlite_database(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, output = jifen(f"sqlite:///{notes}", "demo", "--reset", "--no-serve", "--members", "5")
    assert code == 2 and "is not an SQLite database" in output, output
    assert notes.read_text() == "my notes\n"


def expired(db: Database, program_id: int) -> int:
    """The programme's expiry postings (the database holds other tests' programmes too)."""
    with db.engine.connect() as conn:
        sql = "SELECT count(*) FROM postings WHERE kind = 'expire' AND program_id = :p"
        return int(conn.execute(text(sql), {"p": program_id}).scalar_one())


def test_a_rule_pack_with_a_byte_order_mark_loads_and_twice_changes_nothing(
    db: Database, tmp_path: Path
) -> None:
    program = new_program(db)
    pack = tmp_path / "pack.json"
    demo = Path(__file__).parents[1] / "src" / "jifen" / "demo" / "rules.json"
    rules = len(json.loads(demo.read_text(encoding="utf-8"))["rules"])
    pack.write_bytes(b"\xef\xbb\xbf" + demo.read_bytes())
    for _ in range(2):  # loaded twice: the second load makes no new version
        code, output = jifen(db, "rules", "load", str(pack), "--program", program.code)
        assert code == 0, output
    assert f"{rules} rules loaded" in output and f"{rules} of them unchanged" in output
    code, output = jifen(db, "rules", "load", str(pack), "--program", program.code, "--activate")
    assert code == 0 and "0 of them unchanged" in output, output  # drafts: live ones are new
    code, output = jifen(db, "rules", "load", str(pack), "--program", program.code, "--activate")
    assert code == 0 and f"{rules} of them unchanged" in output, output
    with db.engine.connect() as conn:
        sql = "SELECT count(*) FROM rule_versions WHERE program_id = :p"
        assert conn.execute(text(sql), {"p": program.id}).scalar_one() == 2 * rules


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"LANG": "zh_CN.UTF-8"}, "zh"),
        ({"LC_ALL": "en_US.UTF-8", "LANG": "zh_CN.UTF-8"}, "en"),
        ({"LANG": "C.UTF-8"}, "en"),
        ({"LANG": "zh_CN.UTF-8", "JIFEN_LANGUAGE": "en"}, "en"),
    ],
)
def test_the_cli_speaks_the_systems_language_unless_told(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: str
) -> None:
    for name in ("LC_ALL", "LC_MESSAGES", "LANG", "JIFEN_LANGUAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert get_settings().language == expected
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("not a url", "'not a url'"),
        # never the password: the address is shown without it
        ("http://jifen:s3cret@nats.example:4222", "'http://***@nats.example:4222'"),
    ],
)
def test_a_worker_given_no_nats_address_says_so(
    db: Database, monkeypatch: pytest.MonkeyPatch, url: str, shown: str
) -> None:
    monkeypatch.setenv("JIFEN_NATS_URL", url)
    get_settings.cache_clear()
    try:
        code, output = jifen(db, "worker", "--no-jobs")
    finally:
        monkeypatch.delenv("JIFEN_NATS_URL")
        get_settings.cache_clear()
    assert code == 2 and "is not a NATS address" in output, output
    assert shown in output and "s3cret" not in output, output


@pytest.mark.parametrize("ack_wait", ["1e10", "inf", "nan"])
def test_a_worker_given_an_ack_wait_no_server_takes_stops_at_once(
    db: Database, ack_wait: str
) -> None:
    """An ack wait the server cannot store (nanoseconds beyond 64 bits) would have the
    worker set up its consumer again and again, forever, saying NATS cannot be reached."""
    code, output = jifen(db, "worker", "--no-jobs", "--ack-wait", ack_wait)
    assert code == 2 and "--ack-wait" in output and "Traceback" not in output, output


def help_of(environment: dict[str, str], *command: str) -> str:
    """``jifen … --help`` as an operator sees it, in a process of its own (the help texts'
    language is settled when jifen.cli is imported), with the whitespace taken out: how a
    line is wrapped is the terminal's business, not the text's."""
    env = {**os.environ, "COLUMNS": "200", **environment}
    done = subprocess.run(
        [sys.executable, "-m", "jifen", *command, "--help"], env=env, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return re.sub(r"\s+", "", done.stdout)


def said(text: str) -> str:
    return re.sub(r"\s+", "", text)


# For each help page: (English, Chinese) texts it shows.
HELP_PAGES: dict[tuple[str, ...], list[tuple[str, str]]] = {
    (): [
        ("loyalty points platform with an exact ledger.", "会员积分平台,账本精确无误。"),
        ("Create and migrate the database schema.", "创建并迁移数据库结构。"),
        ("SQLAlchemy URL; default:", "SQLAlchemy 数据库地址;默认:"),
    ],
    ("ledger", "verify"): [
        ("Recompute every posting digest and hash chain", "重新计算每笔记录的摘要与哈希链"),
        ("Programme code; default: every programme.", "计划代码;默认:所有计划。"),
    ],
    ("jobs", "run"): [
        ("Run a job once for a programme.", "为一个计划运行一次任务。"),
        ("The job, as `jifen jobs list` names it.", "任务名,即 `jifen jobs list` 列出的名称。"),
        ("Allow a --now later than the present", "允许 --now 晚于当前时刻"),
        ("Chunk size.", "每批的大小。"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("command", list(HELP_PAGES), ids=lambda c: " ".join(c) or "jifen")
def test_help_speaks_the_language_asked_for(command: tuple[str, ...]) -> None:
    # given JIFEN_LANGUAGE=zh-CN, then en
    chinese = help_of({"JIFEN_LANGUAGE": "zh-CN"}, *command)
    english = help_of({"JIFEN_LANGUAGE": "en"}, *command)
    # then each help page shows its texts in that language, and not in the other
    for en, zh in HELP_PAGES[command]:
        assert said(zh) in chinese and said(en) not in chinese, (zh, chinese)
        assert said(en) in english and said(zh) not in english, (en, english)


def test_help_prints_in_english_where_the_settings_cannot_be_read() -> None:
    # given Chinese asked for, next to a setting jifen refuses
    environment = {"JIFEN_LANGUAGE": "zh-CN", "JIFEN_DELIVERY_CONCURRENCY": "1000"}
    # when the help is asked for
    shown = help_of(environment, "jobs", "run")
    # then it is printed all the same, in English
    assert said("Run a job once for a programme.") in shown
    assert said("为一个计划运行一次任务。") not in shown


@pytest.mark.parametrize(
    ("language", "said_wrong"), [("en", "less than or equal to 64"), ("zh-CN", "应小于或等于 64")]
)
def test_a_setting_jifen_refuses_is_named_not_a_traceback(language: str, said_wrong: str) -> None:
    # given a setting out of its range
    env = {**os.environ, "JIFEN_LANGUAGE": language, "JIFEN_DELIVERY_CONCURRENCY": "1000"}
    # when a command runs
    done = subprocess.run(
        [sys.executable, "-m", "jifen", "ledger", "verify"], env=env, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    # then it stops, naming the variable and what is wrong with it, in the language asked for
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "error[invalid_setting]: JIFEN_DELIVERY_CONCURRENCY:" in done.stderr, done.stderr
    assert said_wrong in done.stderr, done.stderr


def test_chinese_help_is_shown_whole_in_an_80_column_terminal() -> None:
    # given Chinese help in an 80-column terminal
    shown = help_of({"JIFEN_LANGUAGE": "zh-CN", "COLUMNS": "80"}, "jobs", "run")
    # then a long text is all there, not cut short with "…" (as Rich's tables cut Chinese)
    pause = "每批完成后暂停,时长为该批耗时乘以此倍数,把机器留给线上流量(1.0:约让出一半)。"
    assert said(pause) in shown and "…" not in shown, shown


SHORT_HELPS = """
import typer.main
from jifen.cli import app

def walk(group, path):
    for name, command in group.commands.items():
        print(" ".join([*path, name]), command.get_short_help_str(), sep="\\t")
        if hasattr(command, "commands"):
            walk(command, [*path, name])

walk(typer.main.get_command(app), ["jifen"])
"""


def test_every_command_is_listed_with_a_chinese_summary() -> None:
    # given Chinese help, where Click shortens each command's help for the lists of commands
    done = subprocess.run(
        [sys.executable, "-c", SHORT_HELPS], env={**os.environ, "JIFEN_LANGUAGE": "zh-CN"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = dict(line.split("\t") for line in done.stdout.splitlines())
    # then every command is there with a summary in Chinese, not shortened to nothing ("...")
    assert {"jifen jobs run", "jifen rewards expire-vouchers", "jifen demo"} <= set(listed)
    bare = {name: summary for name, summary in listed.items() if not re.match(r"[^.]*\w", summary)}
    assert bare == {}
    assert all(re.search(r"[\u4e00-\u9fff]", summary) for summary in listed.values()), listed


LOADED = """
import sys
from jifen.cli import app

try:
    app(sys.argv[1:], prog_name="jifen")
except SystemExit:
    pass
print(*sorted(sys.modules), sep="\\n", file=sys.stderr)
"""

HEAVY = (
    "fastapi", "uvicorn", "nats", "alembic", "apscheduler", "sqlalchemy", "psycopg",
    "jifen.api.app", "jifen.auth.service", "jifen.db.migrate", "jifen.db.uow",
    "jifen.demo.credentials", "jifen.demo.service", "jifen.events.service",
    "jifen.events.stream", "jifen.imports.core", "jifen.imports.service",
    "jifen.jobs.scheduler", "jifen.jobs.service", "jifen.points.integrity",
    "jifen.rewards.service", "jifen.rules.schemas", "jifen.rules.service",
)  # fmt: skip
"""What only some commands need: the web stack, the database layer, the domain services."""


@pytest.mark.parametrize(
    "command",
    [("--help",), ("demo", "--help"), ("worker", "--help"), ("import", "orders", "--help"),
     ("totp", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")],
    ids=" ".join,
)  # fmt: skip
def test_help_and_light_commands_start_without_the_services(command: tuple[str, ...]) -> None:
    # given a process of its own, which runs one command that touches no database
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *command], env={**os.environ, "COLUMNS": "200"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip(), done.stderr
    # then the modules only other commands need were never loaded
    loaded = set(done.stderr.splitlines())
    assert [name for name in HEAVY if name in loaded] == []
    assert "pyotp" not in loaded or command[0] == "totp"


def test_ending_a_temporary_upgrade_that_names_no_tier_to_return_to(db: Database) -> None:
    from tests.tiers.test_service import forget_what_it_returns_to, lend_silver_in_double_eleven

    world = lend_silver_in_double_eleven(db, members=2)
    forget_what_it_returns_to(db, world.members[0])
    run = ["jobs", "run", "tiers.end_temporary", "--program", world.program.code]
    code, output = jifen(db, *run, "--now", "2026-12-11T18:15+08:00", "--allow-future")
    assert (code, "Traceback" in output) == (0, False), output
    assert "ended 2" in output
    assert world.tiers() == ["普通", "普通"]


def test_a_dry_run_of_a_job_reports_its_progress_chunk_by_chunk(history: tuple) -> None:
    db, program, _ = history
    run = ["jobs", "run", "points.dormancy", "--program", program.code, "--size", "1"]
    code, output = jifen(db, *run, "--dry-run")
    assert code == 0 and "dry run, nothing changed in 3 chunks" in output, output
    assert "… chunk 1: members 1" in output and "… chunk 2: members 2" in output, output


@pytest.mark.parametrize(
    ("seed", "said"),
    [
        ("JBSWY3DPEHPK3PXP", "too short: a seed has at least 112 bits"),
        ("JBSWY3DPEHPK3PXP1BSWY3DPEHPK3PXP", "not a base32 TOTP seed"),
    ],
)
def test_totp_says_what_is_wrong_with_a_seed(seed: str, said: str) -> None:
    # given a seed too short, then one with a character base32 does not have
    # when `jifen totp` is asked for its code
    code, output = jifen("sqlite://", "totp", seed)
    # then it says which, and prints no code
    assert code == 2, output
    assert said in output, output
    assert not re.search(r"^\d{6}$", output, re.MULTILINE)


def test_totp_takes_a_seed_as_an_authenticator_shows_it() -> None:
    # given a seed in groups of four, in lower case, as an authenticator app shows it
    seed = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    shown = " ".join(seed[i : i + 4] for i in range(0, len(seed), 4)).lower()
    # when `jifen totp` is asked for its code, as it is shown and as it is (twice over
    # should a 30-second step end between the two)
    for _ in range(2):
        code, spaced = jifen("sqlite://", "totp", shown)
        code_plain, plain = jifen("sqlite://", "totp", seed)
        if spaced == plain:
            break
    # then both give the same code of six digits
    assert code == 0 and code_plain == 0, spaced + plain
    assert re.fullmatch(r"\d{6}", spaced.strip()), spaced
    assert spaced == plain
