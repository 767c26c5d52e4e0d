"""The migrations build exactly the schema the code declares, on both backends."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, select

from jifen.api.models import idempotency_records
from jifen.clock import EARLIEST, ManualClock
from jifen.db.base import UTCDateTime
from jifen.db.engine import make_engine
from jifen.db.migrate import (
    alembic_config,
    current_revision,
    head_revision,
    is_current,
    upgrade,
)
from jifen.db.schema import metadata
from jifen.db.uow import Database
from jifen.errors import PaymentUsed
from jifen.events.models import events
from jifen.events.service import order_subject
from jifen.members.api import NOT_STORED
from jifen.members.models import members
from jifen.points.models import accounts
from jifen.programs.models import programs
from jifen.rewards.models import reward_orders
from jifen.rewards.models import rewards as rewards_table
from jifen.rules import service as rules
from jifen.rules.models import earning_caps
from jifen.rules.schemas import ProgramCaps
from tests.conftest import BACKENDS, START, empty_database_url
from tests.rewards.shop import Shop


def test_migrated_schema_matches_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    assert differences == []


def test_0012_waits_for_orders_that_share_a_payment_to_be_put_right(tmp_path: Path) -> None:
    # given a database at 0011 where two orders name one payment (nothing refused it then):
    # made by today's code, then taken back to 0011
    db = Database(f"sqlite:///{tmp_path / 'old.db'}", clock=ManualClock(START))
    upgrade(db.engine)
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    kettle = shop.reward(points=100, cash_fen=900)
    first = shop.redeem(member, kettle.code, payment_ref="pay-1")
    second = shop.redeem(member, kettle.code, payment_ref="pay-2")
    command.downgrade(alembic_config(db.engine), "0011")
    share = reward_orders.update().where(reward_orders.c.id == second.id)
    db.run(lambda uow: uow.conn.execute(share.values(payment_ref="pay-1")))
    # when it is upgraded, it is refused, naming the payment, and nothing changes
    with pytest.raises(RuntimeError, match="'pay-1' × 2"):
        upgrade(db.engine)
    assert current_revision(db.engine) == "0011"
    # once the orders are put right, the upgrade goes through
    db.run(lambda uow: uow.conn.execute(share.values(payment_ref="pay-2b")))
    upgrade(db.engine)
    assert is_current(db.engine)
    with pytest.raises(PaymentUsed, match=f"order {first.id}"):
        shop.redeem(member, kettle.code, payment_ref="pay-1")
    db.dispose()


def test_0026_takes_the_ledgers_foreign_keys_off_and_back_on_sqlite_with_rows_in_place(
    tmp_path: Path,
) -> None:
    # given an SQLite ledger with rows that name each other (SQLite alters a table by copying
    # it: with foreign keys enforced, dropping a table that other rows name would fail)
    db = Database(f"sqlite:///{tmp_path / 'ledger.db'}", clock=ManualClock(START))
    upgrade(db.engine)
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    shop.redeem(member, shop.reward(points=300).code)
    counted = "SELECT (SELECT count(*) FROM postings), (SELECT count(*) FROM lots), " \
        "(SELECT count(*) FROM allocations), (SELECT count(*) FROM lines)"  # fmt: skip

    def counts() -> tuple[Any, ...]:
        with db.engine.connect() as conn:
            return tuple(conn.exec_driver_sql(counted).one())

    def foreign_keys(table: str) -> int:
        with db.engine.connect() as conn:
            return len(conn.exec_driver_sql(f"PRAGMA foreign_key_list({table})").all())

    before = counts()
    # when it goes back to 0025 and up again, every row stays and the keys come and go
    command.downgrade(alembic_config(db.engine), "0025")
    assert (foreign_keys("lots"), foreign_keys("postings")) == (3, 4)
    assert counts() == before
    upgrade(db.engine)
    assert (foreign_keys("lots"), foreign_keys("postings")) == (0, 0)
    assert counts() == before
    with db.engine.connect() as conn:  # enforced again for every other table
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    # a row that leads nowhere keeps the keys from coming back, and nothing changes
    with db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE lines SET account_id = 999999 WHERE id = 1")
    with pytest.raises(RuntimeError, match=r"rows name rows that do not exist.*'lines'"):
        command.downgrade(alembic_config(db.engine), "0025")
    assert current_revision(db.engine) == head_revision(db.engine)
    assert foreign_keys("lines") == 0
    db.dispose()


def test_database_is_at_head_and_upgrading_again_changes_nothing(db: Database) -> None:
    assert head_revision(db.engine) == "0029"
    assert is_current(db.engine)
    upgrade(db.engine)
    assert is_current(db.engine)


@pytest.fixture(params=BACKENDS)
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database of each backend (PostgreSQL: a schema of its own)."""
    for url in empty_database_url(request.param, tmp_path):
        engine = make_engine(url)
        yield engine
        engine.dispose()


def test_events_stored_before_once_per_subject_keep_the_first_of_each(
    empty_engine: Engine,
) -> None:
    """0013 gives the events of the types that became once-only their subject, the first of
    each only (the repeats that paid again keep none), and keys the index by type."""
    engine = empty_engine
    upgrade(engine, "0012")
    now = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # 23:00 in Shanghai

    def event(external_id: str, kind: str, member: int, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "program_id": 1, "source": "pos", "external_id": external_id, "type": kind,
            "member_id": member, "occurred_at": now, "received_at": now, "payload": payload,
            "request_hash": "-", "subject": None,
        }  # fmt: skip

    # Three of the first check-in's repeats, in a chunk after the first (5,000 a chunk).
    filler = [event(f"q{n}", "quiz.answered", 2, {"quiz_id": f"Q{n}"}) for n in range(5_000)]
    late = [event(f"c{n}", "member.checked_in", 1, {}) for n in (3, 4, 5)]

    with engine.begin() as conn:
        conn.execute(programs.insert().values(id=1, code="p", name="p", created_at=now))
        conn.execute(
            members.insert(),
            [
                {"id": m, "program_id": 1, "external_ref": f"m{m}", "created_at": now}
                for m in (1, 2)
            ],
        )
        conn.execute(
            events.insert(),
            [
                event("r1", "referral.completed", 2, {"inviter_member_id": 1}),
                event("r2", "referral.completed", 2, {"inviter_member_id": 1}),
                event("c1", "member.checked_in", 1, {}),
                event("c2", "member.checked_in", 1, {}),
                event("v1", "review.posted", 1, {"review_id": "R1"}),
                event("l1", "review.liked", 1, {"review_id": "R1", "likes": 3}),
                *filler,
                *late,
            ],
        )
    upgrade(engine)
    with engine.connect() as conn:
        subjects = dict(conn.execute(select(events.c.external_id, events.c.subject)).all())
        assert subjects == {
            "r1": "2", "r2": None, "c1": "1:2026-03-02", "c2": None, "v1": "R1", "l1": None,
            "c3": None, "c4": None, "c5": None,
            **{f"q{n}": f"2:Q{n}" for n in range(5_000)},
        }  # fmt: skip
        # An order id that reads like a member's birthday of a year is another subject.
        conn.execute(events.insert(), [
            event("o1", "order.paid", 1, {}) | {"subject": "2:2026"},
            event("b1", "member.birthday", 2, {}) | {"subject": "2:2026"},
        ])  # fmt: skip
    engine.dispose()


def test_0017_qualifies_the_orders_of_merchants_by_their_merchant(empty_engine: Engine) -> None:
    """0017 gives the order events of a merchant the subject ``<merchant>/<order id>``, a
    refund sent for no merchant its order's, and leaves the orders of no merchant bare; the
    downgrade puts the bare ids back."""
    engine = empty_engine
    upgrade(engine, "0016")
    now = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
    long_id = "L" * 100

    def event(external_id: str, kind: str, order_id: str, merchant: str | None) -> dict[str, Any]:
        return {
            "program_id": 1, "source": "pos", "external_id": external_id, "type": kind,
            "member_id": 1, "occurred_at": now, "received_at": now,
            "payload": {"order_id": order_id}, "request_hash": "-", "subject": order_id,
            "merchant": merchant,
        }  # fmt: skip

    with engine.begin() as conn:
        conn.execute(programs.insert().values(id=1, code="p", name="p", created_at=now))
        conn.execute(members.insert().values(id=1, program_id=1, external_ref="m1", created_at=now))
        conn.execute(
            events.insert(),
            [
                event("a1", "order.paid", "1001", "mall/a"),
                event("a2", "order.refunded", "1001", "mall/a"),
                event("a3", "order.refunded", "1001", None),  # sent by programme-wide keys
                event("n1", "order.paid", "2002", None),
                event("n2", "order.refunded", "2002", None),
                event("s1", "order.paid", "x/1", None),
                event("p1", "order.paid", "3%", "100%"),
                event("l1", "order.paid", long_id, "m" * 64),
            ],
        )
    upgrade(engine, "0017")
    digest = hashlib.sha256(f"{'m' * 64}/{long_id}".encode()).hexdigest()
    wanted = {
        "a1": "mall%2Fa/1001", "a2": "mall%2Fa/1001", "a3": "mall%2Fa/1001", "n1": "2002",
        "n2": "2002", "s1": "/x/1", "p1": "100%25/3%", "l1": f"sha256:{digest}",
    }  # fmt: skip
    for external_id, subject in wanted.items():
        merchant = {"a1": "mall/a", "p1": "100%", "l1": "m" * 64}.get(external_id)
        order_id = {"a1": "1001", "s1": "x/1", "p1": "3%", "l1": long_id}.get(external_id)
        if order_id is not None:  # the service computes the same subjects
            assert order_subject(merchant, order_id) == subject
    with engine.connect() as conn:
        subjects = dict(conn.execute(select(events.c.external_id, events.c.subject)).all())
    assert subjects == wanted
    command.downgrade(alembic_config(engine), "0016")
    with engine.connect() as conn:
        subjects = dict(conn.execute(select(events.c.external_id, events.c.subject)).all())
    assert subjects == {
        "a1": "1001", "a2": "1001", "a3": "1001", "n1": "2002", "n2": "2002", "s1": "x/1",
        "p1": "3%", "l1": long_id,
    }  # fmt: skip
    engine.dispose()


def test_0019_names_the_member_of_each_stored_answer_and_erases_the_erased_ones(
    empty_engine: Engine,
) -> None:
    """0019 gives each answer stored before the member it shows (a profile's id, a family
    group's main account, an answer's member_id), keeps a family group without its other
    members' references and names, erases the answers about members erased before, and
    leaves an erasure's answer and an answer about no member as they were."""
    engine = empty_engine
    upgrade(engine, "0017")
    now = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
    profile = {
        "id": 1, "program_id": 1, "external_ref": "m1", "name": "王芳", "email": None,
        "tags": [], "state": "active",
    }  # fmt: skip
    family = {
        "main_member_id": 1,
        "members": [
            {"member_id": 1, "external_ref": "m1", "name": "王芳", "main": True},
            {"member_id": 2, "external_ref": "m2", "name": "李雷", "main": False},
        ],
    }
    erasure = {"member_id": 2, "state": "closed", "erased": True, "erased_at": now.isoformat()}
    bodies = {
        "profile": profile,
        "family": family,
        "posting": {"id": 7, "member_id": 1, "amount": 100},
        "staff": {"id": 3, "username": "ops"},
        "erased": {**profile, "id": 2, "external_ref": "m2", "name": "李雷"},
        "erasure": erasure,
    }
    status = {"profile": 201, "posting": 201}
    with engine.begin() as conn:
        conn.execute(programs.insert().values(id=1, code="p", name="p", created_at=now))
        conn.execute(
            members.insert(),
            [
                {"id": 1, "program_id": 1, "external_ref": "m1", "created_at": now},
                {"id": 2, "program_id": 1, "external_ref": "erased:2", "created_at": now},
            ],
        )
        conn.execute(
            idempotency_records.insert(),
            [
                {"scope": "staff:1", "key": key, "request_hash": "-", "created_at": now,
                 "status_code": status.get(key, 200), "body": body}
                for key, body in bodies.items()
            ],
        )  # fmt: skip
    upgrade(engine)
    with engine.connect() as conn:
        rows = {
            row.key: row
            for row in conn.execute(
                select(
                    idempotency_records.c.key, idempotency_records.c.member_id,
                    idempotency_records.c.status_code, idempotency_records.c.body,
                )
            )
        }  # fmt: skip
    about = {key: (row.member_id, row.status_code) for key, row in rows.items()}
    assert about == {
        "profile": (1, 201), "family": (1, 200), "posting": (1, 201), "staff": (None, 200),
        "erased": (2, 410), "erasure": (None, 200),
    }  # fmt: skip
    assert rows["erased"].body == {"erased_member_id": 2, "status_code": 200}
    assert [m["name"] for m in rows["family"].body["members"]] == ["王芳", NOT_STORED]
    assert rows["family"].body["members"][1]["external_ref"] == NOT_STORED
    for key in ("profile", "posting", "staff", "erasure"):
        assert rows[key].body == bodies[key], key
    command.downgrade(alembic_config(engine), "0017")
    assert current_revision(engine) == "0017"
    engine.dispose()


def test_0018_gives_each_member_account_its_member_state(empty_engine: Engine) -> None:
    """0018 gives every member account its member's state (system accounts and the
    accounts of active members stay active); the downgrade takes the column away."""
    engine = empty_engine
    upgrade(engine, "0017")
    now = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
    states = {1: "active", 2: "frozen", 3: "banned", 4: "closed"}
    with engine.begin() as conn:
        conn.execute(programs.insert().values(id=1, code="p", name="p", created_at=now))
        conn.execute(
            members.insert(),
            [
                {"id": m, "program_id": 1, "external_ref": f"m{m}", "state": state,
                 "created_at": now}
                for m, state in states.items()
            ],
        )  # fmt: skip
        conn.execute(
            sa.text(
                "INSERT INTO accounts (program_id, member_id, system_code, created_at) "
                "VALUES (1, NULL, 'issued', :now), (1, 1, NULL, :now), (1, 2, NULL, :now), "
                "(1, 3, NULL, :now), (1, 4, NULL, :now)"
            ),
            {"now": now},
        )
    upgrade(engine, "0018")
    with engine.connect() as conn:
        carried = dict(conn.execute(select(accounts.c.member_id, accounts.c.member_state)).all())
    assert carried == {None: "active", **states}
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(accounts.update().where(accounts.c.member_id == 1).values(member_state="x"))
    command.downgrade(alembic_config(engine), "0017")
    with engine.connect() as conn:
        columns = {column["name"] for column in sa.inspect(conn).get_columns("accounts")}
    assert "member_state" not in columns
    engine.dispose()


def test_0020_gives_orders_a_time_to_be_paid_by(empty_engine: Engine) -> None:
    """0020 adds ``reward_orders.pay_by``, NULL for the orders made before; an order awaiting
    payment must have one; the downgrade takes the column away and keeps the orders."""
    engine = empty_engine
    upgrade(engine, "0019")
    now = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)

    def order(key: str, state: str, **more: Any) -> dict[str, Any]:
        return {
            "program_id": 1, "member_id": 1, "reward_id": 1, "idempotency_key": key,
            "request_hash": "-", "state": state, "quantity": 1, "points": 100, "price": [],
            "outcome": {}, "created_at": now, "updated_at": now, **more,
        }  # fmt: skip

    with engine.begin() as conn:
        conn.execute(programs.insert().values(id=1, code="p", name="p", created_at=now))
        conn.execute(members.insert().values(id=1, program_id=1, external_ref="m1", created_at=now))
        conn.execute(
            rewards_table.insert().values(
                id=1, program_id=1, code="kettle", kind="physical", points=100, terms={},
                created_at=now, updated_at=now,
            )
        )  # fmt: skip
        conn.execute(reward_orders.insert().values(order("before", "created")))
    upgrade(engine, "0020")
    with engine.begin() as conn:
        conn.execute(
            reward_orders.insert().values(
                order("awaiting", "awaiting_payment", pay_by=now + timedelta(minutes=30))
            )
        )
        kept = dict(
            conn.execute(select(reward_orders.c.idempotency_key, reward_orders.c.pay_by)).all()
        )
    assert kept == {"before": None, "awaiting": now + timedelta(minutes=30)}
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(reward_orders.insert().values(order("no-time", "awaiting_payment")))
    command.downgrade(alembic_config(engine), "0019")
    with engine.connect() as conn:
        columns = {column["name"] for column in sa.inspect(conn).get_columns("reward_orders")}
        left = conn.execute(select(func.count()).select_from(sa.table("reward_orders"))).scalar()
    assert "pay_by" not in columns and left == 2
    engine.dispose()


def test_0028_carries_the_caps_on_record_over_as_their_first_version(
    empty_engine: Engine,
) -> None:
    """0028 keys the earning caps by the time they took effect: the caps on record become the
    first version, in force since the earliest time jifen stores (an event of any time is
    capped by them, as before) until caps are set again; the downgrade keeps the current
    ones."""
    engine = empty_engine
    upgrade(engine, "0027")
    now = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
    stored = sa.table(
        "earning_caps", sa.column("program_id", sa.Integer()), sa.column("caps", sa.JSON()),
        sa.column("updated_at", UTCDateTime()),
    )  # fmt: skip
    with engine.begin() as conn:
        conn.execute(programs.insert().values(id=1, code="p", name="p", created_at=now))
        conn.execute(stored.insert().values(program_id=1, caps={"budget": 700}, updated_at=now))
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(select(earning_caps.c.active_from)).scalars().all() == [EARLIEST]
    db = Database(engine.url.render_as_string(hide_password=False), clock=ManualClock(now))
    a_year_before = now - timedelta(days=365)

    def budget(at: datetime | None) -> int | None:
        return db.run(lambda uow: rules.get_caps(uow, program_id=1, at=at).budget)

    assert (budget(a_year_before), budget(now), budget(None)) == (700, 700, 700)
    db.clock = ManualClock(now + timedelta(days=1))
    db.run(lambda uow: rules.set_caps(uow, program_id=1, caps=ProgramCaps(budget=900)))
    assert (budget(a_year_before), budget(now), budget(None)) == (700, 700, 900)
    db.dispose()
    command.downgrade(alembic_config(engine), "0027")
    with engine.connect() as conn:
        kept = conn.execute(select(stored.c.caps, stored.c.updated_at)).all()
    assert [(caps["budget"], at) for caps, at in kept] == [(900, now + timedelta(days=1))]
    engine.dispose()


def test_0025_makes_a_registration_and_a_completed_profile_once_per_member(
    empty_engine: Engine,
) -> None:
    """0025 gives the registrations and completed profiles stored before their member as
    subject, the first of each member only (the repeats that paid again keep none); the
    index then refuses another."""
    engine = empty_engine
    upgrade(engine, "0024")
    now = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)

    def event(external_id: str, kind: str, member: int) -> dict[str, Any]:
        return {
            "program_id": 1, "source": "app", "external_id": external_id, "type": kind,
            "member_id": member, "occurred_at": now, "received_at": now, "payload": {},
            "request_hash": "-", "subject": None,
        }  # fmt: skip

    with engine.begin() as conn:
        conn.execute(programs.insert().values(id=1, code="p", name="p", created_at=now))
        conn.execute(
            members.insert(),
            [
                {"id": m, "program_id": 1, "external_ref": f"m{m}", "created_at": now}
                for m in (1, 2)
            ],
        )
        conn.execute(
            events.insert(),
            [
                event("g1", "member.registered", 1),
                event("g2", "member.registered", 1),
                event("g3", "member.registered", 2),
                event("p1", "member.profile_completed", 2),
                event("p2", "member.profile_completed", 2),
                event("l1", "member.logged_in", 2),
            ],
        )
    upgrade(engine)
    with engine.connect() as conn:
        subjects = dict(conn.execute(select(events.c.external_id, events.c.subject)).all())
    assert subjects == {"g1": "1", "g2": None, "g3": "2", "p1": "2", "p2": None, "l1": None}
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(events.insert().values(event("g4", "member.registered", 2) | {"subject": "2"}))
    engine.dispose()
