"""The demo programme: a deterministic, sound year of history, built once by ``jifen demo``."""

from __future__ import annotations

import stat
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from typer.testing import CliRunner

from jifen.api.app import create_app
from jifen.auth.core import BUILTIN_ROLES
from jifen.cli import app
from jifen.clock import ManualClock
from jifen.db import migrate
from jifen.db.uow import Database
from jifen.demo import credentials
from jifen.demo import service as demo
from jifen.members import service as members_service
from jifen.points.models import postings
from jifen.programs import service as programs
from jifen.rewards.models import reward_orders, rewards
from jifen.settings import get_settings
from tests.api.conftest import api_settings
from tests.conftest import START
from tests.factories import assert_ledger_sound

runner = CliRunner()
EVERY_KIND = {"earn", "spend", "refund", "reverse", "transfer", "freeze", "unfreeze", "adjust",
              "expire"}  # fmt: skip


def jifen(url: str, *args: str) -> tuple[int, str]:
    """Run the command; ``demo`` without serving the API afterwards."""
    if args and args[0] == "demo":
        args = (*args, "--no-serve")
    result = runner.invoke(app, ["--database-url", url, *args])
    return result.exit_code, result.output


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data directory of the test's own (the demo keeps its credentials there)."""
    monkeypatch.setenv("JIFEN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


def unique_code() -> str:
    return f"demo-{uuid.uuid4().hex[:10]}"


def history_of(db: Database, program_id: int) -> list[tuple[object, ...]]:
    """Each posting's facts but its id, in order: what two equal histories share."""
    query = (
        select(postings.c.kind, postings.c.amount, postings.c.created_at, postings.c.reason)
        .where(postings.c.program_id == program_id)
        .order_by(postings.c.id)
    )
    with db.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


# --------------------------------------------------------------------------- the generator


def test_a_built_year_is_sound_ends_now_and_has_every_kind_of_posting(db: Database) -> None:
    # given a database (SQLite, then PostgreSQL), its own clock, and the moment "now"
    own_clock = db.clock
    end = db.clock.now()
    code = unique_code()
    # when a small demo is built to end now
    built = demo.build(db, members=20, seed=3, end=ManualClock(end), code=code)
    # then reconcile and verify are clean, and the year has a bit of everything
    assert_ledger_sound(db, built.program_id)
    summary = demo.summary(db, code=code)
    assert summary.members == 20
    assert set(summary.postings) >= EVERY_KIND
    assert summary.complete and summary.ok
    # Refusals happened and were survived: on PostgreSQL a failed statement would have
    # aborted the day's transaction, so a refusal must come before any write.
    assert built.refused.get("insufficient_points", 0) > 0
    # The figures account for every point: what was issued is redeemed, donated, exchanged
    # out, expired, frozen, held by members or owed by them.
    assert (
        summary.figure("issued") + summary.figure("adjustments") + summary.figure("receivable")
        == summary.figure("redeemed") + summary.figure("charity") + summary.figure("partners")
        + summary.figure("expired") + summary.figure("frozen") + summary.member_total
    )  # fmt: skip
    assert summary.figure("charity") > 0 and summary.figure("partners") > 0
    # The postings fill the year before now, up to its last day, and time never ran back.
    moments = [row[2] for row in history_of(db, built.program_id)]
    assert end - timedelta(days=365) <= min(moments) <= end - timedelta(days=300)
    assert end - timedelta(days=1) <= max(moments) <= end
    assert moments == sorted(moments)
    # The database keeps its own clock.
    assert db.clock is own_clock


def test_the_same_seed_gives_the_same_history_and_another_seed_another(
    tmp_path: Path,
) -> None:
    # given one moment for the histories to end at, and a fresh database for each build, as
    # `jifen demo` (and `--reset`) builds the demo in one (the property is the generator's
    # own, so one backend and six weeks of history show it); two programmes in one database
    # are two programmes, whose lotteries draw apart even for the same order keys
    end = START

    def build(seed: int) -> list[tuple[object, ...]]:
        db = Database(f"sqlite:///{tmp_path / f'demo-{uuid.uuid4().hex[:8]}.db'}",
                      clock=ManualClock(end))  # fmt: skip
        try:
            migrate.upgrade(db.engine)
            built = demo.build(db, members=30, seed=seed, end=ManualClock(end), days=42)
            draws = (
                select(reward_orders.c.outcome["draw"])
                .join(rewards, rewards.c.id == reward_orders.c.reward_id)
                .where(rewards.c.kind == "lottery")
                .order_by(reward_orders.c.id)
            )
            with db.engine.connect() as conn:
                drawn = [tuple(row) for row in conn.execute(draws)]
            return [*history_of(db, built.program_id), *drawn,
                    tuple(sorted(built.refused.items()))]  # fmt: skip
        finally:
            db.dispose()

    # when the demo is built twice with seed 11 and once with seed 12
    first, again, other = build(11), build(11), build(12)
    # then the first two are the same posting for posting, the third differs
    assert len(first) > 20
    assert any("roll" in str(row) for row in first)  # lottery draws among them
    assert first == again
    assert first != other


# --------------------------------------------------------------------------- jifen demo


def test_jifen_demo_builds_once_shows_the_same_summary_again_and_resets(tmp_path: Path) -> None:
    # given a fresh embedded database file
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    # when `jifen demo` runs
    code, output = jifen(url, "demo", "--members", "40")
    # then it built the programme and its summary says the ledger is sound
    assert code == 0, output
    assert "built 40 members" in output
    # with no terminal to draw a bar on, a progress line a month of history
    assert "… day 30 of 365" in output and "… day 360 of 365" in output
    assert "示例会员计划 / Demo loyalty programme (programme `demo`)" in output
    assert "40 members, " in output
    for row in ("issued", "redeemed", "expired", "frozen", "held by members", "owed by"):
        assert row in output
    assert "reconcile: ok" in output
    assert "verify: ok" in output
    # when it runs again
    code, again = jifen(url, "demo", "--members", "40")
    # then it builds nothing and prints the same summary
    assert code == 0, again
    assert "exists already" in again
    assert "built" not in again
    assert again[again.index("示例会员计划") :] == output[output.index("示例会员计划") :]
    database = Database(url)
    try:
        program = database.run(lambda u: programs.get_program(u, code="demo"))
        assert program.time_zone == "Asia/Shanghai"
        assert_ledger_sound(database, program.id)
        assert len(database.run(programs.list_programs)) == 1
    finally:
        database.dispose()
    # when it is reset, with fewer members and fewer days
    code, output = jifen(url, "demo", "--members", "6", "--days", "20", "--reset")
    # then the file was built again from scratch, schema included, with as many days as asked
    assert code == 0, output
    assert "built 6 members and 20 days of history" in output
    assert "6 members, " in output
    code, output = jifen(url, "db", "current")
    assert code == 0
    assert f"current: {migrate.head_revision(create_engine(url))}" in output


def test_jifen_demo_prints_credentials_that_work(tmp_path: Path, data_dir: Path) -> None:
    # given the demo, built
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    code, output = jifen(url, "demo", "--members", "5", "--days", "20")
    assert code == 0, output
    # then it printed one sign-in per built-in role, the member and a merchant key
    kept = credentials.load(data_dir, "demo")
    assert kept is not None
    assert [c.who for c in kept] == [f"staff:{role}" for role in BUILTIN_ROLES] + [
        "member", "api_key"
    ]  # fmt: skip
    for item in kept:
        assert item.login in output and (item.password or item.token) in output
    assert stat.S_IMODE((data_dir / "demo-credentials.json").stat().st_mode) == 0o600
    by_who = {c.who: c for c in kept}
    database = Database(url)
    try:
        with TestClient(create_app(database, api_settings())) as client:
            # the merchant key reads the demo member's balance
            member = database.run(
                lambda u: members_service.find_member(
                    u, program_id=programs.get_program(u, code="demo").id, external_ref="M000001"
                )
            )
            balance = client.get(
                f"/v1/programs/demo/members/{member.id}/points",
                headers={"Authorization": f"Bearer {by_who['api_key'].token}"},
            )
            assert balance.status_code == 200, balance.text
            # the operator signs in with its password and the code `jifen totp` prints
            code, totp = jifen(url, "totp", by_who["staff:operator"].totp_secret)
            operator = by_who["staff:operator"]
            signed_in = client.post(
                "/v1/auth/staff/sign-in",
                json={"username": operator.login, "password": operator.password,
                      "totp_code": totp.strip()},
            )  # fmt: skip
            assert signed_in.status_code == 200, signed_in.text
            # the member signs in with its password
            member_in = client.post(
                "/v1/auth/members/sign-in",
                json={"program": "demo", "login": "M000001",
                      "password": by_who["member"].password},
            )  # fmt: skip
            assert member_in.status_code == 200, member_in.text
    finally:
        database.dispose()
    # when the demo runs again, the same credentials are printed; after --reset, new ones
    code, again = jifen(url, "demo")
    assert code == 0 and by_who["member"].password in again
    code, rebuilt = jifen(url, "demo", "--members", "5", "--days", "20", "--reset")
    assert code == 0 and by_who["member"].password not in rebuilt


def test_jifen_demo_reset_keeps_a_database_holding_another_programme(tmp_path: Path) -> None:
    # given the embedded database, where a real programme lives beside the demo
    url = f"sqlite:///{tmp_path / 'jifen.db'}"
    code, output = jifen(url, "demo", "--members", "5", "--days", "10")
    assert code == 0, output
    database = Database(url)
    try:
        database.run(lambda u: programs.create_program(u, code="shop", name="Shop"))
    finally:
        database.dispose()
    # when the demo is reset on it
    code, output = jifen(url, "demo", "--members", "5", "--reset")
    # then nothing is deleted: it says which programme the file holds
    assert code == 2, output
    assert "error[invalid_input]: --reset:" in output and "shop" in output, output
    database = Database(url)
    try:
        codes = {program.code for program in database.run(programs.list_programs)}
    finally:
        database.dispose()
    assert codes == {"demo", "shop"}


def test_jifen_demo_is_not_built_into_a_database_holding_another_programme(
    tmp_path: Path,
) -> None:
    # given a database where a real programme lives
    url = f"sqlite:///{tmp_path / 'jifen.db'}"
    code, output = jifen(url, "db", "upgrade")
    assert code == 0, output
    database = Database(url)
    try:
        database.run(lambda u: programs.create_program(u, code="shop", name="Shop"))
    finally:
        database.dispose()
    # when the demo is asked for on it
    code, output = jifen(url, "demo", "--members", "5")
    # then nothing is built: no demo programme, members or staff with printed passwords
    assert code == 2, output
    assert "error[invalid_input]:" in output and "shop" in output, output
    assert "demo credentials" not in output
    database = Database(url)
    try:
        codes = {program.code for program in database.run(programs.list_programs)}
        with database.engine.connect() as conn:
            staff = conn.execute(text("SELECT count(*) FROM staff_users")).scalar_one()
    finally:
        database.dispose()
    assert (codes, staff) == ({"shop"}, 0)


def test_jifen_demo_with_no_folder_for_its_secret_key_says_so_and_builds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a data directory that cannot be made (a file stands in its way), no secret key
    # given in the environment, and the database elsewhere
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("JIFEN_DATA_DIR", str(tmp_path / "file" / "data"))
    monkeypatch.delenv("JIFEN_SECRET_KEY", raising=False)
    get_settings.cache_clear()
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    # when the demo is built
    code, output = jifen(url, "demo", "--members", "5")
    # then it says, in one line, what to set, and no demo is left half-built
    assert code == 2, output
    assert output.startswith("error[no_secret_key]: cannot keep the secret key in"), output
    database = Database(url)
    try:
        assert not demo.exists(database)
    finally:
        database.dispose()


def test_jifen_demo_reset_keeps_a_database_it_cannot_read(tmp_path: Path) -> None:
    # given a file with an SQLite header whose content is damaged
    damaged = tmp_path / "jifen.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    # when the demo is reset on it
    code, output = jifen(f"sqlite:///{damaged}", "demo", "--members", "5", "--reset")
    # then it says so in one line and leaves the file as it is
    assert code == 2, output
    assert output.startswith("error[invalid_input]: --reset:") and "cannot be read" in output
    assert damaged.read_bytes().startswith(b"SQLite format 3\x00\xff")


def test_jifen_demo_reset_refuses_a_database_that_is_not_embedded() -> None:
    # given a PostgreSQL URL (never reached: the refusal comes first)
    url = "postgresql://nobody@127.0.0.1:1/production"
    # when --reset is asked for
    code, output = jifen(url, "demo", "--reset")
    # then it refuses in one line and deletes nothing
    assert code == 2
    assert "error[invalid_input]: --reset: only the embedded SQLite" in output
    assert "Traceback" not in output


def test_jifen_demo_says_when_an_earlier_build_was_interrupted(tmp_path: Path) -> None:
    # given a demo programme that was created but never sealed (a build cut short)
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    database = Database(url)
    try:
        migrate.upgrade(database.engine)
        database.run(lambda u: programs.create_program(u, code="demo", name=demo.DEMO_NAME))
    finally:
        database.dispose()
    # when `jifen demo` runs
    code, output = jifen(url, "demo")
    # then it does not pass the stub off as a demo, and says how to start over
    assert code == 1
    assert "not built to the end" in output
    assert "jifen demo --reset" in output


def test_jifen_demo_says_in_chinese_when_an_earlier_build_was_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a build cut short, and JIFEN_LANGUAGE=zh
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    database = Database(url)
    try:
        migrate.upgrade(database.engine)
        database.run(lambda u: programs.create_program(u, code="demo", name=demo.DEMO_NAME))
    finally:
        database.dispose()
    monkeypatch.setenv("JIFEN_LANGUAGE", "zh")
    get_settings.cache_clear()
    # when `jifen demo` runs
    code, output = jifen(url, "demo")
    # then it says so, and how to start over, in Chinese
    assert code == 1
    assert "示例计划未生成完毕" in output and "jifen demo --reset" in output, output
    assert "not built to the end" not in output
